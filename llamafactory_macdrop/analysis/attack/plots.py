"""Plots of the sweeps that edit a model: metric against k (attacks), super-weight scaling, quantization.

Why here: they read the reports of ``macdrop attack`` and ``macdrop quantize`` (rows per
setting); built as :mod:`..figures` says (``*_figure`` returns the figure, ``plot_*`` saves it).
"""

from __future__ import annotations

from pathlib import Path

from ..figures import finish, model_label, save_figure, wilson

PROTECT_STYLES = {"none": ("tab:red", "o"), "sw": ("tab:blue", "s"), "sw+massive": ("tab:green", "^")}


def _metric_axis(ax, metric: str) -> float:
    if metric == "ppl":
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        return 1.0
    ax.set_ylabel("accuracy (%)")
    return 100.0


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
        unit = _metric_axis(ax, metric)
        base = report.value("none", dataset, metric)
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


# ----------------------------------------------------------------------------- stop words
def quantization_figure(report):
    """Metric against block size ("tensor" last), one panel per bit width and corpus/task, one
    line per protection (and clipping, when several); the unquantized model as a dashed line."""
    from matplotlib.figure import Figure

    quantized = [r for r in report.rows if r["bits"] is not None]
    bits = list(dict.fromkeys(r["bits"] for r in quantized))
    sizes = sorted({r["block_size"] for r in quantized if r["block_size"] != "tensor"})
    sizes += ["tensor"] * any(r["block_size"] == "tensor" for r in quantized)
    clips = list(dict.fromkeys(r["clip"] for r in quantized))
    protects = list(dict.fromkeys(r["protect"] for r in quantized))
    columns = report.columns()
    fig = Figure(figsize=(3.8 * max(1, len(bits)), 3.2 * max(1, len(columns))), dpi=110)
    axes = fig.subplots(max(1, len(columns)), max(1, len(bits)), squeeze=False)
    for row, (dataset, metric) in enumerate(columns):
        base = report.value((None, None, None, None), dataset, metric)
        n = next((r.get("n") for r in report.rows if r["dataset"] == dataset and "acc" in r), None)
        for col, b in enumerate(bits):
            ax = axes[row][col]
            unit = _metric_axis(ax, metric)
            for c in clips:
                for p in protects:
                    color, marker = PROTECT_STYLES.get(p, ("tab:gray", "x"))
                    raw = [(i, report.value((b, s, c, p), dataset, metric)) for i, s in enumerate(sizes)]
                    raw = [(i, v) for i, v in raw if v is not None]
                    pts = [(i, unit * v) for i, v in raw]
                    if pts and metric == "acc" and n:  # Wilson 95 % intervals over the documents
                        low, high = zip(*(wilson(v, n) for _, v in raw))
                        ax.fill_between(
                            [i for i, _ in raw],
                            [unit * v for v in low],
                            [unit * v for v in high],
                            color=color,
                            alpha=0.12,
                        )
                    if pts:
                        style = "-" if c == clips[0] else ["--", ":", "-."][(clips.index(c) - 1) % 3]
                        ax.plot(
                            *zip(*pts),
                            marker=marker,
                            ms=4,
                            color=color,
                            linestyle=style,
                            label=f"protect {p}" + (f", clip {c}" if len(clips) > 1 else ""),
                        )
            if base is not None:
                ax.axhline(unit * base, color="black", linestyle="--", linewidth=1, label=f"{report.dtype}")
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels([str(s) for s in sizes], fontsize=7)
            ax.set_xlabel("block size (elements)")
            ax.set_title(
                f"{b}-bit RTN, {dataset}"
                + (f" (n = {n})" if n else "")
                + ("" if len(clips) > 1 else f", clip {clips[0]}"),
                fontsize=9,
            )
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    finish(fig, f"{model_label(report.model)}: round-to-nearest quantization")
    return fig


def plot_quantization(report, path) -> Path:
    return save_figure(quantization_figure(report), path)


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
        base = report.value("none", dataset, metric)
        n = next((r.get("n") for r in report.rows if r["dataset"] == dataset and "acc" in r), None)
        for mode, (label, color, marker) in SWEEP_STYLES.items():
            ks = sorted(k for m, k, _ in settings if m == mode)
            if not ks:
                continue
            labels = ["none"] + [f"{mode} k={k}" for k in ks]
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


# ----------------------------------------------------------------------------- generation tasks
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
            base = points.get("none")
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
                if r["mode"] not in ("none", "zero", "retain"):
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
