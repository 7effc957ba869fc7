"""Super weights beyond detection, on the planted model of tiny_superweight.py: zero the super weight
and write the super activation back (sw_restore), several super weights at once, the stop-word
shift, and the commands that report them. Oracles are written here: a hook that replays the
recorded original activation, and probabilities from plain forwards with the weight edited by hand."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny
from helpers import tiny_superweight as ts

from llamafactory_macdrop.analysis.attack.attacks import (
    AttackSetting,
    AttackTargets,
    ModelAttacker,
    SuperWeightTarget,
    scaled_super_weights,
    set_activation_cutoffs,
    sweep_settings,
)
from llamafactory_macdrop.analysis.attack.report import AttackReport, loss_gap_recovery, run_sweep
from llamafactory_macdrop.analysis.attack.stopwords import stopword_shift, stopword_token_ids
from llamafactory_macdrop.analysis.evaluate.perplexity import evaluate_perplexity
from llamafactory_macdrop.cli import main
from llamafactory_macdrop.core.architectures import find_ffn_blocks


def _oracle_nll(model, x, cutoff=None):
    """Mean NLL of window x with W_down[SW] zeroed by hand; with ``cutoff``, the recorded original
    down output in SW_ROW written back where its magnitude exceeds it."""
    down = model.model.layers[ts.SW_LAYER].mlp.down_proj
    rec = {}

    def record(m, a, o):
        rec["orig"] = o[..., ts.SW_ROW].clone()

    h = down.register_forward_hook(record)
    with torch.no_grad():
        model(x)
    h.remove()
    saved = down.weight.detach().clone()
    handles = []
    if cutoff is not None:

        def put_back(m, a, o):
            o = o.clone()
            keep = rec["orig"].abs() > cutoff
            o[..., ts.SW_ROW] = torch.where(keep, rec["orig"], o[..., ts.SW_ROW])
            return o

        handles.append(down.register_forward_hook(put_back))
    try:
        with torch.no_grad():
            down.weight[ts.SW_ROW, ts.SW_COL] = 0.0
            logits = model(x).logits
            return float(F.cross_entropy(logits[0, :-1], x[0, 1:])), rec["orig"]
    finally:
        with torch.no_grad():
            down.weight.copy_(saved)
        for h in handles:
            h.remove()


def test_sw_restore_writes_the_super_activation_back(super_weight_llama):
    model, tokenizer = super_weight_llama
    before = ts.state_bits(model)
    corpus = ts.planted_corpus(tokenizer)
    x = corpus.windows.tail
    sw = SuperWeightTarget(ts.SW_LAYER, ts.SW_ROW, ts.SW_COL)
    set_activation_cutoffs(model, x, [sw])
    targets = AttackTargets(ts.SW_LAYER, [ts.SW_COL], super_weights=[sw])
    attacker = ModelAttacker(model, targets)
    settings = sweep_settings(["sw_restore"], [0])
    assert [s.label for s in settings] == ["clean", "superweight x0", "superweight x0 + SA restored"]
    report = run_sweep(model, attacker, settings, [corpus], report=AttackReport("planted", None, {}), progress=False)
    nll = {r["setting"]: r["nll"] for r in report.rows}
    zeroed, _ = _oracle_nll(model, x)
    assert nll["superweight x0"] == pytest.approx(zeroed, rel=1e-5)
    assert zeroed > nll["clean"] + 5
    # the planted super activation is at every position: writing it back everywhere restores the model
    assert nll["superweight x0 + SA restored"] == pytest.approx(nll["clean"], abs=1e-4)
    (rec,) = loss_gap_recovery(report)
    assert rec["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert rec["metric"] == "loss"

    # a cutoff at the median magnitude: only the positions above it get their value back
    _, orig = _oracle_nll(model, x)
    mags = orig.abs().flatten().sort().values
    sw.activation_cutoff = float(mags[len(mags) // 2 : len(mags) // 2 + 2].mean())  # between two positions
    expected, _ = _oracle_nll(model, x, cutoff=sw.activation_cutoff)
    with attacker.applied(AttackSetting("sw_restore")):
        got = evaluate_perplexity(model, corpus.windows, progress=False).nll
    assert got == pytest.approx(expected, rel=1e-4)
    assert nll["clean"] + 0.5 < got < zeroed - 0.5  # half the positions: partly recovered
    attacker.verify_restored()
    assert all(torch.equal(v, before[k]) for k, v in ts.state_bits(model).items())


def test_several_super_weights_are_scaled_together_and_restored_bitwise(super_weight_llama):
    model, _ = super_weight_llama
    before = ts.state_bits(model)
    blocks = {b.index: b for b in find_ffn_blocks(model)}
    down0 = model.model.layers[0].mlp.down_proj.weight
    down1 = model.model.layers[1].mlp.down_proj.weight
    sws = [
        SuperWeightTarget(0, ts.SW_ROW, ts.SW_COL),
        SuperWeightTarget(0, 3, ts.SW_COL),  # same column
        SuperWeightTarget(1, 2, 10),
    ]
    want = {
        (0, ts.SW_ROW, ts.SW_COL): ts.SW_VALUE * 0.5,
        (0, 3, ts.SW_COL): 0.0,
        (1, 2, 10): float(down1.detach()[2, 10]) * 0.5,
    }
    with scaled_super_weights(blocks, sws, 0.5):
        inside = ts.state_bits(model)
        for (layer, r, c), v in want.items():
            assert float((down0 if layer == 0 else down1)[r, c]) == v
        changed = {k: int((inside[k] != before[k]).sum()) for k in before if not torch.equal(inside[k], before[k])}
        # 4 bytes per float32 value; row 3 of column SW_COL was planted 0 (0 * 0.5 = 0: unchanged)
        assert set(changed) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert all(torch.equal(v, before[k]) for k, v in ts.state_bits(model).items())


def test_stop_words_rise_when_the_super_weight_is_zeroed(super_weight_llama):
    model, tokenizer = super_weight_llama
    before = ts.state_bits(model)
    x = ts.planted_corpus(tokenizer).windows.tail
    words = stopword_token_ids(tokenizer, list(ts.STOP_WORDS) + ["fox"])
    report = stopword_shift(model, [x], words, [SuperWeightTarget(ts.SW_LAYER, ts.SW_ROW, ts.SW_COL)])
    # the oracle: plain forwards, the weight zeroed by hand
    down = model.model.layers[ts.SW_LAYER].mlp.down_proj.weight
    with torch.no_grad():
        p_orig = model(x).logits[0].softmax(-1)
        saved = down[ts.SW_ROW, ts.SW_COL].clone()
        down[ts.SW_ROW, ts.SW_COL] = 0.0
        p_zero = model(x).logits[0].softmax(-1)
        down[ts.SW_ROW, ts.SW_COL] = saved
    for w in report.words:
        assert w.p_original == pytest.approx(float(p_orig[:, w.token_ids].sum(-1).mean()), rel=1e-5)
        assert w.p_zeroed == pytest.approx(float(p_zero[:, w.token_ids].sum(-1).mean()), rel=1e-5)
    ratio = {w.word: w.ratio for w in report.words}
    assert all(ratio[s] > 1.5 for s in ts.STOP_WORDS)  # wired: the super activation suppresses them
    assert ratio["fox"] < 0.1  # an ordinary word loses its probability instead
    assert report.positions == x.shape[1]
    assert report.restored_bitwise
    assert sorted(words["the"]) == sorted(ts.stop_word_ids(tokenizer)[:2])
    assert all(torch.equal(v, before[k]) for k, v in ts.state_bits(model).items())
    with pytest.raises(ValueError, match="--stopword-tokens 'zzqx'"):
        stopword_token_ids(tokenizer, ["zzqx"])


def test_superweight_stopwords_and_attack_commands(super_weight_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(tiny.corpus(20, seed=3)))
    out = tmp_path / "stop.json"
    assert (
        main(
            [
                "superweight",
                str(super_weight_llama_dir),
                "--stopwords",
                "--stopword-tokens",
                "the",
                "a",
                "fox",
                "--super-weight",
                "all",
                "--text-file",
                str(text),
                "--stopwords-json",
                str(out),
                "--plot",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["super_weights"] == [{"layer": ts.SW_LAYER, "row": ts.SW_ROW, "col": ts.SW_COL}]
    assert [w["word"] for w in data["words"]] == ["the", "a", "fox"]
    assert data["words"][1]["ratio"] > 1.5
    assert "super weights restored bitwise: yes" in printed
    assert (tmp_path / "stopwords.png").stat().st_size > 0

    out = tmp_path / "attack.json"
    assert (
        main(
            [
                "attack",
                str(super_weight_llama_dir),
                "--mode",
                "superweight,sw_restore",
                "--scale",
                "0,0.5,2",
                "--super-weight",
                f"{ts.SW_LAYER},{ts.SW_ROW},{ts.SW_COL}",
                "--text-file",
                str(text),
                "--json",
                str(out),
                "--plot",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["results"]] == [
        "clean",
        "superweight x0",
        "superweight x0.5",
        "superweight x2",
        "superweight x0 + SA restored",
    ]
    (rec,) = data["sw_restore_recovery"]
    assert rec["recovered"] == pytest.approx(1.0, abs=1e-3)
    assert "| 100 % |" in printed
    assert data["targets"]["super_weights"][0]["activation_cutoff"] > 1000
    assert (tmp_path / "superweight_scaling.png").stat().st_size > 0


def test_super_weight_option_values(capsys):
    from llamafactory_macdrop.cli.evaluation import super_weight_arg

    assert super_weight_arg("all") == "all"
    assert [(s.layer, s.row, s.col) for s in super_weight_arg("11,507,1229,28,507,678")] == [
        (11, 507, 1229),
        (28, 507, 678),
    ]
    with pytest.raises(SystemExit):
        main(["attack", "m", "--super-weight", "1,2"])
    assert "expected LAYER,ROW,COL" in capsys.readouterr().err
