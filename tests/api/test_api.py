"""The Python API is the command line: ``md.X(...).to_dict()`` equals ``macdrop X ... --json``'s
document (the CLI run as a user runs it, in its own process), a loaded model gives the folder's
numbers and comes back untouched, and keywords are read as the options are."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny
from helpers.process import run_cli
from helpers.zeroshot_data import tiny_docs, write_arc_folder

import llamafactory_macdrop as md
from llamafactory_macdrop.errors import MacDropError

pytestmark = pytest.mark.slow

#: what differs between two runs of the same measurement: wall time and memory
VOLATILE = {"seconds", "peak_memory_mb"}


def stable(doc):
    """The document without timings (the numbers, protocol and labels stay)."""
    if isinstance(doc, dict):
        return {k: stable(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [stable(v) for v in doc]
    return doc


def cli_json(args: list[str], tmp_path) -> dict:
    out = tmp_path / "cli.json"
    proc = run_cli(["macdrop", *args, "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A text file the planted tokenizer knows, a tiny arc_easy folder and a two-item JSONL task."""
    root = tmp_path_factory.mktemp("api_inputs")
    text = root / "words.txt"
    text.write_text(" ".join(tiny.corpus(30, seed=5)))
    data = write_arc_folder(root / "tasks", tiny_docs(8))
    tasks = root / "qa.jsonl"
    items = [
        {"question_id": 1, "category": "qa", "turns": ["the cat"], "reference": ["sat"]},
        {"question_id": 2, "category": "qa", "turns": ["a dog"], "reference": ["ran"]},
    ]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in items))
    return text, data, tasks


def test_locate_returns_the_cli_document(tiny_llama_dir, tmp_path):
    api = md.locate(str(tiny_llama_dir), k=5, echo=None)
    assert api.to_dict() == cli_json(["locate", str(tiny_llama_dir), "--k", "5"], tmp_path)
    assert (api.result.layer, api.result.indices) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES)
    assert [p.name for p in api.plot(tmp_path / "plots")] == ["locate_intermediate.png"]


def test_attack_with_perplexity_zeroshot_and_a_generation_task_returns_the_cli_document(
    tiny_llama_dir, inputs, tmp_path
):
    text, data, tasks = inputs
    cli = cli_json(
        ["attack", str(tiny_llama_dir), "--mode", "zero", "--k-sweep", "0,5", "--text-file", str(text)]
        + ["--seq-len", "32", "--zeroshot", "arc_easy", "--zeroshot-data", str(data), "--limit", "4"]
        + ["--gen-tasks", str(tasks), "--max-new-tokens", "3", "--no-progress"],
        tmp_path,
    )
    lines = []
    api = md.attack(
        str(tiny_llama_dir),
        mode=["zero"],
        k=[0, 5],
        text_file=text,
        seq_len=32,
        zeroshot=["arc_easy"],
        zeroshot_data=data,
        limit=4,
        gen_tasks=[tasks],
        max_new_tokens=3,
        no_progress=True,
        echo=lines.append,
    )
    assert stable(api.to_dict()) == stable(cli)
    assert {r["dataset"] for r in cli["results"]} == {"words.txt", "arc_easy"}  # both families measured
    assert {r["task"] for r in cli["generation"]} == {"qa"}
    assert any(line.startswith("attack: ") for line in lines)  # the progress lines went to echo
    assert "weights restored bitwise after the sweep: yes" in api.table()
    assert sorted(p.name for p in api.plot(tmp_path / "plots")) == ["attack_sweep.png", "generation_sweep.png"]


def test_a_loaded_model_gives_the_folder_numbers_and_comes_back_untouched(tiny_llama_dir, inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text, _, _ = inputs
    options = dict(mode="zero,retain", k_sweep="0,2", text_file=[text], seq_len=32, no_progress=True, echo=None)
    folder = md.attack(str(tiny_llama_dir), **options)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()  # a user's model, in train mode
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = tmp_path / "lora"
    tiny.loud_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).save_pretrained(adapter)

    loaded = md.attack(model, tokenizer=tokenizer, **options)
    assert stable(loaded.to_dict()) == stable(folder.to_dict())
    with_adapter = md.attack(model, tokenizer=tokenizer, adapter=adapter, **options)
    assert with_adapter.to_dict()["results"][0]["ppl"] != folder.to_dict()["results"][0]["ppl"]  # it was used

    after = model.state_dict()
    assert after.keys() == before.keys()  # no LoRA layer left behind
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    with pytest.raises(MacDropError, match="dtype='float16' applies to a model folder"):
        md.attack(model, tokenizer=tokenizer, dtype="float16", **options)


def test_quantize_returns_the_cli_document(tiny_llama_dir, inputs, tmp_path):
    text, _, _ = inputs
    cli = cli_json(
        ["quantize", str(tiny_llama_dir), "--bits", "8,4", "--block-size", "tensor", "--protect", "none"]
        + ["--text-file", str(text), "--seq-len", "32", "--no-progress"],
        tmp_path,
    )
    api = md.quantize(
        tiny_llama_dir, bits=[8, 4], block_size="tensor", protect="none", text_file=text, seq_len=32, echo=None
    )
    assert stable(api.to_dict()) == stable(cli)
    assert [r["bits"] for r in cli["results"]] == [None, 8, 4]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: md.attack(d, modes="zero"), "attack() got an unknown option 'modes'; allowed: mode, k, k_sweep"),
        (lambda d: md.attack(d, json="x.json"), "unknown option 'json'"),  # the report writes, not the call
        (lambda d: md.locate(d, dtype="float8"), "dtype='float8' is not allowed: give one of float32, bfloat16"),
        (lambda d: md.attack(d, k_sweep="a,b"), "k_sweep='a,b': 'a,b': expected comma-separated integers"),
        (lambda d: md.attack(d, no_progress="yes"), "no_progress='yes': give True or False"),
        (lambda d: md.locate(d, k=0), "--k 0 is not allowed: give a number >= 1"),
        (lambda d: md.attack(d, k=[0, 5], k_sweep=[1]), "give k as a list or k_sweep, not both"),
    ],
    ids=["unknown", "output", "choices", "type", "flag", "range", "k twice"],
)
def test_bad_keywords_are_one_line_before_anything_loads(call, message, tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the keywords were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(MacDropError) as err:
        call(str(tiny_llama_dir))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
