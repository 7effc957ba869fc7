"""What the analysis commands feed a model: what its tokenizer feeds it, named in every protocol.

The planted models answer by construction (tests/helpers/tiny_nobos.py: a tokenizer that adds no BOS and
a config ``bos_token_id`` whose token sets off a DECOY super weight; tests/helpers/tiny.py: a Llama-like
tokenizer that adds BOS). Perplexities are checked against Hugging Face's own loss over the
tokenizer's own encoding, never against the project's code.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import tiny, tiny_nobos
from helpers.process import BIN, run_cli

from llamafactory_macdrop.cli import main

pytestmark = pytest.mark.slow
TEXT = "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees. " * 3
ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def no_bos_dir(tmp_path_factory):
    return tiny_nobos.build_no_bos_llama(tmp_path_factory.mktemp("no_bos"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def hand_ppl(model_dir, ids: list[int]) -> float:
    """exp(mean NLL) of one window by transformers' loss (every position but the first predicted)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return math.exp(model(input_ids=x, labels=x).loss.item())


def _attack(model_dir, text_file, tmp_path, *extra):
    out = tmp_path / f"attack{len(extra)}.json"
    proc = run_cli(
        [
            "macdrop",
            "attack",
            str(model_dir),
            "--mode",
            "zero",
            "--k",
            "1",
            "--text-file",
            str(text_file),
            "--json",
            str(out),
            "--no-progress",
            *extra,
        ],
        cwd=tmp_path,
        env_extra=ENV,
    )
    return proc, out


