"""Plots of what is in a model: the per-layer profile, the intermediate state at the origin, the stop-word shift.

Why two plots: the layer profile shows WHERE the massive activation appears (the hidden state's
top-1 leaves the median by orders of magnitude at one layer and stays there, which needs a log
axis), and the bar plot shows WHICH intermediate units create it (a handful of spikes over a
flat floor, the top-k massive weights the locator names).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: nothing global is
touched (no backend switch, no figure registry to leak), so this works headless and inside a
notebook alike. ``*_figure`` functions return the figure (the tests read the plotted data from
it); ``plot_*`` save it as PNG and return the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..figures import finish, model_label, save_figure
from .activations import ActivationReport

TOP_STYLES = (("top-1", "tab:red"), ("top-2", "tab:orange"), ("top-3", "tab:olive"))


def _nan_pad(values: Optional[Sequence[float]], n: int = 3) -> list[float]:
    values = list(values or [])
    return values + [float("nan")] * (n - len(values))


def layer_profile_figure(report: ActivationReport, origin_layer: Optional[int] = None):
    """Two panels over the layers, log y: |hidden state| leaving each layer and |intermediate|;
    top-1/2/3 and median each; ``origin_layer`` (default: the report's) marked by a vertical line."""
    from matplotlib.figure import Figure

    origin = origin_layer if origin_layer is not None else report.origin_layer
    x = [s.layer for s in report.layers]
    fig = Figure(figsize=(7.0, 5.6), dpi=110)
    axes = fig.subplots(2, 1, sharex=True)
    panels = (
        (
            "|hidden state| (layer output)",
            [s.hidden_top for s in report.layers],
            [s.hidden_median for s in report.layers],
        ),
        (
            "|intermediate| (down input)",
            [s.intermediate_top for s in report.layers],
            [s.intermediate_median if s.intermediate_median is not None else float("nan") for s in report.layers],
        ),
    )
    for ax, (title, tops, medians) in zip(axes, panels):
        padded = [_nan_pad(t) for t in tops]
        for rank, (label, color) in enumerate(TOP_STYLES):
            ax.plot(x, [p[rank] for p in padded], marker="o", ms=3, color=color, label=label)
        ax.plot(x, medians, marker=".", ms=3, color="tab:blue", linestyle="--", label="median")
        if origin is not None:
            ax.axvline(origin, color="black", linestyle=":", linewidth=1.2, label=f"origin (layer {origin})")
        ax.set_yscale("log")
        ax.set_ylabel(title, fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3, loc="upper left")
    axes[1].set_xlabel("layer (0-based)")
    finish(fig, f"{model_label(report.model)}: activation magnitudes per layer ({len(report.input_ids)} tokens)")
    return fig


def intermediate_bars_figure(values: torch.Tensor | Sequence[float], topk_indices: Sequence[int], layer: int):
    """|intermediate| per unit (thin bars) with the top-k units highlighted and labelled."""
    from matplotlib.figure import Figure

    v = torch.as_tensor(values, dtype=torch.float32).detach().cpu().abs().flatten()
    idx = [int(i) for i in topk_indices]
    fig = Figure(figsize=(7.0, 3.4), dpi=110)
    ax = fig.subplots()
    ax.vlines(range(v.numel()), 0, v.tolist(), color="tab:gray", linewidth=0.6, label="|intermediate|")
    top_values = [float(v[i]) for i in idx]
    ax.vlines(idx, 0, top_values, color="tab:red", linewidth=1.5)
    ax.plot(idx, top_values, "o", color="tab:red", ms=4, label=f"top-{len(idx)}")
    for i, y in zip(idx, top_values):
        ax.annotate(f"{i}", (i, y), textcoords="offset points", xytext=(3, 2), fontsize=7)
    ax.set_xlim(-0.5, v.numel() - 0.5)
    ax.set_xlabel("intermediate unit")
    ax.set_ylabel("|act(gate(x)) * up(x)|")
    ax.legend(fontsize=7)
    finish(fig, f"layer {layer}: intermediate state, top-{len(idx)} = {idx}")
    return fig


def plot_layer_profile(report: ActivationReport, path, origin_layer: Optional[int] = None) -> Path:
    """Save :func:`layer_profile_figure` as a PNG at ``path``."""
    return save_figure(layer_profile_figure(report, origin_layer), path)


def plot_intermediate_bars(values, topk_indices, path, layer: int) -> Path:
    """Save :func:`intermediate_bars_figure` as a PNG at ``path``."""
    return save_figure(intermediate_bars_figure(values, topk_indices, layer), path)


# ----------------------------------------------------------------------------- the stop-word shift
def stopword_figure(report):
    """Mean next-token probability per stop word, original vs super weight(s) zeroed (log y),
    each pair labelled with the ratio."""
    from matplotlib.figure import Figure

    words = report.words
    fig = Figure(figsize=(max(5.0, 0.8 * len(words) + 2), 3.6), dpi=110)
    ax = fig.subplots()
    x = list(range(len(words)))
    before = [w.p_original for w in words]
    after = [w.p_zeroed for w in words]
    ax.bar([i - 0.2 for i in x], before, width=0.4, color="tab:blue", label="original")
    ax.bar([i + 0.2 for i in x], after, width=0.4, color="tab:red", label="super weight zeroed")
    for i, w in enumerate(words):
        ax.annotate(
            f"x{w.ratio:.1f}",
            (i, max(w.p_original, w.p_zeroed)),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(x)
    ax.set_xticklabels([repr(w.word)[1:-1] for w in words], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("mean next-token probability")
    ax.legend(fontsize=7)
    finish(
        fig,
        f"{model_label(report.model)}: stop words when {report.super_weight_names()} is zeroed "
        f"({report.positions} positions)",
    )
    return fig


def plot_stopwords(report, path) -> Path:
    return save_figure(stopword_figure(report), path)


# ----------------------------------------------------------------------------- quantization
