"""Every bad input of the analysis commands gets one line `macdrop: error: ...` and exit code 2,
before anything loads: out-of-range options, a file that is not what it should be.

The model folder holds config.json and the tokenizer but no weights: a check that came after the
load would end in another line ("the model does not load"), so the exact line also shows that
nothing loaded; no "Loading weights" bar may appear either.
"""

import json
import shutil

import pytest
from helpers.process import run_cli

pytestmark = pytest.mark.slow

ERROR = "macdrop: error: "


@pytest.fixture(scope="module")
def no_weights(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama's folder without its weights (intermediate_size 128)."""
    folder = tmp_path_factory.mktemp("no_weights")
    for path in tiny_llama_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    return folder


def run_files(tmp_path, tiny_llama_dir) -> dict:
    """The files the cases read: a non-GGUF file and four broken locator files."""
    good = {
        "model": str(tiny_llama_dir),
        "layer": 1,
        "indices": [97, 13],
        "magnitudes": [9.0, 7.5],
        "median": 0.1,
        "probe_token_id": 1,
        "modules": ["model.layers.1.mlp.gate_proj.weight"],
        "massiveness": 90.0,
        "source": "probe",
    }
    text = json.dumps(good, indent=1)
    contents = {
        "truncated": text[: len(text) // 2].encode(),
        "latin1": '{"model": "caf\xe9"}'.encode("latin-1"),
        "empty_object": b"{}",
        "list": b"[1, 2, 3]",
    }
    out = {}
    for name, data in contents.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "macdrop_locator.json").write_bytes(data)
        out[name] = tmp_path / name
    (tmp_path / "model.gguf").write_text("not a gguf file\n")
    return out


CASES = [
    # item 1: a traceback (rc 1) or an empty table (rc 0) before
    (["locate", "{model}", "--k", "-3"], "--k -3 is not allowed: give a number >= 1"),
    (["locate", "{model}", "--k", "0"], "--k 0 is not allowed: give a number >= 1"),
    (
        ["locate", "{model}", "--k", "129"],
        "--k 129 is not allowed: give 1..128 (intermediate_size 128 in {model}/config.json)",
    ),
    (
        ["convert-gguf", "{tmp}/out", "--gguf", "{tmp}/model.gguf"],
        "--gguf {tmp}/model.gguf is not a GGUF file (it does not start with the bytes 'GGUF')",
    ),
    (["summary", "{truncated}"], "{truncated}/macdrop_locator.json is not a MacDrop locator file: not valid JSON ("),
    (
        ["summary", "{latin1}"],
        "{latin1}/macdrop_locator.json is not a MacDrop locator file: not UTF-8 text (byte 0xe9 at offset 14)",
    ),
    (
        ["summary", "{empty_object}"],
        "{empty_object}/macdrop_locator.json is not a MacDrop locator file: it has no "
        "'model', 'layer', 'indices', 'modules', 'source'",
    ),
    (
        ["summary", "{list}"],
        "{list}/macdrop_locator.json is not a MacDrop locator file: it holds a JSON array, "
        "not an object with the located layer and rows",
    ),
    # item 3: misleading rc-0 results before
    (["activations", "{model}", "--text", ""], "--text '' is not allowed: give a text of at least one token"),
    (
        ["activations", "{model}", "--median-ratio", "-1", "--abs-threshold", "-5"],
        "--abs-threshold -5 is not allowed: give a number >= 0",
    ),
    (["activations", "{model}", "--median-ratio", "0.5"], "--median-ratio 0.5 is not allowed: give a number > 1"),
    (["superweight", "{model}", "--top", "0"], "--top 0 is not allowed: give a number >= 1"),
]


@pytest.mark.parametrize(
    "argv, message",
    CASES,
    ids=[" ".join(x.replace("{", "").replace("}", "") for x in a if x != "{model}") for a, _ in CASES],
)
def test_bad_input_is_one_line_before_anything_loads(argv, message, no_weights, tiny_llama_dir, tmp_path):
    names = {"model": no_weights, "tmp": tmp_path, **run_files(tmp_path, tiny_llama_dir)}
    proc = run_cli(["macdrop", *[a.format(**names) for a in argv]], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith(ERROR), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0][len(ERROR) :].startswith(message.format(**names)), lines[0]
    assert "Loading weights" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # convert-gguf wrote nothing


def test_keys_table_keeps_its_columns(tmp_path):
    """`macdrop keys`: every row's type, default and help start where the header's do."""
    proc = run_cli(["macdrop", "keys"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    starts = [header.index(word) for word in ("type", "default", "help")]
    keys = {row["key"]: row for row in json.loads(run_cli(["macdrop", "keys", "--json"], cwd=tmp_path).stdout)["keys"]}
    assert len(rows) == len(keys)
    for row in rows:
        key = row.split()[0]
        entry = keys[key]
        cells = [entry["type"], json.dumps(entry["default"]), entry["help"]]
        assert [row[s : s + len(c)] for s, c in zip(starts, cells)] == cells, row
        assert all(row[s - 1] == " " for s in starts), row  # a blank before every column
