"""``macdrop convert-gguf``: a GGUF file (default: the packaged SmolLM2-135M) as a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from ..analysis.models.gguf import convert_gguf

    out = convert_gguf(args.out, args.gguf)
    print(f"HF folder ready: {out}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser("convert-gguf", help="convert a GGUF file (default: the packaged SmolLM2-135M) to an HF folder")
    p.add_argument("out", type=Path)
    p.add_argument("--gguf", type=Path, default=None)
    p.set_defaults(func=cmd_convert_gguf)
