"""Which quantized checkpoints MacDrop can mask exactly, read from the model's config.json (a local
folder, or a hub id already in the Hugging Face cache; nothing is downloaded).

LLaMA-Factory loads a checkpoint that is already quantized (``quantization_config`` in its
config.json) as it is: GPTQ/AWQ/AQLM/EETQ/HQQ/... layers store packed integer codes (``qweight``,
``W_q``, ...) that no MacDrop storage backend edits exactly, so such a run is refused before
the model loads. FP8 and MXFP4 checkpoints LLaMA-Factory dequantizes at load (plain tensors),
and a bitsandbytes 4-bit checkpoint loads as bitsandbytes 4-bit weights: those are supported.
Pure: no LLaMA-Factory import (the integration module calls it with the user's arguments).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

#: quant_method values whose weights reach MacDrop in a storage it masks exactly
DEQUANTIZED_AT_LOAD = ("fp8", "mxfp4")  # LLaMA-Factory 0.9.5 passes dequantize=True for these


def config_json_path(model_name_or_path: str, cache_dir: Optional[str] = None,
                     revision: Optional[str] = None) -> Optional[str]:
    """Where the model's config.json can be read WITHOUT any download: a local model folder's, or
    for a hub id (``org/name``) the copy already in the Hugging Face cache; None otherwise."""
    name = str(model_name_or_path)
    local = Path(name) / "config.json"
    if local.is_file():
        return str(local)
    if Path(name).exists() or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision or None)
    except Exception:  # an id the cache layout cannot hold, ...: nothing to check before load
        return None
    return found if isinstance(found, str) else None


def read_config_json(model_name_or_path: str, cache_dir: Optional[str] = None,
                     revision: Optional[str] = None) -> Optional[tuple[str, dict]]:
    """(path, contents) of the model's config.json where :func:`config_json_path` finds one."""
    path = config_json_path(model_name_or_path, cache_dir, revision)
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (path, data) if isinstance(data, dict) else None


def checkpoint_quantization(model_name_or_path: str, cache_dir: Optional[str] = None,
                            revision: Optional[str] = None) -> Optional[dict]:
    """The ``quantization_config`` of the model's config.json (local folder, or a hub id already in
    the cache), or None (not found, not quantized). Nothing is downloaded: where no config.json
    is at hand the storage factory still refuses any weight it cannot mask, once the model loaded."""
    found = read_config_json(model_name_or_path, cache_dir, revision)
    quantization = found[1].get("quantization_config") if found else None
    return quantization if isinstance(quantization, dict) and quantization else None


def unsupported_checkpoint_reason(quantization: dict) -> Optional[str]:
    """Why MacDrop cannot mask a checkpoint quantized this way, or None when it can."""
    method = str(quantization.get("quant_method", "")).lower()
    if method in DEQUANTIZED_AT_LOAD:
        return None
    if method == "bitsandbytes":
        if quantization.get("load_in_4bit") and not quantization.get("load_in_8bit"):
            return None
        return ("its bitsandbytes 8-bit weights (LLM.int8) are not masked by MacDrop (only 4-bit bitsandbytes "
                "weights are)")
    return (f"its layers store {method or 'unknown'}-packed codes, which MacDrop cannot mask exactly (supported: "
            "unquantized, bitsandbytes 4-bit, or FP8/MXFP4 checkpoints that LLaMA-Factory dequantizes at load)")
