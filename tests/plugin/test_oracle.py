"""The plugin's mechanism against a literal, independent Algorithm 1.

The oracle edits a deep copy of the model exactly as the paper's pseudo-code reads: save rows,
multiply rows by M in place, forward + backward, write the saved rows back. The mechanism under
test is :class:`MacDropRun` (what the trainer mixin calls per micro-batch). With the same masks
(the oracle predicts each mask with its own re-implementation of the seeding rule, and checks
that the mechanism drew exactly that one) losses and adapter gradients must be identical.
"""

import copy

import pytest
import torch
from dist_check import expected_keep
from helpers import tiny

from llamafactory_macdrop.core.architectures import find_ffn_blocks
from llamafactory_macdrop.core.curriculum import Progress
from llamafactory_macdrop.core.locator import locate_massive_weights
from llamafactory_macdrop.integrations.transformers.trainer import MacDropRun
from llamafactory_macdrop.plugin.keys import MacDropConfig


def bits(t):
    """Bitwise view of a float32 tensor (the oracle's own, not the package's)."""
    return t.contiguous().view(torch.int32)


def _peft(model, dora: bool):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        use_dora=dora,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so that every adapter matrix gets a gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def _batches(vocab: int, n: int = 4):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (2, 12), generator=g)
        ids[:, 0] = 1  # BOS first, where the massive activation lives
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _weights(model, layer):
    mlp = model.base_model.model.model.layers[layer].mlp
    return mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight


def oracle_step(model, layer, idx, keep, batch):
    """Algorithm 1, literally."""
    w_gate, w_up = _weights(model, layer)
    saved_gate, saved_up = w_gate.data[idx].clone(), w_up.data[idx].clone()
    if keep is not None:
        w_up.data[idx] *= keep
        w_gate.data[idx] *= keep
    loss = model(**batch).loss
    loss.backward()
    w_up.data[idx] = saved_up
    w_gate.data[idx] = saved_gate
    return loss.detach()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _run_both(tiny_llama, dora, checkpointing, scope="massive", steps=4, p0=0.8):
    base = _peft(tiny_llama, dora)
    oracle = copy.deepcopy(base)
    if checkpointing:
        base.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    base.train()
    oracle.train()
    cfg = MacDropConfig(macdrop=True, macdrop_p0=p0, macdrop_scope=scope)
    result = locate_massive_weights(base, cfg.macdrop_k)
    run = MacDropRun(cfg, result, find_ffn_blocks(base), seed=123)
    assert (result.layer, result.indices[:5]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES)
    rows = {
        "massive": torch.tensor(tiny.PLANTED_INDICES),
        "all": torch.arange(tiny.INTERMEDIATE),
        "non_massive": torch.tensor([i for i in range(tiny.INTERMEDIATE) if i not in tiny.PLANTED_INDICES]),
    }[scope]
    originals = [bits(w).clone() for w in _weights(base, result.layer)]
    for t, batch in enumerate(_batches(base.config.vocab_size, steps), start=1):
        base.zero_grad()
        oracle.zero_grad()
        p = p0 * (1 - t / steps)  # the step curriculum, written out
        want = expected_keep(123, t, 0, p, (len(rows), tiny.HIDDEN)) if p > 0 else None
        with run.step(Progress(t, steps)) as keep:
            loss = base(**batch).loss
            loss.backward()
        # the mechanism drew the mask the published seeding rule predicts (re-implemented in
        # dist_check), and the literal Algorithm 1 runs with THAT prediction, not with the mechanism's
        assert (keep is None) == (want is None)
        assert want is None or torch.equal(keep.cpu(), want)
        ref = oracle_step(oracle, result.layer, rows, want, batch)
        yield t, keep, loss.detach(), ref, _grads(base), _grads(oracle)
        assert all(torch.equal(bits(w), o) for w, o in zip(_weights(base, result.layer), originals))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
def test_mechanism_equals_literal_algorithm_1(tiny_llama, dora, checkpointing):
    masked_steps = 0
    for t, keep, loss, ref, grads, ref_grads in _run_both(tiny_llama, dora, checkpointing):
        assert torch.allclose(loss, ref, rtol=0, atol=1e-6), (t, loss, ref)
        assert grads.keys() == ref_grads.keys()
        assert len(grads) > 0
        for name in grads:
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7), name
        masked_steps += keep is not None
    assert masked_steps == 3  # t = 4 of 4 has p = 0: nothing drawn


def test_masks_change_the_loss_so_the_comparison_has_power(tiny_llama):
    """Different masks give clearly different losses: a mechanism that drew or applied the wrong
    mask (or none) could not pass the equality test above."""
    model = _peft(tiny_llama, False)
    batch = _batches(model.config.vocab_size, 1)[0]
    idx = torch.tensor(tiny.PLANTED_INDICES)
    g = torch.Generator().manual_seed(0)
    keeps = [None] + [torch.rand(5, tiny.HIDDEN, generator=g) > 0.5 for _ in range(2)]
    losses = [float(oracle_step(model, tiny.PLANTED_LAYER, idx, k, batch)) for k in keeps]
    assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1 :]) > 1e-4, losses


@pytest.mark.parametrize("scope", ["all", "non_massive"])
def test_scope_ablations_target_the_right_rows(tiny_llama, scope):
    for _t, keep, loss, ref, _grads, _ref_grads in _run_both(tiny_llama, False, False, scope=scope, steps=2):
        if keep is not None:
            assert torch.allclose(loss, ref, rtol=0, atol=1e-6)
            n = tiny.INTERMEDIATE - (5 if scope == "non_massive" else 0)
            assert keep.shape == (n, tiny.HIDDEN)


def test_one_mask_per_step_by_default_fresh_per_micro_batch_on_request(tiny_llama):
    model = _peft(tiny_llama, False)
    result = locate_massive_weights(model, 5)
    default = MacDropRun(MacDropConfig(macdrop=True), result, find_ffn_blocks(model), seed=1)
    shared = []
    for micro in range(2):  # default macdrop_mask_per: optimizer_step -> one mask for the whole step
        with default.step(Progress(3, 10), micro) as keep:
            shared.append(keep.clone())
    assert torch.equal(shared[0], shared[1])
    cfg = MacDropConfig(macdrop=True, macdrop_mask_per="micro_batch")
    run_a = MacDropRun(cfg, result, find_ffn_blocks(model), seed=1)
    masks = []
    for micro in range(2):
        with run_a.step(Progress(3, 10), micro) as keep:
            masks.append(keep.clone())
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], shared[0])  # micro-batch 0 uses the step's seed in both modes
    with run_a.step(Progress(3, 10), 1) as keep:  # same (seed, rank, step, micro) -> same mask
        assert torch.equal(keep, masks[1])
    assert run_a.last_p == pytest.approx(0.8 * (1 - 3 / 10))
    p = 0.8 * (1 - 3 / 10)  # both modes against the independent re-implementation of the rule
    assert torch.equal(shared[0].cpu(), expected_keep(1, 3, 0, p, tuple(shared[0].shape)))
    assert torch.equal(masks[1].cpu(), expected_keep(1, 3, 1, p, tuple(masks[1].shape)))
