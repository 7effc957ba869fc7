"""``MacDropCallback`` on a plain ``transformers.Trainer`` (no LLaMA-Factory, no Trainer subclass):
the masks, the restore at every exit, and what it refuses.

Oracles: the spy of helpers/hf_trainer.py (effective W_up/W_gate at every training forward and the
storage bytes after every optimizer step, checked by ``dist_check.verify`` against the masks its
own re-implementation of the seeding rule predicts), and the stored weight read from the
checkpoint file after an interrupted run.
"""

import pytest
import torch
from dist_check import verify
from helpers import hf_trainer, tiny
from helpers.hf_trainer import GA, P0, SEED, STEPS, Spy
from safetensors.torch import load_file
from transformers import TrainerCallback

from llamafactory_macdrop import MacDropCallback, with_macdrop
from llamafactory_macdrop.plugin.keys import MacDropConfigError

UP = f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj"


def _trainer(model_dir, out, callbacks, trainer_cls=None, **args):
    from transformers import AutoTokenizer, Trainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return (trainer_cls or Trainer)(
        model=hf_trainer.lora_model(model_dir),
        args=hf_trainer.training_args(out, **args),
        train_dataset=hf_trainer.token_rows(tok),
        processing_class=tok,
        callbacks=callbacks,
    )


def test_the_callback_runs_algorithm_1_per_optimizer_step(tiny_llama_dir, tmp_path):
    spy = Spy()
    callback = MacDropCallback(macdrop_p0=P0)
    trainer = _trainer(
        tiny_llama_dir,
        tmp_path,
        [spy, callback],
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer.train()
    lines = verify(
        [spy.finish(tmp_path)],
        layer=tiny.PLANTED_LAYER,
        indices=list(tiny.PLANTED_INDICES),
        seed=SEED,
        steps=STEPS,
        ga=GA,
        p0=P0,
        recompute=True,
    )
    print("\n".join(lines))
    assert hf_trainer.logged_p(trainer.state.log_history) == pytest.approx([P0 * (1 - t / STEPS) for t in (1, 2, 3)])
    assert "training_step" not in trainer.__dict__  # the guard is gone once training ends


class Interrupt(TrainerCallback):
    """Raises ``error`` in optimizer step 2: inside its second micro-batch's forward (``where="forward"``,
    a forward pre-hook on the planted layer), or between its two micro-batches (``where="between"``)."""

    def __init__(self, error, where):
        self.error, self.where, self.micro = error, where, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        (layer,) = [m for n, m in model.named_modules() if n.endswith(UP + ".base_layer")]
        layer.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        if module.training and self.state.global_step + 1 == 2:
            self.micro += 1
            if self.where == "forward" and self.micro == 2:
                raise self.error

    def on_substep_end(self, args, state, control, **kwargs):
        if self.where == "between" and state.global_step + 1 == 2:
            raise self.error


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (KeyboardInterrupt(), "forward"),
        (RuntimeError("out of memory (planted)"), "forward"),
        (KeyboardInterrupt(), "between"),
    ],
    ids=["interrupt_in_forward", "error_in_forward", "interrupt_between_micro_batches"],
)
def test_an_exception_in_a_step_leaves_the_original_weights(error, where, tiny_llama_dir, tmp_path):
    """The weights in memory after ``train()`` raised are the checkpoint's, bit for bit (a notebook
    that catches the error and merges or saves the model must not keep dropped rows)."""
    original = load_file(tiny_llama_dir / "model.safetensors")
    spy = Spy()
    callbacks = [spy, MacDropCallback(macdrop_p0=0.8, macdrop_curriculum="constant"), Interrupt(error, where)]
    trainer = _trainer(tiny_llama_dir, tmp_path, callbacks)
    with pytest.raises(type(error)):
        trainer.train()
    masked_forwards = [w for step, w in spy.trace["forward"] if (w["up"] != spy.trace["original"]["up"]).any()]
    assert masked_forwards, "no forward saw a mask: the test would prove nothing"
    after = dict(trainer.model.named_parameters())
    for name in (f"{UP}.weight", f"model.layers.{tiny.PLANTED_LAYER}.mlp.gate_proj.weight"):
        live = next(p for n, p in after.items() if n.endswith(name.replace(".weight", ".base_layer.weight")))
        assert torch.equal(live.detach().view(torch.int32), original[name].view(torch.int32)), name


def test_refusals_are_one_line(tiny_llama_dir, tmp_path):
    from transformers import Trainer

    with pytest.raises(MacDropConfigError) as info:
        MacDropCallback(macdrop_mask_per="micro_batch")
    assert "MacDropCallback with macdrop_mask_per='micro_batch' is not supported: a callback draws one mask" in str(
        info.value
    )
    with pytest.raises(MacDropConfigError, match="already runs MacDrop"):
        _trainer(tiny_llama_dir, tmp_path, [MacDropCallback()], trainer_cls=with_macdrop(Trainer)).train()
    with pytest.raises(MacDropConfigError, match="it runs inside a transformers Trainer's train"):
        MacDropCallback().on_train_begin(None, None, None)
    with pytest.raises(MacDropConfigError, match="macdrop_p0=2.0 is not allowed"):
        MacDropCallback(macdrop_p0=2.0)
