"""``macdrop attention``: attention sinks per layer and the position experiment (docs/analysis.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    ModelPathError,
    add_prefix_options,
    check_model,
    indices_arg,
    load_model,
    load_tokenizer,
    text_prefix,
    token_arg,
)


def _layer_count(model: str):
    """Decoder layers by the checkpoint's config.json (None when it cannot be read before loading)."""
    from ..core.model_config import read_config_json

    found = read_config_json(model)
    if found is None:
        return None
    config = found[1].get("text_config") or found[1]
    n = config.get("num_hidden_layers", config.get("n_layer"))
    return n if isinstance(n, int) else None


def _check_layers(args: argparse.Namespace, n) -> None:
    """Layer options against the checkpoint's layer count, before the model loads."""
    from ..analysis.inspect.attention import AttentionError

    if n is None:
        return
    for option, values in (
        ("--position-layer", [args.position_layer] if args.position_layer is not None else []),
        ("--heatmap-layers", args.heatmap_layers or []),
    ):
        bad = [v for v in values if not 0 <= v < n]
        if bad:
            raise AttentionError(f"{option} {bad[0]} is out of range: the model has layers 0..{n - 1}")


def default_heatmap_layers(report) -> list[int]:
    """The massive layer, the one after it (where the sink starts) and the last layer."""
    ids = [s.layer for s in report.layers]
    wanted = [report.massive_layer, report.massive_layer + 1, ids[-1]]
    return [layer for layer in dict.fromkeys(wanted) if layer in ids]


def cmd_attention(args: argparse.Namespace) -> int:
    from ..analysis.inspect.attention import AttentionError, attention_report

    check_model(args.model)
    _check_layers(args, _layer_count(args.model))
    if args.text is not None and not args.text.strip():
        raise AttentionError(f"--text {args.text!r} is not allowed: give a text of at least one token")
    if args.probe_token is not None and (args.bos is not None or args.bos_token is not None):
        raise AttentionError("--probe-token puts its token first: give it, or --bos/--bos-token, not both")
    if args.adapter is not None:
        from ..analysis.models.loading import check_adapter

        check_adapter(args.adapter)  # config and weights file readable, before anything loads
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ModelPathError(f"{args.model}: no tokenizer found next to the model (the probe text needs one)")
    prefix = text_prefix(args, tokenizer, args.model) if args.probe_token is None else None  # before loading
    model = load_model(args.model, args.dtype)
    if args.adapter is not None:
        from ..analysis.models.loading import attach_adapter

        model = attach_adapter(model, args.adapter, args.model)

    bar = None

    def progress(what, done, total):  # one bar per forward pass, layer by layer
        nonlocal bar
        if args.no_progress:
            return
        if done == 1:
            from tqdm.auto import tqdm

            if bar is not None:
                bar.close()
            label = "input" if what == "start" else f"probe token {what}"
            bar = tqdm(total=total, desc=f"attention ({label})", unit="layer", leave=False, file=sys.stderr)
        bar.update(1)

    try:
        text = {} if args.text is None else {"text": args.text}
        report = attention_report(
            model,
            tokenizer,
            **text,
            probe_token=args.probe_token,
            prefix=prefix,
            per_head=args.per_head,
            position_layer=args.position_layer,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    report.model = args.model
    report.adapter = str(args.adapter) if args.adapter is not None else None
    print(report.table())
    if args.plot:
        from ..analysis.inspect.attention_plots import plot_attention_heatmaps, plot_position, plot_sink_curve

        layers = args.heatmap_layers or default_heatmap_layers(report)
        for path in (
            plot_attention_heatmaps(report, layers, Path(args.plot) / "attention_heatmaps.png"),
            plot_sink_curve(report, Path(args.plot) / "attention_sink.png"),
            plot_position(report, Path(args.plot) / "attention_position.png"),
        ):
            print(f"plot written to {path}")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser(
        "attention",
        help="attention sinks per layer and where the probe token stands (Sun et al., House of Cards Fig. 2)",
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument(
        "--text", default=None, help="probe text after the probe token (default 'Summer is warm. Winter is cold.')"
    )
    p.add_argument(
        "--probe-token",
        type=token_arg,
        default=None,
        help="the token put first and moved in the position experiment: an id or a text's first token "
        "(default: the input's first token, as the tokenizer feeds it)",
    )
    add_prefix_options(p)
    p.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="LoRA/DoRA adapter folder: attention of MODEL + adapter (the massive layer is located on MODEL)",
    )
    p.add_argument("--per-head", action="store_true", help="also every head's key shares (JSON)")
    p.add_argument(
        "--position-layer",
        type=int,
        default=None,
        help="layer of the position experiment's summary and figure (default: the layer after the massive "
        "one with the largest sink share)",
    )
    p.add_argument(
        "--heatmap-layers",
        type=indices_arg,
        default=None,
        help="comma-separated layers for attention_heatmaps.png (default: massive, massive+1, last)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="folder for attention_heatmaps.png, attention_sink.png, attention_position.png",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_attention)
