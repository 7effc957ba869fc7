"""Scaling out as users launch it: multi-node torchrun and Ray Train, through ``llamafactory-cli train``.

* Two "nodes" on this machine: two launches of ``llamafactory-cli train`` with ``FORCE_TORCHRUN=1
  NNODES=2 NODE_RANK=0/1 NPROC_PER_NODE=1 MASTER_ADDR=127.0.0.1``, each with its own output_dir
  (no shared filesystem: ``save_on_each_node: true``, as multi-node users without one must set),
  DDP and DeepSpeed ZeRO-3 (yaml_configs/ds_z3_config.json). Each equals the 1-node x 2-rank DDP
  run of the same config: the same located rows, the same weights in every forward, the same p
  and loss per step, the same adapter on both nodes (ZeRO-3 within 1e-6: its reductions round
  differently; its 1-node x 2-rank run equals the single-process one in test_distributed.py). The
  DDP pair is then resumed from each node's own checkpoint-2: node 0 reads the locator file it
  wrote, node 1 (which has none) follows it.
* Ray Train: ``USE_RAY=1 llamafactory-cli train`` with ``ray_num_workers: 2`` (CPU workers on this
  machine): MacDrop acts in both workers, activated there by the ``.pth`` start-up hook; one
  ``macdrop_locator.json``; ``macdrop_p`` in trainer_log.jsonl; the adapter equals the torchrun
  run's; resuming from checkpoint-2 reuses the locator; a plugin error raised in the workers ends
  the command in one line.

The oracle is tests/dist_check.py's (it imports nothing of the plugin), put into every rank and
worker by tests/spy_site/sitecustomize.py, first on PYTHONPATH: in every training forward it
measures the effective W_up/W_gate of the planted layer through the layer's own forward and
compares it with Algorithm 1's weight, the keep-mask recomputed from the seed; the stored bytes
must be the checkpoint's after every step. On this machine LLaMA-Factory 0.9.5's Ray path needs
one change, made by that same test-only file: without GPUs it reserves one 10-CPU placement-group
bundle per CPU of the cluster and waits for ever, MacDrop or not (docs/distributed.md).

Cost on 2 shared cores: 4 min for the module at a load average of 4-5 (31 s the 1-node run, 84 s
the two-node DDP runs and their resume, 47 s ZeRO-3, 56 s the two Ray runs, 22 s the Ray error),
6 min at a load average of 8. Each Ray run starts a local Ray instance of its own, as a user's
does on one machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
import yaml
from dist_check import verify
from helpers import tiny
from helpers.process import BIN, REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
STEPS, GA, SEED = 4, 2, 7
GIVE_UP_S = 480
Z3_CONFIG = REPO / "yaml_configs" / "ds_z3_config.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model_dir, data_dir, out, mode, **overrides) -> dict:
    """The planted tiny Llama, pt (packed 32-token blocks: 2 ranks x 1 row is the 1 x 2 global batch)."""
    args = tiny.lf_train_args(
        model_dir,
        data_dir,
        out,
        stage="pt",
        dataset="tiny_pt",
        cutoff_len=32,
        max_steps=STEPS,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=GA,
        seed=SEED,
    )
    if mode == "zero3":
        args["deepspeed"] = str(Z3_CONFIG)
    args.update(overrides)
    return args


def _env(trace_dir, **extra) -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        # the spy first; the repository next: a worktree must test its own package
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "spy_site"), str(REPO), str(REPO / "tests")]),
        "MACDROP_TEST_TRACE_DIR": str(trace_dir),
        **extra,
    }


def _start(work, name, config, env) -> subprocess.Popen:
    """``llamafactory-cli train NAME.yaml`` in ``work``, as a user types it; output to NAME.log."""
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    with open(work / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "llamafactory-cli"), "train", f"{name}.yaml"],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _kill_tree(proc) -> None:
    """End a launch and everything it started (this test's processes only, by pid)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [*tree, psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _wait(launches: dict, expect: int = 0) -> dict:
    """Wait for every launch (name -> (process, folder)); the first one that fails or hangs ends
    the others (a node left alone would wait for its peer until torchrun's rendezvous times out)."""
    deadline = time.monotonic() + GIVE_UP_S
    codes = {}
    pending = dict(launches)
    while pending:
        for name, (proc, work) in list(pending.items()):
            code = proc.poll()
            if code is None:
                continue
            codes[name] = code
            del pending[name]
            if code != expect:
                for other, _ in pending.values():
                    _kill_tree(other)
                pytest.fail(f"{name} exited {code}\n" + _log(work, name)[-5000:])
        if pending and time.monotonic() > deadline:
            for other, _ in pending.values():
                _kill_tree(other)
            name, (_, work) = next(iter(pending.items()))
            pytest.fail(f"{name} still running after {GIVE_UP_S} s\n" + _log(work, name)[-3000:])
        time.sleep(0.5)
    return codes


def _log(work, name) -> str:
    return (work / f"{name}.log").read_text(errors="replace")


def _traces(*dirs) -> list:
    """Every rank's trace, in rank order, from the trace folders of all nodes."""
    found = {int(p.stem[4:]): p for d in dirs for p in d.glob("rank*.pt")}
    return [torch.load(found[r]) for r in sorted(found)]


def _steps(out) -> list[dict]:
    """(loss, macdrop_p) per step as trainer_log.jsonl has them (LlamaBoard's file)."""
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return [{"loss": r["loss"], "macdrop_p": r["macdrop_p"]} for r in rows if "loss" in r]


def _adapter(out) -> dict:
    return load_file(out / "adapter_model.safetensors")


def _assert_same_adapter(got: dict, want: dict, where: str, tol: float = 0.0) -> None:
    assert sorted(got) == sorted(want), where
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst <= tol, f"{where}: adapter differs from the 1-node x 2-rank run's by up to {worst:g}"


def _original(model_dir) -> dict:
    weights = load_file(model_dir / "model.safetensors")
    up = f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj.weight"
    return {"up": weights[up], "gate": weights[up.replace("up_", "gate_")]}


def _verify(traces, model_dir, mode, located, **kw):
    return verify(
        traces,
        layer=tiny.PLANTED_LAYER,
        indices=tiny.PLANTED_INDICES,
        seed=SEED,
        steps=STEPS,
        ga=GA,
        zero3=mode == "zero3",
        located=located,
        original=_original(model_dir),
        **kw,
    )


def _need(mode):
    if mode == "zero3":
        pytest.importorskip("deepspeed")
        if not shutil.which("g++"):
            pytest.skip("DeepSpeed's CPU ops need g++")


@pytest.fixture(scope="module")
def one_node(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    """The 1-node x 2-rank DDP run (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``), checked by the oracle."""
    work = tmp_path_factory.mktemp("one_node")
    env = _env(work / "trace", FORCE_TORCHRUN="1", NPROC_PER_NODE="2", MASTER_PORT=str(_free_port()))
    proc = _start(work, "run", _config(tiny_llama_dir, tiny_data_dir, work / "out", "ddp"), env)
    _wait({"run": (proc, work)})
    out = work / "out"
    run = {
        "traces": _traces(work / "trace"),
        "located": json.loads((out / "macdrop_locator.json").read_text()),
        "steps": _steps(out),
        "adapter": _adapter(out),
    }
    _verify(run["traces"], tiny_llama_dir, "ddp", run["located"])
    assert [s["macdrop_p"] for s in run["steps"]] == pytest.approx([0.6, 0.4, 0.2, 0.0])
    return run


@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_two_nodes_equal_one_node_of_two_ranks(mode, one_node, tiny_llama_dir, tiny_data_dir, tmp_path):
    _need(mode)
    reference = one_node

    port = str(_free_port())
    outs = [tmp_path / f"node{r}" / "out" for r in (0, 1)]
    extra = dict(save_strategy="steps", save_steps=2) if mode == "ddp" else {}  # checkpoints to resume from

    def launch_nodes(tag, per_node=lambda rank: {}):
        launches = {}
        for rank in (1, 0):  # the worker node first, as a cluster scheduler may start it
            work = tmp_path / f"node{rank}"
            work.mkdir(exist_ok=True)
            env = _env(
                work / f"trace_{tag}",
                FORCE_TORCHRUN="1",
                NNODES="2",
                NODE_RANK=str(rank),
                NPROC_PER_NODE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            config = _config(tiny_llama_dir, tiny_data_dir, outs[rank], mode, save_on_each_node=True, **extra)
            launches[f"{tag} node {rank}"] = (_start(work, tag, {**config, **per_node(rank)}, env), work)
        _wait(launches)
        return [tmp_path / f"node{r}" / f"trace_{tag}" for r in (0, 1)]

    traces = _traces(*launch_nodes("train"))
    assert len(traces) == 2
    # the locator ran once, on global rank 0, and wrote its file on node 0 only
    located = json.loads((outs[0] / "macdrop_locator.json").read_text())
    assert not (outs[1] / "macdrop_locator.json").exists()
    assert located == reference["located"]
    for line in _verify(traces, tiny_llama_dir, mode, located):
        print(f"{mode}, 2 nodes:", line)
    # both ranks saw the same weights in every forward (verify), and the 1-node run's too
    for (s0, w0), (s1, w1) in zip(traces[0]["forward"], reference["traces"][0]["forward"]):
        assert s0 == s1 and all(torch.equal(w0[k], w1[k]) for k in w0), "2 nodes and 1 node masked differently"
    steps = _steps(outs[0])
    assert [s["macdrop_p"] for s in steps] == [s["macdrop_p"] for s in reference["steps"]]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference["steps"]], abs=1e-6)
    for rank in (0, 1):  # each node wrote its own copy of the adapter
        tol = 0.0 if mode == "ddp" else 1e-6
        _assert_same_adapter(_adapter(outs[rank]), reference["adapter"], f"{mode} node {rank}", tol)
    if mode != "ddp":
        return

    # resume both nodes from their own checkpoint-2: only node 0 holds the locator file
    for out in outs:
        assert (out / "checkpoint-2").is_dir()
        for name in ("optimizer.pt", "scheduler.pt"):  # CPU ranks cannot load them (map_location 'cpu:0'),
            (out / "checkpoint-2" / name).unlink()  # MacDrop or not; the test is about the locator file
    port = str(_free_port())
    resumed = launch_nodes(
        "resume",
        lambda rank: dict(
            overwrite_output_dir=False, resume_from_checkpoint=str(outs[rank] / "checkpoint-2"), save_strategy="no"
        ),
    )
    assert "reused from" in _log(tmp_path / "node0", "resume")
    assert json.loads((outs[0] / "macdrop_locator.json").read_text()) == located
    assert not (outs[1] / "macdrop_locator.json").exists()
    _verify(_traces(*resumed), tiny_llama_dir, mode, located, first_step=3)


# ----------------------------------------------------------------------------- Ray Train
def _ray_config(model_dir, data_dir, out, **overrides) -> dict:
    """2 Ray workers in a Ray instance of this run's own (``address: local``: a bare ``ray.init()``
    joins whatever cluster ``ray start`` last left on this machine); ``num_cpus``: logical CPUs for
    LLaMA-Factory's 10-CPU bundles (one per worker); a dashboard port of its own (the state API
    LLaMA-Factory asks for the head node)."""
    return _config(
        model_dir,
        data_dir,
        out,
        "ddp",
        ray_num_workers=2,
        ray_init_kwargs={"address": "local", "num_cpus": 20, "dashboard_port": _free_port()},
        **overrides,
    )


def _ray_env(trace_dir) -> dict:
    # the test's Ray instance is its own: no token shared through ~/.ray with other Ray users of this machine
    return _env(trace_dir, USE_RAY="1", RAY_AUTH_MODE="disabled")


def test_ray_workers_run_macdrop_as_torchrun_ranks_do(one_node, tiny_llama_dir, tiny_data_dir, tmp_path):
    pytest.importorskip("ray.util.state")
    reference = one_node
    out = tmp_path / "out"
    config = _ray_config(tiny_llama_dir, tiny_data_dir, out, save_strategy="steps", save_steps=2)
    driver = _start(tmp_path, "train", config, _ray_env(tmp_path / "trace"))
    _wait({"train": (driver, tmp_path)})

    traces = _traces(tmp_path / "trace")
    assert len(traces) == 2, "one trace per Ray worker"
    processes = [t["process"] for t in traces]
    # two worker interpreters, neither the driver: the .pth hook patched LLaMA-Factory in each
    assert len({p["pid"] for p in processes} | {driver.pid}) == 3, processes
    assert all(p["pth_hook"] and p["training_function_patched"] for p in processes), processes
    assert all(t["engine"] == "DistributedDataParallel" for t in traces)
    assert list(out.rglob("macdrop_locator.json")) == [out / "macdrop_locator.json"], "one locator file"
    located = json.loads((out / "macdrop_locator.json").read_text())
    assert located == reference["located"]
    for line in _verify(traces, tiny_llama_dir, "ddp", located):
        print("Ray, 2 workers:", line)
    assert _steps(out) == reference["steps"]  # macdrop_p in LlamaBoard's file, the losses of torchrun's run
    _assert_same_adapter(_adapter(out), reference["adapter"], "Ray")

    for name in ("optimizer.pt", "scheduler.pt"):  # CPU workers cannot load them (map_location 'cpu:0'),
        (out / "checkpoint-2" / name).unlink()  # MacDrop or not; the test is about the locator file
    resume = {**config, "overwrite_output_dir": False, "resume_from_checkpoint": str(out / "checkpoint-2")}
    resume["ray_init_kwargs"] = {**config["ray_init_kwargs"], "dashboard_port": _free_port()}
    resume["save_strategy"] = "no"
    _wait({"resume": (_start(tmp_path, "resume", resume, _ray_env(tmp_path / "trace_resume")), tmp_path)})
    assert "reused from" in _log(tmp_path, "resume")
    assert json.loads((out / "macdrop_locator.json").read_text()) == located
    _verify(_traces(tmp_path / "trace_resume"), tiny_llama_dir, "ddp", located, first_step=3)


def test_ray_worker_error_ends_the_command_in_one_line(tiny_llama_dir, tiny_data_dir, tmp_path):
    """A check that needs the trainer's state (an epoch curriculum in a run of one epoch) fails in the
    workers at their first step: the driver prints the one line and exits 2."""
    pytest.importorskip("ray.util.state")
    config = _ray_config(tiny_llama_dir, tiny_data_dir, tmp_path / "out", macdrop_curriculum="epoch_before")
    driver = _start(tmp_path, "train", config, _ray_env(tmp_path / "trace"))
    _wait({"train": (driver, tmp_path)}, expect=2)
    log = _log(tmp_path, "train")
    errors = [line for line in log.splitlines() if "[macdrop] error:" in line]
    assert len(errors) == 1 and errors[0].startswith("[macdrop] error: macdrop_curriculum='epoch_before'"), errors
    assert "Traceback" not in log, log[-4000:]
