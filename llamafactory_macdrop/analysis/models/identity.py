"""What identifies a model and the libraries that evaluated it: for caches and resumable sweeps.

Why here: ``macdrop compare`` keys its evaluation cache, and ``macdrop attack`` / ``quantize``
key their per-setting checkpoints, on exactly which weights were measured with which libraries;
a result is reused only when both are the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


def fingerprint(model: nn.Module) -> dict[str, str]:
    """SHA-256 of the raw bytes of every parameter and buffer (bitwise identity, any dtype)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().contiguous().cpu()
        out[name] = (
            hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else "empty"
        )
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def folder_identity(folder: Optional[str | Path]) -> Optional[dict[str, Any]]:
    """A model or adapter folder as it is on disk, cheaply: config.json's text and every other file's
    size and modification time (a checkpoint rewritten in place changes them); None for no folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    out: dict[str, Any] = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            stat = f.stat()
            out[f.name] = f.read_text(errors="replace") if f.name.endswith(".json") and stat.st_size < 1 << 20 else (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return out


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "lm_eval"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def digest(value: Any) -> str:
    """SHA-256 of a JSON-able value (sorted keys; paths and the like as text)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
