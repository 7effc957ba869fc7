"""Figures of ``macdrop compare``: metrics per arm, paired differences with their intervals,
robustness vs k, loss curves with p.

Why these three: the first answers "is MacDrop better here" (each seed as a dot, the paired
interval next to it), the second the method's robustness claim (how each arm degrades as more
of the base model's massive rows are zeroed or kept alone), the third what the training did
(loss per run, and p on its own axis for the MacDrop arms). Built on ``matplotlib.figure.Figure``
like the project's other plots (no pyplot, no backend switch) and saved with ``figures.save_figure``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..figures import finish, model_label, save_figure
from .evaluation import parse_metric
from .paired import seed_spread


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _colors(arms: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {a: cycle[i % len(cycle)] for i, a in enumerate(arms)}


def metrics_figure(report):
    """Clean metrics: one panel each, seeds as dots and mean as a bar per arm, the base as a dashed
    line; the paired difference's interval and its n written under the panel title."""
    metrics = [m for m in report.metric_names() if parse_metric(m)[2] == "clean"] or report.metric_names()[:1]
    arms = report.arm_names()
    colors = _colors(arms)
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = _figure(rows, cols, (4.2 * cols, 3.4 * rows))
    for ax, metric in zip(axes.flat, metrics):
        scale = 100 if parse_metric(metric)[0] == "acc" else 1
        for i, arm in enumerate(arms):
            values = [scale * v for v in report.arm_values(arm, metric)]
            if not values:
                continue
            mean, sd = seed_spread(values)
            ax.bar(i, mean, yerr=sd, capsize=4, color=colors[arm], alpha=0.35, width=0.6)
            ax.scatter([i] * len(values), values, color=colors[arm], s=18, zorder=3)
        if report.base is not None and metric in report.base.metrics:
            ax.axhline(scale * report.base.metrics[metric], color="grey", ls="--", lw=1, label="base")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=7, ha="right")
        shown = [scale * v for a in arms for v in report.arm_values(a, metric)]
        if report.base is not None and metric in report.base.metrics:
            shown.append(scale * report.base.metrics[metric])  # the base line stays on the axis
        lo, hi = min(shown), max(shown)
        pad = (hi - lo) * 0.6 or abs(hi) * 0.05 or 1
        ax.set_ylim(lo - pad, hi + pad)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # values as they are, no "+5.8494"
        diffs = [d for d in report.paired if d.metric == metric]
        sub = "; ".join(
            f"Δ {scale * d.mean_diff:+.3g} [{scale * d.low:+.3g}, {scale * d.high:+.3g}], n = {d.n}" for d in diffs
        )
        ax.set_title(f"{metric}{' (%)' if scale == 100 else ''}\n{sub}", fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    finish(fig, f"{model_label(report.model)}: clean metrics per arm (dots: seeds; bars: mean ± sd)")
    return fig


def plot_metrics(report, path: Path) -> Path:
    return save_figure(metrics_figure(report), path)


def paired_figure(report):
    """Every paired difference (arm - control) with its bootstrap interval, one panel per metric
    kind, one row per metric; filled markers where the verdict is a detectable difference."""
    kinds = list(dict.fromkeys(parse_metric(d.metric)[0] for d in report.paired))
    treatments = list(dict.fromkeys(d.treatment for d in report.paired))
    colors = _colors(treatments)
    rows = max(sum(1 for d in report.paired if parse_metric(d.metric)[0] == k) for k in kinds)
    fig, axes = _figure(1, len(kinds), (6 * len(kinds), 0.9 + 0.32 * rows))
    for ax, kind in zip(axes[0], kinds):
        scale = 100 if kind == "acc" else 1
        diffs = [d for d in report.paired if parse_metric(d.metric)[0] == kind]
        labels = list(dict.fromkeys(d.metric for d in diffs))
        for j, t in enumerate(treatments):
            offset = (j - (len(treatments) - 1) / 2) * 0.25
            for d in (d for d in diffs if d.treatment == t):
                y = labels.index(d.metric) + offset
                ax.errorbar(
                    scale * d.mean_diff,
                    y,
                    xerr=[[scale * (d.mean_diff - d.low)], [scale * (d.high - d.mean_diff)]],
                    fmt="o",
                    ms=4,
                    capsize=3,
                    color=colors[t],
                    mfc=colors[t] if d.direction != "none" else "white",
                    label=f"{t} − {d.control}" if d.metric == labels[0] else None,
                )
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(labels)), [m.split("/", 1)[1] for m in labels], fontsize=7)
        ax.invert_yaxis()
        better = "lower is better" if kind == "ppl" else "higher is better"
        ax.set_xlabel(f"difference in {kind}{' (points)' if scale == 100 else ''} ({better})")
        ax.legend(fontsize=7)
        conf = round(100 * diffs[0].confidence)
        ax.set_title(
            f"{conf} % bootstrap intervals over n = {max(d.n for d in diffs)} items (filled: detectable)", fontsize=8
        )
    finish(fig, f"{model_label(report.model)}: paired differences (arm − control)")
    return fig


