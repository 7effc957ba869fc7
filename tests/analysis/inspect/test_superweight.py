"""Super weights (Yu et al.): on the planted tiny Llama the super weight is the planted W_down entry
(row 1 = the residual dim written, col = the locator's top-1 index); on SmolLM2 it is layer 11,
row 507, col 1229."""

import copy
import json

import pytest
import torch
from helpers import tiny

from llamafactory_macdrop.analysis.inspect.activations import probe_input_ids
from llamafactory_macdrop.analysis.inspect.superweight import RELATIVE, find_super_weights
from llamafactory_macdrop.cli import build_parser
from llamafactory_macdrop.core.locator import locate_massive_weights

TEXT = "the quick brown fox jumps over a lazy dog"


@pytest.fixture()
def ids(tiny_llama, tiny_llama_dir):
    from transformers import AutoTokenizer

    return probe_input_ids(AutoTokenizer.from_pretrained(tiny_llama_dir), TEXT)


def test_the_planted_down_proj_entry_is_the_super_weight(tiny_llama, ids):
    report = find_super_weights(tiny_llama, ids)
    top = report.candidates[0]
    assert (top.layer, top.row, top.col, top.position) == (tiny.PLANTED_LAYER, 1, tiny.PLANTED_INDICES[0], 0)
    assert top.weight == 1.0  # tiny.plant sets down_proj[1, idx] = 1
    assert top.creates
    assert top.module == "model.layers.1.mlp.down_proj.weight"
    assert top.col == locate_massive_weights(tiny_llama, 5).indices[0]
    # five planted units write dim 1 with gains 10, 8.5, 7, 5.5, 4: the top one writes ~10/35
    assert top.share == pytest.approx(10 / 35, abs=0.02)
    assert top.output_spike > 2000
    assert top.input_spike > 500
    assert len(report.candidates) == 1  # layer 0 writes nothing comparable
    # the decoy has the largest down INPUT of all, at layer 0; a zero column keeps it out
    l0 = report.layers[0]
    assert l0.col == tiny.DECOY_INDEX
    assert l0.input_spike > 10 * top.input_spike
    assert l0.output_spike < 1


def test_the_spike_needs_bos(tiny_llama, ids):
    with_bos = find_super_weights(tiny_llama, ids).candidates[0]
    without = find_super_weights(tiny_llama, ids[:, 1:]).candidates[0]
    assert without.output_spike < 0.05 * with_bos.output_spike


def test_threshold_and_top(tiny_llama, ids):
    assert find_super_weights(tiny_llama, ids, threshold=1e6).candidates == []
    both = find_super_weights(tiny_llama, ids, threshold=0.0)
    assert [c.layer for c in both.candidates] == [1, 0]
    assert [c.layer for c in find_super_weights(tiny_llama, ids, threshold=0.0, top=1).candidates] == [1]


def test_a_late_layer_that_cancels_ranks_after_the_one_that_creates(tiny_llama):
    # a third layer reads the massive dim 1 and writes it back down with a LARGER spike, as the
    # last layers of real models do; ranking by spike alone would name it
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(tiny_llama.config)
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tiny.plant(model, config.bos_token_id)
    with torch.no_grad():
        mlp, unit = model.model.layers[2].mlp, 7
        mlp.gate_proj.weight[unit, 1], mlp.up_proj.weight[unit, 1] = 1.0, 12.0
        mlp.down_proj.weight[:, unit] = 0.0
        mlp.down_proj.weight[1, unit] = -4.0
    report = find_super_weights(model, [config.bos_token_id])
    first, second = report.candidates
    assert (first.layer, first.row, first.col, first.creates) == (1, 1, tiny.PLANTED_INDICES[0], True)
    assert (second.layer, second.row, second.col, second.creates) == (2, 1, unit, False)
    assert second.output_spike > first.output_spike
    assert second.weight == -4.0
    assert second.share == pytest.approx(1.0, abs=0.02)  # one unit does all the cancelling


def test_adapters_are_seen_through(tiny_llama, ids):
    peft_model = tiny.loud_adapter(tiny_llama, ["up_proj", "gate_proj", "down_proj"])
    top = find_super_weights(peft_model, ids).candidates[0]
    assert (top.layer, top.row, top.col, top.weight) == (1, 1, tiny.PLANTED_INDICES[0], 1.0)
    assert top.module == "model.layers.1.mlp.down_proj.base_layer.weight"
    assert peft_model.training


