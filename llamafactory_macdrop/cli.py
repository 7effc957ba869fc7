"""``macdrop``: the analysis command line (thin: parse, call the core, print)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype)).eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _use_layer_by_layer(args: argparse.Namespace) -> bool:
    """Explicit flag, else automatic for local checkpoints larger than half the free memory."""
    if args.layer_by_layer is not None:
        return args.layer_by_layer
    from .streaming import checkpoint_bytes

    size = checkpoint_bytes(args.model) if Path(args.model).is_dir() else 0
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return size > free / 2


def cmd_locate(args: argparse.Namespace) -> int:
    from .locator import locate_massive_weights

    tokenizer = _load_tokenizer(args.model)
    kwargs = dict(tokenizer=tokenizer, layer=args.layer, indices=args.indices, probe_token=args.probe_token)
    if _use_layer_by_layer(args):
        from .streaming import locate_layer_by_layer

        result, stats = locate_layer_by_layer(args.model, args.k, dtype=_dtype(args.dtype), **kwargs)
        print(f"layer by layer: read layers {stats.layers_loaded[0]}..{stats.layers_loaded[-1]}, "
              f"peak {stats.peak_bytes / 2**20:,.0f} MiB of parameters in memory")
    else:
        model = _load_model(args.model, args.dtype)
        result = locate_massive_weights(model, args.k, **kwargs)
    result.model = args.model
    print(result.table())
    if args.plot:
        from .plots import plot_intermediate_bars

        if result.intermediate is None:
            raise FileNotFoundError("--plot needs a probe run (not both --layer and --indices)")
        path = plot_intermediate_bars(result.intermediate, result.indices, Path(args.plot) / "locate_intermediate.png",
                                      result.layer)
        print(f"plot written to {path}")
    if args.json:
        print(f"written to {result.write_json(args.json)}")
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    from .activations import activation_report, probe_input_ids

    model, tokenizer = _load_model(args.model, args.dtype), _load_tokenizer(args.model)
    ids = probe_input_ids(model, tokenizer, args.text)
    report = activation_report(model, ids, abs_threshold=args.abs_threshold, median_ratio=args.median_ratio,
                               tokenizer=tokenizer)
    report.model = args.model
    print(report.table())
    if args.plot:
        from .plots import plot_intermediate_bars, plot_layer_profile

        print(f"plot written to {plot_layer_profile(report, Path(args.plot) / 'activations_layers.png')}")
        if report.origin_intermediate is not None:
            values = report.origin_intermediate
            top = values.topk(min(5, values.numel())).indices.tolist()
            path = plot_intermediate_bars(values, top, Path(args.plot) / "activations_intermediate.png", report.origin_layer)
            print(f"plot written to {path}")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    return 0


def cmd_superweight(args: argparse.Namespace) -> int:
    from .activations import probe_input_ids
    from .superweight import find_super_weights

    model, tokenizer = _load_model(args.model, args.dtype), _load_tokenizer(args.model)
    report = find_super_weights(model, probe_input_ids(model, tokenizer, args.text), threshold=args.threshold,
                                top=args.top)
    report.model = args.model
    print(report.table())
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    out = convert_gguf(args.out, args.gguf)
    print(f"HF folder ready: {out}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .config import MacDropConfig

    rows = MacDropConfig.key_reference()
    if args.json:
        print(json.dumps([{"key": k, "type": t, "default": d, "help": h} for k, t, d, h in rows], indent=1))
        return 0
    print(f"{'key':<20} {'type':<17} {'default':<8} help")
    for key, kind, default, help_text in rows:
        print(f"{key:<20} {kind:<17} {json.dumps(default):<8} {help_text}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """What a MacDrop run did: the located weights and p / loss per logged step."""
    from .locator import LOCATOR_FILE, LocatorResult

    out = Path(args.output_dir)
    locator_path, state_path = out / LOCATOR_FILE, out / "trainer_state.json"
    if not locator_path.is_file():
        raise FileNotFoundError(f"{locator_path} not found: was this output_dir trained with macdrop: true?")
    result = LocatorResult.from_dict(json.loads(locator_path.read_text()))
    print(result.table())
    history = json.loads(state_path.read_text())["log_history"] if state_path.is_file() else []
    steps = [h for h in history if "macdrop_p" in h]
    if steps:
        print("\n  step  epoch  macdrop_p    loss")
        for h in steps:
            print(f"  {h['step']:4d}  {h.get('epoch', 0):5.2f}  {h['macdrop_p']:9.4f}  {h.get('loss', float('nan')):6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"locator": result.to_dict(), "log": steps}, indent=1) + "\n")
        print(f"written to {args.json}")
    if args.plot:
        if not steps:
            raise FileNotFoundError(f"{state_path} has no macdrop_p entries to plot")
        print(f"plot written to {plot_run(steps, result, args.plot)}")
    return 0


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


def _token(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def _indices(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="macdrop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("locate", help="find the massive layer and top-k massive weights of a model")
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=_indices, default=None, help="comma-separated row override")
    p.add_argument("--probe-token", type=_token, default=None,
                   help="token fed alone: an id, or a text whose first token is used (default: BOS, else EOS)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--json", type=Path, default=None, help="write macdrop_locator.json-style output here")
    p.add_argument("--plot", type=Path, default=None, help="folder for a bar plot of the intermediate state")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layer-by-layer", dest="layer_by_layer", action="store_true", default=None,
                       help="read one layer at a time from safetensors (default: when the checkpoint exceeds half the free memory)")
    group.add_argument("--full-load", dest="layer_by_layer", action="store_false")
    p.set_defaults(func=cmd_locate)

    for name, func, text in (
        ("activations", cmd_activations, "per-layer activation magnitudes and massive activations (Sun et al.)"),
        ("superweight", cmd_superweight, "candidate super weights of the down projections (Yu et al.)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
        p.add_argument("--text", default=DEFAULT_TEXT, help="probe text; the input is BOS + its tokens")
        p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
        p.set_defaults(func=func)
        if name == "activations":
            p.add_argument("--plot", type=Path, default=None, help="folder for the layer profile and intermediate bar plots")
            p.add_argument("--abs-threshold", type=float, default=100.0, help="massive: |a| above this")
            p.add_argument("--median-ratio", type=float, default=1000.0, help="massive: |a| above this times the layer median")
        else:
            p.add_argument("--threshold", type=float, default=None,
                           help="keep layers whose down output spike exceeds this (default: >= 0.5 x the largest)")
            p.add_argument("--top", type=int, default=3, help="at most this many candidates")

    p = sub.add_parser("convert-gguf", help="convert a GGUF file (default: the packaged SmolLM2-135M) to an HF folder")
    p.add_argument("out", type=Path)
    p.add_argument("--gguf", type=Path, default=None)
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("summary", help="show the locator result and the p/loss log of a training output_dir")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG of p and loss per step")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("keys", help="list the macdrop_* YAML keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .architectures import UnsupportedArchitectureError
    from .config import MacDropConfigError
    from .locator import LocatorError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LocatorError, UnsupportedArchitectureError, MacDropConfigError, FileNotFoundError) as err:
        print(f"macdrop: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
