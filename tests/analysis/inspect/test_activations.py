"""Massive activations (Sun et al.) per layer: the planted tiny Llama gives known answers, SmolLM2
the real picture; plus the plots and the ``activations`` subcommand."""

import json

import pytest
import torch
from helpers import tiny

from llamafactory_macdrop.analysis.inspect.activations import activation_report, probe_input_ids
from llamafactory_macdrop.analysis.inspect.plots import (
    intermediate_bars_figure,
    layer_profile_figure,
    plot_intermediate_bars,
    plot_layer_profile,
)
from llamafactory_macdrop.cli import build_parser
from llamafactory_macdrop.core.architectures import find_ffn_blocks

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "the quick brown fox jumps over a lazy dog"


@pytest.fixture()
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def ids(tiny_llama, tok):
    return probe_input_ids(tok, TEXT)


def test_probe_input_is_what_the_tokenizer_puts_first_plus_the_text(tiny_llama, tok, ids):
    words = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids.shape == (1, len(words) + 1)
    assert ids[0].tolist() == [tiny_llama.config.bos_token_id] + words == tok(TEXT)["input_ids"]  # a Llama-like BOS

    class NoBos:  # a tokenizer that adds nothing gets the text alone, whatever a config's BOS says
        bos_token_id = 1

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [5, 6, 7]}

    assert probe_input_ids(NoBos(), "x")[0].tolist() == [5, 6, 7]


def test_planted_massive_activation_is_found_where_it_was_planted(tiny_llama, tok, ids):
    report = activation_report(tiny_llama, ids, tokenizer=tok)
    l0, l1 = report.layers
    # layer 1's down_proj writes the planted units into residual dim 1 at BOS: one massive entry
    assert [(m.layer, m.position, m.dim) for m in report.massive] == [(tiny.PLANTED_LAYER, 0, 1)]
    assert l1.massive[0].value > 1000
    assert l1.massive[0].value == pytest.approx(l1.hidden_top[0])
    assert (l1.massive_dims, l1.massive_positions) == ([1], [0])
    assert report.origin_layer == tiny.PLANTED_LAYER
    assert report.massive_layers == [1]
    # layer 0: only the BOS embedding's 5.0 in dim 0, and the decoy never reaches the residual
    assert l0.hidden_top[0] == pytest.approx(5.0, abs=0.1)
    assert l0.hidden_top_at[0] == [0, 0]
    assert l0.intermediate_top_at[0] == [0, tiny.DECOY_INDEX]
    assert not l0.massive
    assert l1.intermediate_top_at == [[0, i] for i in tiny.PLANTED_INDICES[:3]]
    assert l1.intermediate_top == sorted(l1.intermediate_top, reverse=True)
    assert l1.hidden_top[0] > 1000 * l1.hidden_median
    # the vector kept for the bar plot is layer 1's intermediate state at BOS
    assert report.origin_intermediate.topk(5).indices.tolist() == tiny.PLANTED_INDICES
    assert report.origin_intermediate[tiny.PLANTED_INDICES[0]] == pytest.approx(l1.intermediate_top[0])
    assert report.tokens[0] == "<s>"
    assert report.input_ids == ids[0].tolist()


def test_both_criteria_count(tiny_llama, ids):
    # the absolute bar alone rejects the planted value when raised above it...
    assert activation_report(tiny_llama, ids, abs_threshold=3000).massive == []
    # ...and so does the relative bar (2233 < 1e6 x median)
    assert activation_report(tiny_llama, ids, median_ratio=1e6).massive == []
    # lowered bars also catch the BOS embedding's 5.0 in dim 0 (> 100 x median ~0.015) at layer 0
    loose = activation_report(tiny_llama, ids, abs_threshold=1.0, median_ratio=100.0)
    assert (loose.layers[0].massive_dims, loose.layers[0].massive_positions) == ([0], [0])
    assert loose.origin_layer == 0


def test_without_bos_there_is_nothing_massive(tiny_llama, ids):
    report = activation_report(tiny_llama, ids[:, 1:])  # the planted path starts at the BOS embedding
    assert report.massive == []
    assert report.origin_layer is None
    assert report.origin_intermediate is None
    assert "no massive activations" in report.table()


def test_adapters_are_disabled_and_mode_restored(tiny_llama, ids):
    plain = activation_report(tiny_llama, ids)
    peft_model = tiny.loud_adapter(tiny_llama, ["up_proj", "gate_proj", "down_proj"])
    report = activation_report(peft_model, ids)
    assert peft_model.training
    assert [(m.layer, m.position, m.dim) for m in report.massive] == [(1, 0, 1)]
    for a, b in zip(report.layers, plain.layers):
        assert a.hidden_top == pytest.approx(b.hidden_top, rel=1e-4)
        assert a.intermediate_top == pytest.approx(b.intermediate_top, rel=1e-4)


def test_a_subset_of_blocks(tiny_llama, ids):
    report = activation_report(tiny_llama, ids, blocks=find_ffn_blocks(tiny_llama)[1:])
    assert [s.layer for s in report.layers] == [1]
    assert report.origin_layer == 1


def test_json_and_table(tiny_llama, ids, tmp_path):
    report = activation_report(tiny_llama, ids)
    data = json.loads(report.write_json(tmp_path / "a.json").read_text())
    assert data["origin_layer"] == 1
    assert data["massive_dims"] == [1]
    assert data["massive_layers"] == [1]
    assert data["layers"][1]["massive"][0]["dim"] == 1
    assert data["layers"][1]["massive_positions"] == [0]
    assert data["layers"][0]["intermediate_top_at"][0] == [0, tiny.DECOY_INDEX]
    assert data["abs_threshold"] == 100.0
    assert data["median_ratio"] == 1000.0
    table = report.table()
    assert "dims [1] pos [0]" in table
    assert "origin of the massive activations: layer 1" in table
    assert len(table.splitlines()) == 2 + len(report.layers) + 1


