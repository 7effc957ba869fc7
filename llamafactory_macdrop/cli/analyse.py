"""``macdrop locate | activations | superweight``: where the massive weights and activations of a model are."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    DEFAULT_TEXT,
    add_dtype_option,
    add_figure_options,
    add_prefix_options,
    add_renamed,
    command,
    indices_arg,
    run_api,
    token_arg,
    write_outputs,
)


def cmd_locate(args: argparse.Namespace) -> int:
    """``md.locate`` (api/inspection.py): the table, then --plot and --json."""
    from ..core.model_config import is_moe, read_config_json
    from ..errors import MacDropError

    if args.plot is not None and args.layer is not None and args.indices is not None:
        found = read_config_json(args.model)  # a MoE layer is probed all the same (to name the expert)
        if found is not None and not is_moe(found[1]):
            raise MacDropError("--plot needs a probe run: give --layer or --indices, not both (nothing is probed)")
    report = run_api("locate", args, args.model)
    print(report.table())
    write_outputs(report, args)
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    report = run_api("activations", args, args.model)
    print(report.table())
    write_outputs(report, args)
    return 0


def cmd_superweight(args: argparse.Namespace) -> int:
    report = run_api("superweight", args, args.model)
    print(report.table())
    write_outputs(report, args)
    if report.stopwords is not None and args.stopwords_json:
        print(f"written to {report.stopwords.write_json(args.stopwords_json)}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = command(
        sub,
        "locate",
        "find the massive layer and top-k massive weights of a model",
        "macdrop locate models/SmolLM2-135M-Instruct --json locator.json --plot plots",
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--k", type=int, default=5, help="how many rows: 1..intermediate size (default 5)")
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=indices_arg, default=None, help="comma-separated row override")
    p.add_argument(
        "--probe-token",
        type=token_arg,
        default=None,
        help="token fed alone: an id, or a text whose first token is used (default: the first candidate "
        "with a massive activation: what the template/tokenizer puts first, then BOS, then EOS)",
    )
    p.add_argument(
        "--template",
        default=None,
        help="LLaMA-Factory template NAME (as in the training YAML): its first token is the first "
        "candidate (default: the tokenizer's chat template, else a BOS the tokenizer prepends)",
    )
    add_dtype_option(p)
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write macdrop_locator.json-style output here (plus cross_check and published)",
    )
    _published_option(p)
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="folder for a bar plot of the intermediate state (and, for MoE models, the routing heatmap)",
    )
    add_figure_options(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--layer-by-layer",
        dest="layer_by_layer",
        action="store_true",
        default=None,
        help="read one layer at a time from safetensors (default: when the checkpoint exceeds half the free memory)",
    )
    group.add_argument(
        "--full-load", dest="layer_by_layer", action="store_false", help="load the whole model (however large)"
    )
    p.set_defaults(func=cmd_locate)

    for name, func, text, example in (
        (
            "activations",
            cmd_activations,
            "per-layer activation magnitudes and massive activations (Sun et al.)",
            "macdrop activations models/SmolLM2-135M-Instruct --json activations.json --plot plots",
        ),
        (
            "superweight",
            cmd_superweight,
            "candidate super weights of the down projections (Yu et al.)",
            "macdrop superweight models/SmolLM2-135M-Instruct --json superweight.json",
        ),
    ):
        p = command(sub, name, text, example)
        p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
        add_renamed(
            p,
            "--probe-text",
            default=DEFAULT_TEXT,
            help="probe text, not empty; the input is what the tokenizer puts first (if anything) + its tokens",
        )
        add_prefix_options(p)
        p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
        add_dtype_option(p)
        p.set_defaults(func=func)
        if name == "activations":
            p.add_argument(
                "--plot", type=Path, default=None, help="folder for the layer profile and intermediate bar plots"
            )
            add_figure_options(p)
            p.add_argument(
                "--abs-threshold", type=float, default=100.0, help="massive: |a| above this; >= 0 (default 100)"
            )
            p.add_argument(
                "--median-ratio",
                type=float,
                default=1000.0,
                help="massive: |a| above this times the layer median; > 1 (default 1000)",
            )
        else:
            p.add_argument(
                "--threshold",
                type=float,
                default=None,
                help="keep layers whose down output spike exceeds this; >= 0 (default: >= 0.5 x the largest)",
            )
            p.add_argument("--top", type=int, default=3, help="at most this many candidates; >= 1 (default 3)")
            p.add_argument(
                "--k",
                type=int,
                default=5,
                help="cross-check: the locator's top-k massive rows; 1..intermediate size (default 5)",
            )
            _published_option(p)
            _stopword_options(p)


def _published_option(p) -> None:
    p.add_argument(
        "--published",
        type=Path,
        action="append",
        default=None,
        metavar="FILE",
        help="also compare with the positions in FILE (repeatable; the format of the packaged "
        "analysis/inspect/published_positions.json, docs/locator.md)",
    )


def _stopword_options(p) -> None:
    from ..analysis.attack.stopwords import STOP_WORDS
    from .evaluation import add_super_weight_option

    p.add_argument(
        "--stopwords",
        action="store_true",
        help="also measure the stop-word shift: next-token probability of stop words, super weight(s) zeroed",
    )
    p.add_argument(
        "--stopword-tokens",
        nargs="+",
        default=list(STOP_WORDS),
        metavar="WORD",
        help=f"the stop words (default: {' '.join(STOP_WORDS)})",
    )
    add_super_weight_option(p)
    p.add_argument(
        "--text-file",
        type=Path,
        nargs="+",
        default=[],
        help="--stopwords: text files to measure over (default: --text)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="--stopwords: tokens per window (default 4096)")
    p.add_argument("--stopwords-json", type=Path, default=None, help="write the stop-word report as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="--stopwords: folder for stopwords.png")
    add_figure_options(p)
