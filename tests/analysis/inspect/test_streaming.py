"""Layer-by-layer locating: same answer as the full load, holding about one layer at a time."""

import pytest
import torch
from helpers import tiny_archs as ta

from llamafactory_macdrop.analysis.inspect.streaming import locate_layer_by_layer
from llamafactory_macdrop.core.locator import LocatorError, locate_massive_weights

LAYERS = 6


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt", "phi3", "gemma2"])
def sharded(request, tmp_path_factory):
    """A 6-layer planted model saved in several safetensors shards (origin at layer 1)."""
    name = request.param
    cfg = ta.configs(layers=LAYERS)[name]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ta.plant(model)
    out = tmp_path_factory.mktemp(f"sharded_{name}")
    model.save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 3
    return name, model, out


def test_same_answer_as_the_full_load_and_stops_after_the_origin(sharded):
    name, model, folder = sharded
    full = locate_massive_weights(model, 5)
    streamed, stats = locate_layer_by_layer(folder, 5)
    assert (streamed.layer, streamed.indices) == (full.layer, full.indices) == (ta.PLANTED_LAYER, ta.PLANTED_INDICES)
    assert streamed.magnitudes == pytest.approx(full.magnitudes, rel=1e-5)
    assert streamed.massiveness == pytest.approx(full.massiveness, rel=1e-5)
    # the rule decides PERSIST_LAYERS (2) layers after the origin: nothing after that was read
    assert stats.layers_loaded == [0, 1, 2, 3]
    assert [s.layer for s in streamed.layers] == [0, 1, 2, 3]
    assert all(
        a.layer == b.layer and a.out_max == pytest.approx(b.out_max, rel=1e-5)
        for a, b in zip(streamed.layers, full.layers)
    )
    # memory: never more than one decoder layer at a time, plus the non-layer parameters
    layer_bytes = sum(p.numel() * 4 for p in find_layer(model, 0).parameters())
    non_layer = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n and ".h." not in n)
    assert stats.max_resident_layers == 1
    assert stats.peak_bytes <= non_layer + layer_bytes * 1.01


def find_layer(model, i):
    from llamafactory_macdrop.core.architectures import find_ffn_blocks

    return find_ffn_blocks(model)[i].layer


def test_explicit_layer_is_reached_and_missing_files_fail_clearly(sharded, tmp_path):
    name, model, folder = sharded
    result, stats = locate_layer_by_layer(folder, 3, layer=4)
    assert result.layer == 4
    assert stats.layers_loaded == [0, 1, 2, 3, 4]
    with pytest.raises(LocatorError, match="no model.safetensors"):
        locate_layer_by_layer(tmp_path, 5)


def test_the_output_head_is_never_read_and_dropped_layers_are_freed(sharded):
    from llamafactory_macdrop.analysis.inspect import streaming

    name, model, folder = sharded
    if model.get_output_embeddings() is None:
        pytest.skip("no output head")
    lazy = streaming.LayerByLayerModel(folder)
    lazy.load_non_layer_parameters()
    assert lazy.model.get_output_embeddings().weight.device.type == "meta"  # untied head: never runs
    assert lazy.model.get_input_embeddings().weight.device.type == "cpu"
    lazy.close()
    head = sum(p.numel() * 4 for p in model.get_output_embeddings().parameters())
    non_layer = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n and ".h." not in n)
    _, stats = locate_layer_by_layer(folder, 5)
    assert stats.peak_bytes <= non_layer - head + sum(p.numel() * 4 for p in find_layer(model, 0).parameters()) * 1.01
    streaming.return_freed_memory()  # callable everywhere (a no-op without glibc)


@pytest.fixture(scope="module")
def tiny_embeddings_folders(tmp_path_factory):
    out = {}
    for origin in (True, False):
        model = ta.build_tiny_embeddings(origin=origin, layers=LAYERS)
        folder = tmp_path_factory.mktemp(f"tiny_emb_{origin}")
        model.save_pretrained(folder, max_shard_size="100KB")
        out[origin] = (model, folder)
    return out


def test_layer_by_layer_uses_the_same_rule_on_tiny_embeddings(tiny_embeddings_folders):
    model, folder = tiny_embeddings_folders[True]
    full = locate_massive_weights(model, 5)
    streamed, stats = locate_layer_by_layer(folder, 5)
    assert (streamed.layer, streamed.indices) == (full.layer, full.indices) == (ta.TINY_EMB_ORIGIN, ta.TINY_EMB_INDICES)
    assert streamed.massive
    assert not streamed.warnings
    assert stats.layers_loaded == list(range(ta.TINY_EMB_ORIGIN + 3))  # layer 0's ~100x jump does not stop it
    # nothing massive: every candidate is read to the last layer, and the answer is the full load's warning
    model, folder = tiny_embeddings_folders[False]
    full = locate_massive_weights(model, 5)
    streamed, stats = locate_layer_by_layer(folder, 5)
    assert (streamed.layer, streamed.indices, streamed.massive) == (full.layer, full.indices, False)
    assert streamed.warnings == full.warnings
    assert len(streamed.warnings) == 1
    assert stats.layers_loaded == list(range(LAYERS)) * 2  # BOS, then EOS
