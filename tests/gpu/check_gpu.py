"""End-to-end MacDrop checks on ONE CUDA GPU: bf16 LoRA, DeepSpeed ZeRO-3 (bf16), QLoRA (4-bit), FSDP1/FSDP2.

Not collected by pytest (CI has no GPU). Run on a machine with a GPU, from the repository root:

    python tests/gpu/check_gpu.py [--out DIR] [--only bf16,zero3,qlora,fsdp1,fsdp2]

Needs llamafactory 0.9.5 and its training stack, deepspeed (zero3) and bitsandbytes (qlora).
Each case trains the planted tiny Llama (tests/helpers/tiny.py) for a few optimizer steps through
LLaMA-Factory's own ``run_exp`` (via tests/dist_check.py, under ``torchrun`` for ZeRO-3, under
``accelerate launch --config_file yaml_configs/fsdp_config.yaml`` / ``fsdp2_config.yaml``
unchanged — bf16 mixed precision, FULL_STATE_DICT save, sync_module_states and
cpu_ram_efficient_loading — for the FSDP cases; with one GPU the shard is the whole weight,
the CPU tests cover shards split across ranks) and
asserts, on the GPU, what tests/plugin/test_distributed.py asserts on the CPU: the planted layer and
indices are found; every forward of W_up (recomputation included) sees exactly
``original * M`` with M the mask Algorithm 1 draws for that step and micro-batch; the weights
are bitwise restored after every step and at the end. It prints one line per check and
writes ``DIR/gpu_checks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path[:0] = [str(TESTS), str(REPO)]

import torch  # noqa: E402
from dist_check import verify  # noqa: E402
from helpers import tiny  # noqa: E402

STEPS, GA, SEED = 4, 2, 11
CASES = {
    "bf16": {"bf16": True},
    "zero3": {"bf16": True, "deepspeed": str(REPO / "yaml_configs" / "ds_z3_config.json")},
    # LLaMA-Factory itself builds the 4-bit config: NF4, codes stored in the compute dtype (bf16 here,
    # bnb_4bit_quant_storage=compute_dtype), as a user's QLoRA run gets it
    "qlora": {"bf16": True, "quantization_bit": 4},
    "fsdp1": {"bf16": True},
    "fsdp2": {"bf16": True},
}
#: case -> accelerate config it is launched with, and the wrapper the trainer must run
FSDP_CONFIGS = {"fsdp1": ("fsdp_config.yaml", "FullyShardedDataParallel"), "fsdp2": ("fsdp2_config.yaml", None)}


def run_case(name: str, work: Path, model_dir: Path, data_dir: Path) -> dict:
    case_dir = work / name
    case_dir.mkdir(parents=True, exist_ok=True)
    args = tiny.lf_train_args(
        model_dir,
        data_dir,
        case_dir / "out",
        stage="pt",
        dataset="tiny_pt",
        cutoff_len=32,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GA,
        seed=SEED,
        **CASES[name],
    )
    (case_dir / "args.json").write_text(json.dumps(args))
    script = str(TESTS / "dist_check.py")
    if name in FSDP_CONFIGS:
        config = str(REPO / "yaml_configs" / FSDP_CONFIGS[name][0])
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config,
            "--num_processes",
            "1",
            script,
        ]
    elif "deepspeed" in args:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", script]
    else:
        cmd = [sys.executable, script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd + [str(case_dir / "args.json"), str(case_dir / "trace")], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    (case_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"case": name, "ok": False, "error": (proc.stdout + proc.stderr)[-4000:], "seconds": seconds}
    trace = torch.load(case_dir / "trace" / "rank0.pt")
    trace["located"] = json.loads((case_dir / "out" / "macdrop_locator.json").read_text())
    try:
        # the recorded weights must be the real [intermediate, hidden] matrices: the first QLoRA check
        # compared rows of the PACKED bf16 storage ([N*K/4, 1]) with each other and passed while the
        # masks hit the wrong elements
        for key in ("up", "gate"):
            shape = tuple(trace["original"][key].shape)
            assert shape == (tiny.INTERMEDIATE, tiny.HIDDEN), f"recorded {key} weight has shape {shape}"
        checks = verify(
            [trace],
            layer=tiny.PLANTED_LAYER,
            indices=tiny.PLANTED_INDICES,
            seed=SEED,
            steps=STEPS,
            ga=GA,
            zero3=name == "zero3",
        )
        storage = trace["storage"]["up"]
        if name == "fsdp1":
            assert trace["engine"] == FSDP_CONFIGS[name][1], trace["engine"]
        if name == "fsdp2":
            assert storage["type"] == "DTensor", f"W_up is not an FSDP2 DTensor: {storage}"
        if name == "qlora":
            assert storage["quantized"], f"W_up is not 4-bit: {storage}"
        checks.append(f"W_up stored as {storage['type']} {storage['dtype']}, engine {trace['engine']}")
    except AssertionError as err:
        return {"case": name, "ok": False, "error": f"assertion failed: {err}", "seconds": seconds}
    state = json.loads((case_dir / "out" / "trainer_state.json").read_text())
    log = [h for h in state["log_history"] if "loss" in h]
    return {
        "case": name,
        "ok": True,
        "checks": checks,
        "seconds": round(seconds, 1),
        "engine": trace["engine"],
        "loss": [h["loss"] for h in log],
        "macdrop_p": [h["macdrop_p"] for h in log],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_checks")
    parser.add_argument("--only", default=",".join(CASES))
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing checked", file=sys.stderr)
        return 2
    work = Path(opts.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "model.safetensors").exists():
        tiny.build_planted_llama(model_dir)
    data_dir = tiny.write_datasets(work / "data")
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; torch {torch.__version__}")
    results = []
    for name in opts.only.split(","):
        result = run_case(name, work, model_dir, data_dir)
        results.append(result)
        status = "PASS" if result["ok"] else "FAIL"
        print(f"[{status}] {name} ({result['seconds']} s)")
        for line in result.get("checks", []):
            print(f"    - {line}")
        if not result["ok"]:
            print("    " + result["error"].replace("\n", "\n    "))
        else:
            print(f"    - loss {result['loss']}  macdrop_p {result['macdrop_p']}")
    (work / "gpu_checks.json").write_text(
        json.dumps({"gpu": gpu, "torch": torch.__version__, "results": results}, indent=1)
    )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
