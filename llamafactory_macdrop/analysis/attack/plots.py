"""Plots of ``macdrop attack``: the metric against k (the paper's Fig. 4 view) and super-weight scaling.

Built as :mod:`..figures` says (``*_figure`` returns the figure, ``plot_*`` saves it); the
generation tasks' figures, shared with ``quantize``, are :mod:`..sweep.plots`.
"""

from __future__ import annotations

from pathlib import Path

from ..figures import finish, metric_axis, model_label, save_figure, wilson


# ----------------------------------------------------------------------------- scaling sweep
def superweight_scaling_figure(report):
    """One panel per corpus/task: the metric against the factor applied to the super weight(s)
    (``attack --mode superweight --scale ...``); factor 1 is the unattacked model."""
    from matplotlib.figure import Figure

    columns = report.columns()
    fig = Figure(figsize=(4.0 * max(1, len(columns)), 3.4), dpi=110)
    axes = fig.subplots(1, max(1, len(columns)), squeeze=False)[0]
    scales = sorted({r["scale"] for r in report.rows if r["mode"] == "superweight"})
    for ax, (dataset, metric) in zip(axes, columns):
        unit = metric_axis(ax, metric)
        base = report.value("clean", dataset, metric)
        points = {s: report.value(f"superweight x{s:g}", dataset, metric) for s in scales}
        if base is not None:
            points.setdefault(1.0, base)
            ax.axhline(unit * base, color="black", linestyle="--", linewidth=1, label="no attack (x1)")
        xs = sorted(x for x, y in points.items() if y is not None)
        ax.plot(xs, [unit * points[x] for x in xs], marker="o", ms=4, color="tab:green", label="super weight x factor")
        ax.set_xlabel("factor applied to the super weight(s)")
        ax.set_title(dataset, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    sws = report.targets.get("super_weights") or (
        [report.targets["super_weight"]] if report.targets.get("super_weight") else []
    )
    names = ", ".join(f"L{s['layer']}[{s['row']},{s['col']}]" for s in sws)
    finish(fig, f"{model_label(report.model)}: super weight scaling ({names})")
    return fig


def plot_superweight_scaling(report, path) -> Path:
    return save_figure(superweight_scaling_figure(report), path)


# ----------------------------------------------------------------------------- attack sweeps
SWEEP_STYLES = {"zero": ("top-k zeroing", "tab:red", "o"), "retain": ("top-k retaining", "tab:blue", "s")}


def attack_sweep_figure(report):
    """One panel per corpus/task: the metric against k for top-k zeroing and retaining (the
    paper's Fig. 4 view); the unattacked baseline and the other modes as horizontal lines.
    Perplexity on a log axis (zeroing moves it by orders of magnitude), accuracy in %."""
    from matplotlib.figure import Figure

    columns = report.columns()
    fig = Figure(figsize=(4.0 * max(1, len(columns)), 3.4), dpi=110)
    axes = fig.subplots(1, max(1, len(columns)), squeeze=False)[0]
    settings = report.settings()
    for ax, (dataset, metric) in zip(axes, columns):
        scale = 1.0 if metric == "ppl" else 100.0
        base = report.value("clean", dataset, metric)
        n = next((r.get("n") for r in report.rows if r["dataset"] == dataset and "acc" in r), None)
        for mode, (label, color, marker) in SWEEP_STYLES.items():
            ks = sorted(k for m, k, _ in settings if m == mode)
            if not ks:
                continue
            labels = ["clean"] + [f"{mode} k={k}" for k in ks]
            points = [(x, report.value(s, dataset, metric)) for x, s in zip([0] + ks, labels)]
            points = [(x, y) for x, y in points if y is not None]  # a setting may lack this column
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [scale * y for y in ys], marker=marker, ms=4, color=color, label=label)
                if metric == "acc" and n:  # Wilson 95 % intervals over the documents
                    low, high = zip(*(wilson(y, n) for y in ys))
                    ax.fill_between(xs, [scale * v for v in low], [scale * v for v in high], color=color, alpha=0.15)
        if base is not None:
            ax.axhline(scale * base, color="black", linestyle="--", linewidth=1, label="no attack")
        others = {
            "superweight": iter(("tab:green", "tab:olive", "tab:cyan")),
            "activation": iter(("tab:purple", "tab:pink", "tab:brown")),
        }
        for mode, _k, label in settings:
            if mode in others:
                v = report.value(label, dataset, metric)
                if v is not None:
                    ax.axhline(
                        scale * v, linestyle=":", linewidth=1.4, color=next(others[mode], "tab:gray"), label=label
                    )
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("k (top-k massive weights)")
        ax.set_ylabel("perplexity" if metric == "ppl" else "accuracy (%), 95 % Wilson band")
        ax.set_title(dataset + (f" (n = {n})" if n else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    adapter = f" + {model_label(report.adapter)}" if report.adapter else ""
    finish(fig, f"{model_label(report.model)}{adapter}: attacks on layer {report.targets['layer']}")
    return fig


def plot_attack_sweep(report, path) -> Path:
    """Save :func:`attack_sweep_figure` as a PNG at ``path``."""
    return save_figure(attack_sweep_figure(report), path)
