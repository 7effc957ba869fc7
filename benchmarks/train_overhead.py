"""MacDrop's training overhead: plain LoRA vs LoRA + MacDrop through LLaMA-Factory's own trainer.

    python benchmarks/train_overhead.py --preset cpu  [--repeats 3] [--json out.json]
    python benchmarks/train_overhead.py --preset gpu  [--repeats 3] [--deepspeed yaml_configs/ds_z3_config.json]

A random-init Llama (``cpu``: 4 layers x hidden 512; ``gpu``: 16 layers x hidden 2048, 1.2 B
parameters, bf16) is written once; then the SAME LLaMA-Factory pt + LoRA config (rank 16, all
linear layers, gradient checkpointing as LF defaults) is trained with and without
``macdrop: true``, alternating A/B ``--repeats`` times in fresh processes. MacDrop uses the
``constant`` curriculum at p = 0.8, so EVERY step masks and restores (the worst case; with the
``step`` curriculum p reaches 0 and the cost vanishes). ``macdrop_layer``/``macdrop_indices``
fix the rows, so the figure is the per-step mechanism; the one-off locator probe is timed
separately by ``--locate``. Reported: LF's ``train_runtime`` per run, the per-pair ratio
MacDrop / LoRA and its median, plus an in-process micro-benchmark of one mask + restore.
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

PRESETS = {
    "cpu": dict(layers=4, hidden=512, intermediate=1408, heads=8, vocab=8000, batch=4, seq=256, steps=12, bf16=False),
    "gpu": dict(layers=16, hidden=2048, intermediate=8192, heads=16, vocab=32000, batch=4, seq=1024, steps=40,
                bf16=True),
}
WARMUP = 5  # steps excluded from the steady-state time (CUDA/cuBLAS warm-up, allocator growth)
RUNNER = """
import json, sys, time
import torch
from transformers import TrainerCallback
from llamafactory_macdrop import integration
from llamafactory.train import tuner

class StepClock(TrainerCallback):
    # wall time of optimizer steps WARMUP+1..end, synchronized at both ends
    def __init__(self, out):
        self.out, self.t0 = out, None
    def _now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == %d:
            self.t0, self.s0 = self._now(), state.global_step
    def on_train_end(self, args, state, control, **kw):
        if args.process_index == 0:
            steps = state.global_step - self.s0
            json.dump({"steady_step_s": (self._now() - self.t0) / steps, "steps": steps}, open(self.out, "w"))

