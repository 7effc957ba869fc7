"""A plain ``transformers.Trainer`` under DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun, gloo), no
LLaMA-Factory: ``with_macdrop`` and ``MacDropCallback``.

tests/trainer_zero3_check.py trains and records, per rank, the effective W_up/W_gate at every
training forward (the weight ZeRO-3 gathered from both ranks' partitions, each of which MacDrop
edited on its own) and the gathered storage bytes after every optimizer step. ``dist_check.verify``
asserts Algorithm 1's weight for the predicted mask in every forward, the same weights on both
ranks, and a bitwise restore after every step; the log carries ``macdrop_p``.
"""

import json
import os
import re
import subprocess

import pytest
import torch
from dist_check import step_p, verify
from helpers import hf_trainer, tiny
from helpers.hf_trainer import GA, P0, SEED, STEPS
from helpers.process import BIN, REPO

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")


@pytest.mark.parametrize("how", ["with_macdrop", "callback"])
def test_zero3_two_ranks(how, tiny_llama_dir, tmp_path):
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "DS_ACCELERATOR": "cpu",
        "PYTHONFAULTHANDLER": "1",
        "TINY_LLAMA_DIR": str(tiny_llama_dir),
    }
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + (os.getpid() + 7) % 1000),
        str(REPO / "tests" / "trainer_zero3_check.py"),
        str(tmp_path / "out"),
        str(tmp_path / "trace"),
        how,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        causes = [ln for ln in proc.stderr.splitlines() if re.search(r"Error|error:|Traceback|Abort", ln)]
        pytest.fail(f"exit {proc.returncode}\n" + "\n".join(causes[-30:]) + "\n--- stderr tail\n" + proc.stderr[-4000:])
    traces = [torch.load(tmp_path / "trace" / f"rank{r}.pt") for r in range(2)]
    located = json.loads((tmp_path / "out" / "macdrop_locator.json").read_text())
    lines = verify(
        traces,
        layer=tiny.PLANTED_LAYER,
        indices=list(tiny.PLANTED_INDICES),
        seed=SEED,
        steps=STEPS,
        ga=GA,
        p0=P0,
        zero3=True,
        recompute=True,
        located=located,
    )
    print("\n".join(lines))
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert hf_trainer.logged_p(log) == pytest.approx([step_p(P0, t, STEPS) for t in range(1, STEPS + 1)])
