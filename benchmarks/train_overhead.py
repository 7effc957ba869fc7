"""MacDrop's training overhead: plain LoRA vs LoRA + MacDrop through LLaMA-Factory's own trainer.

    python benchmarks/train_overhead.py --preset cpu  [--repeats 2] [--json out.json]
    python benchmarks/train_overhead.py --preset gpu  [--deepspeed yaml_configs/ds_z3_config.json]
    python benchmarks/train_overhead.py --preset cpu --nproc 2 --deepspeed yaml_configs/ds_z3_config.json
    python benchmarks/train_overhead.py --preset gpu --mode processes --repeats 4
    python benchmarks/train_overhead.py --preset cpu --quantization-bit 4   # QLoRA: MacDrop edits 4-bit codes

A random-init Llama (``cpu``: 4 layers x hidden 512; ``gpu``: 16 layers x hidden 2048, 1.2 B
parameters, bf16) is written once; then ONE LLaMA-Factory pt + LoRA run (rank 16, all linear
layers, gradient checkpointing as LF defaults) trains with ``macdrop: true`` and the benchmark
switches MacDrop on and off between optimizer steps, in blocks of four steps ABBA, BAAB, ...
(A = on) after a warm-up. "Off" calls the stock LF trainer's ``training_step`` on the same
trainer object, so both arms share the process, model, allocator, data stream and clocks: the
figure is the median over blocks of (on-time / off-time). Why not compare fresh processes: on a
GPU the same config varies ±6–12 % between processes, a hundred times the effect being measured
(``--mode processes`` still does that, with LF's ``train_runtime``).

MacDrop uses the ``constant`` curriculum at p = 0.8, so EVERY on-step masks and restores (the
worst case; with the ``step`` curriculum p reaches 0 and the cost vanishes). ``macdrop_layer``/
``macdrop_indices`` fix the rows. Also reported: an in-process micro-benchmark of one mask +
restore and, on CUDA, whether it blocks the host behind queued GPU work.

``--quantization-bit 4`` trains QLoRA as LLaMA-Factory builds it (bitsandbytes NF4, double
quantization, codes stored in the compute dtype): MacDrop then edits the 4-bit codes of the rows
(the ``bnb-4bit`` storage backend) and the micro-benchmark loads the model the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import benchlib  # noqa: E402  (benchmarks/, the script's own folder)

PRESETS = {
    "cpu": dict(layers=4, hidden=512, intermediate=1408, heads=8, vocab=8000, batch=4, seq=256, steps=38, bf16=False),
    "gpu": dict(
        layers=16, hidden=2048, intermediate=8192, heads=16, vocab=32000, batch=4, seq=1024, steps=102, bf16=True
    ),
    # Llama-3-8B's shapes (the reference measurement's model), random init
    "gpu8b": dict(
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        vocab=128256,
        batch=4,
        seq=1024,
        steps=54,
        bf16=True,
    ),
}
WARMUP = 6  # steps excluded from every timing (CUDA/cuBLAS warm-up, allocator growth, the locator)
RUNNER = r"""
import json, sys, time
import torch
from transformers import TrainerCallback
from llamafactory_macdrop.plugin import integration
from llamafactory_macdrop.integrations.transformers.trainer import MacDropTrainerMixin
from llamafactory.train import tuner

spec = json.load(open(sys.argv[1]))
args, warmup, interleave = spec["args"], spec["warmup"], spec["interleave"]
AB = {"on": True}

def macdrop_on(step):
    # interleaved A/B: after the warm-up, blocks of 4 steps ABBA, BAAB, ABBA, ... (A = MacDrop on),
    # so a slow drift of the machine cancels inside every block
    if not interleave or step <= warmup:
        return True
    block, pos = divmod(step - warmup - 1, 4)
    return (pos in (0, 3)) == (block % 2 == 0)

if interleave:
    # MacDrop off = the stock LF trainer's training_step, called on the very same trainer object
    masked_step = MacDropTrainerMixin.training_step
    def training_step(self, model, inputs, *a, **k):
        if AB["on"]:
            return masked_step(self, model, inputs, *a, **k)
        return super(MacDropTrainerMixin, self).training_step(model, inputs, *a, **k)
    MacDropTrainerMixin.training_step = training_step

class StepClock(TrainerCallback):
    # wall time of each optimizer step (on_step_end to on_step_end, synchronized), tagged on/off
    def __init__(self, out):
        self.out, self.last, self.steps = out, None, []
    def _now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()
    def on_train_begin(self, args, state, control, **kw):
        self.last = self._now()
    def on_step_end(self, args, state, control, **kw):
        now, step = self._now(), state.global_step
        self.steps.append({"step": step, "s": now - self.last, "macdrop": AB["on"]})
        self.last = now
        AB["on"] = macdrop_on(step + 1)
    def on_train_end(self, args, state, control, **kw):
        if args.process_index == 0:
            json.dump(self.steps, open(self.out, "w"))

