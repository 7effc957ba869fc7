"""`macdrop attack --generate`: generation alone is something to evaluate, texts in the table,
JSON and a side-by-side report, through an adapter too; bad generation options fail before loading."""

import json

import pytest
import torch
from helpers import tiny
from helpers.lm_oracle import argmax_loop

from llamafactory_macdrop.cli import main

PROMPT = "the quick brown"


@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora_gen")
    tiny.loud_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).save_pretrained(out)
    return out


def expected_text(model, tok, n=10):
    ids = tok(PROMPT)["input_ids"]
    new = argmax_loop(model.eval(), ids, n, tok.eos_token_id)
    return tok.decode([t for t in new if t != tok.eos_token_id], skip_special_tokens=True)


def test_generate_alone_side_by_side(tiny_llama_dir, lora_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = ["attack", str(tiny_llama_dir), "--generate", PROMPT, "--max-new-tokens", "10", "--no-progress"]
    assert (
        main(
            base
            + [
                "--k-sweep",
                "1,2,5",
                "--generate-settings",
                "zero:5,retain:1",
                "--json",
                str(tmp_path / "g.json"),
                "--generate-report",
                str(tmp_path / "g.html"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "g.json").read_text())
    gens = report["generations"]
    assert [(g["setting"], g["mode"], g["k"]) for g in gens] == [
        ("clean", "clean", 0),
        ("zero k=5", "zero", 5),
        ("retain k=1", "retain", 1),
    ]
    assert report["results"] == []
    assert report["restored_bitwise"] is True
    assert report["generate_protocol"] == {
        "prompt": PROMPT,
        "chat_template": False,
        "max_new_tokens": 10,
        "decoding": "greedy",
    }
    assert gens[0]["text"] == expected_text(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tok)
    assert "no chat template (the tokenizer has none)" in out
    assert "| setting | generated text |" in out
    assert f"| zero k=5 | {gens[1]['text']} |" in out
    assert "weights restored bitwise after the sweep: yes" in out
    page = (tmp_path / "g.html").read_text()
    assert page.count('<div class="col">') == 3
    assert "<h2>retain k=1</h2>" in page

    # through a LoRA adapter: the original row is base + adapter
    assert (
        main(
            base
            + [
                "--adapter",
                str(lora_dir),
                "--json",
                str(tmp_path / "a.json"),
                "--generate-report",
                str(tmp_path / "a.md"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    adapted = json.loads((tmp_path / "a.json").read_text())["generations"]
    assert [g["setting"] for g in adapted] == ["clean", "zero k=5", "retain k=5"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(lora_dir))
    with torch.no_grad():
        assert adapted[0]["text"] == expected_text(peft, tok)
    assert (tmp_path / "a.md").read_text().splitlines()[4] == "| clean | zero k=5 | retain k=5 |"


def test_bad_generation_options_fail_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-model")  # never loaded: each error comes first
    cases = [
        (
            ["--generate", "hi", "--generate-settings", "zero:7"],
            "--generate-settings 'zero:7' matches no setting of this run (settings: clean, zero k=5, retain k=5)",
        ),
        (
            ["--generate", "hi", "--generate-report", "out.txt"],
            "--generate-report out.txt: the name must end in .md, .html or .htm",
        ),
        (["--generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0 is not allowed: give a number >= 1"),
        (["--generate-settings", "zero"], "--generate-settings needs --generate PROMPT"),
    ]
    for extra, message in cases:
        assert main(["attack", missing, "--no-progress", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"macdrop: error: {message}"
