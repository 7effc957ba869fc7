"""Figures of the generation tasks under every setting of a sweep (attack, quantize): each metric
against k with Wilson intervals for the proportions, and the needle's length x depth heat map."""

from __future__ import annotations

from pathlib import Path

from ..figures import finish, model_label, save_figure, wilson


def generation_sweep_figure(report):
    """One panel per generation task: each metric against k for top-k zeroing and retaining (the
    unattacked value and the other modes as horizontal lines), the judge on its own 1-5 axis."""
    from matplotlib.figure import Figure

    rows = [r for r in report.gen_rows if "length" not in r]  # the needle's cells: needle_heatmap_figure
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(4.2 * max(1, len(tasks)), 3.4), dpi=110)
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        mine = [r for r in rows if r["task"] == task and r["value"] == r["value"]]  # nan: nothing scored
        metrics = list(dict.fromkeys(r["metric"] for r in mine if r["metric"] != "judge"))
        judge_ax = ax.twinx() if any(r["metric"] == "judge" for r in mine) else None
        for i, metric in enumerate(metrics + (["judge"] if judge_ax is not None else [])):
            target = judge_ax if metric == "judge" else ax
            color = f"C{i}"
            points = {r["setting"]: r for r in mine if r["metric"] == metric}
            base = points.get("clean")
            for mode, marker, style in (("zero", "o", "-"), ("retain", "s", "--")):
                ks = sorted(r["k"] for r in points.values() if r["mode"] == mode)
                used = ([(0, base)] if base else []) + [(k, points[f"{mode} k={k}"]) for k in ks]
                if ks:
                    xs = [x for x, _ in used]
                    target.plot(
                        xs,
                        [r["value"] for _, r in used],
                        marker=marker,
                        ms=4,
                        linestyle=style,
                        color=color,
                        label=f"{metric} ({mode})",
                    )
                    if is_proportion(metric):  # Wilson 95 % intervals over the items
                        low, high = zip(*(wilson(r["value"], r.get("n") or 0) for _, r in used))
                        target.fill_between(xs, low, high, color=color, alpha=0.12)
            for r in points.values():
                if r["mode"] not in ("clean", "zero", "retain"):
                    target.axhline(
                        r["value"], linestyle=":", linewidth=1.2, color=color, label=f"{metric} {r['setting']}"
                    )
        ax.set_xlabel("k (top-k massive weights)")
        ax.set_ylabel("reference metric")
        if judge_ax is not None:
            judge_ax.set_ylim(1, 5)
            judge_ax.set_ylabel("judge (1-5)")
        n = max((r.get("n") or 0 for r in mine), default=0)
        ax.set_title(task + (f" (n = {n})" if n else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        handles = ax.get_legend_handles_labels()
        if judge_ax is not None:
            more = judge_ax.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
        ax.legend(*handles, fontsize=6)
    finish(fig, f"{model_label(report.model)}: generation tasks under attack")
    return fig


def is_proportion(metric: str) -> bool:
    """A metric that is a share of items right (each item 0 or 1), so a binomial interval applies."""
    name = metric.split(",")[0]
    return name.startswith("acc") or "match" in name or name in ("em", "exact")


def plot_generation_sweep(report, path) -> Path:
    """Save :func:`generation_sweep_figure` as a PNG at ``path``."""
    return save_figure(generation_sweep_figure(report), path)


def needle_heatmap_figure(report, setting_label=lambda r: r["setting"]):
    """One heat map per setting: needle accuracy by prompt length (rows) and depth (columns), each
    cell annotated with its accuracy (0 dark, 1 light)."""
    from matplotlib.figure import Figure

    grid = [r for r in report.gen_rows if "length" in r]
    settings = list(dict.fromkeys(setting_label(r) for r in grid))
    fig = Figure(figsize=(3.3 * max(1, len(settings)) + 0.8, 3.2), dpi=110)
    axes = fig.subplots(1, max(1, len(settings)), squeeze=False)[0]
    image = None
    for ax, setting in zip(axes, settings):
        mine = [r for r in grid if setting_label(r) == setting]
        lengths = sorted({r["length"] for r in mine})
        depths = sorted({r["depth"] for r in mine})
        values = [[float("nan")] * len(depths) for _ in lengths]
        for r in mine:
            values[lengths.index(r["length"])][depths.index(r["depth"])] = r["value"]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white"
                    )
        ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_xlabel("needle depth (%)", fontsize=8)
        ax.set_title(setting, fontsize=9)
    axes[0].set_ylabel("prompt tokens", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="pass-key accuracy")
    finish(fig, f"{model_label(report.model)}: needle retrieval")
    return fig


def plot_needle_heatmap(report, path, setting_label=lambda r: r["setting"]) -> Path:
    """Save :func:`needle_heatmap_figure` as a PNG at ``path``."""
    return save_figure(needle_heatmap_figure(report, setting_label), path)
