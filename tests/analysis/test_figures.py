"""Every figure as a paper needs it: drawn, its text inside the canvas (matplotlib's tight bounding
box), the model named by its folder's name (not its path), --title replacing the title, every
--format written, intervals where the data has n, and no offset notation on compare's axes.

The reports are real where they are cheap (the inspect commands through the API on the planted
tiny Llama) and built by hand where a real one costs a training run (compare) or a long context
(the needle grid): the figure code only reads their rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import llamafactory_macdrop as md
from llamafactory_macdrop.analysis.attack import plots as attack_plots
from llamafactory_macdrop.analysis.attack.report import AttackReport
from llamafactory_macdrop.analysis.compare import plots as compare_plots
from llamafactory_macdrop.analysis.compare.paired import AccuracyItems, PerplexityItems, paired_difference
from llamafactory_macdrop.analysis.compare.report import CompareReport, RunRecord
from llamafactory_macdrop.analysis.figures import figure_style
from llamafactory_macdrop.analysis.inspect import attention_plots
from llamafactory_macdrop.analysis.inspect import plots as inspect_plots
from llamafactory_macdrop.analysis.sweep import plots as sweep_plots

#: a path long enough to overflow any title that printed it
LONG = "/home/someone/experiments/2026-12/checkpoints/a-rather-long-folder-name-for-a-model/SmolLM2-135M-Instruct"


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text")) if t.get_text()]


def fits(fig) -> None:
    """Draw the figure and check every piece of it lies inside the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    tol = 0.02
    assert box.x0 >= -tol and box.y0 >= -tol, (box, _texts(fig)[:3])
    assert box.x1 <= width + tol and box.y1 <= height + tol, (box, width, height, _texts(fig)[:3])
    assert not any(LONG in t for t in _texts(fig)), "a title shows the model's path"


def attack_report() -> AttackReport:
    """Perplexity and accuracy rows of a k-sweep, generation rows with a needle grid."""
    report = AttackReport(model=LONG, adapter=None, targets={"layer": 11, "indices": [1229, 1487]})
    for mode, k, ppl, acc in (("clean", 0, 26.3, 0.52), ("zero", 2, 40.1, 0.40), ("zero", 5, 51.9, 0.31)):
        label = "clean" if mode == "clean" else f"{mode} k={k}"
        report.rows.append({"mode": mode, "k": k, "setting": label, "dataset": "english.txt", "ppl": ppl})
        report.rows.append({"mode": mode, "k": k, "setting": label, "dataset": "arc_easy", "acc": acc, "n": 570})
        for task, metric, value in (("nq_open", "exact_match", acc / 4), ("needle", "needle_match", acc)):
            report.gen_rows.append(
                {"mode": mode, "k": k, "setting": label, "task": task, "metric": metric, "value": value, "n": 100}
            )
        for length in (1024, 2048, 4096):
            for depth in (0, 50, 100):
                report.gen_rows.append(
                    {
                        "mode": mode,
                        "k": k,
                        "setting": label,
                        "task": "needle",
                        "metric": "needle_match",
                        "length": length,
                        "depth": depth,
                        "value": acc,
                        "n": 5,
                    }  # fmt: skip
                )
    report.restored_bitwise = True
    return report


def compare_report() -> CompareReport:
    """Two arms x 2 seeds, a perplexity near 5.8 that differs in the 4th decimal (offset notation's
    trigger) and an accuracy, with their paired differences."""
    items = {}
    for arm, shift in (("plain", 0.0), ("macdrop", 0.0001)):
        for seed in (0, 1):
            items[(arm, seed)] = {
                "ppl/english.txt/clean": PerplexityItems(
                    tuple(1.7605 + shift + 0.00002 * i for i in range(20)), (50,) * 20
                ),
                "acc/arc_easy/clean": AccuracyItems(tuple(float((i + seed) % 2) for i in range(40))),
            }
    values = {k: {m: float(v.value()) for m, v in got.items()} for k, got in items.items()}
    runs = [RunRecord(a, s, f"/tmp/{a}/{s}", values[(a, s)]) for a, s in items]
    paired = [
        paired_difference(
            m,
            {s: items[("plain", s)][m] for s in (0, 1)},
            {s: items[("macdrop", s)][m] for s in (0, 1)},
            higher_is_better=m.startswith("acc"),
            iterations=200,
        )
        for m in values[("plain", 0)]
    ]
    base = RunRecord("base", None, None, {"ppl/english.txt/clean": 5.8495, "acc/arc_easy/clean": 0.49})
    return CompareReport("base.yaml", "/tmp/cmp", [0, 1], [], LONG, {}, base, runs, paired)


