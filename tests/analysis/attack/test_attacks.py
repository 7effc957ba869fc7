"""attacks.py: in-place edits at the planted rows of every layout, and bitwise restoration."""

import pytest
import torch
from helpers import tiny, tiny_archs

from llamafactory_macdrop.analysis.attack.attacks import (
    AttackError,
    AttackSetting,
    AttackTargets,
    ModelAttacker,
    massive_activation_target,
    super_weight_target,
    sweep_settings,
)
from llamafactory_macdrop.core.architectures import find_ffn_blocks
from llamafactory_macdrop.core.locator import locate_massive_weights, probe_ffn_states
from llamafactory_macdrop.core.probing import as_batch, first_tensor
from llamafactory_macdrop.core.storage import bits


def state_bits(model):
    return {n: bits(p.detach()).clone() for n, p in model.state_dict().items()}


def assert_same_bits(model, snapshot):
    now = state_bits(model)
    assert now.keys() == snapshot.keys()
    changed = [n for n in now if not torch.equal(now[n], snapshot[n])]
    assert not changed, changed


def attacker_for(model, k=5):
    located = locate_massive_weights(model, k)
    return ModelAttacker(model, AttackTargets(located.layer, located.indices, expert=located.expert))


def bos_intermediate(model, layer, token):
    blocks = find_ffn_blocks(model)
    _, inters, _ = probe_ffn_states(model, blocks, token)
    return inters[layer]


@torch.no_grad()
def residual_after(model, layer, ids):
    """The residual stream leaving decoder ``layer`` for input ``ids`` (1 x T -> T x D)."""
    seen = {}
    block = find_ffn_blocks(model)[layer]

    def hook(module, args, output):
        seen["h"] = first_tensor(output)[0].clone()

    handle = block.layer.register_forward_hook(hook)
    try:
        model(input_ids=as_batch(model, ids))
    finally:
        handle.remove()
    return seen["h"]


# ----------------------------------------------------------------------------- settings
def test_sweep_settings_baseline_first_and_k0_only_once():
    settings = sweep_settings(
        ["zero", "retain", "superweight", "activation"], [0, 3, 1, 3], scales=[0.5, 2], fills=["zero", "mean"]
    )
    assert [s.label for s in settings] == [
        "clean",
        "zero k=1",
        "zero k=3",
        "retain k=1",
        "retain k=3",
        "superweight x0.5",
        "superweight x2",
        "activation := zero",
        "activation := mean",
    ]
    with pytest.raises(
        AttackError, match=r"--mode bogus is not allowed: choose from zero, retain, superweight, activation"
    ):
        sweep_settings(["zero", "bogus"], [5])
    with pytest.raises(AttackError, match="--fill"):
        AttackSetting("activation", fill="median")


# ----------------------------------------------------------------------------- planted tiny Llama
def test_zeroing_removes_the_planted_units_and_changes_the_logits(tiny_llama):
    model = tiny_llama.eval()
    attacker = attacker_for(model)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    before = state_bits(model)
    with torch.no_grad():
        base = model(ids).logits
    base_inter = bos_intermediate(model, tiny.PLANTED_LAYER, 1)
    with attacker.applied(AttackSetting("zero", 3)):
        inter = bos_intermediate(model, tiny.PLANTED_LAYER, 1)
        mlp = model.model.layers[tiny.PLANTED_LAYER].mlp
        top3 = tiny.PLANTED_INDICES[:3]
        assert mlp.up_proj.weight[top3].abs().sum() == 0
        assert mlp.gate_proj.weight[top3].abs().sum() == 0
        assert mlp.up_proj.weight[tiny.PLANTED_INDICES[3:]].abs().sum() > 0
        with torch.no_grad():
            attacked = model(ids).logits
    assert (inter[top3] == 0).all()
    others = [i for i in range(tiny.INTERMEDIATE) if i not in top3]
    assert torch.allclose(inter[others], base_inter[others])  # nothing else in the layer moved
    assert (attacked - base).abs().max() > 1e-3
    assert_same_bits(model, before)


def test_retaining_keeps_the_planted_path_and_zeroing_destroys_it(tiny_llama):
    model = tiny_llama.eval()
    attacker = attacker_for(model)
    ids = [1, 40, 41, 42]
    massive = residual_after(model, tiny.PLANTED_LAYER, ids)[0, 1]  # BOS, residual dim 1 (planted)
    assert massive > 50
    with attacker.applied(AttackSetting("retain", 5)):
        inter = bos_intermediate(model, tiny.PLANTED_LAYER, 1)
        kept = residual_after(model, tiny.PLANTED_LAYER, ids)[0, 1]
    others = [i for i in range(tiny.INTERMEDIATE) if i not in tiny.PLANTED_INDICES]
    assert (inter[others] == 0).all()
    assert (inter[tiny.PLANTED_INDICES] > 0).all()
    assert kept == pytest.approx(float(massive), rel=0.05)
    with attacker.applied(AttackSetting("zero", 5)):
        gone = residual_after(model, tiny.PLANTED_LAYER, ids)[0, 1]
    assert abs(gone) < 0.1 * massive


