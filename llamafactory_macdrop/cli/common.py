"""What the command groups share: model/tokenizer loading and argument types."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelPathError(FileNotFoundError):
    """MODEL names no model this command can load (one line, exit 2)."""


def check_model(path: str) -> None:
    """One line, before anything loads, when MODEL is not a model folder (or a hub id that resolves).

    A local path must be a folder with config.json; a name that is no local path is tried as a hub
    id (transformers' own config lookup, which answers at once offline)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelPathError(f"{path}: no config.json in that folder: give a Hugging Face model folder "
                                 "(config.json and weights; `macdrop convert-gguf` makes one from a GGUF file)")
        return
    if folder.exists():
        raise ModelPathError(f"{path} is a file, not a model folder: give the folder that holds config.json")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelPathError(f"{path}: no such folder, and not a model the hub serves here ({reason[:160]})") from None


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    check_model(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).eval()
    except OSError as err:  # a folder whose weights are missing or unreadable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelPathError(f"{path}: the model does not load ({reason[:200]})") from None


def config_facts(path: str) -> tuple:
    """(config bos_token_id, vocab_size) from the checkpoint's config.json, before the model loads
    (Nones when it cannot be read): what the prefix checks name and bound."""
    from ..core.model_config import read_config_json, vocab_size
    from ..core.text_prefix import config_bos_token_id

    found = read_config_json(path)
    if found is None:
        return None, None
    return config_bos_token_id(found[1]), vocab_size(found[1])


class OptionError(ValueError):
    """A command-line value outside the range its help states (one line, exit 2)."""


def check_at_least(option: str, value, low, *, above: bool = False) -> None:
    """``value`` >= ``low`` (``above``: > ``low``), and finite; else one line naming the option."""
    import math

    if value is None:
        return
    fine = math.isfinite(value) and (value > low if above else value >= low)
    if not fine:
        raise OptionError(f"{option} {value:g} is not allowed: give a number {'>' if above else '>='} {low:g}")


def check_text(option: str, text) -> None:
    """A probe text must hold something to tokenize (an empty one has no position to look at)."""
    if text is not None and not text.strip():
        raise OptionError(f"{option} {text!r} is not allowed: give a text of at least one token")


def check_k(option: str, k: int, model: str) -> None:
    """``k`` rows: at least 1 and, where config.json tells before loading, at most the widest FFN."""
    from ..core.model_config import ffn_widths, read_config_json

    check_at_least(option, k, 1)
    found = read_config_json(model)
    widths = ffn_widths(found[1]) if found is not None else {}
    if widths and k > max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        raise OptionError(f"{option} {k} is not allowed: give 1..{width} ({key} {width} in {found[0]})")


def add_prefix_options(p, corpora: bool = False) -> None:
    """``--bos`` and ``--bos-token``: what goes before a text (core/text_prefix.py). Probe texts
    know none|stream; corpora also window (every window opens with it)."""
    choices = ("none", "stream", "window") if corpora else ("none", "stream")
    p.add_argument("--bos", choices=choices, default=None,
                   help="what goes before the text: none, stream (once before it)" + (", window (every window)" if corpora else "")
                        + "; default: what the tokenizer adds (nothing if it adds no BOS"
                        + (", placed per corpus, docs/attacks.md)" if corpora else ")"))
    p.add_argument("--bos-token", type=token_arg, default=None, metavar="ID|TEXT",
                   help="put this token first even where the tokenizer adds none (an id, or one token's text)")


def text_prefix(args, tokenizer, model_path: str):
    """The prefix of the probe texts, from --bos / --bos-token (checked before the model loads)."""
    from ..core.text_prefix import resolve_prefix

    bos = getattr(args, "bos", None)
    config_bos, vocab = config_facts(model_path)
    return resolve_prefix(tokenizer, "stream" if bos == "window" else bos, getattr(args, "bos_token", None),
                          config_bos=config_bos, vocab_size=vocab)


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
    """A token id (digits) or a text."""
    if not text:
        raise argparse.ArgumentTypeError("'' is not allowed: give a token id or a text")
    return int(text) if text.strip().isdigit() else text


def indices_arg(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]
