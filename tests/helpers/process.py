"""Running this environment's executables as a user would, and where things are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run_cli(
    args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run an executable of this environment (llamafactory-cli, macdrop) as a user would."""
    env = dict(os.environ)
    env.update(env_extra or {})
    exe = BIN / args[0]
    return subprocess.run([str(exe), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` with this environment's executables first on PATH and no PYTHONPATH (the compat
    venv must import the installed wheel, not this checkout); ``env`` adds variables."""
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **env}
    full.pop("PYTHONPATH", None)
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=900)
