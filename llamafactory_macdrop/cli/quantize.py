"""``macdrop quantize``: round-to-nearest fake quantization with super weights kept, evaluated."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEFAULT_TEXT, check_model, load_model, load_tokenizer, text_prefix
from .evaluation import (
    add_corpus_options,
    add_generation_options,
    add_super_weight_option,
    add_zeroshot_options,
    gen_items_path,
    generation_suite,
    prepare_corpora,
    quiet_progress,
    read_generation,
    read_sources,
    resolve_sources,
    resolve_super_weights,
    zeroshot_evaluator,
)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Every bits x block size x clip x protection on one loaded model (docs/superweights.md)."""
    import torch

    from ..analysis.attack.quantization import (
        ModelQuantizer,
        QuantizationError,
        QuantizationReport,
        parse_bits,
        parse_block_sizes,
        parse_clip,
        parse_protect,
        quant_settings,
        run_quantization_sweep,
    )
    from ..core.architectures import find_ffn_blocks

    # everything that can be checked before the model loads
    settings = quant_settings(
        parse_bits(args.bits),
        parse_block_sizes(args.block_size),
        [parse_clip(c) for c in args.clip.split(",") if c.strip()] or [parse_clip("none")],
        parse_protect(args.protect),
    )
    if args.k < 1:
        raise QuantizationError(f"--k {args.k} is not allowed: give a number >= 1")
    sources, tasks = read_sources(args, need_text=False)
    gen_tasks, judge = read_generation(args, args.model)
    if not (sources or tasks or gen_tasks):
        raise QuantizationError("nothing to evaluate: give --text-file, --dataset, --zeroshot or --gen-tasks")
    check_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise QuantizationError(f"{args.model}: no tokenizer found next to the model")
    resolved = resolve_sources(sources, tokenizer, args.model)  # a --bos the tokenizer cannot serve: before loading
    protects = {s.protect for s in settings}
    probing = bool(protects & {"sw", "sw+massive"} or args.super_weight)
    prefix = text_prefix(args, tokenizer, args.model) if probing else None
    if args.no_progress:
        quiet_progress()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, args.dtype).to(device)
    blocks = find_ffn_blocks(model)
    sws, massive = [], None
    if probing:
        from ..analysis.inspect.activations import probe_input_ids

        sws = resolve_super_weights(
            args.super_weight, model, probe_input_ids(tokenizer, args.probe_text, prefix), blocks
        )
        if not sws and protects & {"sw", "sw+massive"}:
            raise QuantizationError("--protect sw: the probe found no super weight; give --super-weight LAYER,ROW,COL")
    if "sw+massive" in protects:
        from ..core.first_token import template_first_token
        from ..core.locator import locate_massive_weights

        located = locate_massive_weights(
            model, args.k, tokenizer=tokenizer, first_token=template_first_token(tokenizer), blocks=blocks
        )
        massive = (located.layer, located.indices, located.expert)
    quantizer = ModelQuantizer(model, sws, massive, blocks)
    print(
        f"quantize: {args.model} ({args.dtype}) on {device}; {len(quantizer.saved)} weights, "
        f"{quantizer.num_values / 1e6:,.1f}M values in {len(blocks)} decoder layers (embeddings, norms, LM head "
        "stay as they are)"
        + (f"; super weights: {', '.join(map(str, sws))}" if sws else "")
        + (f"; massive rows: layer {massive[0]} {massive[1]}" if massive else "")
    )
    for bs in dict.fromkeys(s.block_size for s in settings if s.quantized and s.block_size is not None):
        n = quantizer.fallbacks(bs)
        if n:
            print(
                f"  block size {bs}: does not divide {n} of {len(quantizer.saved)} weights, those are quantized "
                "as one block (whole tensor)"
            )
    if prefix is not None:
        print(f"  probe text: {prefix.describe()} + {args.probe_text!r}")
    corpora = prepare_corpora(sources, model, tokenizer, resolved=resolved)
    zeroshot = zeroshot_evaluator(args, tasks, model, tokenizer)
    suite = generation_suite(args, gen_tasks, judge, model, tokenizer)

    report = QuantizationReport(
        model=args.model,
        dtype=args.dtype,
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
        batch_size=args.batch_size,
        progress=not args.no_progress,
        echo=print,
        generation=suite,
    )
    print()
    if report.rows:
        print(report.table())
    if report.gen_rows:
        print()
        print(report.gen_table(report.key, lambda key: report.setting_label(key)))
        grid = report.grid_table(report.key, lambda key: report.setting_label(key))
        if grid:
            print()
            print(grid)
    print("weights restored bitwise after every setting: yes")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    if args.csv:
        print(f"written to {report.write_csv(args.csv)}")
    items = gen_items_path(args)
    if report.gen_items and items is not None:
        print(f"written to {report.write_gen_items(items)}")
    if args.plot and report.rows:
        from ..analysis.attack.plots import plot_quantization

        print(f"plot written to {plot_quantization(report, Path(args.plot) / 'quantize.png')}")
    if args.plot and any("length" in r for r in report.gen_rows):
        from ..analysis.attack.plots import plot_needle_heatmap

        label = lambda r: report.setting_label(report.key(r))  # noqa: E731
        print(f"plot written to {plot_needle_heatmap(report, Path(args.plot) / 'needle_heatmap.png', label)}")
    return 0


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser(
        "quantize",
        help="round-to-nearest fake quantization (blocks, clipping, super weights kept): perplexity and zero-shot",
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--bits", default="8,6,4", help="comma-separated bit widths (default 8,6,4)")
    p.add_argument(
        "--block-size",
        default="128,4096,tensor",
        help="comma-separated block sizes in elements, or tensor (default 128,4096,tensor)",
    )
    p.add_argument(
        "--clip",
        default="none",
        help="comma-separated: none, zscore:Z, block_pct:P, tensor_pct:P (P in %%), iqr:F (default none)",
    )
    p.add_argument(
        "--protect",
        default="none,sw",
        help="comma-separated: none, sw (super weights kept), sw+massive (also the top-k massive rows of "
        "W_up/W_gate) (default none,sw)",
    )
    add_super_weight_option(p)
    p.add_argument("--k", type=int, default=5, help="sw+massive: how many massive rows (default 5)")
    p.add_argument(
        "--probe-text",
        default=DEFAULT_TEXT,
        help="input of the super-weight probe (what the tokenizer puts first, --bos/--bos-token, + text)",
    )
    add_corpus_options(p)
    add_zeroshot_options(p)
    add_generation_options(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="folder for quantize.png (metric vs block size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
