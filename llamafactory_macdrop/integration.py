"""The documented Python entry point ``llamafactory_macdrop.integration`` (``activate()``), kept
at its first path: this name IS :mod:`llamafactory_macdrop.plugin.integration` (the same module
object, so patching either patches both)."""

import sys

from .plugin import integration as _integration

sys.modules[__name__] = _integration
