"""What the command groups share: model/tokenizer loading and argument types."""

from __future__ import annotations

import argparse

from ..analysis.models.loading import (
    TOKENIZER_FILES,
    ModelPathError,
    check_model,
    config_facts,
    load_model,
    load_tokenizer,
    torch_dtype,
)
from ..errors import MacDropError

#: what the commands import from here (loading lives in analysis/models/loading.py)
__all__ = [
    "DEFAULT_TEXT",
    "TOKENIZER_FILES",
    "ModelPathError",
    "OptionError",
    "add_prefix_options",
    "check_at_least",
    "check_indices",
    "check_k",
    "check_model",
    "check_text",
    "check_text_files",
    "config_facts",
    "indices_arg",
    "load_model",
    "load_tokenizer",
    "text_prefix",
    "token_arg",
    "torch_dtype",
]

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


class OptionError(MacDropError, ValueError):
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


def check_text_files(paths, option: str = "--text-file") -> None:
    """Text files are read as UTF-8: one that is missing or is not UTF-8 is one line naming the
    byte, before any model loads (not a UnicodeDecodeError traceback, after it)."""
    from pathlib import Path

    for path in paths or ():
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise OptionError(f"{option} {path} cannot be read ({err.strerror or type(err).__name__})") from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise OptionError(
                f"{option} {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): "
                "convert it, e.g. iconv -f latin1 -t utf-8"
            ) from None


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
    p.add_argument(
        "--bos",
        choices=choices,
        default=None,
        help="what goes before the text: none, stream (once before it)"
        + (", window (every window)" if corpora else "")
        + "; default: what the tokenizer adds (nothing if it adds no BOS"
        + (", placed per corpus, docs/attacks.md)" if corpora else ")"),
    )
    p.add_argument(
        "--bos-token",
        type=token_arg,
        default=None,
        metavar="ID|TEXT",
        help="put this token first even where the tokenizer adds none (an id, or one token's text)",
    )


def text_prefix(args, tokenizer, model_path: str):
    """The prefix of the probe texts, from --bos / --bos-token (checked before the model loads)."""
    from ..core.text_prefix import resolve_prefix

    bos = getattr(args, "bos", None)
    config_bos, vocab = config_facts(model_path)
    return resolve_prefix(
        tokenizer,
        "stream" if bos == "window" else bos,
        getattr(args, "bos_token", None),
        config_bos=config_bos,
        vocab_size=vocab,
    )


def _ascii_int(text: str) -> bool:
    """ASCII digits only: ``int()`` and ``str.isdigit()`` also take '٣' (3) and '²'."""
    text = text.strip()
    return text.isascii() and text.isdigit()


def token_arg(text: str) -> int | str:
    """A token id (ASCII digits) or a text."""
    if not text:
        raise argparse.ArgumentTypeError("'' is not allowed: give a token id or a text")
    return int(text) if _ascii_int(text) else text


def indices_arg(text: str) -> list[int]:
    """Comma-separated row indices, ASCII digits (checked further by :func:`check_indices`)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(_ascii_int(x) for x in items):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: give comma-separated row indices >= 0, e.g. 1229,1487"
        )
    return [int(x) for x in items]


def check_indices(option: str, indices, model: str) -> None:
    """Row indices: distinct (a repeated row would count twice in k and be dropped twice) and, where
    config.json tells before loading, inside the widest FFN."""
    from ..core.model_config import ffn_widths, read_config_json

    if indices is None:
        return
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        shown = ",".join(map(str, indices))
        raise OptionError(f"{option} {shown} is not allowed: rows {repeated} repeat (give distinct row indices)")
    found = read_config_json(model)
    widths = ffn_widths(found[1]) if found is not None else {}
    if widths and max(indices) >= max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        raise OptionError(
            f"{option} {max(indices)} is not allowed: give rows 0..{width - 1} ({key} {width} in {found[0]})"
        )
