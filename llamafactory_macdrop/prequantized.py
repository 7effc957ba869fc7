"""Which quantized checkpoints MacDrop can mask exactly, read from the model folder's config.json.

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


def checkpoint_quantization(model_name_or_path: str) -> Optional[dict]:
    """The ``quantization_config`` of a LOCAL model folder's config.json, or None (not a folder,
    no config.json, not quantized). Hub ids are not looked up: the storage factory still refuses
    any weight it cannot mask, once the model has loaded."""
    config = Path(str(model_name_or_path)) / "config.json"
    if not config.is_file():
        return None
    try:
        quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return None
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
