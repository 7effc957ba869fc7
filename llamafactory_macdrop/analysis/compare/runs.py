"""The training side of ``macdrop compare``: arms x seeds, each a normal LLaMA-Factory run.

Why a plan of plain YAMLs: every arm must be exactly what the user would train by hand, so each
is written out as an LLaMA-Factory YAML (the base YAML, its ``output_dir`` and ``seed`` replaced,
the arm's keys applied) and trained by the user's own command (``llamafactory-cli train`` by
default, launcher settings such as ``FORCE_TORCHRUN``/``NPROC_PER_NODE`` pass through the
environment), in its own folder. The plain arm carries no ``macdrop*`` key at all.

Resuming: a run is finished when its folder holds the marker this module writes after the command
succeeded (:data:`MARKER`), recording the arm's whole config. A finished run is skipped; one whose
recorded config differs from what the plan now asks for is refused (its numbers would describe
another experiment); a folder without the marker (a crash, a kill) is moved aside to
``<folder>.crashed-<time>`` and trained again. Nothing is overwritten or deleted.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ...core.values import comma_ints, comma_list, parse_flag
from ...errors import MacDropError

MARKER = "macdrop_compare_run.json"
#: keys of the base YAML a grid may vary besides ``macdrop_*`` ones (they apply to both arms)
SHARED_GRID_KEYS = ("use_dora",)


class CompareError(MacDropError, ValueError):
    """A comparison that cannot be planned, trained or evaluated; the message is one line."""


def is_macdrop_key(key: str) -> bool:
    return key == "macdrop" or key.startswith("macdrop_")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = comma_ints(text)
    except ValueError:
        raise CompareError(f"--seeds {text!r} is not allowed: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text!r} is not allowed: give distinct integers, e.g. 0,1,2")
    return seeds


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``KEY=V1,V2`` (repeatable) -> {key: [values]}; values read as YAML scalars."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise CompareError(f"--grid {item!r} is not allowed: write KEY=V1,V2 (e.g. macdrop_p0=0.5,0.8)")
        if key == "macdrop" or not (key.startswith("macdrop_") or key in SHARED_GRID_KEYS):
            raise CompareError(
                f"--grid {key}: allowed are macdrop_* keys (MacDrop arms) and {', '.join(SHARED_GRID_KEYS)} (both arms)"
            )
        if key in grid:
            raise CompareError(f"--grid {key} is given twice: put all its values in one --grid {key}=V1,V2")
        try:
            parsed = [yaml.safe_load(v) for v in comma_list(values)]
        except yaml.YAMLError:
            raise CompareError(
                f"--grid {item!r}: a value is not a plain YAML scalar (write numbers, words, true/false)"
            ) from None
        if len(set(map(str, parsed))) != len(parsed):
            raise CompareError(f"--grid {item!r}: a value is listed twice")
        if key in SHARED_GRID_KEYS and not all(isinstance(v, bool) for v in parsed):
            raise CompareError(f"--grid {item!r}: {key} takes true and/or false")
        grid[key] = parsed
    return grid


def _label(key: str, value: Any) -> str:
    short = key[len("macdrop_") :] if key.startswith("macdrop_") else key
    text = json.dumps(value) if not isinstance(value, str) else value
    return f"{short}_{text}".replace("/", "-").replace(" ", "")


@dataclass
class Arm:
    """One configuration of the comparison; ``control`` names the plain arm it is paired with."""

    name: str
    config: dict[str, Any]  # the LLaMA-Factory YAML of the arm, without output_dir/seed
    macdrop: bool
    control: Optional[str] = None
    varied: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.name,
            "macdrop": self.macdrop,
            "control": self.control,
            "varied": self.varied,
            "macdrop_keys": {k: v for k, v in self.config.items() if is_macdrop_key(k)},
        }


def plan_arms(base: dict[str, Any], grid: Optional[dict[str, list[Any]]] = None) -> tuple[list[Arm], list[str]]:
    """(arms, notes): the plain arm(s) and the MacDrop arm(s) of ``base`` under ``grid``.

    MacDrop arms take the base YAML's ``macdrop_*`` keys (``macdrop: true`` added when the base has
    none: a note says so) with the grid's values on top; shared keys (``use_dora``) make one plain
    arm per value, each MacDrop arm paired with the plain arm of its value."""
    grid = dict(grid or {})
    notes: list[str] = []
    plain_base = {k: v for k, v in base.items() if not is_macdrop_key(k)}
    mac_base = dict(base)
    if not parse_flag(base.get("macdrop")):
        mac_base["macdrop"] = True
        notes.append("the base YAML has no `macdrop: true`: the MacDrop arm adds it (default macdrop_* keys otherwise)")
    shared = {k: grid.pop(k) for k in list(grid) if k in SHARED_GRID_KEYS}
    arms: list[Arm] = []
    for shared_values in itertools.product(*shared.values()) if shared else [()]:
        shared_set = dict(zip(shared, shared_values))
        plain_name = "-".join(["plain"] + [_label(k, v) for k, v in shared_set.items()])
        arms.append(Arm(plain_name, {**plain_base, **shared_set}, False, varied=shared_set))
        for values in itertools.product(*grid.values()) if grid else [()]:
            varied = {**shared_set, **dict(zip(grid, values))}
            name = "-".join(["macdrop"] + [_label(k, v) for k, v in varied.items()])
            arms.append(
                Arm(
                    name, {**mac_base, **shared_set, **dict(zip(grid, values))}, True, control=plain_name, varied=varied
                )
            )
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CompareError(
            f"--grid gives two arms the same folder name {twice[0]!r}: use values that differ in "
            "more than '/' and spaces"
        )
    return arms, notes


@dataclass
class Run:
    """One arm trained with one seed, in ``output_dir``."""

    arm: Arm
    seed: int
    output_dir: Path
    yaml_path: Path
    log_path: Path

    @property
    def name(self) -> str:
        return f"{self.arm.name} seed {self.seed}"

    def config(self) -> dict[str, Any]:
        return {**self.arm.config, "output_dir": str(self.output_dir), "seed": self.seed}

    def marker(self) -> Optional[dict[str, Any]]:
        """The finished-run record, or None (none, or unreadable: a write cut short counts as unfinished)."""
        path = self.output_dir / MARKER
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """finished | stale (finished with another config) | crashed (folder, no marker) | new."""
        mark = self.marker()
        if mark is not None:
            return "finished" if _comparable(mark.get("config", {})) == _comparable(self.config()) else "stale"
        return "crashed" if self.output_dir.exists() else "new"

    def train_info(self) -> dict[str, Any]:
        """What the run's training did: wall time (marker), steps, last logged and mean loss, p first/last."""
        mark, history = self.marker() or {}, read_log_history(self.output_dir)
        losses = [h for h in history if "loss" in h]
        ps = [h["macdrop_p"] for h in history if "macdrop_p" in h]
        info = {
            "seconds": mark.get("train_seconds"),
            "steps": max((h.get("step", 0) for h in history), default=None),
            "final_loss": losses[-1]["loss"] if losses else None,
            "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        }
        if ps:
            info.update(p_first=ps[0], p_last=ps[-1])
        return info

    def stale_key(self) -> str:
        old, new = _comparable((self.marker() or {}).get("config", {})), _comparable(self.config())
        key = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), "?")
        return f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as recorded, without ``output_dir`` (the marker's place already says which
    run it is; a relative and an absolute ``--output-dir`` must not make a finished run stale)."""
    out = _jsonable(config)
    out.pop("output_dir", None)
    return out


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def plan_runs(arms: Sequence[Arm], seeds: Sequence[int], root: Path) -> list[Run]:
    runs = []
    for arm in arms:
        for seed in seeds:
            folder = root / arm.name / f"seed{seed}"
            runs.append(
                Run(
                    arm,
                    seed,
                    folder,
                    root / "configs" / f"{arm.name}-seed{seed}.yaml",
                    root / "logs" / f"{arm.name}-seed{seed}.log",
                )
            )
    return runs


def write_yaml(run: Run) -> Path:
    import yaml

    run.yaml_path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# macdrop compare: arm {run.arm.name}, seed {run.seed} (written by `macdrop compare`; train it by hand with\n"
        f"#   llamafactory-cli train {run.yaml_path})\n"
    )
    run.yaml_path.write_text(header + yaml.safe_dump(run.config(), sort_keys=False))
    return run.yaml_path


def move_aside(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.crashed-{stamp}")
    n = 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.crashed-{stamp}-{n}"), n + 1
    folder.rename(target)
    return target


def _tee(proc: subprocess.Popen, log, echo_stream, echo_line: Optional[Callable[[str], None]] = None) -> None:
    """Copy the child's output to the log file and (if given) our stdout, as it comes (bars too);
    without a stream, ``echo_line`` still gets the trainer's log lines (``{'loss': ...}``)."""
    fd = proc.stdout.fileno()
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        if echo_stream is not None:
            echo_stream.write(chunk)
            echo_stream.flush()
        elif echo_line is not None:
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text.startswith("{") and "'loss'" in text:
                    echo_line(text)


