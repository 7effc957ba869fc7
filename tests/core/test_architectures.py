"""Every supported architecture: the locator finds the planted layer/indices/expert, and the
rows MacDrop would mask are the ones that produce those units."""

import pytest
import torch
from helpers import tiny_archs as ta

from llamafactory_macdrop.core.architectures import find_ffn_blocks
from llamafactory_macdrop.core.locator import locate_massive_weights, probe_ffn_states
from llamafactory_macdrop.core.masking import RowDropout

EXPECTED_LAYOUT = {"phi3": "fused_gate_up", "gpt2": "conv1d", "mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe"}


@pytest.fixture(scope="module", params=ta.ARCHITECTURES)
def arch(request):
    return request.param, ta.build(request.param)


def test_locator_finds_the_planted_weights(arch):
    name, model = arch
    result = locate_massive_weights(model, 5)
    assert result.layer == ta.PLANTED_LAYER, [(s.layer, round(s.jump, 1)) for s in result.layers]
    assert result.indices == ta.PLANTED_INDICES
    assert result.probe_token_id == ta.BOS
    assert result.probe_token_source == "config.bos_token_id"
    blocks = find_ffn_blocks(model)
    assert blocks[1].layout == EXPECTED_LAYOUT.get(name, "dense")
    if blocks[1].is_moe:
        assert result.expert == ta.PLANTED_EXPERT
        assert result.router_prob > 0.9
        assert result.modules == ["model.layers.1.mlp.experts.gate_up_proj"]
    else:
        assert result.expert is None
    # "largest intermediate" picks another layer (the decoy in layer 0, or for post-norm models
    # like OLMo2 a later FFN reading the already massive residual): the rule must not be fooled
    assert max(result.layers, key=lambda s: s.intermediate_top1).layer != ta.PLANTED_LAYER


def test_masking_the_located_rows_silences_exactly_those_units(arch):
    name, model = arch
    result = locate_massive_weights(model, 5)
    blocks = find_ffn_blocks(model)
    block = blocks[result.layer]
    before = probe_ffn_states(model, blocks, ta.BOS)[1][result.layer]
    drop = RowDropout(block.row_targets(result.indices, expert=result.expert))
    drop.apply(torch.zeros(drop.mask_shape, dtype=torch.bool))
    after = probe_ffn_states(model, blocks, ta.BOS)[1][result.layer]
    drop.restore()
    idx = torch.tensor(result.indices)
    assert (after[idx] < before[idx] / 100).all(), (before[idx], after[idx])
    others = torch.ones_like(before, dtype=torch.bool)
    others[idx] = False
    # the layer's input is unchanged, so every other unit of the layer is bit-identical
    assert torch.equal(after[others], before[others])
    assert drop.is_restored()
    restored = probe_ffn_states(model, blocks, ta.BOS)[1][result.layer]
    assert torch.equal(restored, before)
