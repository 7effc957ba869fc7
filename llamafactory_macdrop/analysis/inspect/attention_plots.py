"""Figures of the attention report (:mod:`.attention`) and of a MoE model's routing.

Why figures: an attention sink is a column (every query looks at key 0), which a heatmap shows
at a glance and a table of T x T numbers hides; the sink-share curve shows WHERE the sink starts
(right after the massive layer); the position figure is House of Cards' Fig. 2 (top row: the
residual stream at the massive dimensions per position, log scale; bottom row: the attention
map at one layer), one column per placement of the probe token; the routing heatmap is their
Fig. 5 (at the massive layer the router sends the probe token to one expert).

Built on ``matplotlib.figure.Figure`` like :mod:`.plots` (nothing global touched). ``*_figure``
return the figure (tests read the data from it), ``plot_*`` save a PNG and return its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..figures import finish, model_label, save_figure
from .attention import AttentionReport


def _labels(tokens: Optional[Sequence[str]], n: int) -> list[str]:
    return [repr(t)[1:-1][:10] for t in tokens] if tokens else [str(i) for i in range(n)]


def _heatmap(ax, matrix, labels, title, ylabel=True):
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
    ticks = range(len(labels))
    ax.set_xticks(list(ticks), labels, rotation=90, fontsize=6)
    ax.set_yticks(list(ticks), labels, fontsize=6)
    ax.set_xlabel("key", fontsize=7)
    if ylabel:
        ax.set_ylabel("query", fontsize=7)
    ax.set_title(title, fontsize=8)
    return image


def attention_heatmaps_figure(report: AttentionReport, layers: Sequence[int]):
    """One query x key heatmap (head-averaged probabilities) per layer in ``layers``."""
    from matplotlib.figure import Figure

    layers = list(layers)
    fig = Figure(figsize=(2.9 * len(layers) + 0.8, 3.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    labels = _labels(report.tokens, len(report.input_ids))
    image = None
    for ax, index in zip(axes, layers):
        s = report.layer(index)
        tag = " (massive)" if index == report.massive_layer else ""
        image = _heatmap(ax, s.attention, labels, f"layer {index}{tag}: sink {s.sink_share:.2f}", ylabel=ax is axes[0])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="attention probability")
    finish(fig, f"{model_label(report.model)}: head-averaged attention")
    return fig


def sink_curve_figure(report: AttentionReport):
    """Sink share per layer (left axis) and |residual| at the massive dims at position 0 (right,
    log); the massive layer marked: the sink starts right after it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.4), dpi=110)
    ax = fig.subplots()
    x = [s.layer for s in report.layers]
    ax.plot(
        x, [s.sink_share for s in report.layers], marker="o", ms=3, color="tab:blue", label="attention on position 0"
    )
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("sink share (heads, queries >= 1)", fontsize=8)
    ax.axvline(
        report.massive_layer, color="black", linestyle=":", linewidth=1.2, label=f"massive layer {report.massive_layer}"
    )
    right = ax.twinx()
    right.plot(
        x,
        [s.residual_massive[0] for s in report.layers],
        marker=".",
        ms=3,
        color="tab:red",
        linestyle="--",
        label=f"|h| at dims {report.massive_dims}, position 0",
    )
    right.set_yscale("log")
    right.set_ylabel("|residual| at the massive dims", fontsize=8)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    finish(fig, f"{model_label(report.model)}: attention sink per layer")
    return fig


def position_figure(report: AttentionReport):
    """House of Cards Fig. 2: one column per placement of the probe token; top: max |residual| at
    the massive dims per position leaving ``position_layer`` (log), the probe token in red; bottom:
    the head-averaged attention map there."""
    from matplotlib.figure import Figure

    runs = report.placements
    at = [s.layer for s in report.layers].index(report.position_layer)
    fig = Figure(figsize=(3.0 * len(runs) + 0.6, 6.4), dpi=110, layout="constrained")
    axes = fig.subplots(2, len(runs), squeeze=False)
    image = None
    for col, run in enumerate(runs):
        labels = _labels(run.tokens, len(run.input_ids))
        values = run.residual_massive[at]
        colors = ["tab:red" if i == run.probe_position else "tab:gray" for i in range(len(values))]
        top = axes[0][col]
        top.bar(range(len(values)), values, color=colors)
        top.set_yscale("log")
        top.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
        top.set_title(f"probe token {run.placement}", fontsize=8)
        if col == 0:
            top.set_ylabel(f"|h| at dims {report.massive_dims}", fontsize=7)
        image = _heatmap(
            axes[1][col], run.attention_at, labels, f"attention, layer {report.position_layer}", ylabel=col == 0
        )
    fig.colorbar(image, ax=list(axes[1]), shrink=0.8, label="attention probability")
    finish(fig, f"{model_label(report.model)}: where the probe token stands (layer {report.position_layer})")
    return fig


def routing_figure(located):
    """Router probability of the probe token per MoE layer (rows) and expert (columns), massive layer marked."""
    from matplotlib.figure import Figure

    routes = located.routing
    size = (max(4.0, 1.2 + 0.5 * len(routes[0].probs)), max(3.0, 1.4 + 0.3 * len(routes)))  # room for the title
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow([r.probs for r in routes], vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    ax.set_yticks(
        range(len(routes)), [f"{r.layer}{' *' if r.layer == located.layer else ''}" for r in routes], fontsize=7
    )
    ax.set_xticks(range(len(routes[0].probs)), [str(e) for e in range(len(routes[0].probs))], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (* massive)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    finish(fig, f"router probability of the probe token {located.probe_token_id}", fontsize=8)
    return fig


def plot_attention_heatmaps(report, layers, path) -> Path:
    return save_figure(attention_heatmaps_figure(report, layers), path)


def plot_sink_curve(report, path) -> Path:
    return save_figure(sink_curve_figure(report), path)


def plot_position(report, path) -> Path:
    return save_figure(position_figure(report), path)


def plot_routing(located, path) -> Path:
    return save_figure(routing_figure(located), path)
