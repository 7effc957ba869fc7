import pytest
import torch
from helpers.storage import Shard, effective, fsdp1_shards, fsdp2_shards, linear4bit, partitioned, storage_bytes

from llamafactory_macdrop.core.masking import RowDropout, draw_keep_mask
from llamafactory_macdrop.core.storage import UnsupportedStorageError, bits, row_target


def _weights(seed=0, out=32, inp=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g), torch.randn(out, inp, generator=g)


def test_apply_multiplies_selected_rows_by_one_shared_mask_and_nothing_else():
    gate, up = _weights()
    gate0, up0 = gate.clone(), up.clone()
    rows = [7, 3, 30]
    drop = RowDropout([row_target("gate", gate, rows), row_target("up", up, rows)])
    keep = draw_keep_mask(drop.mask_shape, 0.5, torch.Generator().manual_seed(1), "cpu")
    assert 0 < keep.sum() < keep.numel()
    drop.apply(keep)
    assert torch.equal(gate[rows], gate0[rows] * keep)
    assert torch.equal(up[rows], up0[rows] * keep)
    others = [i for i in range(32) if i not in rows]
    assert torch.equal(gate[others], gate0[others])
    assert torch.equal(up[others], up0[others])
    drop.restore()
    assert torch.equal(bits(gate), bits(gate0))
    assert torch.equal(bits(up), bits(up0))
    assert drop.is_restored()


def test_keep_rate_follows_p():
    keep = draw_keep_mask((200, 100), 0.3, torch.Generator().manual_seed(0), "cpu")
    assert keep.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert draw_keep_mask((10, 10), 1.0, None, "cpu").sum() == 0  # U in [0, 1): never > 1


def test_masked_context_restores_bitwise_even_on_error():
    gate, up = _weights()
    gate[3, 2] = -0.0  # signed zero must survive too
    snapshot = [bits(gate).clone(), bits(up).clone()]
    drop = RowDropout([row_target("gate", gate, [3, 4]), row_target("up", up, [3, 4])])
    with pytest.raises(KeyboardInterrupt):
        with drop.masked(0.9, torch.Generator().manual_seed(0)) as keep:
            assert keep is not None
            assert not drop.is_restored()
            raise KeyboardInterrupt
    assert torch.equal(bits(gate), snapshot[0])
    assert torch.equal(bits(up), snapshot[1])
    assert drop.active_mask is None


def test_p_zero_draws_nothing_and_writes_nothing():
    gate, up = _weights()
    drop = RowDropout([row_target("gate", gate, [1]), row_target("up", up, [1])])
    g = torch.Generator().manual_seed(5)
    state = g.get_state().clone()
    version = gate._version
    with drop.masked(0.0, g) as keep:
        assert keep is None
    assert torch.equal(g.get_state(), state)
    assert gate._version == version


def test_unmasked_shows_originals_then_reapplies_the_same_mask():
    gate, up = _weights()
    drop = RowDropout([row_target("gate", gate, [0, 5]), row_target("up", up, [0, 5])])
    with drop.masked(0.5, torch.Generator().manual_seed(3)) as keep:
        masked = gate[[0, 5]].clone()
        with drop.unmasked():
            assert drop.is_restored()
        assert torch.equal(gate[[0, 5]], masked)
        assert torch.equal(drop.active_mask, keep)
    assert drop.is_restored()


def test_writes_do_not_bump_the_autograd_version_counter():
    # DPO's reference forward restores and re-masks between forward and backward: a version bump
    # would make autograd refuse the backward pass.
    w = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    x = torch.randn(2, 4, requires_grad=True)
    drop = RowDropout([row_target("w", w, [1, 2])])
    with drop.masked(0.5, torch.Generator().manual_seed(0)):
        y = torch.nn.functional.linear(x, w)
        with drop.unmasked():
            pass
        y.sum().backward()  # raises if the saved weight was modified "in place" for autograd
    assert x.grad is not None


