"""``macdrop locate | activations | superweight``: where the massive weights and activations of a model are."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import (
    DEFAULT_TEXT,
    ModelPathError,
    OptionError,
    add_prefix_options,
    check_at_least,
    check_indices,
    check_k,
    check_model,
    check_text,
    check_text_files,
    indices_arg,
    load_model,
    load_tokenizer,
    text_prefix,
    token_arg,
    torch_dtype,
)


def _use_layer_by_layer(args: argparse.Namespace) -> bool:
    """Explicit flag, else automatic for local checkpoints larger than half the free memory."""
    if args.layer_by_layer is not None:
        return args.layer_by_layer
    from ..analysis.inspect.streaming import checkpoint_bytes

    size = checkpoint_bytes(args.model) if Path(args.model).is_dir() else 0
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return size > free / 2


def cmd_locate(args: argparse.Namespace) -> int:
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights

    check_model(args.model)
    check_k("--k", args.k, args.model)
    check_indices("--indices", args.indices, args.model)
    entry = _published_entry(args)
    tokenizer = load_tokenizer(args.model)
    if args.template is not None and tokenizer is None:
        raise ModelPathError(f"--template {args.template}: {args.model} has no tokenizer to apply it to")
    template = None
    if args.template is not None and args.probe_token is None:
        from ..plugin.integration import (
            lf_template,  # LLaMA-Factory's registry, through the one module that imports it
        )

        template = lf_template(args.template)
    first = template_first_token(tokenizer, template, args.template) if args.probe_token is None else None
    kwargs = dict(
        tokenizer=tokenizer, layer=args.layer, indices=args.indices, probe_token=args.probe_token, first_token=first
    )
    if _use_layer_by_layer(args):
        from ..analysis.inspect.streaming import locate_layer_by_layer

        result, stats = locate_layer_by_layer(args.model, args.k, dtype=torch_dtype(args.dtype), **kwargs)
        passes = max(len(result.candidates), 1)
        print(
            f"layer by layer: read layers {min(stats.layers_loaded)}..{max(stats.layers_loaded)}"
            + (f" ({passes} probe passes, {len(stats.layers_loaded)} layer reads)" if passes > 1 else "")
            + f", peak {stats.peak_bytes / 2**20:,.0f} MiB of parameters in memory"
        )
        agreement = None
    else:
        model = load_model(args.model, args.dtype)
        result = locate_massive_weights(model, args.k, **kwargs)
        agreement = _cross_check(model, tokenizer, result) if result.probe_token_id is not None else None
    result.model = args.model
    print(result.table())
    extra = {}
    if agreement is not None:
        print(agreement.line())
        for warning in agreement.warnings():
            print(f"warning: {warning}")
        extra["cross_check"] = agreement.to_dict()
    if entry is not None and result.indices:
        from ..core.published import compare_massive

        comparison = compare_massive(entry, result.layer, result.indices, result.expert)
        print(f"published: {comparison.message}")
        extra["published"] = comparison.to_dict()
    if args.plot:
        from ..analysis.inspect.plots import plot_intermediate_bars

        if result.intermediate is None:
            raise OptionError("--plot needs a probe run (not both --layer and --indices)")
        path = plot_intermediate_bars(
            result.intermediate, result.indices, Path(args.plot) / "locate_intermediate.png", result.layer
        )
        print(f"plot written to {path}")
        if result.routing:  # MoE: router probability of the probe token per layer and expert
            from ..analysis.inspect.attention_plots import plot_routing

            print(f"plot written to {plot_routing(result, Path(args.plot) / 'locate_routing.png')}")
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result.to_dict(), **extra}, indent=1) + "\n")
        print(f"written to {args.json}")
    return 0


def _published_entry(args: argparse.Namespace, model=None):
    """The published position this model's config matches (packaged table + --published files), or
    None. User files are read (and refused in one line) before the model loads."""
    from ..core.model_config import read_config_json
    from ..core.published import load_published, match_config

    entries = load_published(args.published or [])
    found = read_config_json(args.model)
    config = found[1] if found is not None else None
    if config is None and model is not None:
        config = model.config.to_dict()
    return match_config(config, entries) if config is not None else None


def _cross_check(model, tokenizer, located):
    """``locate``: the activation and super-weight detectors on the default text, as the tokenizer feeds it."""
    from ..analysis.inspect.activations import probe_input_ids
    from ..analysis.inspect.cross_check import cross_check
    from ..core.text_prefix import resolve_prefix

    if tokenizer is None:
        return None
    prefix = resolve_prefix(tokenizer)
    return cross_check(
        model, probe_input_ids(tokenizer, DEFAULT_TEXT, prefix), located, f"{prefix.describe()} + {DEFAULT_TEXT!r}"
    )


def _need_tokenizer(args: argparse.Namespace):
    """MODEL checked and its tokenizer loaded, before the model: the probe text needs one."""
    check_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ModelPathError(f"{args.model}: no tokenizer found next to the model (the probe text needs one)")
    return tokenizer


def cmd_activations(args: argparse.Namespace) -> int:
    from ..analysis.inspect.activations import activation_report, probe_input_ids
    from ..analysis.inspect.cross_check import locate_as_cli, probe_label

    check_text("--text", args.text)
    check_at_least("--abs-threshold", args.abs_threshold, 0)
    check_at_least("--median-ratio", args.median_ratio, 1, above=True)
    tokenizer = _need_tokenizer(args)
    prefix = text_prefix(args, tokenizer, args.model)  # before the model loads
    model = load_model(args.model, args.dtype)
    ids = probe_input_ids(tokenizer, args.text, prefix)
    report = activation_report(
        model, ids, abs_threshold=args.abs_threshold, median_ratio=args.median_ratio, tokenizer=tokenizer
    )
    report.model, report.prefix = args.model, prefix
    located = locate_as_cli(model, tokenizer, 1)
    report.cross_check = {
        "locator_layer": located.layer,
        "locator_probe": probe_label(located),
        "activations_layer": report.origin_layer,
    }
    if report.origin_layer is not None and report.origin_layer != located.layer:
        report.warnings.append(
            f"the massive activations start at layer {report.origin_layer}, the locator names layer "
            f"{located.layer} ({probe_label(located)}): check what the text starts with (--bos, --bos-token)"
        )
    print(report.table())
    if args.plot:
        from ..analysis.inspect.plots import plot_intermediate_bars, plot_layer_profile

        print(f"plot written to {plot_layer_profile(report, Path(args.plot) / 'activations_layers.png')}")
        if report.origin_intermediate is not None:
            values = report.origin_intermediate
            top = values.topk(min(5, values.numel())).indices.tolist()
            path = plot_intermediate_bars(
                values, top, Path(args.plot) / "activations_intermediate.png", report.origin_layer
            )
            print(f"plot written to {path}")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    return 0


def cmd_superweight(args: argparse.Namespace) -> int:
    from ..analysis.inspect.activations import probe_input_ids
    from ..analysis.inspect.cross_check import locate_as_cli, probe_label
    from ..analysis.inspect.superweight import find_super_weights

    check_text("--text", args.text)
    check_at_least("--top", args.top, 1)
    check_at_least("--threshold", args.threshold, 0)
    check_model(args.model)
    check_k("--k", args.k, args.model)
    if args.stopwords:
        check_text_files(args.text_file)
    tokenizer = _need_tokenizer(args)
    prefix = text_prefix(args, tokenizer, args.model)  # before the model loads
    entry = _published_entry(args)
    model = load_model(args.model, args.dtype)
    report = find_super_weights(
        model, probe_input_ids(tokenizer, args.text, prefix), threshold=args.threshold, top=args.top
    )
    report.model, report.prefix = args.model, prefix
    located = locate_as_cli(model, tokenizer, args.k)
    report.check_against(located.layer, located.indices, probe_label(located))
    if entry is not None and report.candidates:
        from ..core.published import compare_super_weights

        comparison = compare_super_weights(entry, [(c.layer, c.row, c.col) for c in report.candidates])
        if comparison.reported:
            report.published = comparison.to_dict()
    print(report.table())
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    if args.stopwords:
        _stopwords(args, model, tokenizer)
    return 0


def _stopwords(args: argparse.Namespace, model, tokenizer) -> None:
    """``superweight --stopwords``: the stop-word shift when the super weight(s) are zeroed (docs/superweights.md)."""
    from ..analysis.evaluate.perplexity import load_text_file, make_windows, resolve_protocol, tokenize
    from ..analysis.inspect.activations import probe_input_ids
    from ..analysis.inspect.stopwords import stopword_shift, stopword_token_ids
    from ..core.architectures import find_ffn_blocks
    from .common import config_facts
    from .evaluation import resolve_super_weights

    blocks = find_ffn_blocks(model)
    prefix = text_prefix(args, tokenizer, args.model)
    ids = probe_input_ids(tokenizer, args.text, prefix)
    sws = resolve_super_weights(args.super_weight, model, ids, blocks)
    words = stopword_token_ids(tokenizer, args.stopword_tokens)
    windows, names = [], []
    config_bos, vocab = config_facts(args.model)
    for path in args.text_file:
        src = load_text_file(path, {"seq_len": args.seq_len, "bos": args.bos, "bos_token": args.bos_token})
        protocol, used = resolve_protocol(src.protocol, tokenizer, config_bos, vocab)
        w = make_windows(tokenize(tokenizer, src.text), protocol, used.token_ids)
        windows += (list(w.full.split(1)) if w.full.shape[0] else []) + ([w.tail] if w.tail is not None else [])
        names.append(src.name)
    if not windows:
        windows, names = [ids], ["--text"]
    report = stopword_shift(model, windows, words, sws, blocks, texts=names, model_label=args.model)
    print()
    print(report.table())
    print("super weights restored bitwise: yes")
    if args.stopwords_json:
        print(f"written to {report.write_json(args.stopwords_json)}")
    if args.plot:
        from ..analysis.inspect.plots import plot_stopwords

        print(f"plot written to {plot_stopwords(report, Path(args.plot) / 'stopwords.png')}")


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser("locate", help="find the massive layer and top-k massive weights of a model")
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--k", type=int, default=5, help="how many rows: 1..intermediate size (default 5)")
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=indices_arg, default=None, help="comma-separated row override")
    p.add_argument(
        "--probe-token",
        type=token_arg,
        default=None,
        help="token fed alone: an id, or a text whose first token is used (default: the first candidate "
        "with a massive activation: what the template/tokenizer puts first, then BOS, then EOS)",
    )
    p.add_argument(
        "--template",
        default=None,
        help="LLaMA-Factory template NAME (as in the training YAML): its first token is the first "
        "candidate (default: the tokenizer's chat template, else a BOS the tokenizer prepends)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write macdrop_locator.json-style output here (plus cross_check and published)",
    )
    _published_option(p)
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="folder for a bar plot of the intermediate state (and, for MoE models, the routing heatmap)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--layer-by-layer",
        dest="layer_by_layer",
        action="store_true",
        default=None,
        help="read one layer at a time from safetensors (default: when the checkpoint exceeds half the free memory)",
    )
    group.add_argument("--full-load", dest="layer_by_layer", action="store_false")
    p.set_defaults(func=cmd_locate)

    for name, func, text in (
        ("activations", cmd_activations, "per-layer activation magnitudes and massive activations (Sun et al.)"),
        ("superweight", cmd_superweight, "candidate super weights of the down projections (Yu et al.)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
        p.add_argument(
            "--text",
            default=DEFAULT_TEXT,
            help="probe text, not empty; the input is what the tokenizer puts first (if anything) + its tokens",
        )
        add_prefix_options(p)
        p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
        p.set_defaults(func=func)
        if name == "activations":
            p.add_argument(
                "--plot", type=Path, default=None, help="folder for the layer profile and intermediate bar plots"
            )
            p.add_argument(
                "--abs-threshold", type=float, default=100.0, help="massive: |a| above this; >= 0 (default 100)"
            )
            p.add_argument(
                "--median-ratio",
                type=float,
                default=1000.0,
                help="massive: |a| above this times the layer median; > 1 (default 1000)",
            )
        else:
            p.add_argument(
                "--threshold",
                type=float,
                default=None,
                help="keep layers whose down output spike exceeds this; >= 0 (default: >= 0.5 x the largest)",
            )
            p.add_argument("--top", type=int, default=3, help="at most this many candidates; >= 1 (default 3)")
            p.add_argument(
                "--k",
                type=int,
                default=5,
                help="cross-check: the locator's top-k massive rows; 1..intermediate size (default 5)",
            )
            _published_option(p)
            _stopword_options(p)


def _published_option(p) -> None:
    p.add_argument(
        "--published",
        type=Path,
        action="append",
        default=None,
        metavar="FILE",
        help="also compare with the positions in FILE (repeatable; the format of the packaged "
        "core/published_positions.json, docs/locator.md)",
    )


def _stopword_options(p) -> None:
    from ..analysis.inspect.stopwords import STOP_WORDS
    from .evaluation import add_super_weight_option

    p.add_argument(
        "--stopwords",
        action="store_true",
        help="also measure the stop-word shift: next-token probability of stop words, super weight(s) zeroed",
    )
    p.add_argument(
        "--stopword-tokens",
        nargs="+",
        default=list(STOP_WORDS),
        metavar="WORD",
        help=f"the stop words (default: {' '.join(STOP_WORDS)})",
    )
    add_super_weight_option(p)
    p.add_argument(
        "--text-file",
        type=Path,
        nargs="+",
        default=[],
        help="--stopwords: text files to measure over (default: --text)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="--stopwords: tokens per window (default 4096)")
    p.add_argument("--stopwords-json", type=Path, default=None, help="write the stop-word report as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="--stopwords: folder for stopwords.png")
