"""Running a comparison's jobs side by side: device groups on one machine, or tasks on a Ray cluster.

Why jobs are processes: a job is one run of the comparison (train it unless it is finished, then
evaluate its adapter) or the base's evaluation, and each is the same command line,
``python -m llamafactory_macdrop.api.comparison --job OPTIONS.json NAME``, whatever runs it. A
job's results go where the sequential comparison puts them (the run's folder, its marker, the
evaluation cache under DIR/eval/), so a parallel comparison resumes like a sequential one and its
final report is computed by the same code from the same files. What runs a job only decides
where and when:

* :func:`run_local` — ``slots`` processes at a time on this machine; a slot may own a device group
  (``--devices "0,1;2,3"``: ``CUDA_VISIBLE_DEVICES`` per job, so LLaMA-Factory's launcher sees
  exactly that group and starts torchrun over it when it holds several GPUs).
* :func:`run_ray` — one Ray task per job on an existing cluster (``--ray ADDRESS``), with the
  job's GPUs as the task's resources (Ray sets ``CUDA_VISIBLE_DEVICES`` in the task). The
  comparison's folder and the directory the command was given in must be on a filesystem every
  node sees (the jobs write into the one and read relative paths from the other).

A job that fails is reported in one line (its log's telling line) while the others go on.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ...core.values import comma_list
from .runs import CompareError, last_error_line


@dataclass
class Job:
    """One command to run: a run of the comparison (train + evaluate) or the base's evaluation."""

    name: str
    argv: list[str]
    log: Path  # the job's own output
    result: Path  # what the job writes when it ends well (JSON: its timings)
    # Where the command was given: the user's relative paths (--text-file eval.txt, the YAMLs) mean
    # the same in every job, also in a Ray task whose worker starts elsewhere.
    cwd: Path = field(default_factory=Path.cwd)


@dataclass
class Outcome:
    """How a job ended: where it ran, its exit code, its wall time, what it recorded, why it failed."""

    name: str
    where: str
    returncode: int
    started: float
    ended: float
    record: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.name,
            "where": self.where,
            "ok": self.error is None,
            "seconds": round(self.seconds, 1),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.ended)),
            **{k: v for k, v in self.record.items() if k in ("train_seconds", "eval_seconds", "trained", "reused")},
            **({"error": self.error} if self.error else {}),
        }


def parse_devices(text: str) -> list[str]:
    """``"0,1;2,3"`` -> ``["0,1", "2,3"]``: one device group per slot, each a CUDA_VISIBLE_DEVICES value."""
    groups = [g.replace(" ", "") for g in text.split(";") if g.strip()]
    bad = [g for g in groups if not all(d.isascii() and d.isdigit() for d in comma_list(g))]
    if not groups or bad:
        raise CompareError(
            f"--devices {text!r} is not allowed: give device groups of GPU indices, ';' between groups, e.g. '0,1;2,3'"
        )
    seen = [d for g in groups for d in comma_list(g)]
    twice = sorted({d for d in seen if seen.count(d) > 1})
    if twice:
        raise CompareError(f"--devices {text!r}: GPU {twice[0]} is in two groups (two runs would share it)")
    return groups


def _outcome(job: Job, where: str, code: int, started: float) -> Outcome:
    out = Outcome(job.name, where, code, started, time.time())
    if code == 0 and job.result.is_file():
        out.record = json.loads(job.result.read_text())
    else:
        out.error = f"{job.name} failed (exit {code}): {last_error_line(job.log)} -- log: {job.log}"
    return out


def _run(job: Job, env: dict[str, str]) -> int:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.result.unlink(missing_ok=True)  # only what this attempt writes counts
    with open(job.log, "ab") as log:
        log.write(f"$ {' '.join(job.argv)}\n".encode())
        log.flush()
        return subprocess.run(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=job.cwd).returncode


def run_local(
    jobs: Sequence[Job],
    slots: Sequence[Optional[str]],
    env: dict[str, str],
    echo: Callable[[str], None] = print,
) -> list[Outcome]:
    """``len(slots)`` jobs at a time, in order; a slot is a CUDA_VISIBLE_DEVICES value or None (leave it)."""
    todo: "queue.Queue[Job]" = queue.Queue()
    for job in jobs:
        todo.put(job)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker(slot: Optional[str], label: str) -> None:
        mine = dict(env) if slot is None else {**env, "CUDA_VISIBLE_DEVICES": slot}
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                echo(f"[compare] {job.name}: started on {label} (log {job.log})")
            started = time.time()
            outcome = _outcome(job, label, _run(job, mine), started)
            with lock:
                outcomes.append(outcome)
                echo(f"[compare] {_line(outcome)}")

    threads = [
        threading.Thread(target=worker, args=(slot, f"slot {i}" + (f" (GPUs {slot})" if slot else "")), daemon=True)
        for i, slot in enumerate(slots)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outcomes, key=lambda o: [j.name for j in jobs].index(o.name))


def run_ray(
    jobs: Sequence[Job],
    address: str,
    gpus_per_job: float,
    env: dict[str, str],
    echo: Callable[[str], None] = print,
) -> list[Outcome]:
    """One Ray task per job on the cluster at ``address``, ``gpus_per_job`` GPUs each (Ray picks them)."""
    try:
        import ray
    except ImportError:
        raise CompareError("--ray needs Ray in this environment: pip install 'ray[default]'") from None
    try:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    except Exception as err:  # Ray's own connection errors are many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CompareError(f"--ray {address}: no Ray cluster answers there ({first[:200]})") from None
    passed = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}  # Ray sets the task's own

    @ray.remote(num_cpus=1, num_gpus=gpus_per_job)
    def remote_job(job: Job, env: dict[str, str]) -> tuple[int, float, str]:
        import socket

        started = time.time()
        code = _run(job, {**os.environ, **env, **_ray_visible()})
        return code, started, socket.gethostname()

    pending = {remote_job.remote(job, passed): job for job in jobs}
    for job in jobs:
        echo(f"[compare] {job.name}: submitted to Ray at {address} ({gpus_per_job:g} GPUs; log {job.log})")
    outcomes = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            code, started, host = ray.get(done[0])
        except Exception as err:  # the task itself died (node lost, ...)
            outcome = Outcome(
                job.name, "ray", -1, time.time(), time.time(), error=f"{job.name}: Ray task failed: {err}"
            )
        else:
            outcome = _outcome(job, f"ray node {host}", code, started)
        outcomes.append(outcome)
        echo(f"[compare] {_line(outcome)}")
    return sorted(outcomes, key=lambda o: [j.name for j in jobs].index(o.name))


def _ray_visible() -> dict[str, str]:
    """The task's GPUs as Ray assigned them (empty on a CPU task)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": value} if value is not None else {}


def _line(outcome: Outcome) -> str:
    if outcome.error:
        return outcome.error
    rec = outcome.record
    parts = []
    if rec.get("trained"):
        parts.append(f"trained in {rec.get('train_seconds', 0):.0f} s")
    elif "train_seconds" in rec:
        parts.append("finished before")
    parts.append("evaluation reused" if rec.get("reused") else f"evaluated in {rec.get('eval_seconds', 0):.0f} s")
    return f"{outcome.name}: {', '.join(parts)} on {outcome.where} ({outcome.seconds:.0f} s in all)"
