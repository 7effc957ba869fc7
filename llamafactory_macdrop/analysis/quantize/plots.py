"""The figure of ``macdrop quantize``: the metric against block size, per bit width and protection."""

from __future__ import annotations

from pathlib import Path

from ..figures import finish, metric_axis, model_label, save_figure, wilson

PROTECT_STYLES = {"none": ("tab:red", "o"), "sw": ("tab:blue", "s"), "sw+massive": ("tab:green", "^")}


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
            unit = metric_axis(ax, metric)
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
