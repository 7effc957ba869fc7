import json

import pytest
import torch
from helpers import tiny

from llamafactory_macdrop.core.architectures import (
    UnsupportedArchitectureError,
    find_ffn_blocks,
)
from llamafactory_macdrop.core.locator import (
    LayerStats,
    LocatorError,
    LocatorResult,
    ProbeToken,
    find_origin,
    locate_massive_weights,
    probe_candidates,
    read_locator_file,
    resolve_probe_token,
    reuse_result,
)


def test_finds_the_planted_layer_and_indices_in_order(tiny_llama):
    result = locate_massive_weights(tiny_llama, 5)
    assert result.layer == tiny.PLANTED_LAYER
    assert result.indices == tiny.PLANTED_INDICES
    assert result.magnitudes == sorted(result.magnitudes, reverse=True)
    assert result.probe_token_id == tiny_llama.config.bos_token_id
    assert result.modules == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert result.source == "probe"
    assert not result.warnings
    assert result.massiveness > 50


def test_the_decoy_would_fool_naive_rules(tiny_llama):
    # The test above is only meaningful if simpler rules pick the wrong layer on this model.
    layers = locate_massive_weights(tiny_llama, 5).layers
    largest = max(layers, key=lambda s: s.intermediate_top1)
    by_ratio = max(layers, key=lambda s: s.intermediate_top1 / s.intermediate_median)
    assert largest.layer == 0
    assert largest.intermediate_top1_index == tiny.DECOY_INDEX
    assert by_ratio.layer == 0


def test_overrides(tiny_llama):
    both = locate_massive_weights(tiny_llama, 5, layer=0, indices=[3, 4])
    assert (both.layer, both.indices, both.source, both.magnitudes) == (0, [3, 4], "override", None)
    only_layer = locate_massive_weights(tiny_llama, 2, layer=0)
    assert only_layer.indices == [tiny.DECOY_INDEX, only_layer.indices[1]]
    assert only_layer.source == "probe+override"
    only_idx = locate_massive_weights(tiny_llama, 2, indices=[13, 97])
    assert only_idx.layer == tiny.PLANTED_LAYER
    assert only_idx.indices == [13, 97]


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


def intermediate_at(model, layer, token):
    """Outside measurement: |act(gate(x)) * up(x)| of a Llama layer at ``token`` alone (down_proj's input)."""
    seen = {}
    hook = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: seen.setdefault("inter", args[0][0, 0].abs())
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[token]]))
    finally:
        hook.remove()
    return seen["inter"]


