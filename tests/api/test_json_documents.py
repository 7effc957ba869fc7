"""Every JSON document is what docs/cli.md's "JSON documents" table says: its ``schema``, the
package version, and exactly the top-level keys listed there (the bracketed ones only when asked
for). The documents are real: the API on the planted models, the CLI for summary and keys."""

from __future__ import annotations

import json
import re

import pytest
from helpers import tiny
from helpers.process import REPO, run_cli

import llamafactory_macdrop as md
from llamafactory_macdrop import __version__

pytestmark = pytest.mark.slow


def documented() -> dict[str, tuple[set[str], set[str]]]:
    """schema -> (keys always there, keys there when asked for), read from the page."""
    page = (REPO / "docs" / "cli.md").read_text()
    section = page.split("## JSON documents", 1)[1].split("\n## ", 1)[0]
    out = {}
    for schema, keys in re.findall(r"^\| `(macdrop\.[a-z]+/\d+)` \| [^|]+ \| (.+) \|$", section, flags=re.M):
        optional = {k for part in re.findall(r"\[([^\]]*)\]", keys) for k in re.findall(r"`(\w+)`", part.split(":")[0])}
        always = set(re.findall(r"`(\w+)`", re.sub(r"\[[^\]]*\]", "", keys)))
        out[schema] = (always, optional)
    return out


def check(doc: dict, schema: str) -> None:
    always, optional = documented()[schema]
    assert (doc["schema"], doc["macdrop_version"]) == (schema, __version__)
    keys = set(doc) - {"schema", "macdrop_version"}
    assert always <= keys, f"{schema}: documented but missing: {sorted(always - keys)}"
    assert keys <= always | optional, f"{schema}: written but not documented: {sorted(keys - always - optional)}"


def test_every_document_has_the_documented_schema_and_keys(tiny_llama_dir, super_weight_llama_dir, tmp_path):
    from llamafactory_macdrop.analysis.compare.report import CompareReport

    assert len(documented()) == 10
    text = tmp_path / "words.txt"
    text.write_text(" ".join(tiny.corpus(20, seed=5)))
    model = str(tiny_llama_dir)
    located = md.locate(model, echo=None)
    check(located.to_dict(), "macdrop.locator/1")
    check(located.result.to_dict(), "macdrop.locator/1")  # what training writes
    check(md.activations(model, echo=None).to_dict(), "macdrop.activations/1")
    check(md.attention(model, echo=None, no_progress=True).to_dict(), "macdrop.attention/1")
    check(
        md.attack(model, k=[0, 2], text_file=text, seq_len=32, echo=None, no_progress=True).to_dict(),
        "macdrop.attack/1",
    )
    quantized = md.quantize(model, bits=[8], block_size="tensor", protect="none", text_file=text, seq_len=32, echo=None)
    check(quantized.to_dict(), "macdrop.quantize/1")
    sw = md.superweight(str(super_weight_llama_dir), stopwords=True, echo=None)
    check(sw.to_dict(), "macdrop.superweight/1")
    check(sw.stopwords.to_dict(), "macdrop.stopwords/1")
    check(CompareReport("base.yaml", "runs", [0], [], model).to_dict(), "macdrop.compare/1")

    run = tmp_path / "run"
    located.result.write_json(run / "macdrop_locator.json")
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "macdrop_p": 0.5, "loss": 2.0}]}))
    assert run_cli(["macdrop", "summary", str(run), "--json", str(tmp_path / "s.json")], cwd=tmp_path).returncode == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    check(summary, "macdrop.summary/1")
    check(summary["locator"], "macdrop.locator/1")
    check(json.loads(run_cli(["macdrop", "keys", "--json"], cwd=tmp_path).stdout), "macdrop.keys/1")
