"""``md.attack``: top-k zeroing/retaining, super-weight and activation attacks, evaluated on one load.

The order is the command line's: every option checked (and the tokenizer read) before the model
loads; then locate, build the targets, prepare every evaluator once, run THE sweep
(analysis/sweep/loop.py), and greedy generation under attack if asked. The report is returned:
``.table()`` is what ``macdrop attack`` prints, ``.to_dict()`` its ``--json``, ``.plot(folder)``
its ``--plot`` figures.
"""

from __future__ import annotations

from typing import Callable, Optional

from .model_input import ModelInput, refuse_load_options
from .options import namespace

Echo = Optional[Callable[[str], None]]

#: ``--generate``'s budget when ``max_new_tokens`` is not given (the generation tasks keep their own)
GENERATE_MAX_NEW_TOKENS = 40


def attack(model, *, tokenizer=None, echo: Echo = print, **options):
    """Every attack setting x corpus / zero-shot task / generation task on one loaded model.

    ``model``: a model folder, or a loaded model with ``tokenizer=``. ``options``: ``macdrop
    attack``'s options by their names (docs/cli.md), e.g. ``mode="zero,retain"`` or
    ``mode=["zero", "retain"]``, ``k=5`` or ``k=[0, 1, 5]`` (a sweep, as ``--k-sweep``),
    ``text_file=["wiki.txt"]``, ``zeroshot=["arc_easy"]``, ``gen_tasks=["nq_open"]``, ``limit=50``.
    ``echo`` gets the progress lines (None: silent). Returns an
    :class:`~..analysis.attack.report.AttackReport`."""
    from .evaluation import progress_quieted

    with progress_quieted(options.get("no_progress") is True):
        return _attack(model, tokenizer=tokenizer, echo=echo, **options)


