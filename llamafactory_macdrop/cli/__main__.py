"""``python -m llamafactory_macdrop.cli``: the ``macdrop`` command without its console script."""

from . import main

raise SystemExit(main())
