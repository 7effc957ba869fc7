"""MacDrop: curriculum dropout on the massive weights of an LLM, for LLaMA-Factory.

Three products, one folder each (docs/layout.md):

* :mod:`.core` — the method, importable without LLaMA-Factory: where the massive weights are
  (architectures, locator, first token), how much to drop when (curriculum), and what dropping
  does to the weights (masking, one storage backend per weight storage).
* :mod:`.plugin` — the LLaMA-Factory plugin: the ``macdrop_*`` keys, the trainer mixin (when it
  acts), the only module that imports LLaMA-Factory, and the start-up hook the ``.pth`` imports.
* :mod:`.analysis` — measuring a model: massive activations, super weights, attacks, perplexity,
  zero-shot, sweeps, plots, layer-by-layer locating, GGUF conversion.

:mod:`.cli` is the ``macdrop`` command, one module per command group.

This module is imported at every interpreter start (through the ``.pth`` hook), so it must stay
empty of heavy imports.
"""

__version__ = "0.1.0"