integration.activate()
tuner.run_exp(args, callbacks=[StepClock(args["output_dir"] + "/step_clock.json")])
"""


def build_model(out: Path, cfg: dict) -> Path:
    import torch

    return benchlib.build_llama(
        out,
        layers=cfg["layers"],
        hidden=cfg["hidden"],
        intermediate=cfg["intermediate"],
        heads=cfg["heads"],
        vocab=cfg["vocab"],
        kv_heads=cfg.get("kv_heads"),
        dtype="bfloat16" if cfg["bf16"] else "float32",
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def write_data(out: Path, cfg: dict) -> Path:
    from helpers import tiny

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = tiny._WORDS
    need = (cfg["steps"] + 4) * cfg["batch"] * cfg["seq"] * 2
    rows, n = [], 0
    while n < need:
        line = " ".join(rng.choice(words) for _ in range(200))
        rows.append({"text": line})
        n += 200
    (out / "bench.json").write_text(json.dumps(rows))
    info = {"bench": {"file_name": "bench.json", "columns": {"prompt": "text"}}}
    (out / "dataset_info.json").write_text(json.dumps(info))
    return out


def lf_args(
    model: Path,
    data: Path,
    out: Path,
    cfg: dict,
    macdrop: bool,
    deepspeed: str | None,
    quantization_bit: int | None = None,
) -> dict:
    args = dict(
        model_name_or_path=str(model),
        stage="pt",
        do_train=True,
        finetuning_type="lora",
        lora_target="all",
        lora_rank=16,
        lora_alpha=16,
        dataset="bench",
        dataset_dir=str(data),
        template="default",
        cutoff_len=cfg["seq"],
        output_dir=str(out),
        overwrite_output_dir=True,
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=1,
        max_steps=cfg["steps"],
        learning_rate=1e-4,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=cfg["bf16"],
        preprocessing_num_workers=1,
        dataloader_num_workers=0,
    )
    if deepspeed:
        args["deepspeed"] = deepspeed
    if quantization_bit:
        args["quantization_bit"] = quantization_bit
    if macdrop:
        args.update(
            macdrop=True,
            macdrop_curriculum="constant",
            macdrop_p0=0.8,
            macdrop_k=5,
            macdrop_layer=1,
            macdrop_indices=[11, 22, 33, 44, 55],
        )
    return args


def train_once(args: dict, work: Path, nproc: int, interleave: bool) -> tuple[float, list[dict]]:
    """LF's train_runtime and the per-step clock ({step, s, macdrop}) of one fresh run."""
    path = work / "spec.json"
    path.write_text(json.dumps({"args": args, "warmup": WARMUP, "interleave": interleave}))
    runner = work / "runner.py"
    runner.write_text(RUNNER)
    cmd = [sys.executable, str(runner), str(path)]
    if nproc > 1 or args.get("deepspeed"):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29600 + os.getpid() % 1000),
        ] + cmd[1:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    out = Path(args["output_dir"])
    runtime = float(json.loads((out / "train_results.json").read_text())["train_runtime"])
    return runtime, json.loads((out / "step_clock.json").read_text())


def bootstrap_ci(values: list[float], n: int = 2000) -> list[float]:
    """95 % bootstrap interval of the median (seeded: the same input gives the same interval)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def interleaved_summary(steps: list[dict]) -> dict:
    """Ratios MacDrop / LoRA from one interleaved run's steps after the warm-up.

    ``block_ratios``: per ABBA block, on-time / off-time (2 steps each); ``median_block_ratio``
    is the headline figure. ``runtime_ratio`` sums all on and all off steps (what train_runtime
    would show if each arm had run alone at the same moment)."""
    timed = [s for s in steps if s["step"] > WARMUP]
    blocks: dict[int, list[dict]] = {}
    for s in timed:
        blocks.setdefault((s["step"] - WARMUP - 1) // 4, []).append(s)
    ratios = []
    for members in blocks.values():
        on = [s["s"] for s in members if s["macdrop"]]
        off = [s["s"] for s in members if not s["macdrop"]]
        if len(on) == 2 and len(off) == 2:
            ratios.append(sum(on) / sum(off))
    on_all = [s["s"] for s in timed if s["macdrop"]]
    off_all = [s["s"] for s in timed if not s["macdrop"]]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [float("nan")] * 3
    return {
        "steps": steps,
        "median_ci95": bootstrap_ci(ratios),
        "block_ratios": ratios,
        "median_block_ratio": statistics.median(ratios),
        "block_ratio_iqr": [q[0], q[2]],
        "runtime_ratio": sum(on_all) / sum(off_all),
        "median_step_ratio": statistics.median(on_all) / statistics.median(off_all),
        "macdrop_step_s": statistics.median(on_all),
        "lora_step_s": statistics.median(off_all),
        "steps_on": len(on_all),
        "steps_off": len(off_all),
    }


def mask_cost_us(
    model_dir: Path, cfg: dict, iters: int = 200, quantization_bit: int | None = None
) -> tuple[float, float | None, str]:
    """One mask + restore of k=5 rows (the plugin's per-micro-batch work), in microseconds; and
    the host time of one mask + restore issued behind ~15 ms of queued GPU work (a value near
    15 ms would mean it synchronizes with the GPU); and the storage backends that did it."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamafactory_macdrop.core.architectures import find_ffn_blocks
    from llamafactory_macdrop.core.curriculum import Progress
    from llamafactory_macdrop.core.locator import LocatorResult
    from llamafactory_macdrop.integrations.transformers.trainer import MacDropRun
    from llamafactory_macdrop.plugin.keys import MacDropConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    if quantization_bit == 4:  # as LLaMA-Factory's quantization.py builds it
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_quant_storage=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, quantization_config=quant, device_map={"": device}
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.to(device)
    blocks = find_ffn_blocks(model)
    result = LocatorResult(
        model="bench",
        layer=1,
        indices=[11, 22, 33, 44, 55],
        magnitudes=None,
        median=None,
        probe_token_id=None,
        modules=[],
        massiveness=None,
        source="override",
    )
    run = MacDropRun(MacDropConfig(macdrop=True, macdrop_curriculum="constant"), result, blocks, seed=0)
    progress = Progress(step=1, total_steps=10, epoch=1, num_epochs=1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(20):
        with run.step(progress):
            pass
    sync()
    t0 = time.perf_counter()
    for i in range(iters):
        with run.step(progress, micro=i):
            pass
    sync()
    per_call = (time.perf_counter() - t0) / iters * 1e6
    blocked = None
    if device == "cuda":  # does mask + restore wait for queued GPU work (a hidden sync)?
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        sync()
        for _ in range(10):
            a @ a  # ~15 ms of queued GPU work
        t0 = time.perf_counter()
        with run.step(progress, micro=0):
            pass
        blocked = (time.perf_counter() - t0) * 1e6
        sync()
    return per_call, blocked, "; ".join(t.describe() for t in run.dropout.targets)


def run_interleaved(opts, cfg, model, data, work) -> dict:
    runs = []
    for r in range(opts.repeats):
        out = work / f"run{r}_interleaved"
        runtime, steps = train_once(
            lf_args(model, data, out, cfg, True, opts.deepspeed, opts.quantization_bit), work, opts.nproc, True
        )
        summary = interleaved_summary(steps)
        summary["train_runtime"] = runtime
        runs.append(summary)
        print(
            f"[bench] run {r + 1}/{opts.repeats}: {len(summary['block_ratios'])} ABBA blocks, median block ratio "
            f"{summary['median_block_ratio']:.4f}, LoRA step {summary['lora_step_s'] * 1e3:.1f} ms, "
            f"+MacDrop {summary['macdrop_step_s'] * 1e3:.1f} ms",
            flush=True,
        )
    print()
    print(
        "| run | ABBA blocks | LoRA step ms (median) | +MacDrop ms | median block ratio | block ratio IQR | sum ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, p in enumerate(runs):
        print(
            f"| {i + 1} | {len(p['block_ratios'])} | {p['lora_step_s'] * 1e3:.1f} | {p['macdrop_step_s'] * 1e3:.1f} | "
            f"{p['median_block_ratio']:.4f} | {p['block_ratio_iqr'][0]:.4f}–{p['block_ratio_iqr'][1]:.4f} | "
            f"{p['runtime_ratio']:.4f} |"
        )
    all_blocks = [b for p in runs for b in p["block_ratios"]]
    ratio, ci = statistics.median(all_blocks), bootstrap_ci(all_blocks)
    print(
        f"\nmedian block ratio over all {len(all_blocks)} blocks: {ratio:.4f} (95 % bootstrap interval "
        f"{ci[0]:.4f}–{ci[1]:.4f}; MacDrop on/off interleaved ABBA in ONE process per run, after {WARMUP} "
        "warm-up steps)"
    )
    return {
        "mode": "interleaved",
        "runs": runs,
        "median_ratio": ratio,
        "median_ci95": ci,
        "lora_step_s": statistics.median(p["lora_step_s"] for p in runs),
    }


def run_processes(opts, cfg, model, data, work) -> dict:
    runs = []
    for r in range(opts.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        pair = {}
        for macdrop in order:
            name = "macdrop" if macdrop else "lora"
            out = work / f"run{r}_{name}"
            seconds, steps = train_once(
                lf_args(model, data, out, cfg, macdrop, opts.deepspeed, opts.quantization_bit), work, opts.nproc, False
            )
            step = statistics.median(s["s"] for s in steps if s["step"] > WARMUP)
            pair[name], pair[f"{name}_step"] = seconds, step
            print(
                f"[bench] repeat {r + 1}/{opts.repeats} {name:7s}: train_runtime {seconds:.2f} s, "
                f"median step {step * 1e3:.1f} ms",
                flush=True,
            )
        pair["ratio"] = pair["macdrop"] / pair["lora"]
        pair["step_ratio"] = pair["macdrop_step"] / pair["lora_step"]
        runs.append(pair)
    print()
    print("| repeat | LoRA train_runtime s | +MacDrop s | ratio | LoRA median step ms | +MacDrop ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for i, p in enumerate(runs):
        print(
            f"| {i + 1} | {p['lora']:.2f} | {p['macdrop']:.2f} | {p['ratio']:.4f} | {p['lora_step'] * 1e3:.1f} | "
            f"{p['macdrop_step'] * 1e3:.1f} | {p['step_ratio']:.4f} |"
        )
    ratio = statistics.median(p["ratio"] for p in runs)
    print(
        f"\nmedian ratio: train_runtime {ratio:.4f}, median step {statistics.median(p['step_ratio'] for p in runs):.4f} "
        f"({opts.repeats} A/B pairs of fresh processes)"
    )
    return {
        "mode": "processes",
        "runs": runs,
        "median_ratio": ratio,
        "median_step_ratio": statistics.median(p["step_ratio"] for p in runs),
        "lora_step_s": statistics.median(p["lora_step"] for p in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="MacDrop vs plain LoRA training time through LLaMA-Factory")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument(
        "--mode",
        choices=("interleaved", "processes"),
        default="interleaved",
        help="interleaved: MacDrop on/off in ABBA blocks of steps inside one run (default); "
        "processes: alternating fresh runs, LF's train_runtime",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs, or A/B process pairs")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--deepspeed", help="a DeepSpeed config (e.g. yaml_configs/ds_z3_config.json)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    parser.add_argument(
        "--quantization-bit",
        type=int,
        choices=(4,),
        help="4: QLoRA (bitsandbytes 4-bit base, as LLaMA-Factory's quantization_bit: 4)",
    )
    parser.add_argument("--work", help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--json", help="write the results here")
    opts = parser.parse_args()
    cfg = dict(PRESETS[opts.preset])
    if opts.steps:
        cfg["steps"] = opts.steps
    work = Path(opts.work or tempfile.mkdtemp(prefix="macdrop-bench-"))
    print(f"[bench] preparing a random {cfg['layers']}-layer Llama (hidden {cfg['hidden']}) in {work}", flush=True)
    model = build_model(work / "model", cfg)
    data = write_data(work / "data", cfg)
    run = run_interleaved if opts.mode == "interleaved" else run_processes
    result = run(opts, cfg, model, data, work)
    cost, blocked, storage = (
        mask_cost_us(model, cfg, quantization_bit=opts.quantization_bit)
        if opts.nproc == 1 and not opts.deepspeed
        else (None, None, None)
    )

    import llamafactory
    import torch
    import transformers

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"{benchlib.cpu_model()} ({os.cpu_count()} cores)"
    )
    kv = cfg.get("kv_heads", cfg["heads"]) / cfg["heads"]  # grouped-query attention shrinks k/v projections
    n_params = int(
        cfg["layers"] * ((2 + 2 * kv) * cfg["hidden"] ** 2 + 3 * cfg["hidden"] * cfg["intermediate"])
        + 2 * cfg["vocab"] * cfg["hidden"]
    )
    lora_step = result["lora_step_s"]
    if cost is not None:
        print(
            f"mask + restore (k=5, one micro-batch): {cost:.1f} us = {cost / (lora_step * 1e6) * 100:.4f} % of a LoRA step"
        )
        print(f"storage: {storage}")
    if blocked is not None:
        print(
            f"host time of mask + restore behind ~15 ms of queued GPU work: {blocked:.0f} us "
            f"({'no sync' if blocked < 2000 else 'it WAITS for the GPU'})"
        )
    report = {
        "benchmark": "train_overhead",
        "preset": opts.preset,
        "config": cfg,
        "params": n_params,
        "deepspeed": opts.deepspeed,
        "nproc": opts.nproc,
        "quantization_bit": opts.quantization_bit,
        "storage": storage,
        **result,
        "warmup_steps": WARMUP,
        "mask_restore_us": cost,
        "mask_restore_behind_gpu_work_us": blocked,
        "device": device,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "date": date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llamafactory": llamafactory.__version__,
            "python": platform.python_version(),
        },
    }
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
