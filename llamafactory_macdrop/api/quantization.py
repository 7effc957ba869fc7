"""``md.quantize``: round-to-nearest fake quantization with super weights kept, evaluated on one load."""

from __future__ import annotations

from typing import Callable, Optional

from .model_input import ModelInput, refuse_load_options
from .options import namespace

Echo = Optional[Callable[[str], None]]


def quantize(model, *, tokenizer=None, echo: Echo = print, **options):
    """Every bits x block size x clip x protection setting on one loaded model, each undone bit for bit.

    ``options``: ``macdrop quantize``'s options by name (docs/cli.md), e.g. ``bits=[8, 4]``,
    ``block_size=["tensor", 4096]``, ``protect="none,sw"``, ``text_file=["wiki.txt"]``. Returns a
    :class:`~..analysis.quantize.report.QuantizationReport`."""
    from .evaluation import progress_quieted

    with progress_quieted(options.get("no_progress") is True):
        return _quantize(model, tokenizer=tokenizer, echo=echo, **options)


def _quantize(model, *, tokenizer=None, echo: Echo = print, **options):
    """``quantize`` without the progress handling (:func:`quantize`)."""
    from ..analysis.inspect.activations import probe_input_ids
    from ..analysis.quantize.quantizer import ModelQuantizer
    from ..analysis.quantize.report import QuantizationReport, run_quantization_sweep
    from ..analysis.quantize.rtn import (
        QuantizationError,
        parse_bits,
        parse_block_sizes,
        parse_clip,
        parse_protect,
        quant_settings,
    )
    from ..core.architectures import find_ffn_blocks
    from ..core.values import comma_list
    from .attacks import sweep_checkpoint
    from .evaluation import (
        device_for,
        generation_suite,
        prepare_corpora,
        read_generation,
        read_sources,
        resolve_sources,
        resolve_super_weights,
        zeroshot_evaluator,
    )
    from .inspection import text_prefix

    source = ModelInput(model, tokenizer)
    args = namespace("quantize", {"model": source.label}, options)
    refuse_load_options(source, options)
    say = echo or (lambda line: None)

    # everything that can be checked before the model loads
    settings = quant_settings(
        parse_bits(args.bits),
        parse_block_sizes(args.block_size),
        [parse_clip(c) for c in comma_list(args.clip)] or [parse_clip("none")],
        parse_protect(args.protect),
    )
    if args.k < 1:
        raise QuantizationError(f"--k {args.k} is not allowed: give a number >= 1")
    sources, tasks = read_sources(args, need_text=False)
    gen_tasks, judge = read_generation(args, source)
    if not (sources or tasks or gen_tasks):
        raise QuantizationError("nothing to evaluate: give --text-file, --dataset, --zeroshot or --gen-tasks")
    tok = source.require_tokenizer("the evaluation needs one")
    resolved = resolve_sources(sources, tok, source.facts())  # a --bos the tokenizer cannot serve: before loading
    protects = {s.protect for s in settings}
    probing = bool(protects & {"sw", "sw+massive"} or args.super_weight)
    prefix = text_prefix(args, source) if probing else None

    device = device_for(args.device) if not source.loaded else str(next(source.module.parameters()).device)
    loaded = source.load(args.dtype, device)
    dtype = args.dtype if not source.loaded else str(next(loaded.parameters()).dtype).replace("torch.", "")
    with source.in_use(loaded):
        blocks = find_ffn_blocks(loaded)
        sws, massive = [], None
        if probing:
            sws = resolve_super_weights(
                args.super_weight, loaded, probe_input_ids(tok, args.probe_text, prefix), blocks
            )
            if not sws and protects & {"sw", "sw+massive"}:
                raise QuantizationError(
                    "--protect sw: the probe found no super weight; give --super-weight LAYER,ROW,COL"
                )
        if "sw+massive" in protects:
            from ..core.first_token import template_first_token
            from ..core.locator import locate_massive_weights

            located = locate_massive_weights(
                loaded, args.k, tokenizer=tok, first_token=template_first_token(tok), blocks=blocks
            )
            massive = (located.layer, located.indices, located.expert)
        quantizer = ModelQuantizer(loaded, sws, massive, blocks)
        say(
            f"quantize: {source.label} ({dtype}) on {device}; {len(quantizer.saved)} weights, "
            f"{quantizer.num_values / 1e6:,.1f}M values in {len(blocks)} decoder layers (embeddings, norms, LM head "
            "stay as they are)"
            + (f"; super weights: {', '.join(map(str, sws))}" if sws else "")
            + (f"; massive rows: layer {massive[0]} {massive[1]}" if massive else "")
        )
        for bs in dict.fromkeys(s.block_size for s in settings if s.quantized and s.block_size is not None):
            n = quantizer.fallbacks(bs)
            if n:
                say(
                    f"  block size {bs}: does not divide {n} of {len(quantizer.saved)} weights, those are quantized "
                    "as one block (whole tensor)"
                )
        if prefix is not None:
            say(f"  probe text: {prefix.describe()} + {args.probe_text!r}")
        corpora = prepare_corpora(sources, loaded, tok, echo=say, resolved=resolved)
        zeroshot = zeroshot_evaluator(args, tasks, loaded, tok, echo=say)
        suite = generation_suite(args, gen_tasks, judge, loaded, tok, echo=say)
        report = QuantizationReport(
            model=source.label,
            dtype=dtype,
            weights={"count": len(quantizer.saved), "values": quantizer.num_values, "layers": len(blocks)},
            super_weights=[{"layer": s.layer, "row": s.row, "col": s.col} for s in sws],
            massive={"layer": massive[0], "indices": massive[1]} if massive else None,
            probe_prefix=prefix.protocol() if prefix is not None else None,
        )
        run_quantization_sweep(
            quantizer,
            settings,
            corpora,
            zeroshot,
            report=report,
            batch_size=args.ppl_batch_size,
            progress=not args.no_progress,
            echo=echo,
            generation=suite,
            checkpoint=sweep_checkpoint(args, source, loaded, report, settings, corpora, zeroshot, suite, device, say),
        )
    return report
