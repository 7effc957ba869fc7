"""``md.locate``, ``md.activations``, ``md.superweight``, ``md.attention``: what is in a model.

Each takes a model folder or a loaded model (+ ``tokenizer=``), the command's options as keywords
(docs/cli.md; :mod:`.options` reads them as the command line does), checks what it can before
anything loads, and returns the report the command prints (``.table()``), writes with ``--json``
(``.to_dict()``, ``.write_json(path)``) and draws with ``--plot`` (``.plot(folder)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.probing import JsonReport
from .model_input import ModelInput, refuse_load_options
from .options import namespace

Echo = Optional[Callable[[str], None]]


# ----------------------------------------------------------------------------- locate
@dataclass
class LocateReport(JsonReport):
    """The locator's answer, the other detectors' cross-check and the published position, if any."""

    schema = "macdrop.locator/1"

    result: Any  # core.locator.LocatorResult
    cross_check: Any = None  # analysis.inspect.cross_check.LayerAgreement
    published: Any = None  # core.published comparison
    layer_by_layer: Optional[str] = None  # what reading one layer at a time cost

    def payload(self) -> dict[str, Any]:
        out = self.result.payload()
        if self.cross_check is not None:
            out["cross_check"] = self.cross_check.to_dict()
        if self.published is not None:
            out["published"] = self.published.to_dict()
        return out

    def table(self) -> str:
        lines = [self.layer_by_layer] if self.layer_by_layer else []
        lines.append(self.result.table())
        if self.cross_check is not None:
            lines.append(self.cross_check.line())
            lines += [f"warning: {w}" for w in self.cross_check.warnings()]
        if self.published is not None:
            lines.append(f"published: {self.published.message}")
        return "\n".join(lines)

    def plot(self, folder: str | Path) -> list[Path]:
        """The intermediate state's bars at the massive layer (and MoE routing); needs a probe run."""
        from ..analysis.inspect.plots import plot_intermediate_bars
        from ..errors import MacDropError

        result = self.result
        if result.intermediate is None:
            raise MacDropError("--plot needs a probe run (not both --layer and --indices)")
        out = [
            plot_intermediate_bars(
                result.intermediate, result.indices, Path(folder) / "locate_intermediate.png", result.layer
            )
        ]
        if result.routing:  # MoE: router probability of the probe token per layer and expert
            from ..analysis.inspect.attention_plots import plot_routing

            out.append(plot_routing(result, Path(folder) / "locate_routing.png"))
        return out


def _use_layer_by_layer(flag: Optional[bool], source: ModelInput) -> bool:
    """Explicit flag, else automatic for local checkpoints larger than half the free memory."""
    if source.loaded:
        return False
    if flag is not None:
        return flag
    from ..analysis.inspect.streaming import checkpoint_bytes

    size = checkpoint_bytes(source.path) if Path(source.path).is_dir() else 0
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return size > free / 2


def locate(model, *, tokenizer=None, echo: Echo = print, **options) -> LocateReport:
    """``macdrop locate``: the massive layer and its top-k rows, cross-checked, matched to published positions."""
    from ..analysis.models.loading import ModelPathError, torch_dtype
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights
    from .checks import check_indices, check_k

    source = ModelInput(model, tokenizer)
    args = namespace("locate", {"model": source.label}, options)
    refuse_load_options(source, options, ("dtype",))
    source.check()
    if source.loaded and options.get("layer_by_layer"):
        raise ModelPathError("layer_by_layer=True reads a folder one layer at a time: give the folder, not a model")
    check_k("--k", args.k, source.config(), source.config_source())
    check_indices("--indices", args.indices, source.config(), source.config_source())
    entry = published_entry(args.published, source)
    tok = source.tokenizer
    if args.template is not None and tok is None:
        raise ModelPathError(f"--template {args.template}: {source.label} has no tokenizer to apply it to")
    template = None
    if args.template is not None and args.probe_token is None:
        from ..plugin.integration import lf_template  # LLaMA-Factory's registry, through the one module that imports it

        template = lf_template(args.template)
    first = template_first_token(tok, template, args.template) if args.probe_token is None else None
    kwargs = dict(
        tokenizer=tok, layer=args.layer, indices=args.indices, probe_token=args.probe_token, first_token=first
    )
    report = LocateReport(None)
    if _use_layer_by_layer(args.layer_by_layer, source):
        from ..analysis.inspect.streaming import locate_layer_by_layer

        result, stats = locate_layer_by_layer(source.path, args.k, dtype=torch_dtype(args.dtype), **kwargs)
        passes = max(len(result.candidates), 1)
        report.layer_by_layer = (
            f"layer by layer: read layers {min(stats.layers_loaded)}..{max(stats.layers_loaded)}"
            + (f" ({passes} probe passes, {len(stats.layers_loaded)} layer reads)" if passes > 1 else "")
            + f", peak {stats.peak_bytes / 2**20:,.0f} MiB of parameters in memory"
        )
    else:
        loaded = source.load(args.dtype)
        with source.in_use(loaded):
            result = locate_massive_weights(loaded, args.k, **kwargs)
            if result.probe_token_id is not None and tok is not None:
                report.cross_check = _cross_check(loaded, tok, result)
    result.model = source.label
    report.result = result
    if entry is not None and result.indices:
        from ..analysis.inspect.published import compare_massive

        report.published = compare_massive(entry, result.layer, result.indices, result.expert)
    return report


