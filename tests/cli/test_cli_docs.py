"""docs/cli.md is executed: every `$ macdrop ...` example runs, and what the page shows is printed.

Each ```console block of the page holds commands (lines starting with `$ `) followed by the
output lines the page shows for them. The test runs each command as a user would, from a
folder laid out like the repository after `make demo` (models/, tests/data, examples/, and a
short real MacDrop training run in outputs/smollm2-lora-macdrop), and checks that the shown
lines appear in the command's stdout: consecutive lines must be consecutive there, `...`
stands for any number of lines; integers must be equal and decimals agree to 1 % (so a
different CPU's last-digit rounding does not fail the page, while a wrong index or a wrong
table does). A second test checks that every option of every `macdrop` subcommand appears
in the page, so the reference cannot silently fall behind the code.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex

import pytest
from helpers.process import BIN, REPO, run_cli

pytestmark = pytest.mark.slow
PAGE = REPO / "docs" / "cli.md"
NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


def examples() -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for every `$ ` line inside ```console blocks."""
    out, block = [], None
    for line in PAGE.read_text().splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```console" and block is None else None
            continue
        if block is None:
            continue
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line.rstrip())
    return out


def _same_line(shown: str, printed: str) -> bool:
    """Equal text; integers (indices, layers, counts) equal, decimals within 1 %."""
    a, b = NUMBER.split(shown.strip()), NUMBER.split(printed.strip())
    if [x.split() for x in a] != [x.split() for x in b]:
        return False
    for x, y in zip(NUMBER.findall(shown), NUMBER.findall(printed)):
        fx, fy = float(x.replace(",", "")), float(y.replace(",", ""))
        if "." not in x + y and fx != fy:
            return False
        if not math.isclose(fx, fy, rel_tol=0.01, abs_tol=1e-9):
            return False
    return True


def shown_in(shown: list[str], printed: list[str]) -> str | None:
    """None when the shown lines appear in ``printed`` (runs consecutive, in order); else why not."""
    runs, run = [], []
    for line in shown:
        if line.strip() == "...":
            runs.append(run)
            run = []
        elif line.strip():
            run.append(line)
    runs.append(run)
    pos = 0
    for run in filter(None, runs):
        for start in range(pos, len(printed) - len(run) + 1):
            if all(_same_line(s, p) for s, p in zip(run, printed[start : start + len(run)])):
                pos = start + len(run)
                break
        else:
            return f"not printed (from position {pos}):\n  " + "\n  ".join(run)
    return None


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory, smollm2_dir):
    """A working folder like the repository after `make demo`, with a short real training run."""
    root = tmp_path_factory.mktemp("cli_docs")
    for name in ("models", "tests", "examples"):
        (root / name).symlink_to(REPO / name)
    proc = run_cli(
        ["llamafactory-cli", "train", "examples/smollm2_lora_macdrop.yaml", "max_steps=2", "logging_steps=1"],
        cwd=root,
        env_extra={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "outputs" / "smollm2-lora-macdrop" / "macdrop_locator.json").is_file()
    return root


def test_page_has_examples_of_every_command():
    commands = {shlex.split(cmd)[1] for cmd, _ in examples()}
    assert commands == {
        "locate",
        "activations",
        "superweight",
        "attention",
        "attack",
        "quantize",
        "compare",
        "summary",
        "convert-gguf",
        "keys",
    }


@pytest.mark.parametrize("command, shown", examples(), ids=[c[:60] for c, _ in examples()])
def test_example_runs_and_prints_what_the_page_shows(command, shown, demo_tree):
    argv = shlex.split(command)
    assert argv[0] == "macdrop"
    proc = run_cli(argv, cwd=demo_tree, env_extra={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    problem = shown_in(shown, proc.stdout.splitlines())
    assert problem is None, f"{command}\n{problem}\n--- printed:\n{proc.stdout}"
    for flag in ("--json", "--csv"):  # the files the example says it writes exist and are not empty
        if flag in argv:
            assert (demo_tree / argv[argv.index(flag) + 1]).stat().st_size > 0


def test_every_option_is_in_the_reference():
    from llamafactory_macdrop.cli import build_parser

    page = PAGE.read_text()
    sections = dict(re.findall(r"^## `macdrop ([\w-]+)`\n(.*?)(?=^## |\Z)", page, flags=re.S | re.M))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(sections), "a subcommand without a section (or a section without a command)"
    missing = [
        f"{name} {opt}"
        for name, parser in sub.choices.items()
        for action in parser._actions
        for opt in action.option_strings
        if opt not in ("-h", "--help") and f"`{opt}" not in sections[name]
    ]
    assert not missing, f"options missing from docs/cli.md: {missing}"


def test_help_has_an_example_per_command_from_this_page_and_every_option_says_what_it_does():
    """`macdrop COMMAND --help` ends with one of this page's examples (so the test above runs it), and
    no option is listed without a help text; `macdrop --version` names the package's version."""
    from llamafactory_macdrop import __version__
    from llamafactory_macdrop.cli import build_parser

    commands = {cmd for cmd, _ in examples()}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        example = parser.epilog.split("\n", 1)[1].strip()
        assert example in commands, f"{name}: its --help example is not one of docs/cli.md's: {example}"
        silent = [a.option_strings or a.dest for a in parser._actions if a.dest != "help" and not a.help]
        assert not silent, f"{name}: options without help: {silent}"
    proc = run_cli(["macdrop", "--version"], cwd=REPO)
    assert proc.stdout.strip() == f"macdrop (llamafactory-macdrop) {__version__}"


def test_the_matcher_fails_on_a_wrong_page():
    printed = ["a 1,229 rows", "b 26.762 ppl", "c done"]
    assert shown_in(["a 1,229 rows", "b 26.76 ppl"], printed) is None
    assert shown_in(["a 1,229 rows", "...", "c done"], printed) is None
    assert shown_in(["b 26.9 ppl"], printed) is None  # decimals within 1 %
    assert shown_in(["b 27.1 ppl"], printed) is not None
    assert shown_in(["a 1,230 rows"], printed) is not None  # integers exactly
    assert shown_in(["a 1,229 rows", "c done"], printed) is not None  # not consecutive
    assert shown_in(["c done", "...", "a 1,229 rows"], printed) is not None  # wrong order
