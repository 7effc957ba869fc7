"""`macdrop attack` as a user runs it: one sweep, JSON/CSV/plot, adapters, and one-line errors."""

import csv
import json

import pytest
from helpers import tiny, tiny_archs
from helpers.process import run_cli
from helpers.zeroshot_data import tiny_docs, write_arc_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(tiny.corpus(30, seed=5)))
    return path


@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory):
    """A LoRA adapter of the tiny Llama whose weights change its outputs (saved, as a run would)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora")
    tiny.loud_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).save_pretrained(out)
    return out


def test_sweep_writes_rows_table_csv_and_plot(tiny_llama_dir, text_file, lora_dir, tmp_path):
    data = write_arc_folder(tmp_path / "tasks", tiny_docs(12))
    args = [
        "macdrop",
        "attack",
        str(tiny_llama_dir),
        "--mode",
        "zero,retain",
        "--k-sweep",
        "0,2,5",
        "--text-file",
        str(text_file),
        "--seq-len",
        "32",
        "--zeroshot",
        "arc_easy",
        "--zeroshot-data",
        str(data),
        "--limit",
        "6",
        "--no-progress",
    ]
    proc = run_cli(
        args
        + ["--json", str(tmp_path / "a.json"), "--csv", str(tmp_path / "a.csv"), "--plot", str(tmp_path / "plots")],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "a.json").read_text())
    rows = report["results"]
    settings = list(dict.fromkeys((r["mode"], r["k"]) for r in rows))
    assert settings == [("clean", 0), ("zero", 2), ("zero", 5), ("retain", 2), ("retain", 5)]
    assert report["restored_bitwise"] is True
    assert report["targets"]["layer"] == tiny.PLANTED_LAYER
    assert report["targets"]["indices"] == tiny.PLANTED_INDICES
    (protocol,) = report["perplexity_protocol"]
    assert (protocol["seq_len"], protocol["bos"], protocol["drop_partial"]) == (32, "stream", False)
    assert report["zeroshot"]["splits"] == {"arc_easy": "validation (stock lm-eval: test)"}
    ppl = {(r["mode"], r["k"]): r["ppl"] for r in rows if r["dataset"] == "words.txt"}
    acc = [r for r in rows if r["dataset"] == "arc_easy"]
    assert len(ppl) == 5
    assert len(acc) == 5
    assert all(r["n"] == 6 and r["split"] == "validation" for r in acc)
    assert ppl[("zero", 5)] != ppl[("clean", 0)]
    assert ppl[("retain", 2)] != ppl[("clean", 0)]
    assert all(r["tokens"] == protocol["predicted_tokens"] for r in rows if "ppl" in r)
    with open(tmp_path / "a.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["mode"], int(r["k"]), r["dataset"]) for r in table] == [(r["mode"], r["k"], r["dataset"]) for r in rows]
    assert float(table[0]["ppl"]) == pytest.approx(rows[0]["ppl"])
    assert "| setting | words.txt ppl | arc_easy acc |" in proc.stdout
    assert f"| zero k=5 | {ppl[('zero', 5)]:.2f} |" in proc.stdout
    assert (tmp_path / "plots" / "attack_sweep.png").read_bytes()[:4] == b"\x89PNG"

    # the same sweep through a LoRA adapter: another baseline, same rows attacked, weights restored
    proc = run_cli(
        [
            "macdrop",
            "attack",
            str(tiny_llama_dir),
            "--adapter",
            str(lora_dir),
            "--text-file",
            str(text_file),
            "--seq-len",
            "32",
            "--no-progress",
            "--json",
            str(tmp_path / "b.json"),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapted = json.loads((tmp_path / "b.json").read_text())
    assert adapted["adapter"] == str(lora_dir)
    assert adapted["restored_bitwise"] is True
    assert adapted["targets"]["indices"] == tiny.PLANTED_INDICES  # located on the base, adapter disabled
    assert adapted["results"][0]["ppl"] != pytest.approx(ppl[("clean", 0)], rel=1e-3)  # the adapter is active
    # peft imports bitsandbytes, whose missing optional CPU kernel is not the user's business
    assert "gemm_4bit_forward" not in proc.stderr and "Setting accelerator to CPU" not in proc.stderr


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory):
    """A LoRA adapter trained (well, saved) on a tiny GPT-2: the wrong base for the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_archs.save_with_tokenizer("gpt2", tmp_path_factory.mktemp("gpt2"))
    adapter = tmp_path_factory.mktemp("gpt2_lora")
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(adapter)
    return base, adapter


