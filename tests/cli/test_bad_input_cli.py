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
    # adapters that are not readable ones, and a text file that is not UTF-8 (issue 32, item 6)
    import torch
    from safetensors.torch import save_file

    config = json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_llama_dir), "r": 4})
    for name, cfg in (("cut_config", config[: len(config) // 2]), ("list_config", "[1, 2]"), ("no_weights", config)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(cfg)
        out[name] = tmp_path / name
    (tmp_path / "cut_weights").mkdir()
    (tmp_path / "cut_weights" / "adapter_config.json").write_text(config)
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut_weights" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    out["cut_weights"] = tmp_path / "cut_weights"
    (tmp_path / "eval.txt").write_text("a text to evaluate, in UTF-8\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
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
    # an option of a task that is not asked for: refused, not silently ignored
    (
        ["attack", "{model}", "--zeroshot", "arc_easy", "--needle-lengths", "512"],
        "--needle-lengths sets up the needle: add needle to --gen-tasks",
    ),
    (
        ["quantize", "{model}", "--zeroshot", "arc_easy", "--max-length", "512"],
        "--max-length is for the long-context tasks: add needle or longbench to --gen-tasks",
    ),
    # item 3: misleading rc-0 results before
    (
        ["activations", "{model}", "--probe-text", ""],
        "--probe-text '' is not allowed: give a text of at least one token",
    ),
    (
        ["activations", "{model}", "--median-ratio", "-1", "--abs-threshold", "-5"],
        "--abs-threshold -5 is not allowed: give a number >= 0",
    ),
    (["activations", "{model}", "--median-ratio", "0.5"], "--median-ratio 0.5 is not allowed: give a number > 1"),
    (["superweight", "{model}", "--top", "0"], "--top 0 is not allowed: give a number >= 1"),
    # issue 32, item 6: adapters and text files that cannot be read, before anything loads
    (
        ["attack", "{model}", "--text-file", "{tmp}/eval.txt", "--adapter", "{cut_config}"],
        "--adapter {cut_config}: adapter_config.json is not valid JSON (",
    ),
    (
        ["attack", "{model}", "--text-file", "{tmp}/eval.txt", "--adapter", "{list_config}"],
        "--adapter {list_config}: adapter_config.json holds an array, not peft's adapter config (a JSON object)",
    ),
    (
        ["attack", "{model}", "--text-file", "{tmp}/eval.txt", "--adapter", "{no_weights}"],
        "--adapter {no_weights}: no adapter weights there (adapter_model.safetensors or adapter_model.bin): give "
        "the output_dir of a finished LoRA/DoRA run, or one of its checkpoint-N folders",
    ),
    (
        ["attention", "{model}", "--adapter", "{cut_weights}"],
        "--adapter {cut_weights}/adapter_model.safetensors cannot be read (Error while deserializing header: "
        "incomplete metadata, file not fully covered): is the file complete?",
    ),
    (
        ["attack", "{model}", "--text-file", "{tmp}/latin1.txt"],
        "--text-file {tmp}/latin1.txt is not UTF-8 text (byte 0xe9 at offset 3): convert it, e.g. iconv -f latin1 -t utf-8",
    ),
    (
        ["superweight", "{model}", "--stopwords", "--text-file", "{tmp}/latin1.txt"],
        "--text-file {tmp}/latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)",
    ),
    # item 11: repeated rows; rows outside the FFN
    (
        ["locate", "{model}", "--indices", "1,1"],
        "--indices 1,1 is not allowed: rows [1] repeat (give distinct row indices)",
    ),
    (
        ["locate", "{model}", "--indices", "3,128"],
        "--indices 128 is not allowed: give rows 0..127 (intermediate_size 128 in {model}/config.json)",
    ),
    # a figure of a probe that will not run: refused before loading, not after the JSON is written
    (
        ["locate", "{model}", "--layer", "0", "--indices", "1,2", "--plot", "{tmp}/out", "--json", "{tmp}/l.json"],
        "--plot needs a probe run: give --layer or --indices, not both",
    ),
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


def test_summary_without_trainer_state_says_so(tmp_path, tiny_llama_dir):
    """issue 32, item 11: a run folder with its locator file but no trainer_state.json (stopped before
    its first save): the table, then one line saying why no p/loss log follows."""
    folder = run_files(tmp_path, tiny_llama_dir)["truncated"].parent / "no_state"
    folder.mkdir()
    good = {"model": "m", "layer": 1, "indices": [97, 13], "modules": ["a"], "source": "probe"}
    (folder / "macdrop_locator.json").write_text(json.dumps(good))
    proc = run_cli(["macdrop", "summary", str(folder)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"no p/loss log: {folder}/trainer_state.json not found" in proc.stdout
    proc = run_cli(["macdrop", "summary", str(folder), "--plot", str(tmp_path / "p.png")], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{ERROR}{folder}/trainer_state.json has no macdrop_p entries to plot (the file does not exist)"
    ]


def test_a_probe_token_of_other_digits_is_a_text(tiny_llama_dir, tmp_path):
    """issue 32, item 10: '٣' (Arabic-Indic three) is a text, not the token id 3; ASCII digits are ids."""
    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(tiny_llama_dir)("٣", add_special_tokens=False)["input_ids"][0]
    for token, want in (("٣", first), ("3", 3)):
        proc = run_cli(
            ["macdrop", "locate", str(tiny_llama_dir), "--probe-token", token, "--json", str(tmp_path / "l.json")],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / "l.json").read_text())["probe_token_id"] == want