def test_sweep_figures_fit_name_the_model_and_show_intervals():
    report = attack_report()
    for figure in (
        attack_plots.attack_sweep_figure(report),
        sweep_plots.generation_sweep_figure(report),
        sweep_plots.needle_heatmap_figure(report),
    ):
        fits(figure)
        assert "SmolLM2-135M-Instruct" in figure._suptitle.get_text()
    sweep = attack_plots.attack_sweep_figure(report)
    acc_ax = next(ax for ax in sweep.axes if ax.get_title().startswith("arc_easy"))
    assert acc_ax.get_title() == "arc_easy (n = 570)"
    band = acc_ax.collections[0].get_paths()[0].vertices[:, 1]  # the Wilson band around the accuracy (%)
    assert min(band) < 31 and max(band) > 52 and max(band) <= 100


def test_compare_figures_fit_keep_the_base_on_the_axis_and_use_no_offset():
    report = compare_report()
    fig = compare_plots.metrics_figure(report)
    fits(fig)
    ppl_ax = next(ax for ax in fig.axes if ax.get_title().startswith("ppl/"))
    low, high = ppl_ax.get_ylim()
    assert low <= 5.8495 <= high  # the base line is inside the axis
    assert ppl_ax.yaxis.get_major_formatter().get_offset() == ""  # no "+5.8494" over the axis
    acc_ax = next(ax for ax in fig.axes if ax.get_title().startswith("acc/"))
    assert "(%)" in acc_ax.get_title() and 30 < acc_ax.get_ylim()[1] <= 100  # a % panel spans %s
    assert "n = 40" in acc_ax.get_title()
    fits(compare_plots.paired_figure(report))


def test_inspect_figures_fit(tiny_llama_dir):
    activations = md.activations(str(tiny_llama_dir), echo=None)
    activations.model = LONG
    fits(inspect_plots.layer_profile_figure(activations))
    located = md.locate(str(tiny_llama_dir), k=5, echo=None).result
    fits(inspect_plots.intermediate_bars_figure(located.intermediate, located.indices, located.layer))
    attention = md.attention(str(tiny_llama_dir), echo=None, no_progress=True)
    attention.model = LONG
    for figure in (
        attention_plots.sink_curve_figure(attention),
        attention_plots.position_figure(attention),
        attention_plots.attention_heatmaps_figure(attention, attention.default_heatmap_layers()),
    ):
        fits(figure)


def test_title_and_formats_apply_to_every_figure_saved(tmp_path):
    report = attack_report()
    with figure_style("Figure 3: SmolLM2 under attack", ["png", "pdf", "svg"]):
        paths = report.plot(tmp_path)
        title = attack_plots.attack_sweep_figure(report)._suptitle.get_text()
    assert title == "Figure 3: SmolLM2 under attack"
    assert [p.name for p in paths] == ["attack_sweep.png", "generation_sweep.png", "needle_heatmap.png"]
    for path in paths:
        for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
            assert path.with_suffix(suffix).read_bytes().startswith(magic)


def test_a_bad_format_is_one_line_before_anything_loads(tiny_llama_dir, tmp_path):
    from helpers.process import run_cli

    proc = run_cli(["macdrop", "locate", str(tiny_llama_dir), "--plot", str(tmp_path), "--format", "png,jpg"], tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "macdrop: error: --format 'png,jpg' is not allowed: give comma-separated png, pdf, svg"
    )
    assert not any(Path(tmp_path).iterdir())


def test_wilson_interval_matches_the_formula():
    from llamafactory_macdrop.analysis.figures import wilson

    low, high = wilson(0.5, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-4) and math.isclose(high, 0.5962, abs_tol=1e-4)
    assert wilson(0.0, 10)[0] == 0.0 and wilson(1.0, 10)[1] == 1.0
