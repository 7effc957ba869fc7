"""How to analyse a model, one subpackage per question (the module map: docs/layout.md)."""

from .moved import install as _install_old_paths

_install_old_paths()