def one_error_line(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("macdrop: error: "), proc.stderr[-2000:]
    return lines[0][len("macdrop: error: ") :]


def test_bad_input_gives_one_clear_line(tiny_llama_dir, text_file, gpt2_adapter, tmp_path):
    model = str(tiny_llama_dir)
    attack = ["macdrop", "attack", model, "--no-progress"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [
        (
            ["--zeroshot", "arc_easy,hellaswag"],
            "--zeroshot 'arc_easy,hellaswag': unknown task hellaswag; allowed: arc_easy, arc_challenge, boolq, piqa, winogrande",
        ),
        (
            ["--dataset", "wikitext103"],
            "--dataset 'wikitext103' is not allowed: choose from wikitext, c4, pg19, NAME=DIR for a local copy, or a dataset folder",
        ),
        (["--text-file", str(empty)], f"--text-file {empty} is empty: give a file with text to evaluate"),
        (
            ["--text-file", str(text_file), "--k", "999"],
            "--k 999 is larger than the intermediate size 128: allowed 1..128",
        ),
        (
            ["--text-file", str(text_file), "--mode", "zero,shuffle"],
            "--mode shuffle is not allowed: choose from zero, retain, superweight, activation, sw_restore",
        ),
        ([], "nothing to evaluate: give --text-file, --dataset, --zeroshot, --gen-tasks or --generate"),
    ]
    for extra, message in cases:
        assert one_error_line(run_cli(attack + extra, cwd=tmp_path)) == message

    base, adapter = gpt2_adapter
    msg = one_error_line(run_cli(attack + ["--text-file", str(text_file), "--adapter", str(adapter)], cwd=tmp_path))
    assert msg == f"--adapter {adapter} was trained on {base} (model_type=gpt2), not on {model} (model_type=llama)"
    # without the recorded base folder, peft's own check is turned into one line too
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    msg = one_error_line(run_cli(attack + ["--text-file", str(text_file), "--adapter", str(adapter)], cwd=tmp_path))
    assert msg.startswith(f"--adapter {adapter} does not fit {model} (trained on {tmp_path / 'gone'}): ")


def test_a_killed_sweep_resumes_and_ends_as_an_uninterrupted_one(tiny_llama_dir, tmp_path):
    """`macdrop attack --json` keeps every finished setting in JSON.partial; killed (SIGKILL) after
    two settings and rerun, it evaluates only the others and writes what an uninterrupted run
    writes; a rerun with another protocol starts afresh."""
    import os
    import signal
    import subprocess
    import time

    from helpers.process import BIN

    data = write_arc_folder(tmp_path / "tasks", tiny_docs(12))
    # enough text that a setting takes ~0.1 s: the kill below lands between settings, not after the last
    (longer := tmp_path / "longer.txt").write_text(" ".join(tiny.corpus(800, seed=5)))
    args = [str(tiny_llama_dir), "--mode", "zero,retain", "--k-sweep", "0,1,2,3,5", "--text-file", str(longer)]
    args += ["--seq-len", "32", "--zeroshot", "arc_easy", "--zeroshot-data", str(data), "--limit", "6", "--no-progress"]
    whole = run_cli(["macdrop", "attack", *args, "--json", str(tmp_path / "whole.json")], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out, partial = tmp_path / "killed.json", tmp_path / "killed.json.partial"
    proc = subprocess.Popen([str(BIN / "macdrop"), "attack", *args, "--json", str(out)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and len(json.loads(partial.read_text())["settings"]) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert not out.exists()
    kept = len(json.loads(partial.read_text())["settings"])
    assert 2 <= kept < 9

    resumed = run_cli(["macdrop", "attack", *args, "--json", str(out)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{kept} of 9 settings finished before" in resumed.stdout
    assert resumed.stdout.count(f"resumed from {partial}") == kept
    strip = lambda doc: [{k: v for k, v in r.items() if k != "seconds"} for r in doc["results"]]  # noqa: E731
    assert strip(json.loads(out.read_text())) == strip(json.loads((tmp_path / "whole.json").read_text()))
    assert not partial.exists()  # the report is complete: nothing left to resume

    partial.write_text(json.dumps({"key": "an earlier protocol", "settings": {'"clean"': {}}}))
    again = run_cli(["macdrop", "attack", *args, "--json", str(out)], cwd=tmp_path)
    assert again.returncode == 0 and "another protocol" in again.stdout and "resumed from" not in again.stdout
