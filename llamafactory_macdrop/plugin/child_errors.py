"""How torchrun children end a job on a plugin error raised on ANY rank, in one line.

Why this exists: MacDrop's errors (``lf.patches.plugin_errors()``) are printed as one line, not
a traceback per rank. Most are raised on every rank together, but one raised on some ranks only
(a rank-local check, a file only one rank can read) must not leave the other ranks waiting in
their next collective: LLaMA-Factory's default ``ddp_timeout`` is 180000000 s, so under NCCL
they would wait for good; under gloo their collective fails instead, each with a traceback.

Two launch paths, both NODE-LOCAL (nothing here crosses nodes):

* ``llamafactory-cli train`` (its patched launcher sets :data:`ERROR_FILE_ENV` to an empty file
  in the node's temp directory): the first rank of the node to fail records its message there
  (:func:`report`: a claim file created with ``O_EXCL`` picks one writer, the message is written
  to a temporary file and renamed into place, so nobody reads half a message) and exits 0. Every
  child runs a daemon thread (:func:`start_watcher`) that polls the file; once a message is there
  and its own process has not started to end within :data:`GRACE_S` (a rank raising the same
  error ends through its own clean path, destroying its process group), it ends the process
  with ``os._exit(0)``, wherever it waits. All children exit 0, so torchrun adds no failure
  report, and the launcher prints ``[macdrop] error: ...`` once and exits 2.
* ``torchrun``/``accelerate launch`` started by hand (no error file): the first rank to fail
  prints the line (one claim file per job in :func:`tempfile.gettempdir`, so N ranks failing
  together print it once) and exits 2; torchrun's agent then stops the other ranks at once and
  reports the failed worker, as for any failing worker.

A rank whose collective breaks BECAUSE another rank ended (gloo: "Connection closed by peer")
asks :func:`peer_failed` and then ends quietly with the same exit code instead of adding its own
traceback. Other nodes see neither file: their ranks get an error from their next collective or
wait in it until the process-group timeout (set ``ddp_timeout`` for multi-node runs).

Standard library only (torch.distributed when a process group must be destroyed), and nothing
of LLaMA-Factory: ``plugin/lf/patches.py`` calls in here.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
import threading
import time
from typing import Optional

#: set by the patched launcher for its torchrun children: the node's file for a plugin error
ERROR_FILE_ENV = "MACDROP_ERROR_FILE"
#: how often the watcher looks at the error file (a stat call)
POLL_S = 0.25
#: how long a rank may take to reach its own clean end after the message appeared, before the
#: watcher ends it (a rank raising the same error a little later then still ends by itself)
GRACE_S = 2.0
#: how long a rank already on its clean end may take (destroying a process group can block when
#: peers are gone) before the watcher ends it anyway
ENDING_LIMIT_S = 30.0

_ending = threading.Event()  # set once this process ends on its own (its error, or a peer's)
_watcher: Optional[threading.Thread] = None


def error_file() -> Optional[str]:
    """The launcher's error file for this node, or None (torchrun started by hand)."""
    return os.environ.get(ERROR_FILE_ENV) or None


def _claim_path(path: str) -> str:
    return f"{path}.claim"


def _job_claim_path() -> str:
    """Without the launcher: one claim file per torchrun job and attempt on this node.

    ``TORCHELASTIC_RUN_ID`` alone is ``none`` for every job torchrun starts without ``--rdzv-id``,
    so the agent's pid (each child's parent), the restart count and the master address join it:
    a claim file left by an earlier job never silences a later one. Under a wrapper process per
    rank (``torchrun --no-python``) the parents differ, and each failing rank prints its own line
    rather than none.
    """
    parts = [
        os.environ.get("TORCHELASTIC_RUN_ID", "none"),
        str(os.getppid()),
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
        os.environ.get("MASTER_ADDR", ""),
        os.environ.get("MASTER_PORT", ""),
    ]
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))
    return os.path.join(tempfile.gettempdir(), f"macdrop-error-{key}.claim")


def _claim(path: str) -> bool:
    """True for the one process that creates ``path`` (atomic: ``O_CREAT | O_EXCL``)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def record(path: str, message: str) -> bool:
    """Leave ``message`` in ``path`` unless another process did first; True if this one did.

    Raises OSError when the file's folder cannot be written."""
    if not _claim(_claim_path(path)):
        return False
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(message)
    os.replace(tmp, path)  # atomic: a reader sees the empty file or the whole message
    return True


