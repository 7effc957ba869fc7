"""``macdrop attack``: top-k zeroing/retaining, super-weight and activation attacks, evaluated."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.values import comma_ints
from .common import (
    DEFAULT_TEXT,
    add_dtype_option,
    add_figure_options,
    add_renamed,
    add_sweep_outputs,
    command,
    indices_arg,
    run_api,
    token_arg,
    write_outputs,
)
from .evaluation import add_corpus_options, add_generation_options, add_super_weight_option, add_zeroshot_options


def _ks(text: str) -> list[int]:
    try:
        return comma_ints(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2,3,5,10") from None


def cmd_attack(args: argparse.Namespace) -> int:
    """Attack sweep: ``md.attack`` (api/attacks.py), then the tables and what the output options ask for."""
    from ..analysis.attack.attacks import AttackError

    report_file = args.generate_report
    if report_file is not None and args.generate is None:
        raise AttackError("--generate-report needs --generate PROMPT")
    if report_file is not None and report_file.suffix.lower() not in (".md", ".html", ".htm"):
        raise AttackError(f"--generate-report {report_file}: the name must end in .md, .html or .htm")
    report = run_api("attack", args, args.model)
    print()
    print(report.table())
    write_outputs(report, args)
    if report_file is not None:
        print(f"written to {report.write_generate_report(report_file)}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = command(
        sub,
        "attack",
        "top-k zeroing/retaining (and super-weight, activation) attacks: perplexity, zero-shot, generation",
        "macdrop attack models/SmolLM2-135M-Instruct --mode zero,retain --k-sweep 0,1,2,5 "
        "--text-file tests/data/english.txt --csv attack.csv --plot plots --no-progress",
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument(
        "--mode",
        default="zero,retain",
        help="comma-separated: zero, retain, superweight, activation, sw_restore (default: zero,retain)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=int, default=5, help="top-k rows for zero/retain (default 5)")
    group.add_argument("--k-sweep", type=_ks, default=None, help="comma-separated k values, e.g. 0,1,2,3,5,10")
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=indices_arg, default=None, help="comma-separated row override (ranked)")
    p.add_argument("--probe-token", type=token_arg, default=None, help="as in macdrop locate")
    p.add_argument(
        "--scale", default="0", help="superweight: comma-separated factors for the super weight (0 = zero it)"
    )
    add_super_weight_option(p)
    p.add_argument(
        "--fill",
        default="zero",
        help="activation: zero and/or mean (comma-separated): what the massive activations become",
    )
    add_renamed(
        p,
        "--probe-text",
        default=DEFAULT_TEXT,
        help="input for the super-weight/activation probes (what the tokenizer puts first, --bos/--bos-token, + text)",
    )
    p.add_argument("--adapter", type=Path, default=None, help="LoRA/DoRA adapter folder evaluated on top of MODEL")
    add_corpus_options(p)
    add_zeroshot_options(p)
    add_generation_options(p)
    add_dtype_option(p)
    add_sweep_outputs(p)
    p.add_argument("--plot", type=Path, default=None, help="folder for attack_sweep.png (metric vs k)")
    add_figure_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen = p.add_argument_group("generation under attack (docs/attacks.md)")
    gen.add_argument(
        "--generate",
        default=None,
        metavar="PROMPT",
        help="greedy continuation of PROMPT for the original model and each setting, side by side",
    )
    gen.add_argument(
        "--generate-settings",
        default=None,
        help="which settings generate: labels ('zero k=5') or MODE[:VALUE] filters (zero:5, retain, "
        "superweight:0, activation:mean), comma-separated (default: all; the original always)",
    )
    gen.add_argument(
        "--generate-report", type=Path, default=None, help="write the texts side by side to a .md or .html file"
    )
    p.set_defaults(func=cmd_attack)
