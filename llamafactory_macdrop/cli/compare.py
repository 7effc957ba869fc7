"""``macdrop compare``: plain LoRA vs MacDrop (and a grid), seeds, one evaluation, one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..api.comparison import FAMILIES
from ..core.values import comma_ints, comma_list
from .common import add_dtype_option, add_figure_options, command, run_api
from .evaluation import add_corpus_options, add_generation_options, add_zeroshot_options


def _ks(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        ks = comma_ints(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers >= 1 (e.g. 1,3,5) or none"
        ) from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be >= 1 (the clean model is always evaluated)")
    return ks


def _robustness(text: str) -> str:
    """``all`` or comma-separated families measured under the attacks (ppl is always among them)."""
    names = comma_list(text)
    bad = [n for n in names if n not in (*FAMILIES, "all")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give all or comma-separated families of {', '.join(FAMILIES)}")
    return text


def cmd_compare(args: argparse.Namespace) -> int:
    """``md.compare`` (api/comparison.py), then the tables, report.md, compare.json and the figures."""
    report = run_api("compare", args, args.config)
    if not hasattr(report, "paired"):  # --plan-only / --no-eval: the plan was printed
        return 0
    print()
    print(report.table())
    root = Path(report.output_dir)
    plots = {}
    if not args.no_plot:
        from ..analysis.figures import figure_style

        with figure_style(args.title, args.format):
            plots = report.plots(args.plot or (root / "plots"))
    for path in plots.values():
        print(f"plot written to {path}")
    print(f"report written to {report.write_markdown(args.report or (root / 'report.md'), plots)}")
    print(f"written to {report.write_json(args.json or (root / 'compare.json'))}")
    if args.csv:
        print(f"written to {report.write_csv(args.csv)}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = command(
        sub,
        "compare",
        "plain LoRA vs MacDrop (and a grid) over seeds: train, evaluate on one base, report",
        "macdrop compare examples/smollm2_compare.yaml --seeds 0,1,2 --grid macdrop_p0=0.5,0.8 "
        "--output-dir outputs/plan-example --plan-only --text-file tests/data/english.txt",
    )
    p.add_argument("config", type=Path, help="the LLaMA-Factory training YAML every arm starts from")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="KEY=V1,V2",
        help="more MacDrop arms: a macdrop_* key (e.g. macdrop_p0=0.5,0.8; macdrop_curriculum=step,exp); "
        "use_dora=false,true makes LoRA and DoRA versions of both arms (repeatable: the product)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the runs go: DIR/ARM/seedS (default: the YAML's output_dir + '-compare')",
    )
    p.add_argument(
        "--train-command",
        default=None,
        help="how one run is trained, the YAML appended (default: llamafactory-cli train; launcher "
        "settings such as FORCE_TORCHRUN pass through the environment)",
    )
    p.add_argument("--plan-only", action="store_true", help="check every arm and print the plan; train nothing")
    side = p.add_argument_group("runs side by side (docs/compare.md)")
    side.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="train and evaluate N runs at a time, each in its own processes (default 1: one after another)",
    )
    side.add_argument(
        "--devices",
        default=None,
        metavar="GROUPS",
        help="GPU groups, one run per group at a time, e.g. '0,1;2,3' (CUDA_VISIBLE_DEVICES per run)",
    )
    side.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="submit each run as a task to the Ray cluster at ADDRESS (the output folder on a shared filesystem)",
    )
    side.add_argument(
        "--gpus-per-run", type=float, default=None, metavar="G", help="--ray: GPUs each run's task asks for (default 0)"
    )
    p.add_argument("--no-eval", action="store_true", help="train the runs only")
    p.add_argument(
        "--quiet-train",
        action="store_true",
        help="training output to the log files; only the trainer's loss lines are shown",
    )
    add_corpus_options(p)
    add_zeroshot_options(p)
    add_generation_options(p, items_option=False)
    p.add_argument(
        "--mode", default="zero,retain", help="robustness attacks on the base's massive rows (default zero,retain)"
    )
    p.add_argument(
        "--robustness",
        type=_robustness,
        default="all",
        help="which families are measured under the attacks: all (default), or comma-separated ppl, zeroshot, gen "
        "(the others on the clean model only; generation is the expensive one)",
    )
    p.add_argument(
        "--k-sweep", type=_ks, default=[1, 3, 5], help="k values of the attacks (default 1,3,5; none: clean only)"
    )
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap iterations of the paired intervals (default 2000)"
    )
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    add_dtype_option(p)
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None, help="default: DIR/compare.json")
    p.add_argument("--csv", type=Path, default=None, help="write one line per run and metric as CSV here")
    p.add_argument("--report", type=Path, default=None, help="markdown report (default: DIR/report.md)")
    p.add_argument("--plot", type=Path, default=None, help="folder for the figures (default: DIR/plots)")
    add_figure_options(p)
    p.add_argument("--no-plot", action="store_true", help="draw no figures")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (evaluation, and the training runs' own)"
    )
    p.set_defaults(func=cmd_compare)
