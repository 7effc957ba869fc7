"""What ``macdrop compare --parallel N`` saves: the same comparison side by side vs one run after another.

    python benchmarks/compare_parallel.py [--parallel 2] [--seeds 0,1] [--json out.json]

Both arms run ``macdrop compare`` as a user types it, on the planted tiny Llama of the tests (2
arms x the seeds, 4 optimizer steps each, perplexity on a short text), each into a fresh output
folder, once sequentially and once with ``--parallel N``; the wall time of each command is
measured and the JSON documents are compared (every run's metrics must be equal: side by side
changes where things run, not what they give). One pair, sequential first: a comparison costs
minutes, and the second arm finds the page cache warm, which favours the parallel arm slightly.
On a machine with fewer cores than ``N x`` what one run uses, the runs compete for the cores and
the ratio stays near 1; it approaches N where each run has its own device group.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib


def main() -> int:
    parser = argparse.ArgumentParser(description="compare --parallel N vs sequential, wall time")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--work", help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--json", help="write the results here")
    opts = parser.parse_args()

    import yaml
    from helpers import tiny

    work = Path(opts.work or tempfile.mkdtemp(prefix="macdrop-bench-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny.build_planted_llama(work / "tiny") if not (work / "tiny" / "config.json").is_file() else work / "tiny"
    data = tiny.write_datasets(work / "data")
    base = tiny.lf_train_args(model, data, str(work / "runs" / "tiny"), num_train_epochs=1, macdrop_k=3)
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    (work / "eval.txt").write_text(" ".join(tiny.corpus(60, seed=11)))
    rec = benchlib.machine("cpu")
    exe = Path(sys.executable).parent / "macdrop"

    def compare(name: str, *extra: str) -> dict:
        out = work / name
        argv = [str(exe), "compare", str(work / "base.yaml"), "--seeds", opts.seeds, "--text-file"]
        argv += [str(work / "eval.txt"), "--seq-len", "32", "--k-sweep", "1,3", "--quiet-train", "--no-progress"]
        argv += ["--no-plot", "--output-dir", str(out), "--json", str(out / "c.json"), *extra]
        print(f"[bench] {name}: {' '.join(argv[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=work)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        doc = json.loads((out / "c.json").read_text())
        print(f"[bench] {name}: {seconds:.1f} s", flush=True)
        return {"seconds": seconds, "doc": doc}

    sequential = compare("sequential")
    side = compare("parallel", "--parallel", str(opts.parallel))
    benchlib.finish_record(rec)
    same = {(r["arm"], r["seed"]): r["metrics"] for r in sequential["doc"]["runs"]} == {
        (r["arm"], r["seed"]): r["metrics"] for r in side["doc"]["runs"]
    }
    ratio = sequential["seconds"] / side["seconds"]
    runs = len(sequential["doc"]["runs"])
    print(f"\nmachine: {benchlib.describe(rec)}")
    print(f"\n{runs} runs (2 arms x seeds {opts.seeds}) of the planted tiny Llama, 4 steps each; one pair\n")
    print(f"| | sequential | --parallel {opts.parallel} | ratio |")
    print("|---|---|---|---|")
    print(f"| wall time | {sequential['seconds']:.0f} s | {side['seconds']:.0f} s | **{ratio:.2f}** |")
    print(f"\nevery run's metrics equal: {'yes' if same else 'NO'}")
    per_job = {j["job"]: j["seconds"] for j in side["doc"]["schedule"]}
    print("per job (parallel): " + ", ".join(f"{k} {v:.0f} s" for k, v in per_job.items()))
    benchlib.write_json(
        opts.json,
        {
            "benchmark": "compare_parallel",
            "machine": rec,
            "runs": runs,
            "parallel": opts.parallel,
            "sequential_s": sequential["seconds"],
            "parallel_s": side["seconds"],
            "ratio": ratio,
            "identical_metrics": same,
            "per_job_s": per_job,
            "cost_seconds": {"sequential": sequential["doc"]["cost_seconds"], "parallel": side["doc"]["cost_seconds"]},
        },
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