def plot_paired(report, path: Path) -> Path:
    return save_figure(paired_figure(report), path)


def robustness_figure(report):
    """Per corpus/task and attack mode: the metric vs k for each arm (mean over seeds, min-max band)."""
    curves: dict[tuple[str, str, str], dict[int, str]] = {}
    for metric in report.metric_names():
        kind, dataset, setting = parse_metric(metric)
        if " k=" not in setting:
            continue
        mode, k = setting.split(" k=")
        curves.setdefault((kind, dataset, mode), {})[int(k)] = metric
    if not curves:
        raise ValueError("no attack settings were evaluated (--k-sweep none): nothing to plot")
    arms = report.arm_names()
    colors = _colors(arms)
    keys = sorted(curves)
    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = _figure(rows, cols, (5 * cols, 3.6 * rows))
    for ax, key in zip(axes.flat, keys):
        kind, dataset, mode = key
        scale = 100 if kind == "acc" else 1
        clean = f"{kind}/{dataset}/clean"
        ks = [0] + sorted(curves[key])
        names = [clean] + [curves[key][k] for k in ks[1:]]
        for arm in arms:
            series = [[scale * v for v in report.arm_values(arm, m)] for m in names]
            if not all(series):
                continue
            mean = [sum(s) / len(s) for s in series]
            ax.plot(ks, mean, marker="o", ms=3, color=colors[arm], label=arm)
            ax.fill_between(ks, [min(s) for s in series], [max(s) for s in series], color=colors[arm], alpha=0.15)
        if report.base is not None and all(m in report.base.metrics for m in names):
            ax.plot(ks, [scale * report.base.metrics[m] for m in names], ls="--", color="grey", label="base")
        ax.set_xlabel(f"k ({mode}: top-k massive rows of the base)")
        ax.set_ylabel(f"{kind}{' (%)' if scale == 100 else ''}")
        if kind == "ppl":
            ax.set_yscale("log")
        ax.set_title(f"{dataset}: {mode}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    finish(fig, f"{model_label(report.model)}: robustness to the base's massive rows (band: min–max over seeds)")
    return fig


def plot_robustness(report, path: Path) -> Path:
    return save_figure(robustness_figure(report), path)


def losses_figure(histories: dict[tuple[str, int], list[dict[str, Any]]]):
    """Training loss per run (colour: arm, line style: seed) and macdrop_p on a second axis."""
    arms = list(dict.fromkeys(a for a, _ in histories))
    colors = _colors(arms)
    seeds = sorted({s for _, s in histories})
    styles = dict(zip(seeds, ["-", "--", ":", "-."] * (len(seeds) // 4 + 1)))
    fig, axes = _figure(1, 1, (7, 4))
    ax = axes[0, 0]
    ax_p = None
    for (arm, seed), history in histories.items():
        steps = [h for h in history if "loss" in h and "step" in h]
        if steps:
            ax.plot(
                [h["step"] for h in steps],
                [h["loss"] for h in steps],
                color=colors[arm],
                ls=styles[seed],
                lw=1.2,
                label=f"{arm} seed {seed}",
            )
        ps = [h for h in history if "macdrop_p" in h]
        if ps:
            ax_p = ax_p or ax.twinx()
            ax_p.plot(
                [h["step"] for h in ps],
                [h["macdrop_p"] for h in ps],
                color=colors[arm],
                ls=styles[seed],
                lw=0.8,
                alpha=0.5,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    if ax_p is not None:
        ax_p.set_ylabel("macdrop_p (thin lines)")
        ax_p.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    finish(fig, "training loss per run; p of the MacDrop arms")
    return fig


def plot_losses(histories: dict[tuple[str, int], list[dict[str, Any]]], path: Path) -> Path:
    return save_figure(losses_figure(histories), path)
