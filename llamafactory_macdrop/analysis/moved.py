"""The analysis modules' paths before analysis/ was grouped by question, kept importable.

``import llamafactory_macdrop.analysis.attacks`` (and every other old path below) still works: a
small finder on ``sys.meta_path`` answers the old name with the module at its new path, the SAME
module object (patching either patches both), imported only when the old name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_PKG = __name__.rpartition(".")[0]  # llamafactory_macdrop.analysis
#: old module name (under analysis/) -> new one
MOVED = {
    "activations": "inspect.activations",
    "superweight": "inspect.superweight",
    "stopwords": "inspect.stopwords",
    "attention": "inspect.attention",
    "attention_plots": "inspect.attention_plots",
    "streaming": "inspect.streaming",
    "cross_check": "inspect.cross_check",
    "plots": "inspect.plots",
    "attacks": "attack.attacks",
    "sweep": "attack.sweep",
    "generation": "attack.generation",
    "quantization": "attack.quantization",
    "superweight_plots": "attack.plots",
    "perplexity": "evaluate.perplexity",
    "zeroshot": "evaluate.zeroshot",
    "compare_runs": "compare.runs",
    "compare_eval": "compare.evaluation",
    "compare_report": "compare.report",
    "compare_plots": "compare.plots",
    "paired": "compare.paired",
    "convert": "models.gguf",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != _PKG or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(f"{_PKG}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module) -> None:  # already executed at its new path
        pass


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
