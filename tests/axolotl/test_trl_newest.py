"""``with_macdrop`` and ``MacDropCallback`` on the newest stack this project installs: TRL 1.9.0,
transformers 5.16.1 and peft 0.20.0 (axolotl 0.19.0's pins), no axolotl and no LLaMA-Factory.

TRL's ``DPOTrainer`` is tested here because the main environment's trl 0.24 cannot build it beside
transformers 5.6 (tests/integrations/test_with_macdrop.py). TRL 1.x runs the reference forward
inline, under ``use_adapter(model, None)`` (``PeftModel.disable_adapter()``), with no method a
subclass could override: the reference-forward guard must show it the original rows. Same oracle
as tests/integrations/: helpers/hf_trainer.py's spy and ``dist_check.verify``.
"""

from __future__ import annotations

import pytest
from dist_check import step_p, verify
from helpers import hf_trainer, tiny
from helpers.hf_trainer import GA, P0, SEED, STEPS, Spy

from llamafactory_macdrop import MacDropCallback, with_macdrop


def _check(trace, log_history, reference=False):
    print(
        "\n".join(
            verify(
                [trace],
                layer=tiny.PLANTED_LAYER,
                indices=list(tiny.PLANTED_INDICES),
                seed=SEED,
                steps=STEPS,
                ga=GA,
                p0=P0,
                recompute=True,
                reference=reference,
            )
        )
    )
    assert hf_trainer.logged_p(log_history) == pytest.approx([step_p(P0, t, STEPS) for t in range(1, STEPS + 1)])


def _pairs():
    texts = tiny.corpus(64, seed=1)
    return [
        {"prompt": texts[2 * i], "chosen": texts[2 * i + 1], "rejected": texts[(2 * i + 3) % 64]} for i in range(32)
    ]


@pytest.mark.parametrize(
    ("how", "adapter"),
    [("with_macdrop", "ref_copy"), ("with_macdrop", "disabled"), ("callback", "ref_copy")],
)
def test_trl_dpo_trainer(how, adapter, tiny_llama_dir, tmp_path):
    """``ref_copy``: a model that already carries its adapter; TRL 1.x adds a frozen copy named "ref"
    and makes it active for the reference forward (``set_adapter``). ``disabled``: TRL wraps the
    model from ``peft_config`` and runs the reference forward with the adapter disabled."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spy = Spy()
    args = hf_trainer.training_args(tmp_path, cls=DPOConfig, max_length=48, gradient_checkpointing=True, bf16=False)
    callbacks = [spy] if how == "with_macdrop" else [spy, MacDropCallback(macdrop_p0=P0)]
    trainer_cls = with_macdrop(DPOTrainer, macdrop_p0=P0) if how == "with_macdrop" else DPOTrainer
    if adapter == "ref_copy":
        model = dict(model=hf_trainer.lora_model(tiny_llama_dir))
    else:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        model = dict(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir), peft_config=lora)
    trainer = trainer_cls(
        args=args,
        train_dataset=Dataset.from_list(_pairs()),
        processing_class=tok,
        callbacks=callbacks,
        **model,
    )
    trainer.train()
    if adapter == "ref_copy":
        assert "ref" in trainer.model.peft_config  # the reference is the frozen copy, switched to
    _check(spy.finish(tmp_path), trainer.state.log_history, reference=True)


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
    _check(spy.finish(tmp_path), trainer.state.log_history)
