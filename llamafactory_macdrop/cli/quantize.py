"""``macdrop quantize``: round-to-nearest fake quantization with super weights kept, evaluated."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    DEFAULT_TEXT,
    add_dtype_option,
    add_figure_options,
    add_renamed,
    add_sweep_outputs,
    command,
    run_api,
    write_outputs,
)
from .evaluation import add_corpus_options, add_generation_options, add_super_weight_option, add_zeroshot_options


def cmd_quantize(args: argparse.Namespace) -> int:
    """Every bits x block size x clip x protection: ``md.quantize`` (api/quantization.py), then its tables and outputs."""
    report = run_api("quantize", args, args.model)
    print()
    print(report.table())
    write_outputs(report, args)
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = command(
        sub,
        "quantize",
        "round-to-nearest fake quantization (blocks, clipping, super weights kept): perplexity and zero-shot",
        "macdrop quantize models/SmolLM2-135M-Instruct --bits 8 --block-size 4096 --protect none "
        "--text-file tests/data/english.txt --no-progress",
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--bits", default="8,6,4", help="comma-separated bit widths (default 8,6,4)")
    p.add_argument(
        "--block-size",
        default="128,4096,tensor",
        help="comma-separated block sizes in elements, or tensor (default 128,4096,tensor)",
    )
    p.add_argument(
        "--clip",
        default="none",
        help="comma-separated: none, zscore:Z, block_pct:P, tensor_pct:P (P in %%), iqr:F (default none)",
    )
    p.add_argument(
        "--protect",
        default="none,sw",
        help="comma-separated: none, sw (super weights kept), sw+massive (also the top-k massive rows of "
        "W_up/W_gate) (default none,sw)",
    )
    add_super_weight_option(p)
    p.add_argument("--k", type=int, default=5, help="sw+massive: how many massive rows (default 5)")
    add_renamed(
        p,
        "--probe-text",
        default=DEFAULT_TEXT,
        help="input of the super-weight probe (what the tokenizer puts first, --bos/--bos-token, + text)",
    )
    add_corpus_options(p)
    add_zeroshot_options(p)
    add_generation_options(p)
    add_dtype_option(p)
    add_sweep_outputs(p)
    p.add_argument("--plot", type=Path, default=None, help="folder for quantize.png (metric vs block size)")
    add_figure_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
