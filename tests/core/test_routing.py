"""MoE routing at the massive layer (House of Cards Fig. 5): the locator's ``routing`` table on a
planted MoE whose router probabilities are known (uniform everywhere but at the massive layer)."""

import json

import pytest
from helpers import tiny, tiny_archs

from llamafactory_macdrop.core.locator import LocatorResult, locate_massive_weights

MOE = [a for a in tiny_archs.ARCHITECTURES if a in ("mixtral", "qwen2_moe", "qwen3_moe")]


@pytest.mark.parametrize("arch", MOE)
def test_routing_collapses_onto_the_planted_expert_at_the_massive_layer(arch):
    result = locate_massive_weights(tiny_archs.build_routed_moe(arch), 5)
    assert result.layer == tiny_archs.PLANTED_LAYER
    assert result.expert == tiny_archs.ROUTED_EXPERT
    assert [r.layer for r in result.routing] == [0, 1, 2, 3]
    for r in result.routing:
        if r.layer == tiny_archs.PLANTED_LAYER:
            assert r.top_expert == tiny_archs.ROUTED_EXPERT
            assert r.probs[r.top_expert] > 0.999
        else:  # zero router weights: logits 0, every expert 1/4 exactly
            assert r.probs == [0.25] * 4
    again = LocatorResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.routing == result.routing
    lines = result.routing_table()
    assert lines[3].split() == ["1", "0.000", "0.000", "1.000", "0.000", "e2", "<-", "massive", "layer"]


def test_dense_models_have_no_routing():
    assert locate_massive_weights(tiny_archs.build("llama"), 5).routing == []


def test_locate_prints_and_plots_the_routing(tmp_path, capsys):
    from llamafactory_macdrop.cli import main

    tok = tiny.build_tokenizer(tmp_path / "moe")
    tiny_archs.build_routed_moe("mixtral", vocab=len(tok)).save_pretrained(tmp_path / "moe")
    assert (
        main(["locate", str(tmp_path / "moe"), "--json", str(tmp_path / "l.json"), "--plot", str(tmp_path / "plots")])
        == 0
    )
    out = capsys.readouterr().out
    assert "router probabilities of the probe token" in out
    assert "e2  <- massive layer" in out
    routing = json.loads((tmp_path / "l.json").read_text())["routing"]
    assert [r["top_expert"] for r in routing] == [0, 2, 0, 0]
    assert routing[1]["probs"][2] > 0.999
    assert (tmp_path / "plots" / "locate_routing.png").stat().st_size > 0
    # both overrides on a MoE layer: the probe still runs (to name the expert), so --plot has its figures
    # (on a dense model the same options are refused before loading: tests/cli/test_bad_input_cli.py)
    overridden = ["--layer", "1", "--indices", "0,1", "--plot", str(tmp_path / "both")]
    assert main(["locate", str(tmp_path / "moe"), *overridden]) == 0
    assert (tmp_path / "both" / "locate_intermediate.png").stat().st_size > 0