def test_json_and_table(tiny_llama, ids, tmp_path):
    report = find_super_weights(tiny_llama, ids)
    data = json.loads(report.write_json(tmp_path / "sw.json").read_text())
    (c,) = data["candidates"]
    assert (c["layer"], c["row"], c["col"], c["weight"], c["creates"]) == (1, 1, tiny.PLANTED_INDICES[0], 1.0, True)
    assert [d["layer"] for d in data["layers"]] == [0, 1]
    assert data["layers"][1]["creates"] is True
    assert data["threshold"] is None
    assert f"{RELATIVE} x the largest" in data["rule"]
    row = report.table().splitlines()[-1].split()
    assert row[:4] == ["1", "1", str(tiny.PLANTED_INDICES[0]), "1.0000"]
    assert row[-1] == "creates"


def test_superweight_subcommand(tiny_llama_dir, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "sw.json"
    args = parser.parse_args(["superweight", str(tiny_llama_dir), "--probe-text", TEXT, "--json", str(out)])
    assert (args.threshold, args.top, args.dtype) == (None, 3, "float32")
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["model"] == str(tiny_llama_dir)
    assert data["input_ids"][0] == 1  # <s> of the tiny tokenizer
    top = data["candidates"][0]
    assert (top["layer"], top["row"], top["col"]) == (tiny.PLANTED_LAYER, 1, tiny.PLANTED_INDICES[0])
    assert "creates" in capsys.readouterr().out
    args = parser.parse_args(["superweight", str(tiny_llama_dir), "--threshold", "1e9", "--json", str(out)])
    assert args.func(args) == 0
    assert json.loads(out.read_text())["candidates"] == []


# ----------------------------------------------------------------------------- SmolLM2-135M (conftest.smollm2)


@pytest.mark.slow
def test_smollm2_super_weight_is_layer_11_row_507_col_1229(smollm2):
    from llamafactory_macdrop.core.text_prefix import resolve_prefix

    model, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog."
    plain = find_super_weights(model, probe_input_ids(tokenizer, text)).candidates[
        0
    ]  # nothing first: SmolLM2's tokenizer
    assert (plain.layer, plain.row, plain.col, plain.position) == (11, 507, 1229, 0)
    # with <|im_start|> first (--bos-token 1): the figures of docs/analysis.md and REFERENCE
    report = find_super_weights(model, probe_input_ids(tokenizer, text, resolve_prefix(tokenizer, bos_token=1)))
    top = report.candidates[0]
    assert (top.layer, top.row, top.col, top.position, top.creates) == (11, 507, 1229, 0, True)
    assert top.col == locate_massive_weights(model, 5).indices[0]
    assert top.weight == pytest.approx(5.876, abs=0.01)
    assert top.input_spike == pytest.approx(3065, rel=0.02)
    assert top.output_spike == pytest.approx(24_880, rel=0.02)
    assert 0.6 < top.share < 0.85  # unit 1487 writes the rest of dim 507
    # layer 28 writes dim 507 back down with a comparable spike: kept, but ranked after the origin
    late = report.candidates[1]
    assert (late.layer, late.row, late.creates) == (28, 507, False)
    assert late.output_spike > RELATIVE * top.output_spike
    assert [c.layer for c in report.candidates] == [11, 28]


@pytest.mark.parametrize("name", ["gpt2", "opt", "gpt_neox", "phi3", "olmo2", "mixtral"])
def test_other_layouts(name):
    # Conv1D stores W_down as [in, out] (the weight is read transposed), OPT hands its FFN a flat
    # [T, D] state, MoE experts have no down module (no candidate, no intermediate statistics)
    from helpers import tiny_archs as ta

    from llamafactory_macdrop.analysis.inspect.activations import activation_report

    model = ta.build(name)
    ids = [ta.BOS, 5, 6, 7]
    act = activation_report(model, ids)
    # (biases and post-FFN norms of these random models make later positions massive too)
    assert act.origin_layer == ta.PLANTED_LAYER
    assert act.layers[1].massive_positions[0] == 0
    report = find_super_weights(model, ids)
    if name == "mixtral":
        assert report.candidates == []
        assert act.layers[1].intermediate_top is None
        return
    top = report.candidates[0]
    assert (top.layer, top.col, top.position, top.creates) == (ta.PLANTED_LAYER, ta.PLANTED_INDICES[0], 0, True)
    assert top.row == 1
    assert top.weight == 1.0  # tiny_archs.plant: W_down[1, planted unit] = 1
    assert act.layers[1].massive_dims == [1]
