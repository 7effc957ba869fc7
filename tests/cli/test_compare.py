"""``macdrop compare`` end to end: 2 arms x 2 seeds through the real ``llamafactory-cli``, resumed.

Oracles from outside: each reported perplexity is recomputed with HF's own loss on the base +
that run's adapter loaded by peft (and, for an attack, on a copy with the planted top row zeroed
by hand); windows are cut here from the text, not by the package; the paired difference is
recomputed from the JSON's per-run values; what each arm trained is read from the YAML files and
training outputs LLaMA-Factory wrote.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.lm_oracle import preferred
from helpers.process import run_cli
from helpers.tiny import PLANTED_INDICES, PLANTED_LAYER, corpus, lf_train_args
from helpers.zeroshot_data import tiny_docs, write_arc_folder

pytestmark = pytest.mark.slow

SEQ = 32


def _compare(cwd: Path, *extra: str, config: str = "base.yaml"):
    return run_cli(
        [
            "macdrop",
            "compare",
            config,
            "--seeds",
            "0,1",
            "--text-file",
            "eval.txt",
            "--seq-len",
            str(SEQ),
            "--k-sweep",
            "1,3",
            "--quiet-train",
            "--no-progress",
            "--json",
            "out.json",
            "--csv",
            "out.csv",
            *extra,
        ],
        cwd=cwd,
        timeout=900,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_llama_dir, tiny_data_dir):
    """A folder with the base YAML (tiny planted Llama, 4 optimizer steps) and an evaluation text."""
    cwd = tmp_path_factory.mktemp("compare")
    base = lf_train_args(tiny_llama_dir, tiny_data_dir, "runs/tiny", num_train_epochs=1, macdrop_k=3, macdrop_p0=0.5)
    (cwd / "base.yaml").write_text(yaml.safe_dump(base))
    (cwd / "eval.txt").write_text(" ".join(corpus(60, seed=11)))
    return cwd


@pytest.fixture(scope="module")
def compared(workdir):
    cwd = workdir
    proc = _compare(cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc, json.loads((cwd / "out.json").read_text())


def _windows(tokenizer, text: str):
    """BOS once before the stream, consecutive windows of SEQ tokens, the last shorter one kept."""
    import torch

    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return [torch.tensor(ids[i : i + SEQ]) for i in range(0, len(ids), SEQ) if len(ids[i : i + SEQ]) >= 2]


def _hf_ppl(model, windows) -> float:
    import torch

    total = tokens = 0
    with torch.no_grad():
        for w in windows:
            total += float(model(input_ids=w[None], labels=w[None]).loss) * (w.numel() - 1)
            tokens += w.numel() - 1
    return math.exp(total / tokens)


def test_two_arms_two_seeds_through_llamafactory_cli(compared, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cwd, proc, out = compared
    root = cwd / "runs" / "tiny-compare"
    runs = {(r["arm"], r["seed"]): r for r in out["runs"]}
    assert set(runs) == {("plain", 0), ("plain", 1), ("macdrop", 0), ("macdrop", 1)}
    names = {
        "ppl/eval.txt/clean",
        "ppl/eval.txt/zero k=1",
        "ppl/eval.txt/zero k=3",
        "ppl/eval.txt/retain k=1",
        "ppl/eval.txt/retain k=3",
    }
    assert all(set(r["metrics"]) == names for r in runs.values())  # --text-file only: no zero-shot

    # what each arm trained: the plain arm has no macdrop key and LLaMA-Factory logged no p
    plain_yaml = yaml.safe_load((root / "configs" / "plain-seed0.yaml").read_text())
    mac_yaml = yaml.safe_load((root / "configs" / "macdrop-seed1.yaml").read_text())
    assert not [k for k in plain_yaml if k.startswith("macdrop")]
    assert mac_yaml["macdrop"] is True
    assert mac_yaml["macdrop_p0"] == 0.5
    assert mac_yaml["seed"] == 1
    for (arm, seed), r in runs.items():
        folder = cwd / r["output_dir"]
        assert folder == root / arm / f"seed{seed}"
        assert (folder / "adapter_model.safetensors").is_file()
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        logged_p = [h["macdrop_p"] for h in history if "macdrop_p" in h]
        assert (folder / "macdrop_locator.json").is_file() == (arm == "macdrop")
        assert bool(logged_p) == (arm == "macdrop")
        if arm == "macdrop":
            assert json.loads((folder / "macdrop_locator.json").read_text())["layer"] == PLANTED_LAYER
            assert logged_p[0] > logged_p[-1]  # step curriculum from p0 = 0.5 down

    # every reported perplexity against HF's loss on base + that adapter (attack: the planted top row zeroed here)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows = _windows(tokenizer, (cwd / "eval.txt").read_text())
    for (arm, seed), r in runs.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        model = PeftModel.from_pretrained(base, str(cwd / r["output_dir"])).eval()
        assert r["metrics"]["ppl/eval.txt/clean"] == pytest.approx(_hf_ppl(model, windows), rel=1e-4)
        if (arm, seed) == ("macdrop", 1):
            mlp = base.model.layers[PLANTED_LAYER].mlp
            import torch

            with torch.no_grad():
                for proj in (mlp.gate_proj, mlp.up_proj):
                    weight = proj.base_layer.weight if hasattr(proj, "base_layer") else proj.weight
                    weight[PLANTED_INDICES[0]] = 0
            assert r["metrics"]["ppl/eval.txt/zero k=1"] == pytest.approx(_hf_ppl(model, windows), rel=1e-4)

    # the paired rows: the seed-mean of the per-run differences, n = the windows (each scored in both seeds)
    paired = {p["metric"]: p for p in out["paired"]}
    assert set(paired) == names
    for metric, p in paired.items():
        assert {"metric", "mean_diff", "low", "high", "n"} <= set(p)
        diffs = [runs[("macdrop", s)]["metrics"][metric] - runs[("plain", s)]["metrics"][metric] for s in (0, 1)]
        assert p["mean_diff"] == pytest.approx(sum(diffs) / 2, rel=1e-9)
        assert p["n"] == len(windows)
        assert p["seeds"] == [0, 1]
        assert p["low"] <= p["high"]
    assert out["restored_bitwise"] is True
    assert out["verdict"]

    # the other outputs: CSV (one line per run and metric, plus the base), report, plots, stdout
    lines = (cwd / "out.csv").read_text().splitlines()
    assert lines[0].startswith("arm,seed,output_dir,metric")
    assert len(lines) == 1 + 5 * len(names)
    report = (root / "report.md").read_text()
    assert "## Verdict" in report
    assert "macdrop − plain" in report
    for name in ("compare_metrics.png", "compare_paired.png", "compare_robustness.png", "compare_loss.png"):
        assert (root / "plots" / name).stat().st_size > 10_000
    assert "verdict: macdrop vs plain" in proc.stdout
    assert "| ppl/eval.txt/clean |" in proc.stdout
    assert "plain seed 0: {'loss'" in proc.stdout  # --quiet-train still shows the trainer's loss lines


def test_rerun_skips_finished_runs_and_restarts_a_crashed_one(compared):
    cwd, _, first = compared
    root = cwd / "runs" / "tiny-compare"
    (root / "plain" / "seed1" / "macdrop_compare_run.json").unlink()  # as if it had been killed
    proc = _compare(cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("plain seed 0", "macdrop seed 0", "macdrop seed 1"):
        assert f"{name}: finished before, skipped" in proc.stdout
    assert "plain seed 1: unfinished folder moved aside to" in proc.stdout
    assert len(re.findall(r"\] \d/4 training ", proc.stdout)) == 1
    aside = [p for p in (root / "plain").iterdir() if p.name.startswith("seed1.crashed-")]
    assert len(aside) == 1
    assert (aside[0] / "adapter_model.safetensors").is_file()  # kept, not deleted
    assert proc.stdout.count("(items reused from an earlier evaluation") == 3
    second = json.loads((cwd / "out.json").read_text())
    before = {(r["arm"], r["seed"]): r["metrics"] for r in first["runs"]}
    after = {(r["arm"], r["seed"]): r for r in second["runs"]}
    for key in (("plain", 0), ("macdrop", 0), ("macdrop", 1)):
        assert after[key]["metrics"] == before[key]
        assert after[key]["evaluation_reused"] is True
    assert after[("plain", 1)]["evaluation_reused"] is False


def test_too_few_windows_give_no_verdict(compared):
    """One perplexity window: the bootstrap's "interval" is a point, so there is no verdict, and the
    reason is said (the finished runs are evaluated on a short text, nothing retrains)."""
    cwd, _, _ = compared
    (cwd / "short.txt").write_text(" ".join(corpus(2, seed=3)))  # fewer than SEQ tokens: one window
    proc = run_cli(
        ["macdrop", "compare", "base.yaml", "--seeds", "0,1", "--text-file", "short.txt", "--seq-len", str(SEQ)]
        + ["--k-sweep", "1", "--quiet-train", "--no-progress", "--json", "short.json"],
        cwd=cwd,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    paired = json.loads((cwd / "short.json").read_text())["paired"]
    assert paired
    for p in paired:
        assert p["n"] == 1
        assert p["direction"] == "none"
        assert p["verdict"].startswith(
            "no verdict: too few items for an interval: 1 paired windows (at least 10); evaluate on more"
        ), p["verdict"]
    assert "no verdict: too few items" in proc.stdout
    assert "better on" not in proc.stdout and "worse on" not in proc.stdout


def test_generation_tasks_are_paired_from_the_per_item_files(compared):
    """--gen-tasks on the finished runs (nothing retrains): the paired differences of the reference
    metric equal what the per-item files give, and chrF is what sacrebleu gives for each output."""
    import sacrebleu

    cwd, _, _ = compared
    rows = [
        {
            "question_id": i,
            "category": "writing",
            "turns": [f"describe {w}"],
            "reference": [f"the {w} is green and blue"],
        }
        for i, w in enumerate(["sky", "grass", "snow", "coal", "tree", "bird"])
    ]
    (cwd / "spec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lb = cwd / "lb"
    lb.mkdir(exist_ok=True)
    for name, answers in (("hotpotqa", ["sky", "grass"]), ("passage_retrieval_en", ["Paragraph 1", "Paragraph 2"])):
        lines = [
            {
                "_id": f"{name}{i}",
                "input": f"the {w} colour",
                "context": f"Paragraph 1: the {w} is blue",
                "answers": [a],
            }
            for i, (w, a) in enumerate(zip(["sky", "snow", "coal"], answers * 2))
        ]
        (lb / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = _compare(
        cwd,
        "--gen-tasks",
        "spec.jsonl,needle,longbench_hotpotqa,longbench_passage_retrieval_en",
        "--longbench-dir",
        "lb",
        "--max-length",
        "240",
        "--needle-lengths",
        "200,240",
        "--needle-depths",
        "0,100",
        "--needle-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--robustness",
        "ppl,zeroshot",
        "--json",
        "gen.json",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(re.findall(r"\] \d/4 training ", proc.stdout)) == 0
    report = json.loads((cwd / "gen.json").read_text())
    names = {m for r in report["runs"] for m in r["metrics"]}
    assert "gen/spec/chrf/clean" in names
    assert not any(m.startswith("gen/") and not m.endswith("/clean") for m in names)  # gen not under attack
    eval_dir = cwd / "runs" / "tiny-compare" / "eval"
    per_run = {}
    for arm in ("plain", "macdrop"):
        for seed in (0, 1):
            items = [
                json.loads(line) for line in (eval_dir / f"{arm}-seed{seed}.generation.jsonl").read_text().splitlines()
            ]
            spec = [it for it in items if it["task"] == "spec"]
            assert [it["id"] for it in spec] == [str(i) for i in range(6)]
            for it in spec:  # the library itself on what the model wrote
                want = sacrebleu.sentence_chrf(it["outputs"][0], it["references"][0]).score
                assert it["scores"]["chrf"] == pytest.approx(want)
            per_run[(arm, seed)] = sum(it["scores"]["chrf"] for it in spec) / len(spec)
            for length in (200, 240):  # the needle per length: the first number said is the key, or not
                mine = [it for it in items if it["task"] == "needle" and it["length"] == length]
                assert len(mine) == 4
                firsts = [re.search(r"\d+", it["outputs"][0]) for it in mine]
                hits = [float(f is not None and f.group(0) == it["references"][0][0]) for f, it in zip(firsts, mine)]
                assert [it["scores"]["needle_match"] for it in mine] == hits
                per_run[(arm, seed, length)] = sum(hits) / len(hits)
    paired = next(p for p in report["paired"] if p["metric"] == "gen/spec/chrf/clean")
    want = sum(per_run[("macdrop", s)] - per_run[("plain", s)] for s in (0, 1)) / 2
    assert paired["mean_diff"] == pytest.approx(want, abs=1e-9)
    assert paired["n"] == 6
    assert paired["higher_is_better"] is True
    # LongBench's average: the mean of the two tasks' means, per run, then the paired difference; each
    # item's score is lm-eval's own process_results on what the model wrote (its logged sample)
    from helpers.lm_eval_longbench import lm_eval_metrics

    oracle = lm_eval_metrics()
    averages = {}
    for arm in ("plain", "macdrop"):
        for seed in (0, 1):
            items = [
                json.loads(line) for line in (eval_dir / f"{arm}-seed{seed}.generation.jsonl").read_text().splitlines()
            ]
            means = []
            for task, process in (
                ("longbench_hotpotqa", oracle.get_qa_f1_with_score),
                ("longbench_passage_retrieval_en", oracle.get_retrieval_with_score),
            ):
                mine = [it for it in items if it["task"] == task]
                assert len(mine) == 3
                for it in mine:
                    want = process({"answers": it["references"][0]}, [it["outputs"][0]])["score"]
                    assert it["scores"]["score,none"] == pytest.approx(want)
                means.append(sum(it["scores"]["score,none"] for it in mine) / 3)
            averages[(arm, seed)] = sum(means) / 2
    paired = next(p for p in report["paired"] if p["metric"] == "gen/longbench/average/clean")
    want = sum(averages[("macdrop", s)] - averages[("plain", s)] for s in (0, 1)) / 2
    assert paired["mean_diff"] == pytest.approx(want, abs=1e-9)
    for length in (200, 240):
        paired = next(p for p in report["paired"] if p["metric"] == f"gen/needle@{length}/needle_match/clean")
        want = sum(per_run[("macdrop", s, length)] - per_run[("plain", s, length)] for s in (0, 1)) / 2
        assert paired["mean_diff"] == pytest.approx(want, abs=1e-9)
        assert paired["n"] == 4


def test_refusals_come_before_anything_trains(compared, tmp_path):
    cwd, _, _ = compared
    base = yaml.safe_load((cwd / "base.yaml").read_text())
    # a finished run whose settings the base YAML no longer has: refused, nothing retrained
    (cwd / "changed.yaml").write_text(yaml.safe_dump({**base, "learning_rate": 0.002}))
    proc = _compare(cwd, "--output-dir", "runs/tiny-compare", config="changed.yaml")
    assert proc.returncode == 2
    assert "learning_rate: 0.001 then, 0.002 now" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not re.search(r"\] \d/4 training ", proc.stdout)

    # a grid arm the plugin refuses (DoRA with p0 = 1): one line naming the arm and the key, no folder made
    proc = _compare(
        cwd, "--output-dir", str(tmp_path / "grid"), "--grid", "use_dora=false,true", "--grid", "macdrop_p0=0.5,1.0"
    )
    assert proc.returncode == 2
    assert not (tmp_path / "grid").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert "arm macdrop-use_dora_true-p0_1.0" in line
    assert "macdrop_p0" in line
    assert "nothing was trained" in line
    # attacks compare does not run, and a grid value of the wrong type: refused before LLaMA-Factory is even asked
    proc = _compare(cwd, "--output-dir", str(tmp_path / "m"), "--mode", "zero,superweight")
    assert proc.returncode == 2
    assert "--mode 'zero,superweight' is not allowed" in proc.stderr
    proc = _compare(cwd, "--output-dir", str(tmp_path / "m"), "--grid", "use_dora=maybe")
    assert proc.returncode == 2
    assert "use_dora takes true and/or false" in proc.stderr
    # a key LLaMA-Factory's own parser does not know
    (cwd / "typo.yaml").write_text(yaml.safe_dump({**base, "lora_rnak": 4}))
    proc = _compare(cwd, "--output-dir", str(tmp_path / "typo"), config="typo.yaml")
    assert proc.returncode == 2
    assert "lora_rnak" in proc.stderr
    assert not (tmp_path / "typo").exists()

    # the grid's plan: LoRA and DoRA versions of both arms, each MacDrop arm paired with its plain one
    proc = _compare(
        cwd,
        "--output-dir",
        str(tmp_path / "plan"),
        "--plan-only",
        "--grid",
        "use_dora=false,true",
        "--grid",
        "macdrop_p0=0.5,0.8",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 arms x 2 seeds" in proc.stdout
    assert "macdrop-use_dora_true-p0_0.8" in proc.stdout
    assert "(paired with plain-use_dora_true)" in proc.stdout
    assert not (tmp_path / "plan").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_launcher_settings_and_the_train_command_pass_through(workdir, tmp_path):
    """FORCE_TORCHRUN/NPROC_PER_NODE reach the training command, which trains on 2 ranks."""
    cwd = workdir
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(
        '#!/usr/bin/env bash\necho "$FORCE_TORCHRUN $NPROC_PER_NODE" >> "$(dirname "$0")/env.txt"\n'
        f'exec "{Path(__import__("sys").executable).parent / "llamafactory-cli"}" train "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "ddp"
    proc = run_cli(
        [
            "macdrop",
            "compare",
            "base.yaml",
            "--seeds",
            "0",
            "--output-dir",
            str(out),
            "--no-eval",
            "--quiet-train",
            "--train-command",
            str(wrapper),
        ],
        cwd=cwd,
        env_extra={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "29517"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "env.txt").read_text().splitlines() == ["1 2", "1 2"]  # plain, macdrop
    for arm in ("plain", "macdrop"):
        state = json.loads((out / arm / "seed0" / "trainer_state.json").read_text())
        # 32 examples, batch 4 x accumulation 2 per rank: 4 steps on one process, 2 on two ranks
        assert state["global_step"] == 2, state["global_step"]
        log = (out / "logs" / f"{arm}-seed0.log").read_text()
        assert "Initializing 2 distributed tasks" in log  # LLaMA-Factory's launcher started torchrun


def test_dora_arms_with_zero_shot_on_one_seed(workdir, tmp_path, tiny_llama_dir):
    """LoRA vs DoRA grid key (DoRA arms only here), lm-eval zero-shot under each adapter (against an
    independent log-likelihood scorer), perplexity only under the attacks (--robustness ppl)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cwd = workdir
    docs = tiny_docs(n=20)
    data = write_arc_folder(tmp_path / "zs", docs)
    out = tmp_path / "dora"
    proc = run_cli(
        [
            "macdrop",
            "compare",
            "base.yaml",
            "--seeds",
            "0",
            "--grid",
            "use_dora=true",
            "--output-dir",
            str(out),
            "--text-file",
            "eval.txt",
            "--seq-len",
            str(SEQ),
            "--k-sweep",
            "1",
            "--zeroshot",
            "arc_easy",
            "--zeroshot-data",
            str(data),
            "--robustness",
            "ppl",
            "--quiet-train",
            "--no-progress",
            "--json",
            str(tmp_path / "dora.json"),
        ],
        cwd=cwd,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "dora.json").read_text())
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"plain-use_dora_true", "macdrop-use_dora_true"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for r in runs.values():
        folder = Path(r["output_dir"])
        assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
        assert set(r["metrics"]) == {
            "ppl/eval.txt/clean",
            "ppl/eval.txt/zero k=1",
            "ppl/eval.txt/retain k=1",
            "acc/arc_easy/clean",
        }
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(folder)).eval()
        right = sum(preferred(model, tokenizer, d) == "ABCD".index(d["answerKey"]) for d in docs)
        assert r["metrics"]["acc/arc_easy/clean"] == pytest.approx(right / len(docs))
    paired = {p["metric"]: p for p in result["paired"]}
    assert paired["acc/arc_easy/clean"]["n"] == len(docs)
    assert paired["acc/arc_easy/clean"]["treatment"] == "macdrop-use_dora_true"
    assert "one seed" in paired["acc/arc_easy/clean"]["verdict"]
    assert result["restored_bitwise"] is True


