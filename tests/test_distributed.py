"""Data-parallel MacDrop on CPU: torchrun DDP (gloo) and DeepSpeed ZeRO-2/ZeRO-3, 2 ranks each.

Every run trains the planted tiny Llama for 4 optimizer steps (pt stage: packed 32-token blocks,
so every micro-batch has the same number of tokens and the global-batch loss of 2 ranks x 1 row
equals the single-process loss of 1 x 2 rows). Asserted per run, from tests/dist_check.py's
per-rank traces:

* every rank located the planted layer and indices;
* every forward of W_up (gradient-checkpoint recomputation included) saw exactly
  ``original * M`` on the located rows, with M the mask Algorithm 1 draws for that optimizer
  step and micro-batch (recomputed here from the seed), the same M on every rank; under ZeRO-3
  that is the GATHERED weight, assembled from each rank's partition edits;
* after every optimizer step, and at the end, the weights are bitwise the checkpoint's;
* loss, grad norm and macdrop_p per step equal the single-process run's.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import BIN, REPO
from llamafactory_macdrop.curriculum import Progress, build_curriculum
from llamafactory_macdrop.masking import draw_keep_mask
from llamafactory_macdrop.trainer import mask_seed

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tests" / "dist_check.py"
STEPS, GA = 4, 2
deepspeed = pytest.importorskip("deepspeed")


def _args(model_dir, data_dir, out, mode):
    args = tiny.lf_train_args(
        model_dir, data_dir, out, stage="pt", dataset="tiny_pt", cutoff_len=32, max_steps=STEPS,
        per_device_train_batch_size=2 if mode == "single" else 1, gradient_accumulation_steps=GA, seed=7,
    )
    if mode in ("zero2", "zero3"):
        args["deepspeed"] = str(REPO / "yaml_configs" / f"ds_z{mode[-1]}_config.json")
    return args


def _run(tmp_path, model_dir, data_dir, mode):
    work = tmp_path / mode
    work.mkdir()
    args = _args(model_dir, data_dir, work / "out", mode)
    (work / "args.json").write_text(json.dumps(args))
    cmd = [sys.executable, str(SCRIPT)] if mode == "single" else \
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "tests"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd + [str(work / "args.json"), str(work / "trace")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = 1 if mode == "single" else 2
    traces = [torch.load(work / "trace" / f"rank{r}.pt") for r in range(ranks)]
    state = json.loads((work / "out" / "trainer_state.json").read_text())
    return traces, [h for h in state["log_history"] if "loss" in h], proc.stdout + proc.stderr


def _expected_masks(seed, shape):
    curriculum = build_curriculum("step", 0.8, 0.01)
    for step in range(1, STEPS + 1):
        p = curriculum.probability(Progress(step=step, total_steps=STEPS, epoch=1, num_epochs=1))
        for micro in range(GA):
            gen = torch.Generator().manual_seed(mask_seed(seed, step, micro))
            yield step, (draw_keep_mask(shape, p, gen, "cpu") if p > 0 else torch.ones(shape, dtype=torch.bool))


@pytest.fixture(scope="module")
def single(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dist"), tiny_llama_dir, tiny_data_dir, "single")


@pytest.mark.parametrize("mode", ["single", "ddp", "zero2", "zero3"])
def test_data_parallel_is_algorithm1_on_the_global_batch(mode, single, tiny_llama_dir, tiny_data_dir, tmp_path):
    if mode == "zero3" and not shutil.which("g++"):
        pytest.skip("DeepSpeed's CPU ops need g++")
    traces, log, output = single if mode == "single" else _run(tmp_path, tiny_llama_dir, tiny_data_dir, mode)
    weights = load_file(tiny_llama_dir / "model.safetensors")
    up_name = f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj.weight"
    gate_name = up_name.replace("up_proj", "gate_proj")
    original = weights[up_name][tiny.PLANTED_INDICES]
    expected = list(_expected_masks(7, tuple(original.shape)))

    for trace in traces:
        assert trace["located"]["layer"] == tiny.PLANTED_LAYER and trace["located"]["indices"] == tiny.PLANTED_INDICES
        assert all(trace["zero3_partitioned"]) == (mode == "zero3")
        assert (trace["engine"] == "DeepSpeedEngine") == mode.startswith("zero")
        # each micro-batch: one forward + one recomputation in backward (gradient checkpointing)
        seen = trace["forward"]
        assert len(seen) == 2 * len(expected)
        for i, (step, keep) in enumerate(expected):
            for step_seen, rows in seen[2 * i: 2 * i + 2]:
                assert step_seen == step
                assert torch.equal(rows, original * keep), f"{mode}: step {step} micro {i % GA}"
        assert [s for s, _ in trace["after_step"]] == list(range(1, STEPS + 1))
        for _, rows in trace["after_step"]:
            assert torch.equal(rows["up"], original) and torch.equal(rows["gate"], weights[gate_name][tiny.PLANTED_INDICES])
        assert torch.equal(trace["final"]["up"], weights[up_name]) and torch.equal(trace["final"]["gate"], weights[gate_name])

    single_log = single[1]
    assert [h["macdrop_p"] for h in log] == [h["macdrop_p"] for h in single_log]
    assert [h["loss"] for h in log] == pytest.approx([h["loss"] for h in single_log], abs=2e-3)
    assert [h["grad_norm"] for h in log] == pytest.approx([h["grad_norm"] for h in single_log], rel=1e-2)
