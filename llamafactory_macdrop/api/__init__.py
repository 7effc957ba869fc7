"""The Python API: one function per ``macdrop`` analysis command (docs/api.md).

``md.locate``, ``md.activations``, ``md.superweight``, ``md.attention``, ``md.attack``,
``md.quantize`` and ``md.compare`` take what the command takes (a model folder, or a loaded model
with ``tokenizer=``; ``compare`` a training YAML) and the command's options as keywords with the
same names (docs/cli.md), run what the command runs, and return its report: ``.table()`` is what
the command prints, ``.to_dict()`` its ``--json`` document, ``.plot(folder)`` its figures. The
command line is this API plus parsing and printing (cli/). Imported on first use (torch is heavy).
"""

from __future__ import annotations

import importlib
from typing import Any

#: function -> the module of this package that defines it
_FUNCTIONS = {
    "locate": "inspection",
    "activations": "inspection",
    "superweight": "inspection",
    "attention": "inspection",
    "attack": "attacks",
    "quantize": "quantization",
    "compare": "comparison",
}
__all__ = list(_FUNCTIONS)


def __getattr__(name: str) -> Any:
    module = _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
