"""What every figure module shares: how a figure is saved.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: nothing global is
touched (no backend switch, no figure registry to leak), so they work headless and inside a
notebook alike. Each subject's ``*_figure`` functions return the figure (the tests read the
plotted data from it) and its ``plot_*`` functions save it with :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
