"""Rows MacDrop masks that the optimizer also trains (LLaMA-Factory's ``additional_target``, full and
freeze fine-tuning) keep every optimizer update: the rule of core/masking.py and docs/how-it-works.md
("Trainable rows"), checked from outside.

The oracle never asks the plugin. Through LLaMA-Factory's own ``run_exp`` with plain SGD, a callback
reads the trained copy of the planted rows and their gradient right before and right after every
optimizer step, a forward pre-hook measures the weight the layer computes with (its own forward on
an identity input), and a second, independent model recomputes step 1's gradient from the batches
the run was fed, with the mask the published seeding rule predicts (re-implemented in dist_check).
Through ``llamafactory-cli``, the rows' movement after a few AdamW steps at a high learning rate is
compared with every other row's, from the files the run saved (the measurement that found the bug:
0.010 against 0.1).
"""

import pytest
import torch
import yaml
from dist_check import expected_keep
from helpers import tiny
from helpers.process import BIN, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from llamafactory_macdrop.plugin import integration

pytestmark = pytest.mark.slow

LAYER = tiny.PLANTED_LAYER
IDX = torch.tensor(tiny.PLANTED_INDICES)
LR = 0.5
SEED = 0


def norm_bits(t):
    """Bit pattern of a float32 tensor with -0.0 read as 0.0 (a dropped element is "exactly 0")."""
    return (t + 0.0).contiguous().view(torch.int32)


def effective_weight(module):
    eye = torch.eye(module.in_features)
    return type(module).forward(module, eye).T


def trained_copy(model, proj):
    """peft's modules_to_save copy of the planted layer's ``proj`` (the module that trains)."""
    suffix = f"layers.{LAYER}.mlp.{proj}.modules_to_save.default"
    (found,) = [m for name, m in model.named_modules() if name.endswith(suffix)]
    return found


class Recorder(TrainerCallback):
    """Per optimizer step: the trained rows and their gradient before the step, the rows after it,
    every forward's effective rows (up_proj), and the batches the causal LM was fed."""

    def __init__(self):
        self.pre, self.grad, self.post, self.seen, self.batches = {}, {}, {}, {}, {}
        self._inside = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        self.up, self.gate = trained_copy(model, "up_proj"), trained_copy(model, "gate_proj")
        self.up.register_forward_pre_hook(self.forward_seen)
        model.register_forward_pre_hook(self.batch_seen, with_kwargs=True)  # the trainer calls the PeftModel

    def step(self):
        return self.state.global_step + 1

    def forward_seen(self, module, args):
        if self._inside or not module.training:  # the locator's probe runs in eval mode
            return
        self._inside = True
        try:
            with torch.no_grad():
                self.seen.setdefault(self.step(), []).append(effective_weight(module)[IDX].clone())
        finally:
            self._inside = False

    def batch_seen(self, module, args, kwargs):
        if module.training and not self._inside:
            keep = ("input_ids", "attention_mask", "labels", "num_items_in_batch")
            self.batches.setdefault(self.step(), []).append(
                {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items() if k in keep}
            )

    def rows(self):
        return {n: m.weight.detach()[IDX].clone() for n, m in (("up", self.up), ("gate", self.gate))}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pre[self.step()] = self.rows()
        self.grad[self.step()] = {n: m.weight.grad[IDX].clone() for n, m in (("up", self.up), ("gate", self.gate))}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.post[self.step()] = self.rows()


@pytest.fixture(scope="module")
def sgd_run(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    """3 SGD steps (lr 0.5, no momentum, no decay, no clipping), batch 2 x GA 2, p = 0.5 constant,
    LoRA on q/v and the gate/up projections trained in full (additional_target)."""
    out = tmp_path_factory.mktemp("sgd_run")
    recorder = Recorder()
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        lora_target="q_proj,v_proj",
        additional_target="gate_proj,up_proj",
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
        seed=SEED,
    )
    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=[recorder])
    return recorder, out


