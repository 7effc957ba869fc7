"""How the project reads values that arrive as text: a yes/no (its own YAML keys, ``macdrop: yes``;
its own environment variables, ``MACDROP_AUTOLOAD=0``; a flag in a config file it checks) and a
comma-separated list (``--mode zero,retain``, ``--k-sweep 0,1,5``, ``macdrop_indices: 1229,1487``).

One parser each, so ``on``/``1``/``yes`` and ``a, b,,c`` mean the same everywhere. Standard library only: the start-up
hook reads ``MACDROP_AUTOLOAD`` with it at every interpreter start. (LLaMA-Factory's own arguments
are read by LLaMA-Factory's parser, accelerate's environment variables by accelerate's
``str_to_bool``: their semantics, not ours.)
"""

from __future__ import annotations

from typing import Any, Optional

TRUE = frozenset({"true", "1", "yes", "on"})
FALSE = frozenset({"false", "0", "no", "off"})


def parse_flag(value: Any) -> Optional[bool]:
    """True or False for a bool or one of the words above (any case, surrounding blanks ignored);
    None for anything else, which the caller refuses or treats as unset."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
    return None


def comma_list(text: Any) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: split on commas, blanks around items and empty items dropped."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


def comma_ints(text: Any) -> list[int]:
    """``"0,1,5"`` -> ``[0, 1, 5]``; ValueError naming the first item that is no integer in ASCII
    digits (``int()`` would also take '٣')."""
    out = []
    for part in comma_list(text):
        digits = part[1:] if part[:1] in "+-" else part
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"{part!r} is not an integer")
        out.append(int(part))
    return out