def read(path: Optional[str]) -> str:
    """The message in ``path`` ("" when none, or no file)."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def discard(path: Optional[str]) -> None:
    """Remove the error file and what :func:`record` leaves beside it."""
    if not path:
        return
    for name in [path, _claim_path(path), *glob.glob(glob.escape(path) + ".*.tmp")]:
        try:
            os.remove(name)
        except OSError:
            pass


def _print_line(message: str) -> None:
    print(f"[macdrop] error: {message}", file=sys.stderr, flush=True)


def report(message: str) -> int:
    """This rank ends on a plugin error: make the job say ``message`` once; returns the exit code.

    With the launcher's file: record it (first writer wins) and return 0, the launcher prints it.
    Without: the first rank of the job on this node prints it; return 2, so that torchrun stops
    the other ranks. If the claim cannot be made (an unwritable temp dir), print it anyway: a
    line per failing rank is better than none.
    """
    _ending.set()
    path = error_file()
    if path:
        try:
            record(path, message)
            return 0
        except OSError:
            _print_line(message)
            return 2
    try:
        first = _claim(_job_claim_path())
    except OSError:
        first = True
    if first:
        _print_line(message)
    return 2


def peer_failed() -> bool:
    """Whether another rank of this job on this node already ended on a plugin error."""
    path = error_file()
    if path:
        try:
            return os.path.getsize(path) > 0
        except OSError:
            return False
    return os.path.exists(_job_claim_path())


def end_quietly() -> int:
    """This rank ends because a peer did (:func:`peer_failed`): no line of its own; the exit code."""
    _ending.set()
    return 0 if error_file() else 2


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not keep the process alive
            pass
    os._exit(0)


def _watch(path: str, poll: float, grace: float, ending_limit: float) -> None:
    while True:
        try:
            if os.path.getsize(path) > 0:
                break
        except OSError:
            return  # the launcher removed it: the job is over
        time.sleep(poll)
    if not _ending.wait(grace):
        _exit_now()  # still running (e.g. waiting in a collective for a rank that is gone)
    time.sleep(ending_limit)
    _exit_now()  # its own clean end is stuck


def start_watcher(poll: float = POLL_S, grace: float = GRACE_S, ending_limit: float = ENDING_LIMIT_S) -> bool:
    """Start this child's watcher on the launcher's error file (once; no file: nothing to watch).

    A daemon thread: it never keeps a finished process alive, and a collective that releases the
    GIL (gloo, NCCL) does not keep it from running. Returns whether a watcher runs.
    """
    global _watcher
    path = error_file()
    if not path:
        return False
    if _watcher is None or not _watcher.is_alive():
        _watcher = threading.Thread(
            target=_watch, args=(path, poll, grace, ending_limit), name="macdrop-error-watcher", daemon=True
        )
        _watcher.start()
    return True


def torchrun_child() -> bool:
    """Whether this process is a torchrun worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def end_child_with(err: Optional[BaseException]) -> None:
    """A torchrun child's exit after a plugin error: ONE line for the whole job, not one traceback per rank.

    ``err``: this rank's plugin error; None when this rank's own error (a collective broken by a
    peer that has gone) follows another rank's plugin error, which then speaks for the job.

    Launched by ``llamafactory-cli`` (whose patched launcher set :data:`ERROR_FILE_ENV`, a file
    local to each node), the first rank of the node to fail, whichever rank it is, records its
    message; every child exits 0, so torchrun adds no failure report of its own, and the node's
    ``llamafactory-cli`` prints the line and exits 2. A rank that does not fail itself ends
    quietly when its collective breaks because the failed rank has gone (gloo), or, when that
    collective never returns (NCCL), is ended by its watcher thread a grace period after the
    message appeared (:func:`start_watcher`). Launched by torchrun directly, the first failing
    rank prints the line and exits 2, and torchrun stops the others.

    Known limit: both signals are node-local. With several nodes the nodes where no rank failed
    learn of it only through their collectives: those fail (gloo: the peer closed the
    connection, a traceback per rank) or wait until the process-group timeout (``ddp_timeout``;
    LLaMA-Factory's default is 180000000 s, so set one for multi-node runs).
    """
    code = report(str(err) or type(err).__name__) if err is not None else end_quietly()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort while exiting
        pass
    sys.exit(code)


def read_and_remove(path: Optional[str]) -> str:
    """The children's message, once torchrun returned; the file and its claim are removed."""
    if not path:
        return ""
    os.environ.pop(ERROR_FILE_ENV, None)
    try:
        return read(path)
    finally:
        discard(path)
