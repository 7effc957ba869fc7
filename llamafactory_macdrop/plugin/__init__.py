"""The LLaMA-Factory plugin: ``llamafactory-cli train x.yaml`` with ``macdrop_*`` keys.

* which keys exist: :mod:`.keys` (the typed ``macdrop_*`` keys, their values and checks);
* when it acts: :mod:`.trainer` (the mixin keyed on ``training_step``: locate once, mask around
  each micro-batch's forward+backward, restore, check every optimizer step);
* how it gets in: :mod:`.startup` (the stdlib-only hook the ``.pth`` file imports at every
  interpreter start) hands LLaMA-Factory's modules to :mod:`.integration`, the ONLY module that
  imports LLaMA-Factory (argument validation before the model loads, trainer-class swap);
  :mod:`.child_errors` ends every torchrun child in one line when any rank fails on a plugin
  error; :mod:`.prequantized` says which quantized checkpoints can be masked exactly.

This ``__init__`` is on the start-up hook's import path: standard library only.
"""


def activate() -> None:
    """Patch an already-imported LLaMA-Factory in this process (notebooks, tests)."""
    from .integration import activate as _activate

    _activate()
