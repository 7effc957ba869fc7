"""The output dir of a MacDrop run: writable, and this run's alone, checked before anything loads.

Why: two runs started on one ``output_dir`` (a second terminal, a re-submitted job) both train,
their checkpoints interleave and ``macdrop summary`` then pairs one run's ``macdrop_locator.json``
with the other's log; and a read-only or full disk used to surface as a traceback at the first
step, after the model and the data had loaded.

:func:`claimed` therefore, before the model loads: creates the folder, writes and removes a small
probe file (a read-only or full disk is one line here), and takes an exclusive ``flock`` on
``output_dir/macdrop_run.lock`` for as long as the run lasts. The lock belongs to the process, so a
run that dies (Ctrl-C, SIGKILL, out of memory) releases it with its last breath and the folder can
be resumed at once; a live run holding it makes a second one stop with one line naming its pid.
The launching ``llamafactory-cli`` holds it for its torchrun children (:data:`HELD_ENV`); on a
multi-node job only node 0 claims it (the folder is shared).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from .keys import MacDropConfigError

LOCK_FILE = "macdrop_run.lock"
#: set while a process holds the claim, for its torchrun children: the resolved output dir
HELD_ENV = "MACDROP_OUTPUT_DIR_CLAIMED"


class OutputDirError(MacDropConfigError):
    """The output dir cannot be written, or another live run writes to it (one line)."""


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_writable(output_dir: str) -> None:
    """Create ``output_dir`` and write, flush and remove a small file in it (one line if it cannot)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"output_dir {output_dir} cannot be created ({_reason(err)})") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".macdrop-write-check-", dir=output_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(b"MacDrop checks that this folder takes a file\n" * 64)  # a few KB: a full disk fails here
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OutputDirError(
            f"output_dir {output_dir} is not writable ({_reason(err)}): MacDrop writes macdrop_locator.json "
            "there at the first step, and LLaMA-Factory its checkpoints; give a writable folder with free space"
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid unknown"


def _lock(output_dir: str) -> int:
    """An fd holding the exclusive lock on ``output_dir/LOCK_FILE`` (the file this path names now)."""
    path = os.path.join(output_dir, LOCK_FILE)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise OutputDirError(f"{path} cannot be opened ({_reason(err)}): remove whatever is at that name") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputDirError(
                f"output_dir {output_dir} is in use by another MacDrop run ({holder}): two runs on one "
                "output_dir mix their checkpoints; wait for it to end, or give another output_dir"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file the previous holder removed between our open and our lock
            os.ftruncate(fd, 0)
            os.pwrite(
                fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0
            )
            return fd
        os.close(fd)
    raise OutputDirError(f"{path}: the lock file keeps changing; is another run starting on this output_dir?")


def _claims_here(environ) -> bool:
    """Node 0 claims (multi-node jobs share the folder); a torchrun child only if no launcher did."""
    if environ.get("NODE_RANK", "0") not in ("", "0") or environ.get("GROUP_RANK", "0") not in ("", "0"):
        return False
    return environ.get("RANK", "0") in ("", "0")


@contextmanager
def claimed(output_dir: Optional[str]) -> Iterator[None]:
    """Hold ``output_dir`` for the duration of the block (see the module docstring)."""
    if not output_dir:
        yield
        return
    real = os.path.realpath(os.path.expanduser(output_dir))
    if os.environ.get(HELD_ENV) == real or not _claims_here(os.environ):
        yield  # the launching process holds it (or another node does)
        return
    check_writable(output_dir)
    fd = _lock(output_dir)
    before = os.environ.get(HELD_ENV)
    os.environ[HELD_ENV] = real
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = before
        try:
            os.unlink(os.path.join(output_dir, LOCK_FILE))  # while still locked: see _lock's inode check
        except OSError:
            pass
        os.close(fd)
