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
