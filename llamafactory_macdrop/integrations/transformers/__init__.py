"""MacDrop in any transformers ``Trainer``: :func:`with_macdrop` (a Trainer subclass, the full
method) and :class:`MacDropCallback` (for hosts that take only callbacks); docs/hosts.md."""

from .callback import MacDropCallback
from .trainer import with_macdrop

__all__ = ["MacDropCallback", "with_macdrop"]
