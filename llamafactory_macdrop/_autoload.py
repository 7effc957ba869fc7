"""The start-up hook's first path, kept for ``.pth`` files installed before the plugin/ layout
(they run ``import llamafactory_macdrop._autoload``). Standard library only: importing
:mod:`llamafactory_macdrop.plugin.startup` registers the finder."""

from .plugin.startup import install

__all__ = ["install"]
