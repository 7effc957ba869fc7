"""One naming scheme (docs/cli.md): the old spellings of renamed options still work, say their new
name once, and give what the new name gives; the API takes the old keyword names the same way."""

from __future__ import annotations

import json

import pytest
from helpers.process import run_cli

import llamafactory_macdrop as md

pytestmark = pytest.mark.slow


def test_old_option_spellings_work_and_say_the_new_name_once(tiny_llama_dir, tmp_path):
    def activations(*flags: str, out: str):
        proc = run_cli(["macdrop", "activations", str(tiny_llama_dir), *flags, "--json", str(tmp_path / out)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads((tmp_path / out).read_text())
        return proc, {k: v for k, v in doc.items() if k != "macdrop_version"}

    new_proc, new = activations("--probe-text", "the cat sat", out="new.json")
    old_proc, old = activations("--text", "a dog", "--text", "the cat sat", out="old.json")  # the last one wins
    assert old == new
    notes = [line for line in old_proc.stderr.splitlines() if line.startswith("macdrop: note:")]
    assert notes == ["macdrop: note: --text is now --probe-text (the old spelling still works)"]
    assert "macdrop: note:" not in new_proc.stderr


def test_old_keyword_names_work_with_a_warning(tiny_llama_dir):
    with pytest.warns(FutureWarning, match=r"activations\(\): text= is now probe_text="):
        old = md.activations(str(tiny_llama_dir), text="the cat sat", echo=None).to_dict()
    new = md.activations(str(tiny_llama_dir), probe_text="the cat sat", echo=None).to_dict()
    assert old == new
    with pytest.raises(md.api.options.ApiOptionError, match="give probe_text= only"):
        md.activations(str(tiny_llama_dir), text="a", probe_text="b", echo=None)


@pytest.mark.parametrize("command", ["activations", "superweight", "attention", "attack", "quantize"])
def test_every_probe_takes_the_old_text_spelling(command, capsys):
    """--text is --probe-text in every command that has a probe (in attack and quantize it used to
    be read, by argparse's abbreviation, as --text-file)."""
    from llamafactory_macdrop.cli import build_parser

    args = build_parser().parse_args([command, "M", "--text", "the cat sat"])
    assert args.probe_text == "the cat sat"
    assert getattr(args, "text_file", None) in (None, [])