def test_runs_side_by_side_equal_the_sequential_ones(compared, tmp_path):
    """--parallel 2: the runs of seed 1 and the base's evaluation (three jobs on two slots) train and
    evaluate two at a time, in their own processes, and every number equals the sequential
    comparison's for that seed; the jobs really overlapped."""
    cwd, _, sequential = compared
    out = tmp_path / "side"
    proc = _compare(
        cwd, "--seeds", "1", "--parallel", "2", "--output-dir", str(out), "--json", str(out / "c.json"),
        "--csv", str(out / "c.csv"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    side = json.loads((out / "c.json").read_text())
    before = {(r["arm"], r["seed"]): r["metrics"] for r in sequential["runs"] if r["seed"] == 1}
    after = {(r["arm"], r["seed"]): r["metrics"] for r in side["runs"]}
    assert after == before
    assert side["base"]["metrics"] == sequential["base"]["metrics"]
    jobs = {j["job"]: j for j in side["schedule"]}
    assert set(jobs) == {"base", "plain-seed1", "macdrop-seed1"}
    assert all(j["ok"] and j["trained"] for name, j in jobs.items() if name != "base")
    spans = sorted((j["started"], j["ended"]) for j in jobs.values())
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # two ran at once
    assert {j["where"] for j in jobs.values()} == {"slot 0", "slot 1"}
    assert "wall (this call)" in side["cost_seconds"]
    for name in jobs:  # each job's own log, and its cache where the sequential comparison keeps it
        assert (out / "logs" / f"{name}.job.log").is_file()
        assert (out / "eval" / f"{name}.json").is_file()


def test_a_failed_run_is_one_line_while_the_others_finish(workdir, tmp_path):
    """One run's training fails: one line names it and its log, the other run is trained and
    evaluated all the same (its marker and cache are there for the rerun), exit 2."""
    cwd = workdir
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(
        '#!/usr/bin/env bash\nif grep -q "^macdrop: true" "$1"; then echo "ValueError: no GPU left" >&2; exit 3; fi\n'
        f'exec "{Path(__import__("sys").executable).parent / "llamafactory-cli"}" train "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "failing"
    proc = _compare(
        cwd,
        "--seeds",
        "0",
        "--parallel",
        "2",
        "--output-dir",
        str(out),
        "--train-command",
        str(wrapper),
        "--json",
        str(out / "c.json"),
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "1 of 3 jobs failed (macdrop-seed0 failed (exit 2)" in line
    assert "ValueError: no GPU left" in line and str(out / "logs" / "macdrop-seed0.job.log") in line
    assert (out / "plain" / "seed0" / "macdrop_compare_run.json").is_file()
    assert (out / "eval" / "plain-seed0.json").is_file() and (out / "eval" / "base.json").is_file()
    assert not (out / "c.json").exists()


def test_runs_as_tasks_on_a_ray_cluster_equal_the_sequential_ones(compared, tmp_path):
    """--ray ADDRESS: each run (train + evaluate) is a task on a Ray cluster (here a local one this
    test starts with `ray start --head`); the numbers are the sequential comparison's."""
    import os
    import socket
    import subprocess
    import sys

    cwd, _, sequential = compared
    ray = Path(sys.executable).parent / "ray"
    if not ray.is_file():
        pytest.skip("Ray is not installed (make ray)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    import tempfile

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    start = [str(ray), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        out = tmp_path / "ray-runs"
        proc = run_cli(
            ["macdrop", "compare", "base.yaml", "--seeds", "0", "--text-file", "eval.txt", "--seq-len", str(SEQ)]
            + ["--k-sweep", "1,3", "--quiet-train", "--no-progress", "--no-plot", "--output-dir", str(out)]
            + ["--json", str(out / "c.json"), "--ray", f"127.0.0.1:{port}"],
            cwd=cwd,
            env_extra={"RAY_AUTH_MODE": "disabled"},
            timeout=900,
        )
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "c.json").read_text())
    before = {(r["arm"], r["seed"]): r["metrics"] for r in sequential["runs"] if r["seed"] == 0}
    assert {(r["arm"], r["seed"]): r["metrics"] for r in doc["runs"]} == before
    assert doc["base"]["metrics"] == sequential["base"]["metrics"]
    assert all(j["where"].startswith("ray node ") and j["ok"] for j in doc["schedule"])
    assert "submitted to Ray at 127.0.0.1:" in proc.stdout
