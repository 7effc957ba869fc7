"""A sweep that keeps its work: every finished setting's rows written as it finishes, read back by a
rerun of the same protocol.

Why: an attack or quantization sweep with zero-shot or generation tasks runs for hours on CPU, one
setting after another; killed at the tenth minute it used to leave nothing. The checkpoint is one
JSON file (written to a temporary name and renamed: a kill mid-write leaves the previous one)
holding a key and, per finished setting, its result rows, generation rows and per-item records. A
rerun whose key is the same (the model's identity, every protocol the report records, the
settings, batch sizes, dtype, device, library versions) restores those settings and evaluates
only the others; any other key starts afresh (the file then describes another experiment, and is
replaced).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..models.identity import digest


def _name(key: Any) -> str:
    return json.dumps(list(key) if isinstance(key, tuple) else key)


class SweepCheckpoint:
    """The finished settings of one sweep, in ``path``, for the protocol ``key``."""

    def __init__(self, path: str | Path, protocol: Any, echo: Optional[Callable[[str], None]] = None) -> None:
        self.path = Path(path)
        self.key = digest(protocol)
        self.echo = echo or (lambda line: None)
        self.done: dict[str, dict[str, list]] = {}
        self.restored = 0
        try:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}  # unreadable: started afresh
        if data.get("key") == self.key:
            self.done = data.get("settings", {})
        elif data:
            self.echo(
                f"  checkpoint {self.path}: another protocol (model, settings or options changed): starting afresh"
            )

    def restore(self, report, setting_key: Any, label: str) -> bool:
        """Put a finished setting's rows back into ``report`` (True), or say it still has to run."""
        entry = self.done.get(_name(setting_key))
        if entry is None:
            return False
        report.rows += entry["rows"]
        report.gen_rows += entry["gen_rows"]
        report.gen_items += entry["gen_items"]
        self.restored += 1
        self.echo(f"  {label:<22} resumed from {self.path}")
        return True

    def save(self, report, setting_key: Any) -> None:
        """Record the setting that just finished (its rows are the ones of ``report`` with its key)."""
        mine = lambda rows: [r for r in rows if report.key(r) == setting_key]  # noqa: E731
        self.done[_name(setting_key)] = {
            "rows": mine(report.rows),
            "gen_rows": mine(report.gen_rows),
            "gen_items": mine(report.gen_items),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "settings": self.done}) + "\n")
        tmp.replace(self.path)

    def remove(self) -> None:
        """The sweep's report is complete and written: nothing left to resume."""
        self.path.unlink(missing_ok=True)