integration.activate()
args = json.load(open(sys.argv[1]))
tuner.run_exp(args, callbacks=[StepClock(args["output_dir"] + "/step_clock.json")])
""" % WARMUP


def build_model(out: Path, cfg: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tiny

    if (out / "config.json").exists():
        return out
    tiny.build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=max(2048, cfg["seq"]), bos_token_id=1, eos_token_id=2, pad_token_id=0,
        torch_dtype="bfloat16" if cfg["bf16"] else "float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if cfg["bf16"] else torch.float32)
    model.save_pretrained(out)
    return out


def write_data(out: Path, cfg: dict) -> Path:
    import tiny

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


def lf_args(model: Path, data: Path, out: Path, cfg: dict, macdrop: bool, deepspeed: str | None) -> dict:
    args = dict(
        model_name_or_path=str(model), stage="pt", do_train=True, finetuning_type="lora", lora_target="all",
        lora_rank=16, lora_alpha=16, dataset="bench", dataset_dir=str(data), template="default",
        cutoff_len=cfg["seq"], output_dir=str(out), overwrite_output_dir=True,
        per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1, max_steps=cfg["steps"],
        learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", seed=0, bf16=cfg["bf16"],
        preprocessing_num_workers=1, dataloader_num_workers=0,
    )
    if deepspeed:
        args["deepspeed"] = deepspeed
    if macdrop:
        args.update(macdrop=True, macdrop_curriculum="constant", macdrop_p0=0.8, macdrop_k=5,
                    macdrop_layer=1, macdrop_indices=[11, 22, 33, 44, 55])
    return args


def train_once(args: dict, work: Path, nproc: int) -> tuple[float, float]:
    """(LF's train_runtime, steady-state seconds per step after WARMUP steps) of one fresh run."""
    path = work / "args.json"
    path.write_text(json.dumps(args))
    runner = work / "runner.py"
    runner.write_text(RUNNER)
    cmd = [sys.executable, str(runner), str(path)]
    if nproc > 1 or args.get("deepspeed"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] + cmd[1:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    out = Path(args["output_dir"])
    runtime = float(json.loads((out / "train_results.json").read_text())["train_runtime"])
    return runtime, float(json.loads((out / "step_clock.json").read_text())["steady_step_s"])


def mask_cost_us(model_dir: Path, cfg: dict, iters: int = 200) -> tuple[float, float | None]:
    """One mask + restore of k=5 rows (the plugin's per-micro-batch work), in microseconds; and
    the host time of one mask + restore issued behind ~15 ms of queued GPU work (a value near
    15 ms would mean it synchronizes with the GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamafactory_macdrop.architectures import find_ffn_blocks
    from llamafactory_macdrop.config import MacDropConfig
    from llamafactory_macdrop.curriculum import Progress
    from llamafactory_macdrop.locator import LocatorResult
    from llamafactory_macdrop.trainer import MacDropRun

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cfg["bf16"] else torch.float32)
    model.to(device)
    blocks = find_ffn_blocks(model)
    result = LocatorResult(model="bench", layer=1, indices=[11, 22, 33, 44, 55], magnitudes=None, median=None,
                           probe_token_id=None, modules=[], massiveness=None, source="override")
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
    return per_call, blocked


def main() -> int:
    parser = argparse.ArgumentParser(description="MacDrop vs plain LoRA training time through LLaMA-Factory")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--deepspeed", help="a DeepSpeed config (e.g. yaml_configs/ds_z3_config.json)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
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
    runs = []
    for r in range(opts.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        pair = {}
        for macdrop in order:
            out = work / f"run{r}_{'macdrop' if macdrop else 'lora'}"
            name = "macdrop" if macdrop else "lora"
            seconds, step = train_once(lf_args(model, data, out, cfg, macdrop, opts.deepspeed), work, opts.nproc)
            pair[name], pair[f"{name}_step"] = seconds, step
            print(f"[bench] repeat {r + 1}/{opts.repeats} {name:7s}: train_runtime {seconds:.2f} s, "
                  f"steady step {step * 1e3:.1f} ms", flush=True)
        pair["ratio"] = pair["macdrop"] / pair["lora"]
        pair["step_ratio"] = pair["macdrop_step"] / pair["lora_step"]
        runs.append(pair)
    ratio = statistics.median(p["ratio"] for p in runs)
    step_ratio = statistics.median(p["step_ratio"] for p in runs)
    lora_step = statistics.median(p["lora_step"] for p in runs)
    cost, blocked = mask_cost_us(model, cfg) if opts.nproc == 1 and not opts.deepspeed else (None, None)

    import torch
    import transformers

    import llamafactory

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    n_params = cfg["layers"] * (4 * cfg["hidden"] ** 2 + 3 * cfg["hidden"] * cfg["intermediate"]) \
        + 2 * cfg["vocab"] * cfg["hidden"]
    print()
    print("| repeat | LoRA train_runtime s | +MacDrop s | ratio | LoRA steady step ms | +MacDrop ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for i, p in enumerate(runs):
        print(f"| {i + 1} | {p['lora']:.2f} | {p['macdrop']:.2f} | {p['ratio']:.4f} | {p['lora_step'] * 1e3:.1f} | "
              f"{p['macdrop_step'] * 1e3:.1f} | {p['step_ratio']:.4f} |")
    print(f"\nmedian ratio: train_runtime {ratio:.4f}, steady-state step {step_ratio:.4f} "
          f"({opts.repeats} A/B pairs; {cfg['steps']} steps of {cfg['batch']}x{cfg['seq']} tokens, "
          f"steady state = steps {WARMUP + 1}..{cfg['steps']}); LoRA step {lora_step * 1e3:.1f} ms")
    if cost is not None:
        print(f"mask + restore (k=5, one micro-batch): {cost:.1f} us = {cost / (lora_step * 1e6) * 100:.4f} % of a LoRA step")
    if blocked is not None:
        print(f"host time of mask + restore behind ~15 ms of queued GPU work: {blocked:.0f} us "
              f"({'no sync' if blocked < 2000 else 'it WAITS for the GPU'})")
    report = {
        "benchmark": "train_overhead", "preset": opts.preset, "config": cfg, "params": n_params,
        "deepspeed": opts.deepspeed, "nproc": opts.nproc, "runs": runs, "median_ratio": ratio,
        "median_step_ratio": step_ratio, "warmup_steps": WARMUP, "lora_step_s": lora_step, "mask_restore_us": cost,
        "mask_restore_behind_gpu_work_us": blocked, "device": device, "date": date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llamafactory": llamafactory.__version__, "python": platform.python_version()},
    }
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
