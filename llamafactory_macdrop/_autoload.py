"""The start-up hook's first path, kept for ``.pth`` files installed before the plugin/ layout
(they run ``import llamafactory_macdrop._autoload``). Standard library only: see
:mod:`llamafactory_macdrop.plugin.startup`."""

import llamafactory_macdrop.plugin.startup  # noqa: F401  (registers the finder)
