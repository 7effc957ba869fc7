"""``with_macdrop`` on Trainers built by hand, no LLaMA-Factory: a plain ``transformers.Trainer``
(gradient checkpointing on, as LLaMA-Factory runs it) and TRL's ``SFTTrainer``, on the planted tiny
Llama with LoRA. TRL's ``DPOTrainer`` cannot be built beside this environment's transformers 5.6
(trl 0.24 reads ``model.warnings_issued``, gone in transformers 5): tests/axolotl/ runs it with the
newer TRL that venv holds; LLaMA-Factory's DPO trainer runs in tests/plugin/test_distributed.py.

The oracle is the spy of helpers/hf_trainer.py (tests/dist_check.py's Recorder): the effective
W_up/W_gate at every training forward, measured through the layer's own forward from outside.
``dist_check.verify`` asserts, per forward, Algorithm 1's weight for the mask its independent
re-implementation of the seeding rule predicts (outside the rows bitwise unchanged, dropped
elements exactly 0, the reference forward of DPO the original), and the storage bytes bitwise
restored after every optimizer step. Then: the same masks as the LLaMA-Factory plugin draws
for the same seed and steps (its own run, its own spy), ``macdrop_p`` in ``state.log_history``,
and one line for what ``with_macdrop`` refuses.
"""

import re

import pytest
import torch
from dist_check import step_p, verify
from helpers import hf_trainer, tiny
from helpers.hf_trainer import GA, P0, SEED, STEPS, Spy

from llamafactory_macdrop import MacDropConfig, with_macdrop
from llamafactory_macdrop.plugin.keys import MacDropConfigError

P_EXPECTED = [step_p(P0, t, STEPS) for t in range(1, STEPS + 1)]


def _check(trace, log_history, recompute, reference=False):
    lines = verify(
        [trace],
        layer=tiny.PLANTED_LAYER,
        indices=list(tiny.PLANTED_INDICES),
        seed=SEED,
        steps=STEPS,
        ga=GA,
        p0=P0,
        recompute=recompute,
        reference=reference,
    )
    print("\n".join(lines))
    assert hf_trainer.logged_p(log_history) == pytest.approx(P_EXPECTED)
    # exact zeros at about p in the planted rows (320 elements a forward)
    by_p = dict(zip(range(1, STEPS + 1), P_EXPECTED))
    for step, patterns in hf_trainer.masks_by_step(trace).items():
        for pattern in patterns:
            dropped = pattern.float().mean().item()
            assert dropped == 0.0 or abs(dropped - by_p[step]) < 0.12, (step, dropped, by_p[step])
    assert any(p.any() for ps in hf_trainer.masks_by_step(trace).values() for p in ps)


