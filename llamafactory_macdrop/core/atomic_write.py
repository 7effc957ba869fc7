"""Writing a file so that a reader finds the old one or the whole new one, never a cut one.

Why: a run's ``macdrop_locator.json`` is read back by the next resume. A disk that fills up (or a
kill) in the middle of a plain ``write_text`` leaves a truncated file behind, which that resume
then refuses; and a plain ``open(path, "w")`` follows a symlink placed at that name, overwriting
whatever file it points to, outside the output dir. Here the text goes to a temporary file in the
same folder, is flushed to disk, and is renamed over the name: ``os.replace`` swaps the directory
entry itself (a symlink there is replaced, its target untouched), atomically on POSIX. A failure
removes the temporary file and is one line (:class:`FileWriteError`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import MacDropError


class FileWriteError(MacDropError, OSError):
    """A file could not be written (full or read-only disk, no permission); the message is one line."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise FileWriteError(f"cannot write {path} ({err.strerror or type(err).__name__})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # what open() would have given, not mkstemp's 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FileWriteError(f"cannot write {path} ({err.strerror or type(err).__name__})") from None
    return path
