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

from typing import Optional

from ..core.model_config import read_config_json

#: quant_method values whose weights reach MacDrop in a storage it masks exactly
DEQUANTIZED_AT_LOAD = ("fp8", "mxfp4")  # LLaMA-Factory 0.9.5 passes dequantize=True for these


def checkpoint_quantization(
    model_name_or_path: str, cache_dir: Optional[str] = None, revision: Optional[str] = None
) -> Optional[dict]:
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
        return (
            "its bitsandbytes 8-bit weights (LLM.int8) are not masked by MacDrop (only 4-bit bitsandbytes weights are)"
        )
    return (
        f"its layers store {method or 'unknown'}-packed codes, which MacDrop cannot mask exactly (supported: "
        "unquantized, bitsandbytes 4-bit, or FP8/MXFP4 checkpoints that LLaMA-Factory dequantizes at load)"
    )
