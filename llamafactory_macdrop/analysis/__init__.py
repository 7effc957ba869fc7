"""How to analyse a model (the ``macdrop`` analysis commands and their Python API).

:mod:`.activations` (massive activations per layer), :mod:`.superweight` (super weights),
:mod:`.attacks` (top-k zeroing/retaining, super-weight and activation attacks, all restored
bitwise), :mod:`.perplexity` and :mod:`.zeroshot` (evaluation), :mod:`.sweep` (one model load,
many settings), :mod:`.plots`, :mod:`.streaming` (locating layer by layer, for models that do not
fit), :mod:`.convert` (GGUF to a Hugging Face folder). Built on :mod:`llamafactory_macdrop.core`;
no LLaMA-Factory import.
"""
