"""The checks every command makes of its options before anything loads (one line each).

Why here: the API functions run them (a notebook call is refused the same way as the command
line), and the command line only parses; the messages name the option as the command line spells
it (``--k``), which docs/cli.md documents for both.
"""

from __future__ import annotations

import math
from typing import Optional

from ..errors import MacDropError

#: the probe text of activations / superweight / attack / quantize when none is given
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


class OptionError(MacDropError, ValueError):
    """An option's value outside the range its help states (one line, exit 2)."""


def check_at_least(option: str, value, low, *, above: bool = False) -> None:
    """``value`` >= ``low`` (``above``: > ``low``), and finite; else one line naming the option."""
    if value is None:
        return
    fine = math.isfinite(value) and (value > low if above else value >= low)
    if not fine:
        raise OptionError(f"{option} {value:g} is not allowed: give a number {'>' if above else '>='} {low:g}")


def check_text(option: str, text) -> None:
    """A probe text must hold something to tokenize (an empty one has no position to look at)."""
    if text is not None and not text.strip():
        raise OptionError(f"{option} {text!r} is not allowed: give a text of at least one token")


def check_k(option: str, k: int, config: Optional[dict], where: str) -> None:
    """``k`` rows: at least 1 and, where the config tells before loading, at most the widest FFN."""
    from ..core.model_config import ffn_widths

    check_at_least(option, k, 1)
    widths = ffn_widths(config) if config is not None else {}
    if widths and k > max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        raise OptionError(f"{option} {k} is not allowed: give 1..{width} ({key} {width} in {where})")


def check_indices(option: str, indices, config: Optional[dict], where: str) -> None:
    """Row indices: distinct (a repeated row would count twice in k and be dropped twice) and, where
    the config tells before loading, inside the widest FFN."""
    from ..core.model_config import ffn_widths

    if indices is None:
        return
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        shown = ",".join(map(str, indices))
        raise OptionError(f"{option} {shown} is not allowed: rows {repeated} repeat (give distinct row indices)")
    widths = ffn_widths(config) if config is not None else {}
    if widths and max(indices) >= max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        raise OptionError(
            f"{option} {max(indices)} is not allowed: give rows 0..{width - 1} ({key} {width} in {where})"
        )


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
