"""The LLaMA-Factory plugin: ``llamafactory-cli train x.yaml`` with ``macdrop_*`` keys (docs/layout.md).

This ``__init__`` is on the start-up hook's import path: standard library only.
"""


def activate() -> None:
    """Patch an already-imported LLaMA-Factory in this process (notebooks, tests)."""
    from .integration import activate as _activate

    _activate()