def test_conv1d_layout_masks_columns():
    w = torch.randn(16, 32)  # GPT-2 Conv1D: [in, out]; intermediate units are columns
    w0 = w.clone()
    drop = RowDropout([row_target("c_fc", w, [4, 9], axis=1)])
    keep = torch.zeros(drop.mask_shape, dtype=torch.bool)
    assert drop.mask_shape == (2, 16)
    drop.apply(keep)
    assert torch.all(w[:, [4, 9]] == 0)
    assert torch.equal(w[:, :4], w0[:, :4])
    drop.restore()
    assert torch.equal(w, w0)


def test_targets_must_agree_and_rows_must_be_in_range():
    gate, up = _weights()
    with pytest.raises(ValueError, match="one shape"):
        RowDropout([row_target("gate", gate, [1, 2]), row_target("up", up, [1])])
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        row_target("gate", gate, [32])


# ----------------------------------------------------------------------------- ZeRO-3 partitions
@pytest.mark.parametrize("axis,expert", [(0, None), (1, None), (0, 2)])
def test_zero3_partition_edits_add_up_to_algorithm1(monkeypatch, axis, expert):
    """Each rank edits only its own partition; the gathered weight is original * M exactly."""
    deepspeed_comm = pytest.importorskip("deepspeed.comm")
    monkeypatch.setattr(deepspeed_comm, "get_rank", lambda group=None: int(group[4:]))
    torch.manual_seed(0)
    full = torch.randn(4, 23, 13) if expert is not None else torch.randn(23, 13)
    world, rows = 3, [7, 0, 12] if axis == 1 else [22, 3, 9]
    params = [partitioned(full, world, r) for r in range(world)]
    drops = []
    for p in params:  # set-up reads the rows once from the gathered weight (GatheredParameters)
        p.data = full.clone()
        drops.append(RowDropout([row_target("w", p, rows, axis=axis, expert=expert)]))
        p.data = torch.empty(0)
    assert all(t.backend == "zero3-partition" for d in drops for t in d.targets)
    matrix = full if expert is None else full[expert]
    want_rows = matrix.index_select(axis, torch.tensor(rows))
    want_rows = want_rows if axis == 0 else want_rows.t()
    keep = torch.rand(want_rows.shape) > 0.5
    for d in drops:
        d.apply(keep)

    gathered = torch.cat([p.ds_tensor for p in params])[: full.numel()].view(full.shape)
    expected = full.clone()
    target_matrix = expected if expert is None else expected[expert]
    masked = want_rows * keep
    target_matrix.index_copy_(axis, torch.tensor(rows), masked if axis == 0 else masked.t())
    assert torch.equal(bits(gathered), bits(expected))
    assert not any(d.is_restored() for d in drops if d.targets[0]._local.numel())
    for d in drops:
        d.restore()
        assert d.is_restored()
    restored = torch.cat([p.ds_tensor for p in params])[: full.numel()].view(full.shape)
    assert torch.equal(bits(restored), bits(full))


