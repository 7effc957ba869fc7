"""sweep.py: one row per setting x corpus, a table line per setting, bitwise restore at the end."""

import torch
from helpers import tiny

from llamafactory_macdrop.analysis.attack.attacks import (
    AttackTargets,
    ModelAttacker,
    massive_activation_target,
    super_weight_target,
    sweep_settings,
)
from llamafactory_macdrop.analysis.attack.report import AttackReport, run_sweep
from llamafactory_macdrop.analysis.evaluate.perplexity import (
    TEXT_FILE_PROTOCOL,
    TextSource,
    make_windows,
)
from llamafactory_macdrop.analysis.sweep.loop import PreparedCorpus
from llamafactory_macdrop.core.locator import locate_massive_weights


def test_every_setting_gets_its_rows_and_its_table_line(tiny_llama):
    model = tiny_llama.eval()
    ids = torch.tensor([[1, 40, 41, 42]])
    located = locate_massive_weights(model, 5)
    targets = AttackTargets(
        located.layer,
        located.indices,
        super_weight=super_weight_target(model, ids),
        activations=massive_activation_target(model, ids),
    )
    attacker = ModelAttacker(model, targets)
    settings = sweep_settings(["zero", "superweight", "activation"], [0, 2, 5], scales=[0, 2], fills=["zero", "mean"])
    g = torch.Generator().manual_seed(1)
    corpora = [
        PreparedCorpus(
            TextSource(name, "", "generated", TEXT_FILE_PROTOCOL),
            make_windows(torch.randint(4, 300, (n,), generator=g), TEXT_FILE_PROTOCOL, prefix=[1]),
        )
        for name, n in (("a", 40), ("b", 70))
    ]
    report = run_sweep(
        model, attacker, settings, corpora, report=AttackReport("tiny", None, targets.to_dict()), progress=False
    )
    assert report.restored_bitwise
    assert [(r["setting"], r["dataset"]) for r in report.rows] == [(s.label, c) for s in settings for c in ("a", "b")]
    lines = report.results_table().splitlines()
    assert lines[0] == "| setting | a ppl | b ppl |"
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [s.label for s in settings]
    ppl = {r["setting"]: r["ppl"] for r in report.rows if r["dataset"] == "a"}
    assert ppl["superweight x0"] != ppl["superweight x2"]
    assert ppl["activation := zero"] != ppl["activation := mean"]
    assert {r["scale"] for r in report.rows if r["mode"] == "superweight"} == {0.0, 2.0}
    assert report.to_dict()["results"] == report.rows
    assert report.to_csv().count("\n") == len(report.rows) + 1
    assert tiny.PLANTED_LAYER == report.targets["layer"]


def test_plot_draws_metric_against_k_for_both_attacks():
    from llamafactory_macdrop.analysis.attack.plots import attack_sweep_figure

    report = AttackReport("m", None, {"layer": 3})
    for mode, k, ppl in (
        ("clean", 0, 10.0),
        ("zero", 1, 20.0),
        ("zero", 5, 80.0),
        ("retain", 1, 12.0),
        ("retain", 5, 11.0),
    ):
        label = "clean" if mode == "clean" else f"{mode} k={k}"
        report.rows.append({"mode": mode, "k": k, "setting": label, "dataset": "wiki", "ppl": ppl, "tokens": 9})
    report.rows.append({"mode": "clean", "k": 0, "setting": "clean", "dataset": "piqa", "acc": 0.5, "n": 4})
    fig = attack_sweep_figure(report)
    wiki, piqa = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in wiki.get_lines()}
    assert lines["top-k zeroing"] == ([0, 1, 5], [10.0, 20.0, 80.0])
    assert lines["top-k retaining"] == ([0, 1, 5], [10.0, 12.0, 11.0])
    assert wiki.get_yscale() == "log"
    assert piqa.get_ylabel() == "accuracy (%), 95 % Wilson band"
    assert [list(line.get_ydata()) for line in piqa.get_lines() if line.get_label() == "no attack"] == [[50.0, 50.0]]
