"""What the model really sees first: the probe's first candidate, in training and outside it."""

import json

import pytest
import torch
from helpers import tiny
from helpers import tiny_archs as ta
from transformers import TrainerCallback

from llamafactory_macdrop.core.first_token import (
    batch_first_token,
    template_first_token,
)
from llamafactory_macdrop.core.locator import LocatorError
from llamafactory_macdrop.plugin.integration import lf_template

IM_START, IM_END, ENDOFTEXT = 1, 2, 0


def test_batch_first_token_reads_the_first_real_token_of_every_row():
    right = {
        "input_ids": torch.tensor([[5, 6, 0], [5, 7, 8], [9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]),
    }
    first = batch_first_token(right)
    assert (first.token_id, first.source) == (5, "first training batch: position 0 of 2/3 sequences (67%)")
    left = {
        "input_ids": torch.tensor([[0, 0, 9], [0, 4, 5], [4, 4, 4]]),
        "attention_mask": torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 1]]),
    }
    assert batch_first_token(left).token_id == 4  # left padding is skipped
    # LLaMA-Factory's pairwise collator: chosen rows, then rejected rows, all in input_ids
    dpo = {"input_ids": torch.tensor([[3, 1], [3, 2], [3, 1], [3, 2]]), "labels": torch.tensor([[3, 1]] * 4)}
    assert "4/4" in batch_first_token(dpo).source
    # TRL-style prompt/completion keys: the prompt is what starts the sequence
    trl = {
        "prompt_input_ids": torch.tensor([[0, 7], [0, 7]]),
        "prompt_attention_mask": torch.tensor([[0, 1], [0, 1]]),
        "chosen_input_ids": torch.tensor([[9, 9], [9, 9]]),
    }
    assert batch_first_token(trl).token_id == 7
    assert batch_first_token({"labels": torch.tensor([[1]])}) is None


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return ta.save_chatml_model(tmp_path_factory.mktemp("chatml"))


def test_template_first_token_follows_the_chat_template_or_the_named_lf_template(chatml_dir, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_dir)
    assert tok.bos_token_id is None  # Qwen-style: nothing is prepended
    own = template_first_token(tok)
    assert (own.token_id, own.text, own.source) == (IM_START, "<|im_start|>", "chat template: first token")
    qwen = template_first_token(tok, lf_template("qwen"), "qwen")
    assert (qwen.token_id, qwen.source) == (IM_START, "template qwen: first token")
    llama = AutoTokenizer.from_pretrained(tiny_llama_dir)  # no chat template; does it prepend BOS?
    plain = template_first_token(llama)
    assert plain is None or plain.token_id == llama.bos_token_id
    default = template_first_token(
        llama, lf_template("default"), "default"
    )  # "Human: ..." as in the tiny training runs
    assert default.token_id == llama("Human", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(LocatorError, match="not a LLaMA-Factory template"):
        lf_template("no-such-template")


class ConfigSpy(TrainerCallback):
    """What the trainer's model config says once training starts (after Trainer.train's alignment)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        self.bos, self.eos = config.bos_token_id, config.eos_token_id


def run_in_process(args, callbacks):
    from llamafactory_macdrop.plugin import integration

    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=callbacks)


@pytest.mark.parametrize(
    "stage, dataset, extra",
    [("sft", "tiny_sft", {}), ("dpo", "tiny_dpo", {}), ("pt", "tiny_pt", {"packing": True})],
    ids=["sft", "dpo", "pt-packing"],
)
def test_training_probes_the_first_batch_token(chatml_dir, tiny_data_dir, tmp_path, stage, dataset, extra):
    spy = ConfigSpy()
    args = tiny.lf_train_args(
        chatml_dir,
        tiny_data_dir,
        tmp_path,
        stage=stage,
        dataset=dataset,
        template="qwen",
        num_train_epochs=1,
        max_steps=2,
        **extra,
    )
    run_in_process(args, [spy])
    # issue 12: by the first step Trainer.train has aligned the config to the tokenizer, which has
    # no BOS; the checkpoint's config.json still says <|endoftext|>
    assert (spy.bos, spy.eos) == (None, IM_END)
    assert json.loads((chatml_dir / "config.json").read_text())["bos_token_id"] == ENDOFTEXT
    located = json.loads((tmp_path / "macdrop_locator.json").read_text())
    assert located["probe_token_source"].startswith("first training batch: position 0 of")
    sources = {c["token_id"]: c["source"] for c in located["candidates"]}
    assert sources[ENDOFTEXT] == "config.bos_token_id"
    assert IM_END in sources
    if stage != "pt":  # every chat sequence starts with <|im_start|>, which carries the massive activation
        assert (located["probe_token_id"], located["probe_token_text"]) == (IM_START, "<|im_start|>")
        assert "(100%)" in located["probe_token_source"]
        assert (located["layer"], located["indices"], located["massive"]) == (
            ta.PLANTED_LAYER,
            ta.PLANTED_INDICES,
            True,
        )
        assert not located["warnings"]
    else:  # packed plain text starts with a word; no candidate has a massive activation: warn, train on
        assert located["probe_token_id"] != IM_START  # packed blocks start mid-text (often right after <|im_end|>)
        assert located["massive"] is False
        assert {c["origin_layer"] for c in located["candidates"]} == {None}
        assert len(located["warnings"]) == 1
        assert located["warnings"][0].startswith("no massive activation")
        assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2


def test_macdrop_probe_token_overrides_the_first_batch_token(chatml_dir, tiny_data_dir, tmp_path):
    """A chat run whose first-batch token <|im_start|> carries the massive activation (the test
    above); ``macdrop_probe_token`` names the config BOS <|endoftext|> instead, which sets off nothing:
    the run probes that token alone, records it and its source, warns, and trains on."""
    args = tiny.lf_train_args(
        chatml_dir,
        tiny_data_dir,
        tmp_path,
        template="qwen",
        num_train_epochs=1,
        max_steps=1,
        macdrop_probe_token="<|endoftext|>",
    )
    run_in_process(args, [])
    located = json.loads((tmp_path / "macdrop_locator.json").read_text())
    assert (located["probe_token_id"], located["probe_token_text"], located["probe_token_source"]) == (
        ENDOFTEXT,
        "<|endoftext|>",
        "override: first token of '<|endoftext|>'",
    )
    assert [(c["token_id"], c["origin_layer"]) for c in located["candidates"]] == [(ENDOFTEXT, None)]  # the only one
    assert located["massive"] is False
    assert len(located["warnings"]) == 1
    assert located["warnings"][0].startswith("no massive activation")
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1
