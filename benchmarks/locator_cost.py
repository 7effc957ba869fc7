"""What locating the massive weights costs: the probe vs one forward, layer by layer vs full load.

    python benchmarks/locator_cost.py --preset cpu [--repeats 3] [--json out.json]
    python benchmarks/locator_cost.py --preset cpu --origin-layer 2     # a planted origin: streaming stops there
    python benchmarks/locator_cost.py --model models/SmolLM2-135M-Instruct  # a real checkpoint
    python benchmarks/locator_cost.py --preset gpu --device cuda        # (a) on the GPU

(a) **Probe vs one forward**, in ONE process on one loaded model, alternating: the whole
``locate_massive_weights(model, k)`` (finding the FFN blocks, hooks on every layer, one BOS
forward, the per-layer statistics, top-k) vs a plain ``model(input_ids=[[BOS]])`` under
``no_grad``. Per pair the time ratio; the median over pairs. Memory: the peak above the loaded
model during each call — CPU: the process's peak RSS (VmHWM) reset through
``/proc/self/clear_refs`` right before the call; CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``.

(b) **Layer by layer vs full load** from the checkpoint on disk, each run in a FRESH process (peak
RSS is per process), alternating, ``--repeats`` pairs: ``locate_layer_by_layer(dir)`` vs
``AutoModelForCausalLM.from_pretrained(dir)`` + ``locate_massive_weights``. Reported: wall time
of the load + locate (imports excluded), the process's peak RSS, and the RSS before the load
(interpreter + torch + transformers), whose difference is what the model cost. The checkpoint
is read once beforehand so both arms find it in the page cache. Streaming always runs on the CPU.

Memory is reported twice: peak RSS (VmHWM) counts the pages of memory-mapped safetensors files
that the process touched (transformers 5 maps checkpoints, and a CPU load in the file's own
dtype keeps the weights as views of the map: page cache, which the kernel can drop); the peak
of anonymous memory (RssAnon, sampled every millisecond) is what the process had to allocate.

The random model (``cpu``: 12 layers x hidden 1024, intermediate 2816, vocab 32000, 220 M
parameters) is saved in bfloat16 as published checkpoints are and loaded as float32, the
``macdrop locate`` default. It has no massive activation unless ``--origin-layer`` plants one,
so the streaming loader reads every layer: its worst case for time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import Clock, median

PRESETS = {
    "cpu": dict(layers=12, hidden=1024, intermediate=2816, heads=16, vocab=32000, dtype="bfloat16"),
    "gpu": dict(layers=16, hidden=4096, intermediate=14336, heads=32, vocab=32000, dtype="bfloat16"),
}
K = 5


# ----------------------------------------------------------------------------- (b) worker
def worker(mode: str, model_dir: str, dtype: str) -> None:
    """One fresh-process arm of (b); prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamafactory_macdrop.analysis.inspect.streaming import locate_layer_by_layer
    from llamafactory_macdrop.core.locator import locate_massive_weights

    dt = getattr(torch, dtype)
    before, anon_before = benchlib.rss_bytes(), benchlib.rss_anon_bytes()
    t0 = time.perf_counter()
    with benchlib.AnonPeak() as anon:
        if mode == "stream":
            result, stats = locate_layer_by_layer(model_dir, K, dtype=dt)
            layers = stats.layers_loaded
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
            result = locate_massive_weights(model, K)
            layers = [s.layer for s in result.layers]
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_before": before,
                "peak_rss": benchlib.peak_rss_bytes(),
                "anon_before": anon_before,
                "peak_anon": anon.peak,
                "layer": result.layer,
                "indices": result.indices,
                "layers_run": [layers[0], layers[-1]],
            }
        )
    )