def test_indices_alone_are_checked_against_the_located_layer_not_layer_0():
    """macdrop_indices without macdrop_layer index the LOCATED layer's rows, whose count may differ
    from layer 0's: models built with a different FFN width at layer 0 than at the planted origin."""
    from helpers import tiny_archs as ta

    wide0 = ta.build_uneven_widths(192, 128)  # layer 0 wider than the origin
    narrow0 = ta.build_uneven_widths(64, 160)  # the origin wider than layer 0
    for model, widths in ((wide0, [192, 128, 128]), (narrow0, [64, 160, 160])):
        assert [layer.mlp.up_proj.weight.shape[0] for layer in model.model.layers] == widths
        located = locate_massive_weights(model, 5)
        assert (located.layer, located.indices, located.massive) == (ta.PLANTED_LAYER, ta.PLANTED_INDICES, True)
    # 150 is a row of layer 0 (192 wide) but not of the origin (128 wide): refused in one line
    with pytest.raises(LocatorError) as err:
        locate_massive_weights(wide0, 2, indices=[13, 150])
    assert str(err.value) == "macdrop_indices=[13, 150]: [150] outside 0..127 (intermediate size 128 of layer 1)"
    # 100 is a row of the origin (160 wide) but not of layer 0 (64 wide): accepted, and read at the origin
    result = locate_massive_weights(narrow0, 2, indices=[13, 100])
    assert (result.layer, result.indices, result.source) == (ta.PLANTED_LAYER, [13, 100], "probe+override")
    inter = intermediate_at(narrow0, ta.PLANTED_LAYER, ta.BOS)
    assert result.magnitudes == pytest.approx([float(inter[13]), float(inter[100])])


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
    assert result.layer == tiny.PLANTED_LAYER
    assert result.indices == tiny.PLANTED_INDICES
    assert peft_model.training  # mode restored
    blocks = find_ffn_blocks(peft_model)
    assert blocks[1].module_names() == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert (
        blocks[1].row_targets([1])[1].weight
        is peft_model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight
    )


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
    # what the model sees first, then the tokenizer's BOS/EOS, then the config's (duplicates dropped)
    first = ProbeToken(42, "first training batch: position 0 of 4/4 sequences (100%)")
    assert [(c.token_id, c.source) for c in probe_candidates(tiny_llama, tok, first_token=first)] == [
        (42, first.source),
        (bos, "tokenizer.bos_token_id"),
        (eos, "tokenizer.eos_token_id"),
    ]
    assert probe_candidates(tiny_llama, tok, 7, first_token=first)[0].token_id == 7  # an override is the only one
    # Trainer.train aligns the live config to a tokenizer without BOS; the checkpoint's config.json still has it
    tiny_llama.config.bos_token_id = None
    assert resolve_probe_token(tiny_llama) == (bos, "config.bos_token_id")
    tiny_llama.config._name_or_path = ""  # no checkpoint folder: GPT-style, no BOS -> EOS starts a document
    assert resolve_probe_token(tiny_llama) == (eos, "config.eos_token_id")
    result = locate_massive_weights(tiny_llama, 5, probe_token=bos)  # the planted path needs BOS
    assert result.indices == tiny.PLANTED_INDICES
    assert result.probe_token_source == "override"
    tiny_llama.config.eos_token_id = None
    with pytest.raises(LocatorError, match="neither a BOS nor an EOS"):
        locate_massive_weights(tiny_llama, 5)


def test_a_first_token_without_massive_activation_falls_back_to_the_next_candidate(tiny_llama, tiny_llama_dir):
    from transformers import AutoTokenizer

    # the planted Llama's massive weights answer BOS; LLaMA-Factory's `default` template (the tiny
    # training runs') starts with "Human: ", whose first token sets off nothing massive
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    h = tok("Human", add_special_tokens=False)["input_ids"][0]
    first = ProbeToken(h, "template default: first token", tok.convert_ids_to_tokens(h))
    assert first.text == "H"
    bos, eos = tiny_llama.config.bos_token_id, tiny_llama.config.eos_token_id
    result = locate_massive_weights(tiny_llama, 5, tokenizer=tok, first_token=first)
    assert (result.layer, result.indices, result.massive) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES, True)
    assert (result.probe_token_id, result.probe_token_text, result.probe_token_source) == (
        bos,
        "<s>",
        "tokenizer.bos_token_id",
    )
    assert [(c.token_id, c.origin_layer) for c in result.candidates] == [
        (first.token_id, None),
        (bos, tiny.PLANTED_LAYER),
        (eos, None),
    ]
    assert len(result.warnings) == 1
    assert f"{first.token_id} 'H' (template default" in result.warnings[0]


def residual_max_per_layer(model, token):
    """Outside measurement: max |residual| leaving every decoder layer but the last (whose
    hidden_states entry is after the final norm), at ``token`` alone."""
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([[token]]), output_hidden_states=True).hidden_states
    return [float(h[0, 0].abs().max()) for h in hs[:-1]]  # [embeddings, out of layer 0, ...]


def test_tiny_embeddings_do_not_fool_the_rule():
    from helpers import tiny_archs as ta

    model = ta.build_tiny_embeddings()
    result = locate_massive_weights(model, 5)
    assert (result.layer, result.indices) == (ta.TINY_EMB_ORIGIN, ta.TINY_EMB_INDICES)
    assert result.massive
    assert not result.warnings
    # the trap, measured from outside: embeddings of max 0.05 make layer 0's growth the largest jump
    res = residual_max_per_layer(model, 1)
    jumps = [res[i + 1] / res[i] for i in range(len(res) - 1)]
    assert res[0] == pytest.approx(ta.TINY_EMB_MAX)
    assert res[1] < 10
    assert max(range(len(jumps)), key=jumps.__getitem__) == 0
    assert jumps[0] > jumps[ta.TINY_EMB_ORIGIN] > 50
    assert res[ta.TINY_EMB_ORIGIN + 1] > 300
    assert res[-1] == pytest.approx(res[ta.TINY_EMB_ORIGIN + 1])


