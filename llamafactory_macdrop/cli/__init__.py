"""``macdrop``: the analysis command line (thin: parse, call the core, print).

One module per command group: :mod:`.analyse` (locate, activations, superweight), :mod:`.attention`,
:mod:`.attack`, :mod:`.quantize`, :mod:`.compare`, :mod:`.models` (convert-gguf), :mod:`.runs` (summary, keys);
:mod:`.common` holds what they share, :mod:`.evaluation` the corpus / zero-shot / super-weight
options of the commands that evaluate.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import analyse, attack, attention, compare, models, quantize, runs

DESCRIPTION = (
    "Find, attack and measure the massive weights, massive activations and super weights of a model, "
    "and compare plain LoRA with MacDrop (training itself stays `llamafactory-cli train x.yaml`)."
)
EPILOG = (
    "Every command prints a short table and (but convert-gguf) can write JSON; `macdrop COMMAND --help` shows its options "
    "and an example. Reference: docs/cli.md; the same commands as Python functions: docs/api.md."
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="macdrop", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"macdrop (llamafactory-macdrop) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (analyse, attention, attack, quantize, compare, models, runs):  # the order of `macdrop --help`
        group.register(sub)
    return parser


#: lines other libraries log at import on a CPU machine that say nothing about the user's run:
#: DeepSpeed naming the accelerator it picked, bitsandbytes missing an optional 4-bit CPU kernel
#: (no 4-bit matmul runs in an analysis). Only these exact messages are dropped.
KNOWN_NOISE = {
    "DeepSpeed": "Setting accelerator to CPU",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}


def quiet_known_noise() -> None:
    import logging

    for name, start in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, start=start: not str(record.msg).startswith(start))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import MacDropError

    quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MacDropError as err:  # every user-facing error is one (llamafactory_macdrop/errors.py)
        print(f"macdrop: error: {err}", file=sys.stderr)
        return 2
