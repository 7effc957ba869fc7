"""What the command groups share: model/tokenizer loading and argument types."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str):
    """The model's tokenizer, or None. A local folder without tokenizer files gets None: transformers
    would build an empty tokenizer of the model type there, whose special-token ids are not the model's."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def token_arg(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def indices_arg(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]
