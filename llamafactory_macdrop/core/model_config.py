"""A model's config.json as the checkpoint has it, WITHOUT any download: a local folder's, or a hub
id's copy already in the Hugging Face cache.

Why the checkpoint's own file and not the live config: transformers' ``Trainer.train`` rewrites
``bos_token_id``/``eos_token_id`` (the locator's probe candidates), and the plugin's pre-load checks
(layer/index ranges, quantized checkpoints) run before any model exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def config_json_path(
    model_name_or_path: str, cache_dir: Optional[str] = None, revision: Optional[str] = None
) -> Optional[str]:
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


def read_config_json(
    model_name_or_path: str, cache_dir: Optional[str] = None, revision: Optional[str] = None
) -> Optional[tuple[str, dict]]:
    """(path, contents) of the model's config.json where :func:`config_json_path` finds one."""
    path = config_json_path(model_name_or_path, cache_dir, revision)
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (path, data) if isinstance(data, dict) else None


def decoder_config(config: dict) -> dict:
    """The decoder's part of a config.json: a multimodal config's ``text_config`` where it names the
    layers, else the config itself."""
    text = config.get("text_config")
    return text if isinstance(text, dict) and "num_hidden_layers" in text else config


#: config.json keys that only a mixture-of-experts model has (its FFN rows live in experts)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def is_moe(config: dict) -> bool:
    """Whether a config.json (its decoder part) describes a mixture-of-experts model."""
    return any(k in decoder_config(config) for k in MOE_KEYS)


#: config.json keys that give an FFN's width (intermediate units): dense (Llama, OPT, GPT-2) and MoE
#: (an expert's width, a shared expert's); a per-layer list (Gemma-3n) counts by its widest layer
FFN_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size")


def ffn_widths(config: dict) -> dict[str, int]:
    """{key: width} for every FFN width the config names (a list: its largest entry). No layer of
    the model can have more intermediate units than the largest of them."""
    cfg = decoder_config(config)
    out = {}
    for key in FFN_WIDTH_KEYS:
        value = cfg.get(key)
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = max(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = value
    return out


def vocab_size(config: dict) -> Optional[int]:
    """The config's ``vocab_size`` (a multimodal config: its ``text_config``'s), or None."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = config.get("vocab_size", text.get("vocab_size"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
