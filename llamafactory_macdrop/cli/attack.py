"""``macdrop attack``: top-k zeroing/retaining, super-weight and activation attacks, evaluated."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    DEFAULT_TEXT,
    check_indices,
    check_model,
    indices_arg,
    load_model,
    load_tokenizer,
    text_prefix,
    token_arg,
)
from .evaluation import (
    add_corpus_options,
    add_generation_options,
    add_super_weight_option,
    add_zeroshot_options,
    resolve_super_weights,
)


def _ks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2,3,5,10") from None


def cmd_attack(args: argparse.Namespace) -> int:
    """Attack sweep: locate, then every setting x corpus/task on one loaded model (docs/attacks.md)."""
    import torch

    from ..analysis.attack.attacks import (
        AttackError,
        AttackTargets,
        ModelAttacker,
        massive_activation_target,
        set_activation_cutoffs,
        sweep_settings,
    )
    from ..analysis.attack.sweep import AttackReport, run_sweep
    from ..analysis.models.loading import attach_adapter
    from ..core.architectures import find_ffn_blocks
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights
    from .evaluation import (
        gen_items_path,
        generation_suite,
        prepare_corpora,
        quiet_progress,
        read_generation,
        read_sources,
        resolve_sources,
        zeroshot_evaluator,
    )

    # everything that can be checked before the model loads
    ks = args.k_sweep if args.k_sweep is not None else [args.k]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    try:
        scales = [float(x) for x in args.scale.split(",") if x.strip()]
    except ValueError:
        raise AttackError(f"--scale {args.scale!r} is not allowed: give comma-separated numbers, e.g. 0,2") from None
    fills = [f.strip() for f in args.fill.split(",") if f.strip()]
    settings = sweep_settings(modes, ks, scales=scales, fills=fills)
    generating = _generation_plan(args, settings)
    sources, tasks = read_sources(args, need_text=False)
    gen_tasks, judge = read_generation(args, args.model)
    if not (sources or tasks or generating or gen_tasks):
        raise AttackError("nothing to evaluate: give --text-file, --dataset, --zeroshot, --gen-tasks or --generate")
    if args.adapter is not None:
        from ..analysis.models.loading import check_adapter

        check_adapter(args.adapter)  # config and weights file readable, before anything loads
    check_model(args.model)
    check_indices("--indices", args.indices, args.model)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise AttackError(f"{args.model}: no tokenizer found next to the model")
    resolved = resolve_sources(sources, tokenizer, args.model)
    probes = any(s.mode in ("superweight", "activation", "sw_restore") for s in settings)
    prefix = text_prefix(args, tokenizer, args.model) if probes else None

    if args.no_progress:  # transformers', datasets' and lm-eval's bars too (tqdm reads TQDM_DISABLE)
        quiet_progress()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, args.dtype).to(device)
    blocks = find_ffn_blocks(model)
    size = (
        max(b.intermediate_size for b in blocks)
        if args.layer is None
        else next((b.intermediate_size for b in blocks if b.index == args.layer), blocks[0].intermediate_size)
    )
    max_k = max(s.k for s in settings)
    if max_k > size:
        raise AttackError(f"--k {max_k} is larger than the intermediate size {size}: allowed 1..{size}")
    if args.adapter is not None:
        model = attach_adapter(model, args.adapter, args.model)
        blocks = find_ffn_blocks(model)

    first = template_first_token(tokenizer) if args.probe_token is None else None  # as `macdrop locate` probes
    located = locate_massive_weights(
        model,
        max(max_k, 1) if args.indices is None else len(args.indices),
        tokenizer=tokenizer,
        layer=args.layer,
        indices=args.indices,
        probe_token=args.probe_token,
        first_token=first,
        blocks=blocks,
    )
    if args.indices is not None and max_k > len(args.indices):
        raise AttackError(f"--k {max_k} exceeds the {len(args.indices)} rows given by --indices")
    targets = AttackTargets(located.layer, located.indices, expert=located.expert)
    if probes:
        from ..analysis.inspect.activations import probe_input_ids

        ids = probe_input_ids(tokenizer, args.probe_text, prefix)
        if any(s.mode in ("superweight", "sw_restore") for s in settings):
            targets.super_weights = resolve_super_weights(args.super_weight, model, ids, blocks)
            targets.super_weight = targets.super_weights[0] if targets.super_weights else None
        if any(s.mode == "sw_restore" for s in settings) and targets.super_weights:
            set_activation_cutoffs(model, ids, targets.super_weights, blocks)
        if any(s.mode == "activation" for s in settings):
            targets.activations = massive_activation_target(model, ids, blocks)
    attacker = ModelAttacker(model, targets, blocks)
    print(
        f"attack: {args.model}{' + adapter ' + str(args.adapter) if args.adapter else ''} on {device}; "
        f"massive layer {targets.layer} (0-based), rows {targets.indices}"
        + (f", expert {targets.expert}" if targets.expert is not None else "")
        + (f"; super weight {', '.join(map(str, targets.super_weights))}" if targets.super_weights else "")
    )
    if prefix is not None:
        print(f"  probe text: {prefix.describe()} + {args.probe_text!r}")

    corpora = prepare_corpora(sources, model, tokenizer, resolved=resolved)
    zeroshot = zeroshot_evaluator(args, tasks, model, tokenizer)
    suite = generation_suite(args, gen_tasks, judge, model, tokenizer)

    report = AttackReport(
        model=args.model,
        adapter=str(args.adapter) if args.adapter else None,
        targets=targets.to_dict(),
        probe_prefix=prefix.protocol() if prefix is not None else None,
    )
    run_sweep(
        model,
        attacker,
        settings,
        corpora,
        zeroshot,
        report=report,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        echo=print,
        generation=suite,
    )
    gens = _generate(args, model, tokenizer, attacker, generating, report) if generating else []
    print()
    if report.rows:
        print(report.table())
    if any(s.mode == "sw_restore" for s in settings):
        from ..analysis.attack.sweep import loss_gap_recovery, recovery_table

        report.recovery = loss_gap_recovery(report)
        print(recovery_table(report.recovery))
    if report.gen_rows:
        print()
        print(report.gen_table(lambda r: r["setting"], str))
        grid = report.grid_table(lambda r: r["setting"], str)
        if grid:
            print()
            print(grid)
    if generating:
        from ..analysis.attack.generation import generations_table

        print(generations_table(gens))
    print("weights restored bitwise after the sweep: yes")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    items = gen_items_path(args)
    if report.gen_items and items is not None:
        print(f"written to {report.write_gen_items(items)}")
    if args.csv:
        print(f"written to {report.write_csv(args.csv)}")
    if generating and args.generate_report:
        from ..analysis.attack.generation import write_generation_report

        title = (
            f"{args.model}{' + adapter ' + str(args.adapter) if args.adapter else ''}: greedy generation under attack"
        )
        print(f"written to {write_generation_report(args.generate_report, gens, args.generate, title)}")
    if args.plot and report.rows:
        from ..analysis.attack.plots import plot_attack_sweep

        print(f"plot written to {plot_attack_sweep(report, Path(args.plot) / 'attack_sweep.png')}")
        if sum(s.mode == "superweight" for s in settings) > 1:
            from ..analysis.attack.plots import plot_superweight_scaling

            print(f"plot written to {plot_superweight_scaling(report, Path(args.plot) / 'superweight_scaling.png')}")
    if args.plot and report.gen_rows:
        from ..analysis.attack.plots import plot_generation_sweep

        print(f"plot written to {plot_generation_sweep(report, Path(args.plot) / 'generation_sweep.png')}")
        if any("length" in r for r in report.gen_rows):
            from ..analysis.attack.plots import plot_needle_heatmap

            print(f"plot written to {plot_needle_heatmap(report, Path(args.plot) / 'needle_heatmap.png')}")
    return 0


def _generation_plan(args: argparse.Namespace, settings):
    """The settings that generate (None without --generate); every generation option checked before the model loads."""
    from ..analysis.attack.attacks import AttackError
    from ..analysis.attack.generation import select_settings

    given = [
        o
        for o, v in (
            ("--generate-settings", args.generate_settings),
            ("--generate-report", args.generate_report),
            ("--no-chat-template", args.no_chat_template or None),
        )
        if v is not None
    ]
    if args.generate is None:
        if given:
            raise AttackError(f"{given[0]} needs --generate PROMPT")
        return None
    if not args.generate.strip():
        raise AttackError("--generate '' is not allowed: give a prompt")
    if args.max_new_tokens < 1:
        raise AttackError(f"--max-new-tokens {args.max_new_tokens} is not allowed: give a number >= 1")
    if args.generate_report is not None and args.generate_report.suffix.lower() not in (".md", ".html", ".htm"):
        raise AttackError(f"--generate-report {args.generate_report}: the name must end in .md, .html or .htm")
    return select_settings(settings, args.generate_settings)


def _generate(args, model, tokenizer, attacker, settings, report) -> list:
    """Greedy generation for each chosen setting into ``report.generations`` (bitwise restore checked after each)."""
    from ..analysis.attack.generation import generate_under_attack, prompt_ids

    _, templated = prompt_ids(tokenizer, args.generate, not args.no_chat_template)
    print(
        f"  generate: greedy, at most {args.max_new_tokens} new tokens, "
        + (
            "chat template applied"
            if templated
            else "no chat template" + (" (the tokenizer has none)" if not args.no_chat_template else "")
        )
        + f"; {len(settings)} settings"
    )
    gens = generate_under_attack(
        model,
        tokenizer,
        attacker,
        settings,
        args.generate,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        echo=None if args.no_progress else print,
    )
    report.generations = [g.to_dict() for g in gens]
    report.generate_protocol = {
        "prompt": args.generate,
        "chat_template": templated,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
    }
    return gens


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser(
        "attack", help="top-k zeroing/retaining (and super-weight, activation) attacks: perplexity and zero-shot"
    )
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument(
        "--mode",
        default="zero,retain",
        help="comma-separated: zero, retain, superweight, activation, sw_restore (default: zero,retain)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=int, default=5, help="top-k rows for zero/retain (default 5)")
    group.add_argument("--k-sweep", type=_ks, default=None, help="comma-separated k values, e.g. 0,1,2,3,5,10")
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=indices_arg, default=None, help="comma-separated row override (ranked)")
    p.add_argument("--probe-token", type=token_arg, default=None, help="as in macdrop locate")
    p.add_argument(
        "--scale", default="0", help="superweight: comma-separated factors for the super weight (0 = zero it)"
    )
    add_super_weight_option(p)
    p.add_argument(
        "--fill",
        default="zero",
        help="activation: zero and/or mean (comma-separated): what the massive activations become",
    )
    p.add_argument(
        "--probe-text",
        default=DEFAULT_TEXT,
        help="input for the super-weight/activation probes (what the tokenizer puts first, --bos/--bos-token, + text)",
    )
    p.add_argument("--adapter", type=Path, default=None, help="LoRA/DoRA adapter folder evaluated on top of MODEL")
    add_corpus_options(p)
    add_zeroshot_options(p)
    add_generation_options(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="folder for attack_sweep.png (metric vs k)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen = p.add_argument_group("generation under attack (docs/attacks.md)")
    gen.add_argument(
        "--generate",
        default=None,
        metavar="PROMPT",
        help="greedy continuation of PROMPT for the original model and each setting, side by side",
    )
    gen.add_argument("--max-new-tokens", type=int, default=40, help="generation: at most N new tokens (default 40)")
    gen.add_argument("--no-chat-template", action="store_true", help="generation: feed the prompt as plain text")
    gen.add_argument(
        "--generate-settings",
        default=None,
        help="which settings generate: labels ('zero k=5') or MODE[:VALUE] filters (zero:5, retain, "
        "superweight:0, activation:mean), comma-separated (default: all; the original always)",
    )
    gen.add_argument(
        "--generate-report", type=Path, default=None, help="write the texts side by side to a .md or .html file"
    )
    p.set_defaults(func=cmd_attack)
