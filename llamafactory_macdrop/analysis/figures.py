"""What every figure module shares: titles, layout, intervals and how a figure is saved.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: nothing global is
touched (no backend switch, no figure registry to leak), so they work headless and inside a
notebook alike. Each subject's ``*_figure`` functions return the figure (the tests read the
plotted data from it) and its ``plot_*`` functions save it with :func:`save_figure`.

Why a shared finish (:func:`finish`): a figure goes into a paper. Its title names the model (a
folder's name, not the path it happened to sit at), ``--title`` replaces it, long titles wrap to
the figure's width, and the constrained layout keeps every label inside the canvas (the tests
draw each figure and check its tight bounding box). ``--format png,pdf,svg`` writes the same
figure once per format (:func:`figure_style`).
"""

from __future__ import annotations

import math
import textwrap
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

FORMATS = ("png", "pdf", "svg")


@dataclass(frozen=True)
class FigureStyle:
    """What the caller asked of every figure it saves: a title instead of the default, the formats."""

    title: Optional[str] = None
    formats: tuple[str, ...] = ("png",)


_STYLE: ContextVar[Optional[FigureStyle]] = ContextVar("macdrop_figure_style", default=None)


def _style() -> FigureStyle:
    return _STYLE.get() or FigureStyle()


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``png,pdf`` (or a list) -> ("png", "pdf"); one line naming what is allowed otherwise."""
    from ..core.values import comma_list
    from ..errors import MacDropError

    names = [f.lower() for f in (comma_list(text) if isinstance(text, str) else map(str, text)) if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise MacDropError(f"--format {text!r} is not allowed: give comma-separated {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


@contextmanager
def figure_style(title: Optional[str] = None, formats: Sequence[str] = ("png",)) -> Iterator[FigureStyle]:
    """Every figure saved inside gets ``title`` (when given) and is written in each of ``formats``."""
    token = _STYLE.set(FigureStyle(title, parse_formats(formats)))
    try:
        yield _style()
    finally:
        _STYLE.reset(token)


def model_label(model: str) -> str:
    """How a title names a model: a local folder by its name (not its path), a hub id as it is."""
    text = str(model)
    path = Path(text)
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        return path.expanduser().resolve().name or text
    return text


def finish(fig, title: str, fontsize: float = 9) -> None:
    """The figure's title (``--title`` when one was given, else ``title``), wrapped to the figure's
    width, and the constrained layout that keeps every text inside the canvas."""
    text = _style().title or title
    width_chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle("\n".join(textwrap.wrap(text, width_chars)), fontsize=fontsize)
    fig.set_layout_engine("constrained")


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95 % interval of a proportion ``p`` measured on ``n`` items (accuracy, exact match)."""
    if not n or p != p:
        return (math.nan, math.nan)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def save_figure(fig, path) -> Path:
    """Write ``fig`` at ``path`` (folders created) in every format of the current :func:`figure_style`
    (the same name, one suffix each); returns the path of the first format."""
    formats = _style().formats
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    written = [path.with_suffix(f".{fmt}") for fmt in formats]
    for out, fmt in zip(written, formats):
        fig.savefig(out, format=fmt)
    return written[0]


def metric_axis(ax, metric: str) -> float:
    """Perplexity on a log axis (an attack moves it by orders of magnitude), accuracy in %: the factor
    the metric is drawn with."""
    if metric == "ppl":
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        return 1.0
    ax.set_ylabel("accuracy (%)")
    return 100.0