def published_entry(files, source: ModelInput):
    """The published position this model's config matches (packaged table + ``published`` files), or
    None. User files are read (and refused in one line) before the model loads."""
    from ..analysis.inspect.published import load_published, match_config

    entries = load_published(files or [])
    config = source.config()
    return match_config(config, entries) if config is not None else None


def _cross_check(model, tokenizer, located):
    """The activation and super-weight detectors on the default text, as the tokenizer feeds it."""
    from ..analysis.inspect.activations import probe_input_ids
    from ..analysis.inspect.cross_check import cross_check
    from ..core.text_prefix import resolve_prefix
    from .checks import DEFAULT_TEXT

    prefix = resolve_prefix(tokenizer)
    return cross_check(
        model, probe_input_ids(tokenizer, DEFAULT_TEXT, prefix), located, f"{prefix.describe()} + {DEFAULT_TEXT!r}"
    )


# ----------------------------------------------------------------------------- activations, super weights
def text_prefix(args, source: ModelInput):
    """The prefix of the probe texts, from ``bos`` / ``bos_token`` (checked before the model loads)."""
    from ..core.text_prefix import resolve_prefix

    config_bos, vocab = source.facts()
    bos = getattr(args, "bos", None)
    return resolve_prefix(
        source.tokenizer,
        "stream" if bos == "window" else bos,
        getattr(args, "bos_token", None),
        config_bos=config_bos,
        vocab_size=vocab,
    )


def activations(model, *, tokenizer=None, echo: Echo = print, **options):
    """``macdrop activations``: per-layer magnitudes and Sun et al.'s massive activations, cross-checked."""
    from ..analysis.inspect.activations import activation_report, probe_input_ids
    from ..analysis.inspect.cross_check import locate_as_cli, probe_label
    from .checks import check_at_least, check_text

    source = ModelInput(model, tokenizer)
    args = namespace("activations", {"model": source.label}, options)
    refuse_load_options(source, options, ("dtype",))
    check_text("--probe-text", args.probe_text)
    check_at_least("--abs-threshold", args.abs_threshold, 0)
    check_at_least("--median-ratio", args.median_ratio, 1, above=True)
    source.require_tokenizer("the probe text needs one")
    prefix = text_prefix(args, source)  # before the model loads
    loaded = source.load(args.dtype)
    with source.in_use(loaded):
        ids = probe_input_ids(source.tokenizer, args.probe_text, prefix)
        report = activation_report(
            loaded, ids, abs_threshold=args.abs_threshold, median_ratio=args.median_ratio, tokenizer=source.tokenizer
        )
        located = locate_as_cli(loaded, source.tokenizer, 1)
    report.model, report.prefix = source.label, prefix
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
    return report


def superweight(model, *, tokenizer=None, echo: Echo = print, **options):
    """``macdrop superweight``: super-weight candidates (Yu et al.) checked against the locator; with
    ``stopwords=True`` also the stop-word shift (``report.stopwords``)."""
    from ..analysis.inspect.activations import probe_input_ids
    from ..analysis.inspect.cross_check import locate_as_cli, probe_label
    from ..analysis.inspect.superweight import find_super_weights
    from .checks import check_at_least, check_k, check_text, check_text_files

    source = ModelInput(model, tokenizer)
    args = namespace("superweight", {"model": source.label}, options)
    refuse_load_options(source, options, ("dtype",))
    check_text("--probe-text", args.probe_text)
    check_at_least("--top", args.top, 1)
    check_at_least("--threshold", args.threshold, 0)
    check_k("--k", args.k, source.config(), source.config_source())
    if args.stopwords:
        check_text_files(args.text_file)
    source.require_tokenizer("the probe text needs one")
    prefix = text_prefix(args, source)  # before the model loads
    entry = published_entry(args.published, source)
    loaded = source.load(args.dtype)
    with source.in_use(loaded):
        ids = probe_input_ids(source.tokenizer, args.probe_text, prefix)
        report = find_super_weights(loaded, ids, threshold=args.threshold, top=args.top)
        report.model, report.prefix = source.label, prefix
        located = locate_as_cli(loaded, source.tokenizer, args.k)
        report.check_against(located.layer, located.indices, probe_label(located))
        if entry is not None and report.candidates:
            from ..analysis.inspect.published import compare_super_weights

            comparison = compare_super_weights(entry, [(c.layer, c.row, c.col) for c in report.candidates])
            if comparison.reported:
                report.published = comparison.to_dict()
        if args.stopwords:
            report.stopwords = _stopwords(args, source, loaded, ids)
    return report


