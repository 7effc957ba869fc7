import json

import pytest
import torch

import tiny
from llamafactory_macdrop.architectures import UnsupportedArchitectureError, find_ffn_blocks
from llamafactory_macdrop.locator import LocatorError, LocatorResult, locate_massive_weights, resolve_probe_token


def test_finds_the_planted_layer_and_indices_in_order(tiny_llama):
    result = locate_massive_weights(tiny_llama, 5)
    assert result.layer == tiny.PLANTED_LAYER
    assert result.indices == tiny.PLANTED_INDICES
    assert result.magnitudes == sorted(result.magnitudes, reverse=True)
    assert result.probe_token_id == tiny_llama.config.bos_token_id
    assert result.modules == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert result.source == "probe" and not result.warnings
    assert result.massiveness > 50


def test_the_decoy_would_fool_naive_rules(tiny_llama):
    # The test above is only meaningful if simpler rules pick the wrong layer on this model.
    layers = locate_massive_weights(tiny_llama, 5).layers
    largest = max(layers, key=lambda s: s.intermediate_top1)
    by_ratio = max(layers, key=lambda s: s.intermediate_top1 / s.intermediate_median)
    assert largest.layer == 0 and largest.intermediate_top1_index == tiny.DECOY_INDEX
    assert by_ratio.layer == 0


def test_overrides(tiny_llama):
    both = locate_massive_weights(tiny_llama, 5, layer=0, indices=[3, 4])
    assert (both.layer, both.indices, both.source, both.magnitudes) == (0, [3, 4], "override", None)
    only_layer = locate_massive_weights(tiny_llama, 2, layer=0)
    assert only_layer.indices == [tiny.DECOY_INDEX, only_layer.indices[1]] and only_layer.source == "probe+override"
    only_idx = locate_massive_weights(tiny_llama, 2, indices=[13, 97])
    assert only_idx.layer == tiny.PLANTED_LAYER and only_idx.indices == [13, 97]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(layer=2), "macdrop_layer=2 is out of range"),
        (dict(indices=[5, tiny.INTERMEDIATE]), f"outside 0..{tiny.INTERMEDIATE - 1}"),
        (dict(k=tiny.INTERMEDIATE + 1), "exceeds the intermediate size"),
    ],
)
def test_bad_overrides_fail_clearly(tiny_llama, kwargs, fragment):
    k = kwargs.pop("k", 5)
    with pytest.raises(LocatorError, match=fragment):
        locate_massive_weights(tiny_llama, k, **kwargs)


def test_json_round_trip(tiny_llama, tmp_path):
    result = locate_massive_weights(tiny_llama, 5)
    path = result.write_json(tmp_path / "macdrop_locator.json")
    data = json.loads(path.read_text())
    for key in ("model", "layer", "indices", "magnitudes", "median", "probe_token_id", "modules", "massiveness"):
        assert key in data
    assert data["paper_layer"] == data["layer"] + 1
    assert LocatorResult.from_dict(data) == result
    assert "massive layer: 1 (0-based; paper layer 2)" in result.table()


def test_probe_sees_the_base_model_through_a_trained_adapter(tiny_llama):
    peft_model = tiny.loud_adapter(tiny_llama, ["up_proj", "gate_proj"])
    result = locate_massive_weights(peft_model, 5)
    assert result.layer == tiny.PLANTED_LAYER and result.indices == tiny.PLANTED_INDICES
    assert peft_model.training  # mode restored
    blocks = find_ffn_blocks(peft_model)
    assert blocks[1].module_names() == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert blocks[1].row_targets([1])[1].weight is peft_model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight


def test_probe_token_policy(tiny_llama, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos, eos = tiny_llama.config.bos_token_id, tiny_llama.config.eos_token_id
    assert resolve_probe_token(tiny_llama) == (bos, "config.bos_token_id")
    assert resolve_probe_token(tiny_llama, tok, 7) == (7, "override")
    text_id = tok("quick", add_special_tokens=False)["input_ids"][0]
    assert resolve_probe_token(tiny_llama, tok, "quick") == (text_id, "override: first token of 'quick'")
    with pytest.raises(LocatorError, match="outside the vocabulary"):
        resolve_probe_token(tiny_llama, tok, 10**6)
    tiny_llama.config.bos_token_id = None  # GPT-style: no BOS -> EOS starts a document
    assert resolve_probe_token(tiny_llama) == (eos, "config.eos_token_id")
    result = locate_massive_weights(tiny_llama, 5, probe_token=bos)  # the planted path needs BOS
    assert result.indices == tiny.PLANTED_INDICES and result.probe_token_source == "override"
    tiny_llama.config.eos_token_id = None
    with pytest.raises(LocatorError, match="neither a BOS nor an EOS"):
        locate_massive_weights(tiny_llama, 5)


def test_unknown_architecture_fails_clearly():
    with pytest.raises(UnsupportedArchitectureError, match="found no decoder layers"):
        find_ffn_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_model_without_massive_weights_gets_a_warning():
    import tiny_archs as ta
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(ta.configs()["gemma2"]).eval()  # random, nothing planted
    result = locate_massive_weights(plain, 5)
    assert result.massiveness < 10
    assert result.warnings and "no clear massive activation" in result.warnings[0]
    assert "warning: no clear massive activation" in result.table()