def test_perplexity_feeds_the_tokenizers_own_encoding_and_names_it(no_bos_dir, text_file, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(no_bos_dir)
    own = tok(TEXT)["input_ids"]  # this tokenizer puts nothing first
    assert own == tok(TEXT, add_special_tokens=False)["input_ids"]

    proc, out = _attack(no_bos_dir, text_file, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    protocol = data["perplexity_protocol"][0]
    assert (protocol["prefix_token_id"], protocol["tokenizer_adds_bos"], protocol["config_bos_token_id"]) == (
        None,
        False,
        0,
    )
    assert protocol["bos"] == "none"
    assert protocol["bos_requested"] is None
    assert data["results"][0]["ppl"] == pytest.approx(hand_ppl(no_bos_dir, own), rel=1e-4)
    assert (
        "no prefix (the tokenizer adds no BOS; config bos_token_id 0 '<|endoftext|>' is not put first)" in proc.stdout
    )

    # --bos stream: the tokenizer has none to give -> one line, before the model loads
    proc, _ = _attack(no_bos_dir, text_file, tmp_path, "--bos", "stream")
    assert proc.returncode == 2
    assert "attack:" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--bos stream: this tokenizer adds no BOS" in lines[0], proc.stderr
    assert "bos_token_id 0 '<|endoftext|>'" in lines[0]
    assert "--bos-token" in lines[0]

    # naming the token: it is put first, and the protocol says the tokenizer would not have
    proc, out = _attack(no_bos_dir, text_file, tmp_path, "--bos", "stream", "--bos-token", "<|endoftext|>")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    protocol = data["perplexity_protocol"][0]
    assert (protocol["prefix_token_id"], protocol["prefix_token"], protocol["tokenizer_adds_bos"]) == (
        0,
        "<|endoftext|>",
        False,
    )
    assert data["results"][0]["ppl"] == pytest.approx(hand_ppl(no_bos_dir, [0] + own), rel=1e-4)


def test_a_tokenizer_that_adds_bos_keeps_sun_et_als_protocol(tiny_llama_dir, text_file, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    own = tok(TEXT)["input_ids"]
    assert own[0] == tok.bos_token_id
    assert own[1:] == tok(TEXT, add_special_tokens=False)["input_ids"]
    proc, out = _attack(tiny_llama_dir, text_file, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    protocol = data["perplexity_protocol"][0]
    assert (protocol["bos"], protocol["prefix_token_id"], protocol["tokenizer_adds_bos"]) == (
        "stream",
        tok.bos_token_id,
        True,
    )
    assert data["results"][0]["ppl"] == pytest.approx(hand_ppl(tiny_llama_dir, own), rel=1e-4)


def test_superweight_finds_the_planted_one_and_a_config_bos_prefix_is_flagged(no_bos_dir, tmp_path, capsys):
    first = (tiny_nobos.PLANTED_LAYER, tiny_nobos.SW_ROW, tiny_nobos.PLANTED_INDICES[0])
    out = tmp_path / "sw.json"
    assert main(["superweight", str(no_bos_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    top = data["candidates"][0]
    assert (top["layer"], top["row"], top["col"]) == first
    assert top["col_in_massive_rows"] is True
    assert top["col_is_massive_top1"] is True
    assert data["prefix"]["prefix_token_id"] is None
    assert data["prefix"]["tokenizer_adds_bos"] is False
    assert data["located"]["layer"] == tiny_nobos.PLANTED_LAYER
    assert data["warnings"] == []
    assert "rank 1 (top-1)" in printed
    assert "warning" not in printed

    # the config's BOS put first (what the commands did before): the decoy wins, and it says so
    assert main(["superweight", str(no_bos_dir), "--bos-token", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    top = data["candidates"][0]
    assert (top["layer"], top["row"], top["col"]) == (0, tiny_nobos.DECOY_ROW, tiny_nobos.DECOY_INDEX)
    assert top["col_in_massive_rows"] is False
    assert data["prefix"]["prefix_token_id"] == 0
    assert any("layer 0 differs from the massive layer 1" in w for w in data["warnings"]), data["warnings"]
    assert "warning: the super weight's layer 0 differs from the massive layer 1" in printed

    out = tmp_path / "act.json"
    assert main(["activations", str(no_bos_dir), "--bos-token", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["origin_layer"] == 0
    assert data["cross_check"]["locator_layer"] == 1
    assert "warning: the massive activations start at layer 0, the locator names layer 1" in printed
    assert main(["activations", str(no_bos_dir), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["origin_layer"] == 1
    assert "warning" not in capsys.readouterr().out


def _published_file(tmp_path, name, layer_1based, indices, sw):
    path = tmp_path / name
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "sources": {"t": {"label": "planted", "cite": "tests/helpers/tiny_nobos.py"}},
                "models": [
                    {
                        "model": "planted-no-bos",
                        "config": {
                            "model_type": "llama",
                            "hidden_size": tiny_nobos.HIDDEN,
                            "intermediate_size": tiny_nobos.INTERMEDIATE,
                            "num_hidden_layers": tiny_nobos.LAYERS,
                        },
                        "config_sources": ["tests/helpers/tiny_nobos.py"],
                        "massive": {"source": "t", "layer": layer_1based, "layer_base": 1, "indices": indices},
                        "super_weights": {"source": "t", "layer_base": 0, "coordinates": [sw]},
                    }
                ],
            }
        )
    )
    return path


def test_published_positions_are_compared_by_config(no_bos_dir, tmp_path, capsys):
    right = _published_file(
        tmp_path,
        "right.json",
        tiny_nobos.PLANTED_LAYER + 1,
        tiny_nobos.PLANTED_INDICES,
        [tiny_nobos.PLANTED_LAYER, tiny_nobos.SW_ROW, tiny_nobos.PLANTED_INDICES[0]],
    )
    wrong = _published_file(tmp_path, "wrong.json", tiny_nobos.PLANTED_LAYER + 2, [7, 8, 9, 10, 11], [2, 5, 7])
    out = tmp_path / "loc.json"
    assert main(["locate", str(no_bos_dir), "--published", str(right), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "published: matches the published position" in printed
    assert "layer 2 1-based = 1 0-based" in printed
    assert json.loads(out.read_text())["published"]["matches"] is True
    assert main(["locate", str(no_bos_dir), "--published", str(wrong), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "published: differs from the published position" in printed
    assert "located layer 1 (0-based)" in printed
    assert "published layer 2 (0-based)" in printed
    assert main(["superweight", str(no_bos_dir), "--published", str(right)]) == 0
    assert "published: matches the published super weight" in capsys.readouterr().out

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["locate", str(no_bos_dir), "--published", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(broken) in err[0]


def test_attention_feeds_the_input_as_the_tokenizer_does_and_takes_an_adapter(tiny_llama_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "lora"
    tiny.loud_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ("q_proj", "k_proj")).save_pretrained(
        adapter
    )
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "the quick brown fox"
    plain, adapted = tmp_path / "plain.json", tmp_path / "adapted.json"
    assert main(["attention", str(tiny_llama_dir), "--probe-text", text, "--json", str(plain), "--no-progress"]) == 0
    assert (
        main(
            [
                "attention",
                str(tiny_llama_dir),
                "--probe-text",
                text,
                "--adapter",
                str(adapter),
                "--json",
                str(adapted),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "+ adapter" in capsys.readouterr().out
    a, b = json.loads(plain.read_text()), json.loads(adapted.read_text())
    assert a["input_ids"] == tok(text)["input_ids"]
    assert a["prefix"]["prefix_token_id"] == tok.bos_token_id
    assert b["adapter"] == str(adapter)
    assert b["massive_layer"] == tiny.PLANTED_LAYER  # located on the base
    # the adapter's attention, measured independently through peft with eager attention
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager"), str(adapter)
    ).eval()
    with torch.no_grad():
        att = model(input_ids=torch.tensor([a["input_ids"]]), output_attentions=True).attentions
    for layer, got in enumerate(b["layers"]):
        expected = att[layer][0].mean(dim=0)[1:, 0].mean().item()  # head mean, queries >= 1, key 0
        assert got["sink_share"] == pytest.approx(expected, abs=1e-5)
    assert b["layers"][-1]["sink_share"] != pytest.approx(a["layers"][-1]["sink_share"], abs=1e-4)


@pytest.mark.parametrize("command", ["locate", "activations", "superweight", "attention", "attack", "quantize"])
def test_a_missing_model_or_a_folder_without_config_is_one_line(command, tmp_path, capsys):
    extra = ["--text-file", __file__] if command in ("attack", "quantize") else []
    (tmp_path / "empty").mkdir()
    for path, fragment in ((tmp_path / "nothing-here", "no such folder"), (tmp_path / "empty", "no config.json")):
        assert main([command, str(path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("macdrop: error: "), err
        assert fragment in err[0], err


def test_generate_settings_name_a_bad_value(tiny_llama_dir, capsys):
    assert main(["attack", str(tiny_llama_dir), "--generate", "hi", "--generate-settings", "zero:abc"]) == 2
    err = capsys.readouterr().err
    assert "'abc' is not an integer" in err
    assert err.count("\n") == 1