# ----------------------------------------------------------------------------- plots
def test_layer_profile_plots_the_report(tiny_llama, ids, tmp_path):
    report = activation_report(tiny_llama, ids)
    fig = layer_profile_figure(report)
    hidden_ax, inter_ax = fig.axes
    assert hidden_ax.get_yscale() == inter_ax.get_yscale() == "log"
    for ax, tops, medians in (
        (hidden_ax, [s.hidden_top for s in report.layers], [s.hidden_median for s in report.layers]),
        (inter_ax, [s.intermediate_top for s in report.layers], [s.intermediate_median for s in report.layers]),
    ):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for rank in range(3):
            assert list(lines[f"top-{rank + 1}"].get_xdata()) == [0, 1]
            assert list(lines[f"top-{rank + 1}"].get_ydata()) == pytest.approx([t[rank] for t in tops])
        assert list(lines["median"].get_ydata()) == pytest.approx(medians)
        assert list(lines["origin (layer 1)"].get_xdata()) == [1, 1]  # the vertical origin marker
    # an explicit origin overrides the report's
    assert "origin (layer 0)" in [line.get_label() for line in layer_profile_figure(report, 0).axes[0].get_lines()]
    path = plot_layer_profile(report, tmp_path / "sub" / "profile.png")
    assert path == tmp_path / "sub" / "profile.png"
    assert path.read_bytes()[:8] == PNG


def test_intermediate_bars_highlight_the_top_k(tmp_path):
    values = torch.zeros(40)
    values[[7, 3, 30]] = torch.tensor([-9.0, 6.0, 4.0])  # signs are dropped: magnitudes are plotted
    values[11] = 0.5
    fig = intermediate_bars_figure(values, [7, 3, 30], layer=4)
    (ax,) = fig.axes
    bars = ax.collections[0].get_segments()
    assert len(bars) == 40
    assert bars[7][1][1] == 9.0
    assert bars[11][1][1] == 0.5
    assert bars[0][1][1] == 0.0
    top = next(line for line in ax.get_lines() if line.get_label() == "top-3")
    assert list(top.get_xdata()) == [7, 3, 30]
    assert list(top.get_ydata()) == [9.0, 6.0, 4.0]
    assert [t.get_text() for t in ax.texts] == ["7", "3", "30"]
    assert "layer 4" in fig._suptitle.get_text()
    path = plot_intermediate_bars(values.tolist(), [7], tmp_path / "bars.png", 4)
    assert path.read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- subcommand
def test_activations_subcommand(tiny_llama_dir, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "act.json"
    args = parser.parse_args(
        [
            "activations",
            str(tiny_llama_dir),
            "--probe-text",
            TEXT,
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "plots"),
        ]
    )
    assert (args.dtype, args.abs_threshold, args.median_ratio) == ("float32", 100.0, 1000.0)
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["model"] == str(tiny_llama_dir)
    assert data["origin_layer"] == tiny.PLANTED_LAYER
    assert data["tokens"][0] == "<s>"
    assert data["layers"][1]["massive_dims"] == [1]
    assert "origin of the massive activations: layer 1" in capsys.readouterr().out
    for name in ("activations_layers.png", "activations_intermediate.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    strict = parser.parse_args(
        ["activations", str(tiny_llama_dir), "--abs-threshold", "5000", "--json", str(out), "--dtype", "bfloat16"]
    )
    assert strict.func(strict) == 0
    assert json.loads(out.read_text())["massive_layers"] == []


# ----------------------------------------------------------------------------- SmolLM2-135M (conftest.smollm2)


@pytest.mark.slow
def test_smollm2_massive_activation_is_dim_507_at_bos_from_layer_11(smollm2):
    from llamafactory_macdrop.core.text_prefix import resolve_prefix

    model, tokenizer = smollm2
    plain = activation_report(model, probe_input_ids(tokenizer, "The quick brown fox jumps over the lazy dog."))
    assert plain.input_ids[0] == tokenizer("The")["input_ids"][0]  # SmolLM2's tokenizer puts nothing first
    assert plain.origin_layer == 11
    assert sorted({m.dim for m in plain.massive}) == [507]
    assert {m.position for m in plain.massive} == {0}
    # with <|im_start|> first (--bos-token 1), the figures of docs/analysis.md
    ids = probe_input_ids(
        tokenizer, "The quick brown fox jumps over the lazy dog.", resolve_prefix(tokenizer, bos_token=1)
    )
    assert ids[0, 0] == 1
    report = activation_report(model, ids)
    assert report.origin_layer == 11
    by_layer = {s.layer: s for s in report.layers}
    for layer in range(11, 28):  # carried by the residual stream from the origin on
        assert (by_layer[layer].massive_dims, by_layer[layer].massive_positions) == ([507], [0]), layer
        assert by_layer[layer].hidden_top[0] == pytest.approx(24_900, rel=0.02)
    assert all(not by_layer[layer].massive for layer in range(11))
    assert by_layer[10].hidden_top[0] < 200  # the jump happens inside layer 11
    # the last layers write it back down: no longer 1000x the median
    assert not by_layer[28].massive
    assert by_layer[28].hidden_top[0] < 1000 * by_layer[28].hidden_median
    assert by_layer[11].intermediate_top_at[0] == [0, 1229]
    assert report.origin_intermediate.topk(2).indices.tolist() == [1229, 1487]
