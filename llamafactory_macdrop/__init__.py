"""MacDrop: curriculum dropout on the massive weights of an LLM, for LLaMA-Factory.

The folders are ``core`` (the method), ``plugin`` (the LLaMA-Factory plugin), ``integrations`` (any
transformers Trainer, axolotl), ``analysis`` (measuring a model) and ``cli`` (the ``macdrop`` command); the module map is docs/layout.md. The names below
are the public Python surface, imported on first use: this module runs at every interpreter start
(through the ``.pth`` hook), so it must import nothing heavy itself (tests/test_layout.py checks).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (relative to this package)
_LAZY = {
    # the method
    "locate_massive_weights": "core.locator",
    "LocatorResult": "core.locator",
    "find_ffn_blocks": "core.architectures",
    "build_curriculum": "core.curriculum",
    "RowDropout": "core.masking",
    "row_target": "core.storage",
    "resolve_prefix": "core.text_prefix",
    "tokenizer_prefix": "core.text_prefix",
    # the plugin
    "MacDropConfig": "plugin.keys",
    "activate": "plugin.integration",
    "validate_args": "plugin.integration",
    # other hosts
    "with_macdrop": "integrations.transformers.trainer",
    "MacDropCallback": "integrations.transformers.callback",
    # the analysis commands as functions (docs/api.md)
    "locate": "api",
    "activations": "api",
    "superweight": "api",
    "attention": "api",
    "attack": "api",
    "quantize": "api",
    "compare": "api",
    "figure_style": "analysis.figures",
    # analysis building blocks
    "activation_report": "analysis.inspect.activations",
    "find_super_weights": "analysis.inspect.superweight",
    "attention_report": "analysis.inspect.attention",
    "ModelAttacker": "analysis.attack.attacks",
    "AttackSetting": "analysis.attack.attacks",
    "AttackTargets": "analysis.attack.attacks",
    "evaluate_settings": "analysis.sweep.loop",
    "ModelQuantizer": "analysis.quantize.quantizer",
    "evaluate_perplexity": "analysis.evaluate.perplexity",
    "ZeroShotEvaluator": "analysis.evaluate.zeroshot",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
