"""`macdrop attention`: the CLI on a planted sink (the JSON keys the checks read, the eager switch
said, the three figures written), and bad layer options refused before the model loads."""

import json
import shutil

import pytest
from helpers import tiny, tiny_archs

from llamafactory_macdrop.cli import main


@pytest.fixture(scope="module")
def sink_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted_sink")
    tok = tiny.build_tokenizer(out)
    tiny_archs.build_planted_sink(vocab=len(tok)).save_pretrained(out)
    return out


def test_attention_cli_on_a_planted_sink(sink_dir, tmp_path, capsys):
    assert (
        main(
            [
                "attention",
                str(sink_dir),
                "--probe-text",
                "the quick brown fox",
                "--json",
                str(tmp_path / "a.json"),
                "--plot",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "note: the model runs sdpa attention" in out
    assert "switched to eager attention" in out
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["massive_layer"] == tiny_archs.PLANTED_LAYER
    assert report["input_ids"][0] == tiny_archs.BOS
    T = len(report["input_ids"])
    uniform = sum(1 / (q + 1) for q in range(1, T)) / (T - 1)  # q = 0 up to the massive layer
    assert [s["layer"] for s in report["layers"]] == list(range(tiny_archs.SINK_LAYERS))
    for s in report["layers"]:
        assert s["top_key"] == 0
        if s["layer"] < tiny_archs.SINK_FROM:
            assert s["sink_share"] == pytest.approx(uniform, abs=1e-6)
        else:
            assert s["sink_share"] > 0.99
    for name in ("attention_heatmaps.png", "attention_sink.png", "attention_position.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_layer_options_fail_before_loading(sink_dir, tmp_path, capsys):
    shutil.copy(sink_dir / "config.json", tmp_path / "config.json")  # no weights: a load would fail differently
    last = tiny_archs.SINK_LAYERS - 1
    cases = [
        (
            ["--position-layer", str(last + 1)],
            f"--position-layer {last + 1} is out of range: the model has layers 0..{last}",
        ),
        (
            ["--heatmap-layers", f"1,{last + 5}"],
            f"--heatmap-layers {last + 5} is out of range: the model has layers 0..{last}",
        ),
        (["--probe-text", " "], "--probe-text ' ' is not allowed: give a text of at least one token"),
    ]
    for extra, message in cases:
        assert main(["attention", str(tmp_path), "--no-progress", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"macdrop: error: {message}"