def original_rows(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    return {p: weights[f"model.layers.{LAYER}.mlp.{p}_proj.weight"][IDX] for p in ("up", "gate")}


def test_trained_rows_keep_every_optimizer_update(sgd_run, tiny_llama_dir):
    rec, out = sgd_run
    start = original_rows(tiny_llama_dir)
    assert sorted(rec.pre) == sorted(rec.post) == [1, 2, 3]
    for t in (1, 2, 3):
        keep = expected_keep(SEED, t, 0, 0.5, (len(IDX), tiny.HIDDEN))
        before = start if t == 1 else rec.post[t - 1]
        for p in ("up", "gate"):
            # what the step starts from is what the previous step left: no update written over
            assert torch.equal(norm_bits(rec.pre[t][p]), norm_bits(before[p])), (t, p)
            # a dropped element gets no gradient from the micro-batches that dropped it; kept ones do
            assert torch.equal(rec.grad[t][p][~keep], torch.zeros_like(rec.grad[t][p][~keep])), (t, p)
            assert (rec.grad[t][p][keep] != 0).float().mean() > 0.9, (t, p)
            # plain SGD: after = before - lr * grad, every element (dropped ones stay where they are)
            torch.testing.assert_close(rec.post[t][p], rec.pre[t][p] - LR * rec.grad[t][p], rtol=1e-6, atol=1e-7)
            assert torch.equal(norm_bits(rec.post[t][p][~keep]), norm_bits(rec.pre[t][p][~keep]))
        # every forward of step t (two micro-batches, recomputation) masked the CURRENT rows with M_t
        assert len(rec.seen[t]) >= 2
        for rows in rec.seen[t]:
            assert torch.equal(norm_bits(rows), norm_bits(rec.pre[t]["up"] * keep)), t
    # the rows moved by the sum of their updates: at this lr, far from where they started
    moved = (rec.post[3]["up"] - start["up"]).abs()
    assert moved.max() > 0.01
    # and the files the run saved hold exactly the rows after step 3
    saved = load_file(out / "adapter_model.safetensors")
    for p in ("up", "gate"):
        key = f"base_model.model.model.layers.{LAYER}.mlp.{p}_proj.weight"  # peft's name for the trained copy
        assert torch.equal(norm_bits(saved[key][IDX]), norm_bits(rec.post[3][p])), p


def test_step_one_gradient_is_the_chain_rule_through_the_mask(sgd_run, tiny_llama_dir):
    """An independent model, masked by hand with the predicted M_1, fed the batches the run was fed:
    its gradient times M_1 is the gradient the optimizer got (LoRA's B is 0 at step 1, so the
    adapter does not change the forward yet)."""
    rec, _ = sgd_run
    keep = expected_keep(SEED, 1, 0, 0.5, (len(IDX), tiny.HIDDEN))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.train()
    mlp = model.model.layers[LAYER].mlp
    with torch.no_grad():
        for w in (mlp.up_proj.weight, mlp.gate_proj.weight):
            w[IDX] = w[IDX] * keep
    assert len(rec.batches[1]) == 2  # gradient accumulation: two micro-batches
    for batch in rec.batches[1]:
        model(**batch).loss.backward()
    for p, w in (("up", mlp.up_proj.weight), ("gate", mlp.gate_proj.weight)):
        want = w.grad[IDX] * keep
        torch.testing.assert_close(rec.grad[1][p], want, rtol=1e-4, atol=1e-6)
        # without the chain rule the dropped elements would have had this (non-zero) gradient
        assert w.grad[IDX][~keep].abs().max() > 1e-6


def _train(cfg, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return run_cli(
        ["llamafactory-cli", "train", str(tmp_path / "run.yaml")],
        cwd=tmp_path,
        env_extra={"PATH": f"{BIN}:{__import__('os').environ['PATH']}"},
    )


CONFIGS = {
    "additional_target": dict(lora_target="q_proj,v_proj", additional_target="gate_proj,up_proj"),
    "full": dict(finetuning_type="full"),
    "freeze": dict(finetuning_type="freeze", freeze_trainable_layers=2),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_trained_rows_move_like_every_other_row(config, tiny_llama_dir, tiny_data_dir, tmp_path):
    """3 AdamW steps at lr 0.05 with p = 0.8, from the files the run saved. An element kept at step 1
    gets a gradient and Adam's momentum carries it on: it moves as much as the layer's other rows
    (~lr per step). An element dropped at every step never gets a gradient: Adam (no weight decay)
    leaves it bitwise where it was. Before the fix the planted rows moved 0.010-0.013 against
    0.094-0.100: the restore wrote the step-start copy back over every update but the last."""
    out = tmp_path / "out"
    cfg = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        max_steps=3,
        gradient_accumulation_steps=1,
        macdrop_curriculum="constant",
        macdrop_p0=0.8,
        seed=SEED,
        **CONFIGS[config],
    )
    proc = _train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "MacDrop on" in proc.stderr
    before = load_file(tiny_llama_dir / "model.safetensors")[f"model.layers.{LAYER}.mlp.up_proj.weight"]
    if config == "additional_target":
        after = load_file(out / "adapter_model.safetensors")[
            f"base_model.model.model.layers.{LAYER}.mlp.up_proj.weight"
        ]
    else:
        after = load_file(out / "model.safetensors")[f"model.layers.{LAYER}.mlp.up_proj.weight"]
    moved = (after - before).abs()
    others = torch.ones(tiny.INTERMEDIATE, dtype=torch.bool)
    others[IDX] = False
    keeps = [expected_keep(SEED, t, 0, 0.8, (len(IDX), tiny.HIDDEN)) for t in (1, 2, 3)]
    kept_first, never = keeps[0], ~(keeps[0] | keeps[1] | keeps[2])
    planted, rest = moved[IDX][kept_first].median().item(), moved[others].median().item()
    print(f"{config}: median |change| of planted elements kept at step 1 {planted:.4f}, other rows {rest:.4f}")
    assert rest > 0.05
    assert planted > 0.7 * rest, (planted, rest)
    assert never.sum() > 50
    assert torch.equal(after[IDX][never], before[IDX][never])