def test_no_massive_activation_warns_instead_of_picking_a_layer_silently():
    from helpers import tiny_archs as ta

    model = ta.build_tiny_embeddings(origin=False)
    assert max(residual_max_per_layer(model, 1)) < 10  # nothing massive anywhere, yet a ~100x jump at layer 0
    result = locate_massive_weights(model, 5)
    assert result.massive is False
    assert result.layer == 0  # the fallback is named, never passed off as massive
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert warning.startswith("no massive activation")
    assert "layer 0" in warning
    assert "macdrop_layer" in warning
    assert [(c.token_id, c.origin_layer) for c in result.candidates] == [(ta.BOS, None), (ta.EOS, None)]
    assert "warning: no massive activation" in result.table()


def stat(layer, before, after, median=0.01):
    return LayerStats(layer, before, after, after / before, 0.0, 0, 0.0, out_median=median)


def test_the_rule_wants_a_massive_value_created_at_the_layer_and_kept():
    fades = [stat(0, 0.05, 1), stat(1, 1, 300), stat(2, 300, 2), stat(3, 2, 2), stat(4, 2, 2)]
    assert find_origin(fades, 4) is None  # a spike the next layer takes back
    flat = [stat(0, 1, 500, median=100), stat(1, 500, 500, median=100), stat(2, 500, 500, median=100)]
    assert find_origin(flat, 2) is None  # large, but not far above the vector's median
    grows = [stat(0, 0.05, 1), stat(1, 1, 300), stat(2, 300, 290), stat(3, 290, 280), stat(4, 280, 280)]
    # layer by layer: undecided until PERSIST_LAYERS (2) layers after the origin have been seen
    assert [find_origin(grows[:n], 4) for n in range(1, 6)] == [None, None, None, 1, 1]
    assert find_origin(grows[:2], 1) == 1  # the model's last layer: nothing after it to wait for


def test_unknown_architecture_fails_clearly():
    with pytest.raises(UnsupportedArchitectureError, match="found no decoder layers"):
        find_ffn_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_model_without_massive_weights_gets_a_warning():
    from helpers import tiny_archs as ta
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(ta.configs()["gemma2"]).eval()  # random, nothing planted
    result = locate_massive_weights(plain, 5)
    assert result.massiveness < 10
    assert result.massive is False
    assert result.warnings
    assert result.warnings[0].startswith("no massive activation")
    assert "warning: no massive activation" in result.table()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[1, 2, 3]", "it holds a JSON array, not an object with the located layer and rows"),
        (
            '{"model": "m", "layer": 1',
            "not valid JSON (Expecting ',' delimiter: line 1 column 26 (char 25); it looks cut short)",
        ),
        ("", "not valid JSON (Expecting value: line 1 column 1 (char 0); the file is empty)"),
        (
            '{"model": "m", "layer": "1", "indices": [1], "modules": [], "source": "probe"}',
            "'layer' is a JSON string, expected a number",
        ),
        (
            '{"model": "m", "layer": 1, "indices": [], "modules": [], "source": "probe"}',
            "'indices' is [], expected a non-empty list",
        ),
    ],
)
def test_the_one_reader_of_a_locator_file_says_what_is_wrong_in_one_line(tiny_llama, tmp_path, content, fragment):
    """`macdrop summary` and a resumed run read macdrop_locator.json through one reader; the resume
    adds the way out."""
    path = tmp_path / "macdrop_locator.json"
    path.write_text(content)
    with pytest.raises(LocatorError) as info:
        read_locator_file(path)
    assert str(info.value).startswith(f"{path} is not a MacDrop locator file: {fragment}"), str(info.value)
    with pytest.raises(LocatorError) as resumed:
        reuse_result(path, tiny_llama, find_ffn_blocks(tiny_llama), 5)
    assert str(resumed.value) == f"{info.value}: delete {path} to locate again"
    assert "\n" not in str(resumed.value)