def run_worker(mode: str, model_dir: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", str(model_dir), "--dtype", dtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(benchlib.REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- (a)
def probe_vs_forward(model_dir: Path, dtype: str, device: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llamafactory_macdrop.core.locator import locate_massive_weights

    cuda = device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    bos = model.config.bos_token_id
    ids = torch.tensor([[bos]], device=device)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    def probe():
        locate_massive_weights(model, K)

    def measured(fn):
        def arm():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                benchlib.reset_peak_rss()
                base = benchlib.rss_bytes()
            with Clock(cuda) as c:
                fn()
            peak = (torch.cuda.max_memory_allocated() if cuda else benchlib.peak_rss_bytes()) - base
            return {"seconds": c.seconds, "peak_extra_bytes": peak}

        return arm

    for _ in range(5):  # warm-up: first calls fault the weights in, allocate buffers, pick kernels
        forward()
        probe()
    pairs = benchlib.alternate({"probe": measured(probe), "forward": measured(forward)}, repeats, log=lambda s: None)
    for p in pairs:
        p["ratio"] = p["probe"]["seconds"] / p["forward"]["seconds"]
    located = locate_massive_weights(model, K)
    return {
        "pairs": pairs,
        "median_ratio": median(p["ratio"] for p in pairs),
        "probe_s": median(p["probe"]["seconds"] for p in pairs),
        "forward_s": median(p["forward"]["seconds"] for p in pairs),
        "probe_peak_extra_bytes": median(p["probe"]["peak_extra_bytes"] for p in pairs),
        "forward_peak_extra_bytes": median(p["forward"]["peak_extra_bytes"] for p in pairs),
        "probe_peak_extra_max": max(p["probe"]["peak_extra_bytes"] for p in pairs),
        "forward_peak_extra_max": max(p["forward"]["peak_extra_bytes"] for p in pairs),
        "memory_method": "torch.cuda.max_memory_allocated" if cuda else "VmHWM reset by /proc/self/clear_refs",
        "located": {"layer": located.layer, "indices": located.indices},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="locator cost: probe vs one forward; layer by layer vs full load")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--model", help="an existing checkpoint folder (safetensors) instead of the random model")
    parser.add_argument("--origin-layer", type=int, help="plant a massive activation at this layer of the random model")
    parser.add_argument("--repeats", type=int, default=3, help="A/B pairs of (b) (fresh processes)")
    parser.add_argument("--probe-repeats", type=int, default=20, help="A/B pairs of (a) (in process)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of (a); (b) is CPU")
    parser.add_argument("--dtype", help="load dtype (default: the preset's)")
    parser.add_argument("--skip-stream", action="store_true", help="only (a)")
    parser.add_argument("--skip-probe", action="store_true", help="only (b)")
    parser.add_argument("--work", help="where the random model goes (default: a temp dir; reused if present)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, one per core)")
    parser.add_argument("--worker", choices=["stream", "full"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    cfg = dict(PRESETS[opts.preset])
    dtype = opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32")  # the CLI's default on CPU
    if opts.worker:
        worker(opts.worker, opts.model, dtype)
        return 0

    benchlib.set_threads(opts.threads)
    rec = benchlib.machine(opts.device)
    if opts.model:
        model_dir, what = Path(opts.model), f"checkpoint {opts.model}"
    else:
        suffix = f"-origin{opts.origin_layer}" if opts.origin_layer is not None else ""
        work = Path(opts.work or tempfile.mkdtemp(prefix="macdrop-bench-"))
        model_dir = work / f"locator-{opts.preset}{suffix}"
        print(f"[bench] random {cfg['layers']}-layer Llama (hidden {cfg['hidden']}) in {model_dir}", flush=True)
        benchlib.build_llama(
            model_dir,
            **{k: cfg[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")},
            dtype=cfg["dtype"],
            origin_layer=opts.origin_layer,
        )
        what = (
            f"random Llama, {cfg['layers']} layers x hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
            f"vocab {cfg['vocab']}, {benchlib.model_params(cfg) / 1e6:.0f} M parameters, saved in {cfg['dtype']}, "
            f"loaded as {dtype}"
            + (
                f", massive activation planted at layer {opts.origin_layer}"
                if opts.origin_layer is not None
                else ", no massive activation (every layer is read)"
            )
        )
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    benchlib.warm_page_cache(model_dir)
    print(f"[bench] {what}; checkpoint {size / 2**30:.2f} GiB", flush=True)

    a = b = None
    if not opts.skip_probe:
        print("[bench] (a) locate_massive_weights vs one single-token forward, in process", flush=True)
        a = probe_vs_forward(model_dir, dtype, opts.device, opts.probe_repeats)
    if not opts.skip_stream:
        print("[bench] (b) layer by layer vs full load + locate, fresh processes", flush=True)
        pairs = benchlib.alternate(
            {
                "stream": lambda: run_worker("stream", model_dir, dtype),
                "full": lambda: run_worker("full", model_dir, dtype),
            },
            opts.repeats,
        )
        same = all(
            (p["stream"]["layer"], p["stream"]["indices"]) == (p["full"]["layer"], p["full"]["indices"]) for p in pairs
        )
        for p in pairs:
            p["time_ratio"] = p["stream"]["seconds"] / p["full"]["seconds"]
            p["peak_ratio"] = p["stream"]["peak_rss"] / p["full"]["peak_rss"]
            for arm in ("stream", "full"):
                p[arm]["model_rss"] = p[arm]["peak_rss"] - p[arm]["rss_before"]
                p[arm]["model_anon"] = p[arm]["peak_anon"] - p[arm]["anon_before"]
            p["model_rss_ratio"] = p["stream"]["model_rss"] / p["full"]["model_rss"]
            p["model_anon_ratio"] = p["stream"]["model_anon"] / p["full"]["model_anon"]
        b = {
            "pairs": pairs,
            "same_answer": same,
            "median_time_ratio": median(p["time_ratio"] for p in pairs),
            "median_peak_ratio": median(p["peak_ratio"] for p in pairs),
            "median_model_rss_ratio": median(p["model_rss_ratio"] for p in pairs),
            "median_model_anon_ratio": median(p["model_anon_ratio"] for p in pairs),
            **{
                f"{arm}_{key}": median(p[arm][key] for p in pairs)
                for arm in ("stream", "full")
                for key in ("seconds", "peak_rss", "rss_before", "model_rss", "model_anon")
            },
            "layers_run": {arm: pairs[0][arm]["layers_run"] for arm in ("stream", "full")},
        }
    benchlib.finish_record(rec)

    mib = 2**20
    print(f"\n{what}; checkpoint {size / 2**30:.2f} GiB")
    print(f"machine: {benchlib.describe(rec)}")
    if a:
        print(
            f"\n(a) {opts.probe_repeats} alternating pairs in one process on {opts.device}, median; memory = peak above "
            f"the loaded model ({a['memory_method']})\n"
        )
        print("| | locate_massive_weights | one single-token forward | ratio |")
        print("|---|---|---|---|")
        print(f"| time | {a['probe_s'] * 1e3:.1f} ms | {a['forward_s'] * 1e3:.1f} ms | **{a['median_ratio']:.2f}** |")
        print(
            f"| peak memory above the loaded model (median / max) | {a['probe_peak_extra_bytes'] / mib:.1f} / "
            f"{a['probe_peak_extra_max'] / mib:.1f} MiB | {a['forward_peak_extra_bytes'] / mib:.1f} / "
            f"{a['forward_peak_extra_max'] / mib:.1f} MiB | |"
        )
    if b:
        print(
            f"\n(b) {opts.repeats} alternating pairs of fresh processes, median; same answer (layer, indices): "
            f"{'yes' if b['same_answer'] else 'NO'}\n"
        )
        print("| | layer by layer | full load + locate | ratio |")
        print("|---|---|---|---|")
        ls, lf = b["layers_run"]["stream"], b["layers_run"]["full"]
        print(f"| layers read / run | {ls[0]}..{ls[1]} | {lf[0]}..{lf[1]} (all loaded) | |")
        print(
            f"| load + locate wall time | {b['stream_seconds']:.2f} s | {b['full_seconds']:.2f} s | "
            f"**{b['median_time_ratio']:.2f}** |"
        )
        print(
            f"| process peak RSS | {b['stream_peak_rss'] / mib:,.0f} MiB | {b['full_peak_rss'] / mib:,.0f} MiB | "
            f"**{b['median_peak_ratio']:.2f}** |"
        )
        print(
            f"| peak RSS above the imports ({b['stream_rss_before'] / mib:,.0f} MiB) | {b['stream_model_rss'] / mib:,.0f} MiB | "
            f"{b['full_model_rss'] / mib:,.0f} MiB | **{b['median_model_rss_ratio']:.2f}** |"
        )
        print(
            f"| peak anonymous memory above the imports | {b['stream_model_anon'] / mib:,.0f} MiB | "
            f"{b['full_model_anon'] / mib:,.0f} MiB | **{b['median_model_anon_ratio']:.2f}** |"
        )
    report = {
        "benchmark": "locator_cost",
        "preset": opts.preset,
        "model": what,
        "checkpoint_bytes": size,
        "config": None if opts.model else cfg,
        "dtype": dtype,
        "k": K,
        "machine": rec,
        "probe_vs_forward": a,
        "layer_by_layer_vs_full": b,
    }
    benchlib.write_json(opts.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
