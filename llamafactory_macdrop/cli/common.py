"""What the command groups share: argument types and the prefix options."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.models.loading import load_tokenizer
from ..api.checks import DEFAULT_TEXT, OptionError
from ..core.values import comma_list

#: what the commands import from here (the checks live in api/checks.py, loading in analysis/models/)
__all__ = [
    "DEFAULT_TEXT",
    "OptionError",
    "add_dtype_option",
    "add_figure_options",
    "add_prefix_options",
    "command",
    "indices_arg",
    "load_tokenizer",
    "token_arg",
]


def command(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with an example (one of docs/cli.md's, which the tests run)."""
    return sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example (docs/cli.md):\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


#: old option spellings -> the one name the options have now (docs/cli.md, "One naming scheme")
RENAMED = {
    "--text": "--probe-text",
    "--gen-max-new-tokens": "--max-new-tokens",
    "--gen-no-chat-template": "--no-chat-template",
    "--batch-size": "--ppl-batch-size",
}
_NOTED: set[str] = set()


def renamed_action(base: type[argparse.Action]) -> type[argparse.Action]:
    """``base`` that, reached through an old spelling (:data:`RENAMED`), says the new one once, on
    stderr, and then does what the new one does."""

    class Renamed(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string in RENAMED and option_string not in _NOTED:
                _NOTED.add(option_string)
                import sys

                print(
                    f"macdrop: note: {option_string} is now {RENAMED[option_string]} (the old spelling still works)",
                    file=sys.stderr,
                )
            super().__call__(parser, namespace, values, option_string)

    return Renamed


def add_renamed(p, new: str, **kwargs) -> argparse.Action:
    """``new`` and, where it had one, its old spelling (:data:`RENAMED`), one option, one dest."""
    old = [o for o, n in RENAMED.items() if n == new]
    flag = kwargs.pop("action", None)
    base = {None: argparse._StoreAction, "store_true": argparse._StoreTrueAction}[flag]
    return p.add_argument(new, *old, action=renamed_action(base), **kwargs)


def add_dtype_option(p) -> None:
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the dtype the model folder is loaded in (default float32)",
    )


def add_sweep_outputs(p) -> None:
    """``--device``, ``--json``, ``--csv`` and ``--checkpoint``: where a sweep runs and what it leaves."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here (docs/cli.md lists its keys)")
    p.add_argument("--csv", type=Path, default=None, help="write the result rows as CSV here")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep every finished setting in FILE and resume from it when rerun with the same protocol "
        "(default: JSON.partial next to --json; removed once the JSON is written)",
    )


def add_prefix_options(p, corpora: bool = False) -> None:
    """``--bos`` and ``--bos-token``: what goes before a text (core/text_prefix.py). Probe texts
    know none|stream; corpora also window (every window opens with it)."""
    choices = ("none", "stream", "window") if corpora else ("none", "stream")
    p.add_argument(
        "--bos",
        choices=choices,
        default=None,
        help="what goes before the text: none, stream (once before it)"
        + (", window (every window)" if corpora else "")
        + "; default: what the tokenizer adds (nothing if it adds no BOS"
        + (", placed per corpus, docs/attacks.md)" if corpora else ")"),
    )
    p.add_argument(
        "--bos-token",
        type=token_arg,
        default=None,
        metavar="ID|TEXT",
        help="put this token first even where the tokenizer adds none (an id, or one token's text)",
    )


def _ascii_int(text: str) -> bool:
    """ASCII digits only: ``int()`` and ``str.isdigit()`` also take '٣' (3) and '²'."""
    text = text.strip()
    return text.isascii() and text.isdigit()


def token_arg(text: str) -> int | str:
    """A token id (ASCII digits) or a text."""
    if not text:
        raise argparse.ArgumentTypeError("'' is not allowed: give a token id or a text")
    return int(text) if _ascii_int(text) else text


def indices_arg(text: str) -> list[int]:
    """Comma-separated row indices, ASCII digits (checked further by :func:`~..api.checks.check_indices`)."""
    items = comma_list(text)
    if not items or not all(_ascii_int(x) for x in items):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: give comma-separated row indices >= 0, e.g. 1229,1487"
        )
    return [int(x) for x in items]


def add_figure_options(p) -> None:
    """--title and --format: what every figure of the command is called and which files it becomes."""
    p.add_argument(
        "--title", default=None, help="the title of every figure (default: the model's name and what it shows)"
    )
    p.add_argument(
        "--format",
        default="png",
        metavar="FORMATS",
        help="comma-separated figure formats: png, pdf, svg (default png; one file per format)",
    )


def run_api(command: str, args: argparse.Namespace, positional):
    """``md.COMMAND(positional, **what the command line parsed)``, progress lines printed."""
    import importlib

    from ..api.options import cli_options

    if getattr(args, "format", None) is not None:  # before anything loads
        from ..analysis.figures import parse_formats

        parse_formats(args.format)

    if hasattr(args, "checkpoint") and args.checkpoint is None and getattr(args, "json", None) is not None:
        args.checkpoint = args.json.with_name(args.json.name + ".partial")  # a killed sweep keeps its work
    func = getattr(importlib.import_module("llamafactory_macdrop.api"), command)
    return func(positional, echo=lambda line: print(line, flush=True), **cli_options(command, args))


def write_outputs(report, args: argparse.Namespace) -> None:
    """What the output options ask for: --json, --csv, the per-item JSONL, --plot's figures."""
    if getattr(args, "json", None):
        print(f"written to {report.write_json(args.json)}")
        if getattr(args, "checkpoint", None) is not None:  # the report is complete: nothing left to resume
            Path(args.checkpoint).unlink(missing_ok=True)
    if getattr(args, "csv", None):
        print(f"written to {report.write_csv(args.csv)}")
    if getattr(report, "gen_items", None) and hasattr(args, "gen_items"):
        from .evaluation import gen_items_path

        items = gen_items_path(args)
        if items is not None:
            print(f"written to {report.write_gen_items(items)}")
    if getattr(args, "plot", None):
        from ..analysis.figures import figure_style

        with figure_style(getattr(args, "title", None), getattr(args, "format", "png")) as style:
            for path in report.plot(args.plot):
                others = [path.with_suffix(f".{fmt}").name for fmt in style.formats[1:]]
                print(f"plot written to {path}" + (f" (and {', '.join(others)})" if others else ""))
