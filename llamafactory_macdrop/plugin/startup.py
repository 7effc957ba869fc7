"""Start-up hook: activate the MacDrop integration when LLaMA-Factory is imported.

Why a hook at all: LLaMA-Factory 0.9.5 has no plugin, entry-point or callback option, rejects
unknown YAML keys, and ``llamafactory-cli train`` re-launches itself under ``torchrun`` for
multi-GPU runs. A ``.pth`` file in site-packages runs in every interpreter of the environment,
the torchrun children included, so it is the one place that reaches all of them without asking
users to change their command.

This module is imported by that ``.pth`` file at EVERY interpreter start, so it imports only the
standard library and does nothing but register a meta-path finder (well under a millisecond).
The finder waits for the LLaMA-Factory modules the integration patches, lets them load normally,
and then hands them to :mod:`llamafactory_macdrop.plugin.integration`. Set ``MACDROP_AUTOLOAD=0`` to
switch it off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

#: Modules whose loading triggers the integration (LlamaBoard's loss plot; the v1 launcher, to refuse it).
WATCHED_MODULES = (
    "llamafactory.launcher",
    "llamafactory.train.tuner",
    "llamafactory.extras.ploting",
    "llamafactory.v1.launcher",
)


class _PatchingLoader(importlib.abc.Loader):
    """Wraps the real loader: execute the module as usual, then let the integration patch it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: D102 - delegate
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: D102 - delegate, then patch
        self._loader.exec_module(module)
        from llamafactory_macdrop.plugin import integration

        integration.on_module_loaded(module)

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and debuggers
        return getattr(self._loader, name)


class _LlamaFactoryFinder(importlib.abc.MetaPathFinder):
    """Finds the watched modules through the other finders and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register the finder once (idempotent)."""
    from ..core.values import parse_flag

    if parse_flag(os.environ.get("MACDROP_AUTOLOAD", "1")) is False:
        return
    if not any(isinstance(finder, _LlamaFactoryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LlamaFactoryFinder())


install()