def _stopwords(args, source: ModelInput, model, ids):
    """The stop-word shift when the super weight(s) are zeroed (docs/superweights.md)."""
    from ..analysis.attack.stopwords import stopword_shift, stopword_token_ids
    from ..analysis.evaluate.perplexity import load_text_file, make_windows, resolve_protocol, tokenize
    from ..core.architectures import find_ffn_blocks
    from .evaluation import resolve_super_weights

    tokenizer = source.tokenizer
    blocks = find_ffn_blocks(model)
    sws = resolve_super_weights(args.super_weight, model, ids, blocks)
    words = stopword_token_ids(tokenizer, args.stopword_tokens)
    windows, names = [], []
    config_bos, vocab = source.facts()
    for path in args.text_file:
        src = load_text_file(path, {"seq_len": args.seq_len, "bos": args.bos, "bos_token": args.bos_token})
        protocol, used = resolve_protocol(src.protocol, tokenizer, config_bos, vocab)
        w = make_windows(tokenize(tokenizer, src.text), protocol, used.token_ids)
        windows += (list(w.full.split(1)) if w.full.shape[0] else []) + ([w.tail] if w.tail is not None else [])
        names.append(src.name)
    if not windows:
        windows, names = [ids], ["--probe-text"]
    return stopword_shift(model, windows, words, sws, blocks, texts=names, model_label=source.label)


# ----------------------------------------------------------------------------- attention
def _check_layers(args, config: Optional[dict]) -> None:
    """Layer options against the checkpoint's layer count, before the model loads."""
    from ..analysis.inspect.attention import AttentionError
    from ..core.model_config import decoder_config

    n = decoder_config(config).get("num_hidden_layers", config.get("n_layer")) if config else None
    if not isinstance(n, int):
        return
    for option, values in (
        ("--position-layer", [args.position_layer] if args.position_layer is not None else []),
        ("--heatmap-layers", args.heatmap_layers or []),
    ):
        bad = [v for v in values if not 0 <= v < n]
        if bad:
            raise AttentionError(f"{option} {bad[0]} is out of range: the model has layers 0..{n - 1}")


def attention(model, *, tokenizer=None, echo: Echo = print, **options):
    """``macdrop attention``: attention sinks per layer and the position experiment."""
    from ..analysis.inspect.attention import AttentionError, attention_report

    source = ModelInput(model, tokenizer)
    args = namespace("attention", {"model": source.label}, options)
    refuse_load_options(source, options, ("dtype",))
    source.check()
    _check_layers(args, source.config())
    if args.probe_text is not None and not args.probe_text.strip():
        raise AttentionError(f"--probe-text {args.probe_text!r} is not allowed: give a text of at least one token")
    if args.probe_token is not None and (args.bos is not None or args.bos_token is not None):
        raise AttentionError("--probe-token puts its token first: give it, or --bos/--bos-token, not both")
    if args.adapter is not None:
        from ..analysis.models.loading import check_adapter

        check_adapter(args.adapter)  # config and weights file readable, before anything loads
    source.require_tokenizer("the probe text needs one")
    prefix = text_prefix(args, source) if args.probe_token is None else None  # before loading
    loaded = source.load(args.dtype)
    bars = _LayerBars(not args.no_progress)
    with source.in_use(loaded):
        if args.adapter is not None:
            loaded = source.attach(loaded, args.adapter)
        try:
            text = {} if args.probe_text is None else {"text": args.probe_text}
            report = attention_report(
                loaded,
                source.tokenizer,
                **text,
                probe_token=args.probe_token,
                prefix=prefix,
                per_head=args.per_head,
                position_layer=args.position_layer,
                progress=bars.update,
            )
        finally:
            bars.close()
    report.model = source.label
    report.adapter = str(args.adapter) if args.adapter is not None else None
    report.heatmap_layers = args.heatmap_layers
    return report


@dataclass
class _LayerBars:
    """ONE progress bar over every forward pass (the input, then each placement of the position
    experiment), layer by layer (stderr); its total grows as each pass starts."""

    enabled: bool
    bar: Any = field(default=None)

    def update(self, what, done, total) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc="attention", unit="layer", leave=False, file=sys.stderr)
        if done == 1:
            self.bar.total += total
            self.bar.set_description(f"attention ({'input' if what == 'start' else f'probe token {what}'})")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