def _attack(model, *, tokenizer=None, echo: Echo = print, **options):
    """``attack`` without the progress handling (:func:`attack`)."""
    from ..analysis.attack.attacks import (
        AttackError,
        AttackTargets,
        ModelAttacker,
        massive_activation_target,
        set_activation_cutoffs,
        sweep_settings,
    )
    from ..analysis.attack.report import AttackReport, loss_gap_recovery, run_sweep
    from ..analysis.inspect.activations import probe_input_ids
    from ..core.architectures import find_ffn_blocks
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights
    from ..core.values import comma_list
    from .checks import check_indices
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

    if isinstance(options.get("k"), (list, tuple)):  # k=[0, 1, 5] is the sweep
        if options.get("k_sweep") is not None:
            raise AttackError("give k as a list or k_sweep, not both")
        options["k_sweep"] = options.pop("k")
    source = ModelInput(model, tokenizer)
    args = namespace("attack", {"model": source.label}, options)
    refuse_load_options(source, options)
    say = echo or (lambda line: None)

    # everything that can be checked before the model loads
    ks = args.k_sweep if args.k_sweep is not None else [args.k]
    modes = comma_list(args.mode)
    try:
        scales = [float(x) for x in comma_list(args.scale)]
    except ValueError:
        raise AttackError(f"--scale {args.scale!r} is not allowed: give comma-separated numbers, e.g. 0,2") from None
    fills = comma_list(args.fill)
    settings = sweep_settings(modes, ks, scales=scales, fills=fills)
    generating = _generation_plan(args, settings)
    sources, tasks = read_sources(args, need_text=False)
    gen_tasks, judge = read_generation(args, source)
    if not (sources or tasks or generating or gen_tasks):
        raise AttackError("nothing to evaluate: give --text-file, --dataset, --zeroshot, --gen-tasks or --generate")
    if args.adapter is not None:
        from ..analysis.models.loading import check_adapter

        check_adapter(args.adapter)  # config and weights file readable, before anything loads
    tok = source.require_tokenizer("the evaluation needs one")
    check_indices("--indices", args.indices, source.config(), source.config_source())
    resolved = resolve_sources(sources, tok, source.facts())
    probes = any(s.mode in ("superweight", "activation", "sw_restore") for s in settings)
    prefix = text_prefix(args, source) if probes else None

    device = device_for(args.device) if not source.loaded else str(next(source.module.parameters()).device)
    loaded = source.load(args.dtype, device)
    blocks = find_ffn_blocks(loaded)
    size = (
        max(b.intermediate_size for b in blocks)
        if args.layer is None
        else next((b.intermediate_size for b in blocks if b.index == args.layer), blocks[0].intermediate_size)
    )
    max_k = max(s.k for s in settings)
    if max_k > size:
        raise AttackError(f"--k {max_k} is larger than the intermediate size {size}: allowed 1..{size}")
    with source.in_use(loaded):
        if args.adapter is not None:
            loaded = source.attach(loaded, args.adapter)
            blocks = find_ffn_blocks(loaded)
        first = template_first_token(tok) if args.probe_token is None else None  # as `macdrop locate` probes
        located = locate_massive_weights(
            loaded,
            max(max_k, 1) if args.indices is None else len(args.indices),
            tokenizer=tok,
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
            ids = probe_input_ids(tok, args.probe_text, prefix)
            if any(s.mode in ("superweight", "sw_restore") for s in settings):
                targets.super_weights = resolve_super_weights(args.super_weight, loaded, ids, blocks)
                targets.super_weight = targets.super_weights[0] if targets.super_weights else None
            if any(s.mode == "sw_restore" for s in settings) and targets.super_weights:
                set_activation_cutoffs(loaded, ids, targets.super_weights, blocks)
            if any(s.mode == "activation" for s in settings):
                targets.activations = massive_activation_target(loaded, ids, blocks)
        attacker = ModelAttacker(loaded, targets, blocks)
        say(
            f"attack: {source.label}{' + adapter ' + str(args.adapter) if args.adapter else ''} on {device}; "
            f"massive layer {targets.layer} (0-based), rows {targets.indices}"
            + (f", expert {targets.expert}" if targets.expert is not None else "")
            + (f"; super weight {', '.join(map(str, targets.super_weights))}" if targets.super_weights else "")
        )
        if prefix is not None:
            say(f"  probe text: {prefix.describe()} + {args.probe_text!r}")

        corpora = prepare_corpora(sources, loaded, tok, echo=say, resolved=resolved)
        zeroshot = zeroshot_evaluator(args, tasks, loaded, tok, echo=say)
        suite = generation_suite(args, gen_tasks, judge, loaded, tok, echo=say)
        report = AttackReport(
            model=source.label,
            adapter=str(args.adapter) if args.adapter else None,
            targets=targets.to_dict(),
            probe_prefix=prefix.protocol() if prefix is not None else None,
        )
        run_sweep(
            loaded,
            attacker,
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
        if generating:
            _generate(args, loaded, tok, attacker, generating, report, echo)
    if any(s.mode == "sw_restore" for s in settings):
        report.recovery = loss_gap_recovery(report)
    return report


def sweep_checkpoint(args, source, model, report, settings, corpora, zeroshot, suite, device, say):
    """The sweep's checkpoint (``checkpoint`` option), keyed on everything its rows depend on; None without one."""
    if args.checkpoint is None:
        return None
    from ..analysis.models.identity import digest, fingerprint, folder_identity, library_versions
    from ..analysis.sweep.checkpoint import SweepCheckpoint

    report.record_inputs(corpora, zeroshot)
    report.gen_protocol = suite.protocol() if suite is not None else None
    identity = folder_identity(source.path) if not source.loaded else digest(fingerprint(model))
    protocol = {
        "report": report.to_dict(),
        "settings": [s.label for s in settings],
        "model": identity,
        "adapter": folder_identity(getattr(args, "adapter", None)),
        "versions": library_versions(),
        "batch_size": args.ppl_batch_size,
        "zeroshot_batch_size": args.zeroshot_batch_size,
        "dtype": str(next(model.parameters()).dtype),
        "device": device,
    }
    checkpoint = SweepCheckpoint(args.checkpoint, protocol, say)
    if checkpoint.done:
        say(f"  checkpoint {args.checkpoint}: {len(checkpoint.done)} of {len(settings)} settings finished before")
    return checkpoint


def _generation_plan(args, settings):
    """The settings that generate (None without ``generate``); every generation option checked before the model loads."""
    from ..analysis.attack.attacks import AttackError
    from ..analysis.attack.generation import select_settings

    given = ["--generate-settings"] if args.generate_settings is not None else []
    if args.generate is None:
        if given:
            raise AttackError(f"{given[0]} needs --generate PROMPT")
        return None
    if not args.generate.strip():
        raise AttackError("--generate '' is not allowed: give a prompt")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise AttackError(f"--max-new-tokens {args.max_new_tokens} is not allowed: give a number >= 1")
    return select_settings(settings, args.generate_settings)


def _generate(args, model, tokenizer, attacker, settings, report, echo) -> None:
    """Greedy generation for each chosen setting into ``report.generations`` (bitwise restore checked after each)."""
    from ..analysis.attack.generation import generate_under_attack, prompt_ids

    budget = args.max_new_tokens if args.max_new_tokens is not None else GENERATE_MAX_NEW_TOKENS
    _, templated = prompt_ids(tokenizer, args.generate, not args.no_chat_template)
    if echo:
        echo(
            f"  generate: greedy, at most {budget} new tokens, "
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
        max_new_tokens=budget,
        chat_template=not args.no_chat_template,
        echo=None if args.no_progress else echo,
    )
    report.generations = [g.to_dict() for g in gens]
    report.generate_protocol = {
        "prompt": args.generate,
        "chat_template": templated,
        "max_new_tokens": budget,
        "decoding": "greedy",
    }