def train(
    run: Run,
    command: Sequence[str],
    *,
    echo: Callable[[str], None] = print,
    stream_output: bool = True,
    env: Optional[dict[str, str]] = None,
) -> float:
    """Train one run with ``command + [yaml]``; the marker is written only if it succeeded.

    Returns the wall time in seconds; raises :class:`CompareError` (one line, the log's path and
    its last error line) if the command fails or leaves no adapter."""
    write_yaml(run)
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    if run.log_path.exists():  # an earlier, unfinished attempt: its log says why, keep it
        run.log_path.rename(run.log_path.with_name(f"{run.log_path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.log"))
    argv = [*command, str(run.yaml_path)]
    start = time.time()
    with open(run.log_path, "wb") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        except FileNotFoundError:
            raise CompareError(f"--train-command {shlex.join(command)}: {command[0]} not found") from None
        _tee(proc, log, sys.stdout.buffer if stream_output else None, lambda line: echo(f"    {run.name}: {line}"))
        code = proc.wait()
    seconds = time.time() - start
    if code != 0:
        raise CompareError(
            f"{run.name} failed (exit {code}): {last_error_line(run.log_path)} -- log: {run.log_path}; "
            "rerun the same command to restart it (its folder is moved aside)"
        )
    if not (run.output_dir / "adapter_config.json").is_file():
        raise CompareError(
            f"{run.name} finished but left no adapter_config.json in {run.output_dir} "
            f"(finetuning_type must be lora); log: {run.log_path}"
        )
    mark = {
        "arm": run.arm.name,
        "seed": run.seed,
        "config": _jsonable(run.config()),
        "command": argv,
        "train_seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = run.output_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(mark, indent=1) + "\n")
    tmp.replace(run.output_dir / MARKER)  # all or nothing: a kill mid-write leaves no marker
    return seconds


def last_error_line(log_path: Path) -> str:
    """The most telling line of a failed run's log: a [macdrop] error, else the last *Error line."""
    try:
        lines = [
            ln.strip() for ln in log_path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()
        ]
    except OSError:
        return "(no log)"
    for pick in (lambda ln: "[macdrop] error" in ln, lambda ln: "Error" in ln.split(":")[0]):
        found = [ln for ln in lines if pick(ln)]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "(empty log)"


def read_log_history(output_dir: Path) -> list[dict[str, Any]]:
    """``log_history`` of the run's trainer_state.json (loss, macdrop_p per logged step), or []."""
    path = Path(output_dir) / "trainer_state.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("log_history", [])
