"""The rules every storage backend keeps (core/storage/base.py's RowTarget contract), run against
EVERY backend and layout in one table (tests/helpers/storage.py): a dropped element is exactly 0 in
what the layer computes with, kept and untouched elements are bit for bit the same, an error inside
the masked block leaves the storage as it was, p = 0 draws and writes nothing, and no write bumps
an autograd version counter (DPO's reference forward restores and re-masks between a forward and
its backward). Checked from outside: the assembled/dequantized weight and the raw stored bytes."""

from contextlib import ExitStack

import pytest
import torch
from helpers.storage import CASES

from llamafactory_macdrop.core.masking import draw_keep_mask
from llamafactory_macdrop.core.storage import bits


@pytest.fixture(params=list(CASES))
def case(request, monkeypatch):
    built = CASES[request.param](monkeypatch)
    assert all(t.backend == built.backend for d in built.drops for t in d.targets), request.param
    return built


def _same_raw(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _apply_all(case, keep):
    for d in case.drops:  # every rank applies the same mask to what it holds
        d.apply(keep)


def test_dropped_elements_are_exact_zeros_and_nothing_else_changes(case):
    before = case.matrix()
    keep = draw_keep_mask(case.drops[0].mask_shape, 0.5, torch.Generator().manual_seed(1), "cpu")
    assert 0 < keep.sum() < keep.numel()
    _apply_all(case, keep)
    now = case.matrix()
    rows = torch.tensor(case.rows)
    pick = (lambda m: m.index_select(case.axis, rows)) if case.axis == 0 else (lambda m: m.index_select(1, rows).t())
    inside, orig = pick(now), pick(before)
    assert bool((inside[~keep] == 0).all()), "dropped elements are not exactly 0"
    assert torch.equal(bits(inside[keep]), bits(orig[keep])), "kept elements changed"
    others = torch.tensor([i for i in range(before.shape[case.axis]) if i not in case.rows])
    assert torch.equal(bits(now.index_select(case.axis, others)), bits(before.index_select(case.axis, others))), (
        "elements outside the selected rows changed"
    )
    for d in case.drops:
        d.restore()
    assert torch.equal(bits(case.matrix()), bits(before))


def test_an_error_inside_the_masked_block_restores_the_storage_bitwise(case):
    raw = case.raw()
    with pytest.raises(KeyboardInterrupt):
        with ExitStack() as stack:
            for d in case.drops:  # same seed on every rank: the same mask
                keep = stack.enter_context(d.masked(0.9, torch.Generator().manual_seed(0)))
                assert keep is not None
            assert not _same_raw(case.raw(), raw), "the mask wrote nothing"
            raise KeyboardInterrupt
    assert _same_raw(case.raw(), raw)
    assert all(d.active_mask is None for d in case.drops)


def test_p_zero_draws_nothing_and_writes_nothing(case):
    raw, versions = case.raw(), case.versions()
    g = torch.Generator().manual_seed(5)
    state = g.get_state().clone()
    for d in case.drops:
        with d.masked(0.0, g) as keep:
            assert keep is None
    assert torch.equal(g.get_state(), state)
    assert _same_raw(case.raw(), raw)
    assert case.versions() == versions


def test_masking_and_restoring_bump_no_autograd_version_counter(case):
    versions = case.versions()
    keep = torch.zeros(case.drops[0].mask_shape, dtype=torch.bool)
    _apply_all(case, keep)
    for d in case.drops:
        d.restore()
    assert case.versions() == versions