# ----------------------------------------------------------------------------- FSDP shards
@pytest.mark.parametrize("layout", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("axis,expert", [(0, None), (1, None), (0, 2)])
def test_fsdp_shard_edits_add_up_to_algorithm1(layout, axis, expert):
    """Each rank edits only its slice (uneven FSDP2 chunks with padding; FSDP1 slices that start
    inside another weight); what an all-gather assembles is original * M, bitwise."""
    torch.manual_seed(0)
    full = torch.randn(4, 23, 13) if expert is not None else torch.randn(23, 13)
    full[0, 0] = -0.0
    world, rows = 3, [7, 0, 12] if axis == 1 else [22, 3, 9]
    shards, gather = (fsdp2_shards if layout == "fsdp2" else fsdp1_shards)(full, world)
    drops = []
    for shard in shards:  # set-up reads the rows while FSDP shows the whole weight
        shard.gathered = full.clone()
        target = row_target("w", full.clone(), rows, axis=axis, expert=expert, shard=shard)
        assert target.backend == f"{layout}-shard"
        drops.append(RowDropout([target]))
        shard.gathered = None
    assert sum(d.targets[0]._own.numel() for d in drops) == len(rows) * (13 if axis == 0 else 23)
    matrix = full if expert is None else full[expert]
    want = matrix.index_select(axis, torch.tensor(rows))
    want = want if axis == 0 else want.t()
    keep = torch.rand(want.shape) > 0.5
    shards[0].gathered = gathered_copy = full.clone()  # one rank holds the weight gathered: edited too
    for d in drops:
        d.apply(keep)
    expected = full.clone()
    (expected if expert is None else expected[expert]).index_copy_(
        axis, torch.tensor(rows), want * keep if axis == 0 else (want * keep).t()
    )
    assert torch.equal(bits(gather()), bits(expected))
    assert torch.equal(bits(gathered_copy), bits(expected))
    for d in drops:
        d.restore()
        assert d.is_restored()
    assert torch.equal(bits(gather()), bits(full))
    assert torch.equal(bits(gathered_copy), bits(full))


# ----------------------------------------------------------------------------- 4-bit (QLoRA)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_rows_masked_by_codes_equal_dequantized_times_mask(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f

    torch.manual_seed(0)
    dense = torch.randn(40, 27)  # odd width: bytes shared between neighbouring rows
    layer = bnb.nn.Linear4bit(27, 40, bias=False, quant_type=quant_type, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type=quant_type)
    layer = layer.to("cpu")
    w = layer.weight
    before_codes = w.data.clone()
    before = bnb_f.dequantize_4bit(w.data, w.quant_state)
    rows = [31, 4, 5, 17]
    drop = RowDropout([row_target("up", w, rows)])
    assert drop.targets[0].backend == "bnb-4bit"
    assert drop.mask_shape == (4, 27)
    keep = torch.rand(4, 27) > 0.4
    drop.apply(keep)
    after = bnb_f.dequantize_4bit(w.data, w.quant_state)
    expected = before.clone()
    expected[rows] = before[rows] * keep
    assert torch.equal(after, expected)  # equal in value (a dropped element is +0.0, never -0.0)
    x = torch.randn(3, 27)
    out = layer(x)
    assert torch.allclose(out, x @ expected.t(), atol=1e-5)
    drop.restore()
    assert drop.is_restored()
    assert torch.equal(w.data, before_codes)


# ----------------------------------------------------------------------------- 4-bit storages LLaMA-Factory builds
def _check_masked(now, before, rows, keep):
    """Outside ``rows`` bitwise unchanged; inside, kept elements unchanged and dropped ones exactly 0."""
    others = [i for i in range(before.shape[0]) if i not in rows]
    assert torch.equal(bits(now[others]), bits(before[others])), "elements outside the selected rows changed"
    inside, orig = now[rows], before[rows]
    assert torch.equal(bits(inside[keep]), bits(orig[keep])), "kept elements changed"
    assert bool((inside[~keep] == 0).all()), "dropped elements are not 0"


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_float_quant_storage_masks_exactly_the_selected_elements(quant_storage, quant_type):
    """LLaMA-Factory's QLoRA stores the codes in a float tensor ([N*K/4, 1] bf16, [N*K/8, 1] fp32):
    the factory recognises the Params4bit by its type and edits codes, whatever the storage dtype."""
    layer = linear4bit(quant_storage, quant_type)
    w = layer.weight
    assert w.dtype == quant_storage
    before, stored, absmax = effective(layer), storage_bytes(w), bits(w.quant_state.absmax).clone()
    rows = [97, 13, 64, 5, 120]
    drop = RowDropout([row_target("up", w, rows, module=layer)])
    target = drop.targets[0]
    assert target.backend == "bnb-4bit"
    assert target.layout == "canonical"
    assert drop.mask_shape == (5, 64)
    assert f"quant_storage {quant_storage}" in target.describe()
    keep = torch.rand(5, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    drop.apply(keep)
    _check_masked(effective(layer), before, rows, keep)
    drop.restore()
    assert drop.is_restored()
    assert torch.equal(storage_bytes(w), stored)
    assert torch.equal(bits(w.quant_state.absmax), absmax)
    assert torch.equal(bits(effective(layer)), bits(before))


def _repack_for_cpu(layer):
    """What ``Linear4bit.forward`` does to an eval-mode no-grad input on an AVX512-BF16 CPU, forced
    here with bitsandbytes' own conversion so the layout is tested on every host."""
    import bitsandbytes.functional as bnb_f

    layer.weight.data, state = bnb_f._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert state is layer.weight.quant_state
    assert state.packing_format_for_cpu


def _canonicaleffective(layer, state_before):
    """The repacked layer's weight read back through bitsandbytes' inverse conversion and
    dequantized with the quant state from before the repack ([out, in] float32)."""
    import copy

    import bitsandbytes.functional as bnb_f

    codes, _ = bnb_f._convert_weight_packed_for_cpu_inverse(
        layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
    )
    return bnb_f.dequantize_4bit(codes.view(-1, 1).view(torch.uint8), state_before).float()


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("repack", ["before_setup", "after_setup", "while_masked"])
def test_4bit_cpu_repacked_layout_masks_exactly_the_selected_elements(quant_storage, repack):
    """bitsandbytes' CPU layout (``packing_format_for_cpu``), whether the weight was repacked
    before MacDrop set up, between set-up and a step (an evaluation during training) or while a
    mask was applied: dropped codes become the zero code at the right place, nothing else moves."""
    import copy

    import bitsandbytes.functional as bnb_f

    layer = linear4bit(quant_storage, nested=False)
    w = layer.weight
    state_before = copy.deepcopy(w.quant_state)
    before = bnb_f.dequantize_4bit(w.data, state_before).float()
    rows = [
        97,
        13,
        64,
        5,
        120,
        21,
    ]  # the CPU layout packs rows n and n + 16 of a 32-row block in one byte: 5/21 both masked, 13/29 not
    keep = torch.rand(6, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    if repack == "before_setup":
        _repack_for_cpu(layer)
    drop = RowDropout([row_target("up", w, rows, module=layer)])
    if repack == "after_setup":
        _repack_for_cpu(layer)
    drop.apply(keep)
    if repack == "while_masked":
        _repack_for_cpu(layer)
    assert drop.targets[0].layout == "cpu" or repack == "while_masked"
    _check_masked(_canonicaleffective(layer, state_before), before, rows, keep)
    if layer.support_avx512bf16_for_cpu:  # this host has bitsandbytes' CPU kernel: its own forward agrees
        layer.eval()
        with torch.no_grad():
            seen = type(layer).forward(layer, torch.eye(64)).T
        assert bool((seen[rows][~keep] == 0).all())
    drop.restore()
    assert drop.targets[0].layout == "cpu"
    assert drop.is_restored()
    reference = linear4bit(quant_storage, nested=False)  # the same weight, never masked, repacked
    _repack_for_cpu(reference)
    assert torch.equal(storage_bytes(w), storage_bytes(reference.weight))


def test_probe_keeps_bitsandbytes_from_repacking_4bit_weights():
    """The locator's eval no-grad probe must not trigger bitsandbytes' CPU repack (bf16 block
    scales and no input gradient for the rest of training): the switch is off during it only."""
    from llamafactory_macdrop.core.probing import forward_with_hooks

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = linear4bit(torch.bfloat16)
            self.up.support_avx512bf16_for_cpu = 1  # as bitsandbytes sets it on an AVX512-BF16 CPU
            self.seen = []

        def forward(self, input_ids, **kwargs):
            self.seen.append(self.up.support_avx512bf16_for_cpu)
            return None

    model = Tiny()
    forward_with_hooks(model, torch.tensor([[1]]), lambda: [])
    assert model.seen == [False]
    assert model.up.support_avx512bf16_for_cpu == 1
    assert not getattr(model.up.weight.quant_state, "packing_format_for_cpu", False)


# ----------------------------------------------------------------------------- the factory
def test_factory_names_the_backend_of_each_storage(monkeypatch):
    w = torch.randn(32, 16)
    assert row_target("w", w, [1]).backend == "dense"
    assert row_target("w", torch.nn.Parameter(w), [1]).describe() == "w -> dense"
    deepspeed_comm = pytest.importorskip("deepspeed.comm")
    monkeypatch.setattr(deepspeed_comm, "get_rank", lambda group=None: 0)
    assert row_target("w", partitioned(w, 2, 0), [1]).backend == "zero3-partition"
    for version in (1, 2):
        shard = Shard(w.shape, w.reshape(-1).clone(), 0, w.numel(), 0, version=version)
        assert row_target("w", w, [1], shard=shard).backend == f"fsdp{version}-shard"
    assert row_target("w", linear4bit(torch.bfloat16).weight, [1]).backend == "bnb-4bit"


def test_factory_refuses_storage_no_backend_claims():
    """One line naming the weight and what it is, instead of falling into the dense path."""
    from llamafactory_macdrop.core.storage import UnsupportedStorageError

    bnb = pytest.importorskip("bitsandbytes")
    int8 = bnb.nn.Int8Params(torch.randn(32, 16), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert int8.dtype == torch.int8
    assert int8.SCB is not None

    class Odd(torch.Tensor):
        pass

    class GPTQish(torch.nn.Module):
        qweight = torch.zeros(4, 32, dtype=torch.int32)

    unquantized = bnb.nn.Params4bit(torch.randn(32, 16), requires_grad=False, quant_type="nf4")
    tagged = torch.nn.Parameter(torch.randn(32, 16))
    tagged.quant_state = object()
    cases = {
        "Int8Params": int8,
        "tensor type": torch.randn(32, 16).as_subclass(Odd),
        "qweight": None,
        "dtype torch.int8": torch.zeros(32, 16, dtype=torch.int8),
        "not quantized yet": unquantized,
        "quant_state": tagged,
    }
    for expected, weight in cases.items():
        with pytest.raises(UnsupportedStorageError, match=expected) as err:
            row_target("model.layers.1.mlp.up_proj.weight", weight, [1], module=GPTQish())
        assert "\n" not in str(err.value)
        assert str(err.value).startswith("model.layers.1.mlp.up_proj.weight: ")


# ----------------------------------------------------------------------------- trainable rows
def test_trainable_rows_are_masked_from_their_current_values_and_get_the_chain_rule_gradient():
    """A weight the optimizer trains: every mask starts from the rows as they are now (the last
    step's update included), the dropped elements get no gradient, and the optimizer's step after
    the restore lands on the unmasked rows (docs/how-it-works.md, "Trainable rows")."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 8, bias=False)
    rows = [5, 1, 2]
    drop = RowDropout([row_target("w", layer.weight, rows)])
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        before = layer.weight.detach().clone()
        with drop.masked(0.5, g) as keep:
            assert torch.equal(layer.weight.detach()[rows], before[rows] * keep)  # the CURRENT rows, masked
            layer(x).pow(2).sum().backward()
        assert torch.equal(layer.weight.detach(), before)  # restored to this step's start, bitwise
        grad = layer.weight.grad[rows]
        assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))  # d(W*M)/dW = M
        assert (grad[keep] != 0).all()
        opt.step()
        opt.zero_grad()
        assert torch.equal(layer.weight.detach()[rows][~keep], before[rows][~keep])
        assert not torch.equal(layer.weight.detach()[rows][keep], before[rows][keep])  # the update stays


def test_an_update_inside_the_masked_span_stops_the_run():
    """An optimizer that steps while the rows are masked (DeepSpeed inside training_step, layer-wise
    GaLore inside backward): the restore would write the old rows over its update, so it says so."""
    from llamafactory_macdrop.core.masking import RowsUpdatedWhileMaskedError

    layer = torch.nn.Linear(6, 8, bias=False)
    drop = RowDropout([row_target("w", layer.weight, [0, 3])])
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(RowsUpdatedWhileMaskedError, match=r"^w was updated in place while MacDrop had its rows masked"):
        with drop.masked(0.5, torch.Generator().manual_seed(0)):
            layer(torch.randn(2, 6)).sum().backward()
            opt.step()


def test_trainable_rows_are_refused_where_the_update_cannot_be_kept():
    full = torch.randn(23, 13)
    shards, _ = fsdp2_shards(full, 3)
    shards[0].gathered = full.clone()
    with pytest.raises(
        UnsupportedStorageError, match=r"^w: its rows are trainable \(requires_grad\) and stored as fsdp2-shard"
    ):
        RowDropout([row_target("w", full.clone().requires_grad_(), [1, 2], shard=shards[0])])
