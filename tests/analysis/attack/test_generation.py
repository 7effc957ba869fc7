"""generation.py: greedy continuation under attack equals an independent arg-max loop on an
independently attacked copy, weights come back bit for bit, and the settings filter."""

import pytest
import torch
from helpers import tiny
from helpers.lm_oracle import argmax_loop
from test_attacks import assert_same_bits, attacker_for, state_bits

from llamafactory_macdrop.analysis.attack.attacks import AttackError, sweep_settings
from llamafactory_macdrop.analysis.attack.generation import generate_under_attack, prompt_ids, select_settings


@torch.no_grad()
def zero_planted_rows(model):
    mlp = model.model.layers[tiny.PLANTED_LAYER].mlp
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight[tiny.PLANTED_INDICES] = 0.0


@torch.no_grad()
def keep_only_planted_rows(model):
    mlp = model.model.layers[tiny.PLANTED_LAYER].mlp
    others = [i for i in range(mlp.up_proj.weight.shape[0]) if i not in tiny.PLANTED_INDICES]
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight[others] = 0.0


def test_greedy_under_attack_matches_an_independent_loop(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    before = state_bits(model)
    settings = sweep_settings(["zero", "retain"], [5])
    gens = generate_under_attack(model, tok, attacker_for(model), settings, "the quick brown", max_new_tokens=12)
    assert_same_bits(model, before)
    assert [(g.setting, g.mode, g.k) for g in gens] == [
        ("clean", "clean", 0),
        ("zero k=5", "zero", 5),
        ("retain k=5", "retain", 5),
    ]
    assert tok.chat_template is None  # plain text: the tokenizer's own encoding
    ids = tok("the quick brown")["input_ids"]

    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    expected = {"clean": argmax_loop(fresh, ids, 12, tok.eos_token_id)}
    zero_planted_rows(fresh)
    expected["zero k=5"] = argmax_loop(fresh, ids, 12, tok.eos_token_id)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    keep_only_planted_rows(fresh)
    expected["retain k=5"] = argmax_loop(fresh, ids, 12, tok.eos_token_id)  # on this model: the original text
    for g in gens:
        want = expected[g.setting]
        assert g.new_tokens == len(want)
        assert g.text == tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)
    assert expected["clean"] != expected["zero k=5"]  # the planted rows matter to what it says


def test_select_settings_by_label_or_mode_filter():
    settings = sweep_settings(
        ["zero", "retain", "superweight", "activation"], [1, 2, 5], scales=[0, 2], fills=["zero", "mean"]
    )
    labels = lambda spec: [s.label for s in select_settings(settings, spec)]  # noqa: E731
    assert labels(None) == [s.label for s in settings]
    assert labels("zero:5,retain") == ["clean", "zero k=5", "retain k=1", "retain k=2", "retain k=5"]
    assert labels("zero k=2, superweight:0, activation:mean") == [
        "clean",
        "zero k=2",
        "superweight x0",
        "activation := mean",
    ]
    assert labels("clean") == ["clean"]
    with pytest.raises(
        AttackError, match=r"--generate-settings 'zero:7' matches no setting of this run \(settings: clean, zero k=1"
    ):
        select_settings(settings, "zero:7")
    with pytest.raises(AttackError, match=r"--generate-settings 'shuffle' is not allowed: give a setting label"):
        select_settings(settings, "shuffle")


def test_prompt_ids_apply_the_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = "What is the capital of France?"
    chatml = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )  # SmolLM2's ChatML, written out
    assert prompt_ids(tok, prompt) == (tok(chatml, add_special_tokens=False)["input_ids"], True)
    assert prompt_ids(tok, prompt, chat_template=False) == (tok(prompt)["input_ids"], False)