@pytest.fixture(scope="module")
def plain_run(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoTokenizer, Trainer

    out = tmp_path_factory.mktemp("plain")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spy = Spy()
    trainer_cls = with_macdrop(Trainer, macdrop_p0=P0)  # the step curriculum, k = 5: the defaults
    args = hf_trainer.training_args(
        out, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    trainer = trainer_cls(
        model=hf_trainer.lora_model(tiny_llama_dir),
        args=args,
        train_dataset=hf_trainer.token_rows(tok),
        processing_class=tok,
        callbacks=[spy],
    )
    trainer.train()
    return spy.finish(out), trainer.state.log_history, trainer_cls


def test_plain_trainer_runs_algorithm_1(plain_run):
    trace, log_history, trainer_cls = plain_run
    assert trainer_cls.__name__ == "MacDropTrainer"
    _check(trace, log_history, recompute=True)


def test_the_masks_are_the_llamafactory_plugins(plain_run, tiny_llama_dir, tiny_data_dir, tmp_path):
    """LLaMA-Factory's run (its run_exp, its loader, its trainer) with the same seed and steps draws
    the same mask at each optimizer step: the plugin is one user of with_macdrop."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_macdrop.plugin import integration

    integration.activate()
    spy = Spy()
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        tmp_path,
        stage="pt",
        dataset="tiny_pt",
        cutoff_len=16,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GA,
        seed=SEED,
        macdrop_p0=P0,
    )
    run_exp(args, callbacks=[spy])
    lf = hf_trainer.masks_by_step(spy.finish(tmp_path))
    plain = hf_trainer.masks_by_step(plain_run[0])
    assert sorted(lf) == sorted(plain) == list(range(1, STEPS + 1))
    for step in plain:
        assert all(torch.equal(p, lf[step][0]) for p in lf[step] + plain[step]), step


def test_trl_sft_trainer(tiny_llama_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spy = Spy()
    args = hf_trainer.training_args(
        tmp_path, cls=SFTConfig, max_length=24, dataset_text_field="text", gradient_checkpointing=True, bf16=False
    )
    trainer = with_macdrop(SFTTrainer, macdrop_p0=P0)(
        model=hf_trainer.lora_model(tiny_llama_dir),
        args=args,
        train_dataset=Dataset.from_list([{"text": t} for t in tiny.corpus(32, seed=1)]),
        processing_class=tok,
        callbacks=[spy],
    )
    trainer.train()
    _check(spy.finish(tmp_path), trainer.state.log_history, recompute=True)


@pytest.fixture()
def trl_trainers_import(monkeypatch):
    """``from trl import KTOTrainer`` (trl 0.24) fails beside transformers 5.6 in this environment: TRL
    keeps what transformers' ``_is_package_available`` returns, a tuple since transformers 5.3, so
    its "package available" flags are all true (mergekit, llm_blender, ...) and those imports fail.
    LLaMA-Factory fixes the same on import (``llamafactory.extras.packages``); here each flag is set
    to what it means."""
    import importlib

    flags = importlib.import_module("trl.import_utils")
    for name, value in list(vars(flags).items()):
        if name.startswith("_") and name.endswith("_available") and isinstance(value, tuple):
            monkeypatch.setattr(flags, name, bool(value[0]))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda T: with_macdrop(T, macdrop_p0=1.5), "macdrop_p0=1.5 is not allowed: expected a float in [0, 1]"),
        (
            lambda T: with_macdrop(T, macdrop_curiculum="exp"),
            "unknown key 'macdrop_curiculum'; did you mean 'macdrop_curriculum'?",
        ),
        (
            lambda T: with_macdrop(dict, macdrop_p0=0.5),
            "with_macdrop('dict') is not supported: it needs a transformers Trainer class",
        ),
        (
            lambda T: with_macdrop(with_macdrop(T), macdrop_p0=0.5),
            "with_macdrop(MacDropTrainer): that class already runs MacDrop",
        ),
        (
            lambda T: with_macdrop(T, config=MacDropConfig(macdrop=True), macdrop_k=3),
            "give either config= or macdrop_* keys",
        ),
    ],
    ids=["range", "typo", "not_a_trainer", "twice", "config_and_keys"],
)
def test_bad_input_is_one_line(make, needle):
    from transformers import Trainer

    with pytest.raises(MacDropConfigError) as info:
        make(Trainer)
    assert "\n" not in str(info.value)
    assert needle in str(info.value)


def test_unsupported_trl_trainers_are_refused(trl_trainers_import):
    from trl import KTOTrainer

    with pytest.raises(
        MacDropConfigError, match=r"with_macdrop\(KTOTrainer\) is not supported \(MacDrop is not implemented"
    ):
        with_macdrop(KTOTrainer)


def test_what_the_model_config_refuses_stops_at_trainer_creation(tiny_llama_dir, tmp_path):
    """The checks every host runs, as the Trainer is created, before any step: a model without an
    adapter (full fine-tuning would train the rows MacDrop drops), the model's config ranges (macdrop_layer 2 of a 2-layer model, k above the FFN width, a probe token id outside the
    vocabulary) and DoRA at p0 = 1."""
    from transformers import Trainer

    cases = [
        (
            dict(macdrop_layer=2),
            False,
            f"macdrop_layer=2 is out of range: {tiny_llama_dir}/config.json has 2 layers (0..1)",
        ),
        (dict(macdrop_k=129), False, "macdrop_k=129 is out of range: "),
        (dict(macdrop_probe_token=100000), False, "macdrop_probe_token=100000 is outside the vocabulary: "),
        (dict(macdrop_p0=1.0), True, "macdrop_p0=1.0 with use_dora=true is not supported"),
    ]
    for keys, dora, needle in cases:
        trainer_cls = with_macdrop(Trainer, **keys)
        with pytest.raises(MacDropConfigError) as info:
            trainer_cls(
                model=hf_trainer.lora_model(tiny_llama_dir, dora=dora),
                args=hf_trainer.training_args(tmp_path),
                train_dataset=[],
            )
        assert "\n" not in str(info.value)
        assert needle in str(info.value), str(info.value)


def test_distributed_variants_are_read_as_training_arguments_hold_them(tiny_llama_dir):
    """FSDP and DeepSpeed need devices or ranks this CPU test does not start, so the host checks
    are handed the values as TrainingArguments holds them after its __post_init__ (FSDPOption
    enums, fsdp_config without its fsdp_ prefix; HF's parsed DeepSpeed config)."""
    from types import SimpleNamespace

    from transformers.trainer_utils import FSDPOption

    from llamafactory_macdrop.integrations.transformers.checks import check_trainer

    model = hf_trainer.lora_model(tiny_llama_dir)
    config = MacDropConfig(macdrop=True)
    cases = [
        (
            dict(fsdp=[FSDPOption.SHARD_GRAD_OP, FSDPOption.AUTO_WRAP], fsdp_config={"version": 1}),
            "macdrop=true with FSDP1 fsdp_sharding_strategy=SHARD_GRAD_OP in fsdp / fsdp_config is not supported",
        ),
        (
            dict(fsdp=[FSDPOption.FULL_SHARD, FSDPOption.OFFLOAD], fsdp_config={"version": 2}),
            "macdrop=true with FSDP CPU offload",
        ),
        (
            dict(
                hf_deepspeed_config=SimpleNamespace(
                    config={"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}
                )
            ),
            "zero_quantized_weights=true (ZeRO++ qwZ: forward gathers a quantized copy)",
        ),
    ]
    for values, needle in cases:
        args = SimpleNamespace(
            **{"fsdp": [], "fsdp_config": {}, "deepspeed": None, "hf_deepspeed_config": None, **values}
        )
        with pytest.raises(MacDropConfigError, match=re.escape(needle)):
            check_trainer(SimpleNamespace(args=args, model=model), config)
    plain = SimpleNamespace(
        fsdp=[FSDPOption.FULL_SHARD], fsdp_config={"version": 2}, deepspeed=None, hf_deepspeed_config=None
    )
    check_trainer(SimpleNamespace(args=plain, model=model), config)  # FSDP2 full shard: supported


def test_macdrop_false_returns_the_class_and_says_so(caplog):
    import logging

    from transformers import Trainer

    logging.getLogger("llamafactory_macdrop").addHandler(caplog.handler)
    try:
        assert with_macdrop(Trainer, macdrop=False, macdrop_p0=0.3) is Trainer
    finally:
        logging.getLogger("llamafactory_macdrop").removeHandler(caplog.handler)
    assert (
        "MacDrop is off, the class is returned unchanged; these keys are ignored (not checked): macdrop_p0"
        in caplog.text
    )


def test_quantized_models_are_read_as_transformers_keeps_them(tiny_llama_dir, tmp_path):
    """The live config holds quant_method as an enum: a bitsandbytes 8-bit model is refused, a
    4-bit one is not (QLoRA: tests/plugin/test_quantized.py trains it)."""
    from types import SimpleNamespace

    from transformers import BitsAndBytesConfig

    from llamafactory_macdrop.integrations.transformers.checks import check_trainer

    model = hf_trainer.lora_model(tiny_llama_dir)
    args = SimpleNamespace(fsdp=[], fsdp_config={}, deepspeed=None, hf_deepspeed_config=None)
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(MacDropConfigError, match="quant_method=bitsandbytes is not supported: its bitsandbytes 8-bit"):
        check_trainer(SimpleNamespace(args=args, model=model), MacDropConfig(macdrop=True))
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    check_trainer(SimpleNamespace(args=args, model=model), MacDropConfig(macdrop=True))
