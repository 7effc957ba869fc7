"""``macdrop attention``: attention sinks per layer and the position experiment (docs/analysis.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
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


def cmd_attention(args: argparse.Namespace) -> int:
    """``md.attention`` (api/inspection.py): the table, then --plot and --json."""
    report = run_api("attention", args, args.model)
    print(report.table())
    write_outputs(report, args)
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = command(
        sub,
        "attention",
        "attention sinks per layer and where the probe token stands (Sun et al., House of Cards Fig. 2)",
        "macdrop attention models/SmolLM2-135M-Instruct --json attention.json --no-progress",
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    add_renamed(
        p,
        "--probe-text",
        default=None,
        help="probe text after the probe token (default 'Summer is warm. Winter is cold.')",
    )
    p.add_argument(
        "--probe-token",
        type=token_arg,
        default=None,
        help="the token put first and moved in the position experiment: an id or a text's first token "
        "(default: the input's first token, as the tokenizer feeds it)",
    )
    add_prefix_options(p)
    p.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="LoRA/DoRA adapter folder: attention of MODEL + adapter (the massive layer is located on MODEL)",
    )
    p.add_argument("--per-head", action="store_true", help="also every head's key shares (JSON)")
    p.add_argument(
        "--position-layer",
        type=int,
        default=None,
        help="layer of the position experiment's summary and figure (default: the layer after the massive "
        "one with the largest sink share)",
    )
    p.add_argument(
        "--heatmap-layers",
        type=indices_arg,
        default=None,
        help="comma-separated layers for attention_heatmaps.png (default: massive, massive+1, last)",
    )
    add_dtype_option(p)
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="folder for attention_heatmaps.png, attention_sink.png, attention_position.png",
    )
    add_figure_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_attention)
