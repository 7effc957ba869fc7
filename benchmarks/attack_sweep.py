"""What an attack sweep costs: one load vs a reload per setting; perplexity loop vs bare forwards.

    python benchmarks/attack_sweep.py --preset cpu [--repeats 3] [--json out.json]
    python benchmarks/attack_sweep.py --model models/SmolLM2-135M-Instruct --text-file tests/data/english.txt
    python benchmarks/attack_sweep.py --preset gpu --device cuda

(a) **One load vs a load per k, in one process.** The 6-setting k-sweep of ``macdrop attack --mode
zero --k-sweep 0,1,2,3,5,8`` (the baseline and top-k zeroing at k = 1, 2, 3, 5, 8) on one text,
through the Python API the command calls (``md.attack``), twice per pair, alternating: ONE call
for the whole sweep, and one call per k (K = 1, 2, 3, 5, 8: load, locate, the baseline and zero
k=K), as a notebook user looping over k would. The calls run in one process, so they do not pay
the interpreter and imports five separate ``macdrop attack`` runs would (that is (c)). The
perplexities of the two arms must be identical (they are compared). With L = what a call spends
outside its evaluations (load + locate + set-up) and E = one setting's evaluation, the ratio is
5(L + 2E) / (L + 6E): it approaches 5 when loading dominates and 10/6 when evaluation does, so
the script prints L and E next to it.

(c) **As a user runs it** (``--cli``): ONE ``macdrop attack MODEL --mode zero --k-sweep
0,1,2,3,5,8 --text-file F`` process vs the five processes ``macdrop attack MODEL --mode zero
--k K --text-file F`` (K = 1, 2, 3, 5, 8; each also evaluates the baseline, as every attack
run does), alternating, median wall ratio. Here the interpreter start and the imports of
torch/transformers/lm-eval are part of the reload cost, as they are for a user.

(b) **Perplexity throughput.** ``perplexity.evaluate_perplexity`` (progress bar on, as the CLI
runs it, written to /dev/null) vs a hand-written loop of bare forward passes over the SAME
windows (same tensor, same dtype and device, ``inference_mode``, ``use_cache=False``, batch 1),
alternating, ``--repeats`` pairs: median of the per-pair tokens/s ratio module / bare.

Models: ``cpu``: a random 8-layer Llama, hidden 768, intermediate 2048, vocab 32000 (106 M
parameters, SmolLM2-135M's size class) saved in bfloat16 and loaded as float32 (the CLI's
default); ``--model DIR`` takes a real checkpoint (and ``--text-file`` a real text, tokenized
with its tokenizer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import Clock, median

PRESETS = {
    "cpu": dict(
        layers=8,
        hidden=768,
        intermediate=2048,
        heads=12,
        vocab=32000,
        dtype="bfloat16",
        sweep_tokens=256,
        ppl_windows=2,
        ppl_seq=512,
    ),
    "gpu": dict(
        layers=16,
        hidden=4096,
        intermediate=14336,
        heads=32,
        vocab=32000,
        dtype="bfloat16",
        sweep_tokens=4096,
        ppl_windows=16,
        ppl_seq=4096,
    ),
}
KS = [0, 1, 2, 3, 5, 8]


def load(model_dir: Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()


def sweep(
    model_dir: Path, dtype: str, device: str, ks, text_file: Path, seq_len: int
) -> tuple[dict, float, list[float]]:
    """``md.attack`` (the API ``macdrop attack`` calls) with a zero k-sweep ``ks``: {label: ppl},
    seconds outside the evaluations (load + locate + set-up), per-setting evaluation seconds."""
    import llamafactory_macdrop as md

    with Clock(device == "cuda") as c:
        report = md.attack(
            str(model_dir),
            mode="zero",
            k_sweep=ks,
            text_file=[text_file],
            seq_len=seq_len,
            dtype=dtype,
            device=device,
            no_progress=True,
            echo=None,
        )
    assert report.restored_bitwise
    evals = [r["seconds"] for r in report.rows]
    return {r["setting"]: r["ppl"] for r in report.rows}, c.seconds - sum(evals), evals


def one_load_vs_reload(model_dir: Path, dtype: str, device: str, text_file: Path, seq_len: int, repeats: int) -> dict:
    """(a): ONE ``md.attack`` call for the whole k-sweep vs one call per k (each with its baseline)."""

    def one_load():
        with Clock(device == "cuda") as c:
            ppl, outside, evals = sweep(model_dir, dtype, device, KS, text_file, seq_len)
        return {"seconds": c.seconds, "ppl": ppl, "load_locate_s": [outside], "eval_s": evals}

    def reload():
        ppl, outside, evals = {}, [], []
        with Clock(device == "cuda") as c:
            for k in KS[1:]:
                one, o, ev = sweep(model_dir, dtype, device, [k], text_file, seq_len)
                ppl.update(one)
                outside.append(o)
                evals += ev
        return {"seconds": c.seconds, "ppl": ppl, "load_locate_s": outside, "eval_s": evals}

    one_load()  # warm-up (first load, kernels)
    pairs = benchlib.alternate({"one_load": one_load, "reload": reload}, repeats)
    for p in pairs:
        p["ratio"] = p["reload"]["seconds"] / p["one_load"]["seconds"]
    identical = all(p["one_load"]["ppl"] == p["reload"]["ppl"] for p in pairs)
    load_s = median(x for p in pairs for arm in ("one_load", "reload") for x in p[arm]["load_locate_s"])
    eval_s = median(x for p in pairs for arm in ("one_load", "reload") for x in p[arm]["eval_s"])
    n = len(KS) - 1  # calls of the reload arm, each evaluating the baseline and one k
    return {
        "settings": list(pairs[0]["one_load"]["ppl"]),
        "pairs": pairs,
        "median_ratio": median(p["ratio"] for p in pairs),
        "one_load_s": median(p["one_load"]["seconds"] for p in pairs),
        "reload_s": median(p["reload"]["seconds"] for p in pairs),
        "load_locate_s": load_s,
        "eval_per_setting_s": eval_s,
        "model_ratio": n * (load_s + 2 * eval_s) / (load_s + len(KS) * eval_s),
        "identical_ppl": identical,
        "ppl": pairs[0]["one_load"]["ppl"],
    }


def cli_processes(model_dir: Path, text_file: Path, device: str, repeats: int) -> dict:
    """(c): one ``macdrop attack --k-sweep`` process vs one process per k (wall clock)."""
    import subprocess
    import time

    exe = Path(sys.executable).parent / "macdrop"
    base = [
        str(exe),
        "attack",
        str(model_dir),
        "--mode",
        "zero",
        "--text-file",
        str(text_file),
        "--no-progress",
        "--device",
        device,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(args: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(base + args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"macdrop attack failed:\n{proc.stderr[-3000:]}")
        return time.perf_counter() - t0

    def sweep_arm():
        return {"seconds": run(["--k-sweep", ",".join(map(str, KS))])}

    def per_k_arm():
        times = [run(["--k", str(k)]) for k in KS if k > 0]
        return {"seconds": sum(times), "per_process_s": times}

    pairs = benchlib.alternate({"one_process": sweep_arm, "per_k": per_k_arm}, repeats)
    for p in pairs:
        p["ratio"] = p["per_k"]["seconds"] / p["one_process"]["seconds"]
    return {
        "pairs": pairs,
        "median_ratio": median(p["ratio"] for p in pairs),
        "one_process_s": median(p["one_process"]["seconds"] for p in pairs),
        "per_k_s": median(p["per_k"]["seconds"] for p in pairs),
        "processes": len([k for k in KS if k > 0]),
    }


def ppl_throughput(model_dir: Path, dtype: str, device: str, windows, repeats: int) -> dict:
    import torch

    from llamafactory_macdrop.analysis.evaluate.perplexity import evaluate_perplexity

    model = load(model_dir, dtype, device)
    cuda = device == "cuda"
    tokens = windows.full.numel()
    on_device = windows.full.to(device)

    def bare():
        with Clock(cuda) as c, torch.inference_mode():
            for x in on_device.split(1):
                _ = model(input_ids=x, use_cache=False).logits
        return {"seconds": c.seconds, "tokens_per_s": tokens / c.seconds}

    def module():
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), Clock(cuda) as c:
            res = evaluate_perplexity(model, windows, "bench", progress=True)
        return {"seconds": c.seconds, "tokens_per_s": tokens / c.seconds, "ppl": res.ppl}

    bare(), module()  # warm-up
    pairs = benchlib.alternate({"module": module, "bare": bare}, repeats)
    for p in pairs:
        p["ratio"] = p["module"]["tokens_per_s"] / p["bare"]["tokens_per_s"]
    return {
        "pairs": pairs,
        "median_ratio": median(p["ratio"] for p in pairs),
        "tokens": tokens,
        "windows": list(windows.full.shape),
        "module_tokens_per_s": median(p["module"]["tokens_per_s"] for p in pairs),
        "bare_tokens_per_s": median(p["bare"]["tokens_per_s"] for p in pairs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="attack sweep: one load vs reloads; perplexity loop vs bare forwards")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--model", help="an existing checkpoint folder instead of the random model")
    parser.add_argument("--text-file", help="with --model: the text to evaluate (tokenized by the model's tokenizer)")
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs of (a)")
    parser.add_argument("--ppl-repeats", type=int, default=11, help="A/B pairs of (b)")
    parser.add_argument("--sweep-tokens", type=int, help="tokens of the (a) corpus, one window (default: preset's)")
    parser.add_argument("--ppl-windows", type=int, help="windows of (b) (default: preset's)")
    parser.add_argument("--seq-len", type=int, help="tokens per window of (b) (default: preset's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", help="load dtype (default: float32 on CPU, the CLI's default; bfloat16 on CUDA)")
    parser.add_argument("--cli", action="store_true", help="also (c): macdrop attack processes, one vs one per k")
    parser.add_argument("--cli-repeats", type=int, default=2, help="A/B pairs of (c)")
    parser.add_argument("--skip-sweep", action="store_true", help="only (b)")
    parser.add_argument("--skip-ppl", action="store_true", help="only (a)")
    parser.add_argument("--work", help="where the random model goes (default: a temp dir; reused if present)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, one per core)")
    opts = parser.parse_args()
    cfg = dict(PRESETS[opts.preset])
    for key in ("sweep_tokens", "ppl_windows"):
        if getattr(opts, key):
            cfg[key] = getattr(opts, key)
    if opts.seq_len:
        cfg["ppl_seq"] = opts.seq_len
    dtype = opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32")

    import torch

    from llamafactory_macdrop.analysis.evaluate.perplexity import (
        PerplexityProtocol,
        make_windows,
        tokenize,
    )

    benchlib.set_threads(opts.threads)
    rec = benchlib.machine(opts.device)
    if opts.model:
        from transformers import AutoConfig, AutoTokenizer

        model_dir = Path(opts.model)
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        what = f"checkpoint {opts.model}, loaded as {dtype}"
    else:
        work = Path(opts.work or tempfile.mkdtemp(prefix="macdrop-bench-"))
        model_dir = work / f"sweep-{opts.preset}"
        print(f"[bench] random {cfg['layers']}-layer Llama (hidden {cfg['hidden']}) in {model_dir}", flush=True)
        benchlib.build_llama(
            model_dir, **{k: cfg[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}, dtype=cfg["dtype"]
        )
        vocab = cfg["vocab"]
        what = (
            f"random Llama, {cfg['layers']} layers x hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
            f"vocab {vocab}, {benchlib.model_params(cfg) / 1e6:.0f} M parameters, saved in {cfg['dtype']}, "
            f"loaded as {dtype}"
        )
    benchlib.warm_page_cache(model_dir)
    g = torch.Generator().manual_seed(0)
    if opts.text_file:
        stream = tokenize(AutoTokenizer.from_pretrained(model_dir), Path(opts.text_file).read_text())
        text = f"{opts.text_file} ({stream.numel()} tokens)"
    else:
        stream = torch.randint(3, vocab, (max(cfg["sweep_tokens"], cfg["ppl_windows"] * cfg["ppl_seq"]),), generator=g)
        text = "random tokens"
    print(f"[bench] {what}; text: {text}", flush=True)

    a = b = c = None
    text_file = Path(opts.text_file) if opts.text_file else model_dir / "bench_text.txt"
    if not opts.text_file:  # random words the model's tokenizer knows, ~sweep_tokens of them
        import random

        from helpers import tiny

        rng = random.Random(0)
        text_file.write_text(" ".join(rng.choice(tiny._WORDS) for _ in range(cfg["sweep_tokens"])))
    if opts.cli:
        print(f"[bench] (c) one `macdrop attack --k-sweep` process vs one process per k, on {text_file}", flush=True)
        c = cli_processes(model_dir, text_file, opts.device, opts.cli_repeats)
    if not opts.skip_sweep:
        print(
            f"[bench] (a) 6-setting k-sweep {KS} through md.attack: one call vs one call per k, on {text_file} "
            f"(windows of {cfg['sweep_tokens']} tokens)",
            flush=True,
        )
        a = one_load_vs_reload(model_dir, dtype, opts.device, text_file, cfg["sweep_tokens"], opts.repeats)
    if not opts.skip_ppl:
        proto = PerplexityProtocol(seq_len=cfg["ppl_seq"], bos="none", max_windows=cfg["ppl_windows"])
        windows = make_windows(stream, proto)
        print(
            f"[bench] (b) perplexity module vs bare forward loop: {windows.full.shape[0]} windows of "
            f"{windows.full.shape[1]} tokens",
            flush=True,
        )
        b = ppl_throughput(model_dir, dtype, opts.device, windows, opts.ppl_repeats)
    benchlib.finish_record(rec)

    print(f"\n{what}; text: {text}")
    print(f"machine: {benchlib.describe(rec)}")
    if a:
        print(
            f"\n(a) k-sweep {', '.join(a['settings'])}; "
            f"{opts.repeats} alternating pairs, median; perplexities identical: {'yes' if a['identical_ppl'] else 'NO'}\n"
        )
        print("| | one md.attack call (--k-sweep) | one call per k (5) | ratio |")
        print("|---|---|---|---|")
        print(f"| sweep wall time | {a['one_load_s']:.2f} s | {a['reload_s']:.2f} s | **{a['median_ratio']:.2f}** |")
        print(
            f"\nL = load + locate {a['load_locate_s']:.2f} s, E = one setting's evaluation {a['eval_per_setting_s']:.2f} s: "
            f"5(L+2E)/(L+6E) = {a['model_ratio']:.2f}"
        )
    if c:
        print(f"\n(c) `macdrop attack` processes, {opts.cli_repeats} alternating pairs, median\n")
        print("| | one process, --k-sweep 0,1,2,3,5,8 | one process per k (5) | ratio |")
        print("|---|---|---|---|")
        print(f"| wall time | {c['one_process_s']:.1f} s | {c['per_k_s']:.1f} s | **{c['median_ratio']:.2f}** |")
    if b:
        print(
            f"\n(b) {b['windows'][0]} windows x {b['windows'][1]} tokens, batch 1; {opts.ppl_repeats} alternating pairs, "
            f"median\n"
        )
        print("| | evaluate_perplexity | bare forward loop | ratio |")
        print("|---|---|---|---|")
        print(
            f"| tokens/s | {b['module_tokens_per_s']:,.0f} | {b['bare_tokens_per_s']:,.0f} | **{b['median_ratio']:.3f}** |"
        )
    report = {
        "benchmark": "attack_sweep",
        "preset": opts.preset,
        "model": what,
        "text": text,
        "config": None if opts.model else cfg,
        "dtype": dtype,
        "machine": rec,
        "one_load_vs_reload": a,
        "perplexity_throughput": b,
        "cli_processes": c,
    }
    benchlib.write_json(opts.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