def test_restores_bitwise_even_when_the_evaluation_fails(tiny_llama):
    model = tiny_llama.eval()
    attacker = attacker_for(model)
    before = state_bits(model)
    with pytest.raises(KeyboardInterrupt):
        with attacker.applied(AttackSetting("retain", 2)):
            raise KeyboardInterrupt
    assert_same_bits(model, before)
    attacker.verify_restored()


def test_verify_restored_notices_a_changed_bit(tiny_llama):
    model = tiny_llama.eval()
    attacker = attacker_for(model)
    up = model.model.layers[tiny.PLANTED_LAYER].mlp.up_proj.weight
    with torch.no_grad():
        up[3, 3] = -up[3, 3]
    with pytest.raises(RuntimeError, match="not restored bitwise"):
        attacker.verify_restored()


def test_k_beyond_the_located_rows_is_refused(tiny_llama):
    attacker = attacker_for(tiny_llama.eval(), k=3)
    with pytest.raises(AttackError, match="--k 4 exceeds the 3 located rows"):
        with attacker.applied(AttackSetting("zero", 4)):
            pass


def test_super_weight_scaling_touches_one_number(tiny_llama):
    model = tiny_llama.eval()
    ids = torch.tensor([[1, 40, 41]])
    sw = super_weight_target(model, ids)
    assert (sw.layer, sw.row, sw.col) == (tiny.PLANTED_LAYER, 1, tiny.PLANTED_INDICES[0])
    located = locate_massive_weights(model, 5)
    attacker = ModelAttacker(model, AttackTargets(located.layer, located.indices, super_weight=sw))
    down = model.model.layers[sw.layer].mlp.down_proj.weight.detach()  # a view: sees the edits
    before = down.detach().clone()
    for scale in (0.0, 2.0):
        with attacker.applied(AttackSetting("superweight", scale=scale)):
            diff = (down != before).nonzero().tolist()
            assert diff == [[sw.row, sw.col]]
            assert float(down[sw.row, sw.col]) == scale * float(before[sw.row, sw.col])
    attacker.verify_restored()


def test_activation_attack_zeroes_or_means_the_massive_entries_then_unhooks(tiny_llama):
    model = tiny_llama.eval()
    ids = [1, 40, 41, 42]
    act = massive_activation_target(model, torch.tensor([ids]))
    assert act.layer == tiny.PLANTED_LAYER
    assert act.dims == [1]
    located = locate_massive_weights(model, 5)
    attacker = ModelAttacker(model, AttackTargets(located.layer, located.indices, activations=act))
    base = residual_after(model, act.layer, ids)
    for fill, expected in (("zero", 0.0), ("mean", act.means[0])):
        with attacker.applied(AttackSetting("activation", fill=fill)):
            h = residual_after(model, act.layer, ids)
        assert float(h[0, 1]) == pytest.approx(expected)
        assert torch.equal(h[1:, 1], base[1:, 1])
        assert torch.equal(h[:, 2:], base[:, 2:])  # only massive entries
    assert torch.equal(residual_after(model, act.layer, ids), base)  # hook removed


def test_attacks_see_through_an_adapter(tiny_llama):
    model = tiny.loud_adapter(tiny_llama).eval()
    attacker = attacker_for(model)
    before = state_bits(model)
    base_up = model.base_model.model.model.layers[tiny.PLANTED_LAYER].mlp.up_proj
    with attacker.applied(AttackSetting("zero", 5)):
        assert base_up.base_layer.weight[tiny.PLANTED_INDICES].abs().sum() == 0
        assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapter untouched
    assert_same_bits(model, before)


# ----------------------------------------------------------------------------- every layout
@pytest.mark.parametrize("arch", tiny_archs.ARCHITECTURES)
def test_zero_and_retain_on_every_layout(arch):
    model = tiny_archs.build(arch)
    located = locate_massive_weights(model, 5)
    assert located.layer == tiny_archs.PLANTED_LAYER
    assert located.indices == tiny_archs.PLANTED_INDICES
    attacker = ModelAttacker(model, AttackTargets(located.layer, located.indices, expert=located.expert))
    before = state_bits(model)
    blocks = find_ffn_blocks(model)
    top = tiny_archs.PLANTED_INDICES[:2]
    with attacker.applied(AttackSetting("zero", 2)):
        inter = probe_ffn_states(model, blocks, tiny_archs.BOS)[1][located.layer]
        assert (inter[top] == 0).all()
        assert (inter[tiny_archs.PLANTED_INDICES[2:]] > 1).all()
    with attacker.applied(AttackSetting("retain", 2)):
        inter = probe_ffn_states(model, blocks, tiny_archs.BOS)[1][located.layer]
        others = [i for i in range(tiny_archs.I) if i not in top]
        assert (inter[others] == 0).all()
        assert (inter[top] > 1).all()
    assert_same_bits(model, before)
    attacker.verify_restored()
