"""``macdrop summary | keys``: what a MacDrop training run did, and which keys a YAML can set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MacDropError


def cmd_keys(args: argparse.Namespace) -> int:
    from ..plugin.keys import MacDropConfig

    rows = MacDropConfig.key_reference()
    if args.json:
        from .. import __version__

        keys = [{"key": k, "type": t, "default": d, "help": h} for k, t, d, h in rows]
        print(json.dumps({"schema": "macdrop.keys/1", "macdrop_version": __version__, "keys": keys}, indent=1))
        return 0
    table = [("key", "type", "default", "help")] + [(k, t, json.dumps(d), h) for k, t, d, h in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]  # every column as wide as its widest entry
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """What a MacDrop run did: the located weights and p / loss per logged step."""
    from ..core.locator import LOCATOR_FILE, read_locator_file

    out = Path(args.output_dir)
    locator_path, state_path = out / LOCATOR_FILE, out / "trainer_state.json"
    if not out.is_dir():
        raise RunFileError(f"{out}: no such folder: give a training run's output_dir")
    if not locator_path.is_file():
        raise RunFileError(f"{locator_path} not found: was this output_dir trained with macdrop: true?")
    result = read_locator_file(locator_path)
    history = _log_history(state_path) if state_path.is_file() else []
    print(result.table())
    if not state_path.is_file():
        print(
            f"\n  no p/loss log: {state_path} not found (the run saved no trainer state yet: it stopped "
            "before its first save, or is still running)"
        )
    steps = [
        h
        for h in history
        if isinstance(h, dict) and isinstance(h.get("step"), int) and isinstance(h.get("macdrop_p"), (int, float))
    ]
    if steps:
        print("\n  step  epoch  macdrop_p    loss")
        for h in steps:
            print(
                f"  {h['step']:4d}  {h.get('epoch', 0):5.2f}  {h['macdrop_p']:9.4f}  {h.get('loss', float('nan')):6.3f}"
            )
    if args.json:
        from .. import __version__

        doc = {"schema": "macdrop.summary/1", "macdrop_version": __version__, "locator": result.to_dict(), "log": steps}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"written to {args.json}")
    if args.plot:
        if not steps:
            missing = "" if state_path.is_file() else " (the file does not exist)"
            raise RunFileError(f"{state_path} has no macdrop_p entries to plot{missing}")
        print(f"plot written to {plot_run(steps, result, args.plot)}")
    return 0


class RunFileError(MacDropError, ValueError):
    """A run's trainer_state.json that cannot be read (one line, exit 2)."""


def _log_history(path: Path) -> list:
    """``log_history`` of a trainer_state.json, or one line saying why it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from None
    history = data.get("log_history", []) if isinstance(data, dict) else None
    if not isinstance(history, list):
        raise RunFileError(f"{path} has no log_history list: not a transformers trainer_state.json")
    return history


def plot_run(steps: list[dict], result, path: Path) -> Path:
    """p and training loss against the optimizer step, on two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax_p = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    x = [h["step"] for h in steps]
    ax_p.plot(x, [h["macdrop_p"] for h in steps], color="tab:red", marker="o", ms=3, label="macdrop_p")
    ax_p.set_xlabel("optimizer step")
    ax_p.set_ylabel("dropout probability p", color="tab:red")
    ax_p.set_ylim(-0.02, 1.02)
    if any("loss" in h for h in steps):
        ax_loss = ax_p.twinx()
        ax_loss.plot(x, [h.get("loss") for h in steps], color="tab:blue", label="training loss")
        ax_loss.set_ylabel("training loss", color="tab:blue")
    ax_p.set_title(f"MacDrop on layer {result.layer} rows {result.indices[:5]}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    from .common import command

    p = command(
        sub,
        "summary",
        "show the locator result and the p/loss log of a training output_dir",
        "macdrop summary outputs/smollm2-lora-macdrop --json summary.json --plot p.png",
    )
    p.add_argument("output_dir", type=Path, help="a MacDrop training run's output_dir (macdrop_locator.json inside)")
    p.add_argument("--json", type=Path, default=None, help="write the locator result and the p/loss log as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of p and loss per step")
    p.set_defaults(func=cmd_summary)

    p = command(sub, "keys", "list the macdrop_* YAML keys", "macdrop keys")
    p.add_argument("--json", action="store_true", help="print the keys as JSON instead of a table")
    p.set_defaults(func=cmd_keys)
