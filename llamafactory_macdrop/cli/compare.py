"""``macdrop compare``: plain LoRA vs MacDrop (and a grid), seeds, one evaluation, one report."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from .evaluation import add_corpus_options, add_generation_options, add_zeroshot_options


def _default_train_command() -> list[str]:
    """``llamafactory-cli train`` of this interpreter's environment (found even when it is not on PATH)."""
    here = Path(sys.executable).parent / "llamafactory-cli"
    return [str(here) if here.is_file() else (shutil.which("llamafactory-cli") or "llamafactory-cli"), "train"]


def _child_env() -> dict:
    """The environment for the training command: ours, with this interpreter's bin folder first on
    PATH, so what LLaMA-Factory's launcher starts (torchrun, deepspeed) comes from the same
    environment as ``llamafactory-cli`` even when it is not activated."""
    import os

    env = dict(os.environ)
    here = str(Path(sys.executable).parent)
    if here not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = here + os.pathsep + env.get("PATH", "")
    return env


def _ks(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers >= 1 (e.g. 1,3,5) or none"
        ) from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be >= 1 (the clean model is always evaluated)")
    return ks


def _check_ks(base: dict, ks: list[int]) -> None:
    """The largest k against the rows the base YAML names and the model's width (config.json), before training."""
    from ..analysis.compare.runs import CompareError
    from ..core.model_config import read_config_json

    if not ks:
        return
    indices = base.get("macdrop_indices")
    if indices and max(ks) > len(indices):
        raise CompareError(
            f"--k-sweep {max(ks)} exceeds the {len(indices)} rows macdrop_indices names: allowed 1..{len(indices)}"
        )
    found = read_config_json(str(base["model_name_or_path"]))
    width = found[1].get("intermediate_size") if found else None
    if isinstance(width, int) and max(ks) > width:
        raise CompareError(f"--k-sweep {max(ks)} is larger than the intermediate size {width}: allowed 1..{width}")


FAMILIES = ("ppl", "zeroshot", "gen")


def _robustness(text: str) -> str:
    """``all`` or comma-separated families measured under the attacks (ppl is always among them)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in (*FAMILIES, "all")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give all or comma-separated families of {', '.join(FAMILIES)}")
    return text


def _families(text: str) -> set[str]:
    names = {t.strip() for t in text.split(",") if t.strip()}
    return set(FAMILIES) if "all" in names else names | {"ppl"}


def _read_base(path: Path) -> dict:
    import yaml

    from ..analysis.compare.runs import CompareError

    if not path.is_file():
        raise CompareError(f"{path} does not exist: give an LLaMA-Factory training YAML")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CompareError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: expected a mapping of LLaMA-Factory keys")
    if not data.get("model_name_or_path"):
        raise CompareError(f"{path}: model_name_or_path is missing")
    if str(data.get("finetuning_type", "lora")) != "lora":
        raise CompareError(
            f"{path}: finetuning_type={data['finetuning_type']} is not allowed: a comparison trains "
            "LoRA/DoRA adapters (finetuning_type: lora)"
        )
    for key in ("additional_target", "resize_vocab"):
        if data.get(key):
            raise CompareError(
                f"{path}: {key} is not supported by compare (the adapter would carry trained copies of base "
                "modules, which cannot be removed from the one shared base the arms are evaluated on)"
            )
    if data.get("adapter_name_or_path"):
        raise CompareError(
            f"{path}: adapter_name_or_path is not supported by compare (every arm is evaluated as "
            "base + its own adapter; merge earlier adapters into the base first)"
        )
    return data


def cmd_compare(args: argparse.Namespace) -> int:
    from ..analysis.attack.attacks import sweep_settings
    from ..analysis.compare.runs import (
        CompareError,
        move_aside,
        parse_grid,
        parse_seeds,
        plan_arms,
        plan_runs,
        train,
    )
    from ..plugin.keys import MacDropConfigError
    from ..plugin.lf.arguments import check_train_config
    from .evaluation import read_generation, read_sources

    if args.no_progress:  # first: tqdm reads TQDM_DISABLE when it is imported (LLaMA-Factory's checks import it)
        from .evaluation import quiet_progress

        quiet_progress()
    # ---- everything that can be checked before anything trains or loads
    base = _read_base(args.config)
    seeds = parse_seeds(args.seeds)
    grid = parse_grid(args.grid or [])
    root = args.output_dir or Path(str(base.get("output_dir", "outputs/run")).rstrip("/") + "-compare")
    arms, notes = plan_arms(base, grid)
    runs = plan_runs(arms, seeds, root)
    command = shlex.split(args.train_command) if args.train_command else _default_train_command()
    sources, tasks, settings = [], [], []
    if not args.no_eval:
        sources, tasks = read_sources(args, need_text=False)
        gen_tasks, judge = read_generation(args, str(base["model_name_or_path"]))
        if not (sources or tasks or gen_tasks):
            raise CompareError(
                "nothing to evaluate: give --text-file, --dataset, --zeroshot or --gen-tasks (or --no-eval)"
            )
        modes = [m.strip() for m in args.mode.split(",") if m.strip()]
        if any(m not in ("zero", "retain") for m in modes):
            raise CompareError(
                f"--mode {args.mode!r} is not allowed: compare's robustness attacks are zero and/or retain"
            )
        settings = sweep_settings(modes, args.k_sweep)
        _check_ks(base, args.k_sweep)
        _check_base_inputs(base, sources)
        if args.bootstrap < 100:
            raise CompareError(f"--bootstrap {args.bootstrap} is not allowed: give at least 100 iterations")
        if not 0 < args.confidence < 1:
            raise CompareError(f"--confidence {args.confidence} is not allowed: give a number between 0 and 1")
    for arm in arms:
        try:
            check_train_config({**arm.config, "output_dir": str(root / arm.name / "seed0"), "seed": seeds[0]})
        except MacDropConfigError as err:
            raise CompareError(f"arm {arm.name}: {err} (nothing was trained)") from None
    stale = [r for r in runs if r.state() == "stale"]
    if stale:
        raise CompareError(
            f"{stale[0].name} in {stale[0].output_dir} was trained with other settings ({stale[0].stale_key()}): "
            "use another --output-dir or move that folder away (nothing was trained)"
        )
    if base.get("quantization_bit"):
        notes.append(
            f"quantization_bit={base['quantization_bit']}: the adapters are evaluated on the base loaded in "
            f"{args.dtype}, not quantized"
        )
    for note in notes:
        print(f"[compare] note: {note}")
    print(f"[compare] {len(arms)} arms x {len(seeds)} seeds under {root}; training with: {shlex.join(command)} CONFIG")
    print("  arm" + " " * 29 + "  ".join(f"seed {s:<4}" for s in seeds))
    for arm in arms:
        states = [r.state() for r in runs if r.arm is arm]
        print(
            f"  {arm.name:<32}"
            + "  ".join(f"{s:<9}" for s in states)
            + (f"  (paired with {arm.control})" if arm.control else "")
        )
    if args.plan_only:
        return 0

    # ---- training: one normal LLaMA-Factory run per arm x seed
    env = _child_env()
    train_start = time.time()
    for i, run in enumerate(runs, 1):
        state = run.state()
        if state == "finished":
            print(f"[compare] {i}/{len(runs)} {run.name}: finished before, skipped")
            continue
        if state == "crashed":
            print(
                f"[compare] {i}/{len(runs)} {run.name}: unfinished folder moved aside to {move_aside(run.output_dir)}"
            )
        print(f"[compare] {i}/{len(runs)} training {run.name} -> {run.output_dir} (log {run.log_path})", flush=True)
        seconds = train(run, command, stream_output=not args.quiet_train, env=env)
        print(f"[compare] {i}/{len(runs)} {run.name}: trained in {seconds:.0f} s", flush=True)
    trained_for = time.time() - train_start
    if args.no_eval:
        print("[compare] --no-eval: every run is trained; rerun without --no-eval to evaluate")
        return 0
    return _evaluate(
        args, base, root, arms, runs, seeds, sources, tasks, settings, notes, trained_for, gen_tasks, judge
    )


def _check_base_inputs(base: dict, sources) -> None:
    """The base model's folder and what its tokenizer puts before the corpora (--bos/--bos-token),
    before anything trains."""
    from ..analysis.compare.runs import CompareError
    from .common import check_model, load_tokenizer
    from .evaluation import resolve_sources

    model_path = base["model_name_or_path"]  # _read_base made sure it is there
    check_model(str(model_path))
    if sources:
        tokenizer = load_tokenizer(str(model_path))
        if tokenizer is None:
            raise CompareError(f"{model_path}: no tokenizer found next to the model (the corpora need one)")
        resolve_sources(sources, tokenizer, str(model_path))


def _evaluate(
    args, base, root, arms, runs, seeds, sources, tasks, settings, notes, trained_for, gen_tasks=None, judge=None
) -> int:
    import torch

    from ..analysis.attack.attacks import AttackError, AttackTargets
    from ..analysis.compare.evaluation import (
        OneBaseEvaluator,
        evaluate_runs,
        library_versions,
        text_digest,
        trained_rows_note,
    )
    from ..analysis.compare.paired import metric_value
    from ..analysis.compare.report import CompareReport, RunRecord, pair_all
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights
    from .common import load_model, load_tokenizer
    from .evaluation import generation_suite, prepare_corpora, zeroshot_evaluator

    model_path = str(base["model_name_or_path"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    eval_start = time.time()
    print(
        f"[compare] evaluation: loading {model_path} once ({args.dtype}, {device}); every adapter is attached to it in turn"
    )
    model, tokenizer = load_model(model_path, args.dtype).to(device), load_tokenizer(model_path)
    if tokenizer is None:
        raise AttackError(f"{model_path}: no tokenizer found next to the model")
    probe = base.get("macdrop_probe_token")
    located = locate_massive_weights(
        model,
        max([s.k for s in settings] + [1]),
        tokenizer=tokenizer,
        layer=base.get("macdrop_layer"),
        indices=base.get("macdrop_indices"),
        probe_token=probe,
        first_token=template_first_token(tokenizer) if probe is None else None,
    )
    targets = AttackTargets(located.layer, located.indices, expert=located.expert)
    print(f"  attacks: the base model's massive rows, layer {targets.layer} (0-based), rows {targets.indices}")
    corpora = prepare_corpora(sources, model, tokenizer)
    zeroshot = zeroshot_evaluator(args, tasks, model, tokenizer)
    suite = generation_suite(args, gen_tasks, judge, model, tokenizer)
    protocol = {
        "model": model_path,
        "dtype": args.dtype,
        "device": device,
        "settings": [s.label for s in settings],
        "targets": targets.to_dict(),
        "batch_size": args.batch_size,
        "robustness": args.robustness,
        "corpora": [{**c.protocol(), "text_sha256_16": text_digest(c.source.text)} for c in corpora],
        "zeroshot": {
            "tasks": tasks,
            "limit": args.limit,
            "splits": zeroshot.splits() if zeroshot else {},
            "prefix": zeroshot.prefix.protocol() if zeroshot else None,
            "data": str(args.zeroshot_data) if args.zeroshot_data else "packaged",
            "batch_size": args.zeroshot_batch_size,
        },
        "generation": suite.protocol() if suite is not None else None,
    }
    evaluator = OneBaseEvaluator(
        model,
        model_path,
        targets,
        settings,
        corpora,
        zeroshot,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        protocol=protocol,
        zeroshot_under_attack="zeroshot" in _families(args.robustness),
        generation=suite,
        generation_under_attack="gen" in _families(args.robustness),
    )
    items, reused = evaluate_runs(evaluator, runs, root, echo=lambda line: print(line, flush=True))
    eval_seconds = time.time() - eval_start
    notes += [n for n in (trained_rows_note(r, targets) for r in runs) if n]
    values = {key: {m: metric_value(v) for m, v in got.items()} for key, got in items.items()}
    base_record = RunRecord("base", None, None, values[("base", None)], evaluation_reused=reused[("base", None)])
    records = [
        RunRecord(
            r.arm.name,
            r.seed,
            str(r.output_dir),
            values[(r.arm.name, r.seed)],
            r.train_info(),
            reused[(r.arm.name, r.seed)],
        )
        for r in runs
    ]
    paired = pair_all(arms, seeds, items, iterations=args.bootstrap, confidence=args.confidence)
    protocol["versions"] = library_versions()
    train_total = sum(r.train.get("seconds") or 0 for r in records)
    report = CompareReport(
        str(args.config),
        str(root),
        seeds,
        [a.to_dict() for a in arms],
        model_path,
        protocol,
        base_record,
        records,
        paired,
        notes,
        restored_bitwise=True,
        cost={
            "training (sum over runs)": train_total,
            "training (this call)": trained_for,
            "evaluation (this call)": eval_seconds,
            **({"of which generation tasks (this call)": evaluator.gen_seconds} if suite is not None else {}),
        },
    )
    headline = report.headline_metrics()
    print("\nper arm (mean ± sd over seeds):")
    print(report.arms_table(headline))
    print("\npaired difference (arm − control):")
    print(report.paired_table(headline))
    print()
    for line in report.verdicts():
        print(f"verdict: {line}")
    print("base weights restored bitwise after every adapter (SHA-256 of every tensor): yes")
    plots = {}
    if not args.no_plot:
        from ..analysis.compare.plots import plot_losses, plot_metrics, plot_paired, plot_robustness
        from ..analysis.compare.runs import read_log_history

        folder = args.plot or (root / "plots")
        plots["metrics"] = plot_metrics(report, folder / "compare_metrics.png")
        if report.paired:
            plots["paired"] = plot_paired(report, folder / "compare_paired.png")
        if any(" k=" in m for m in report.metric_names()):
            plots["robustness"] = plot_robustness(report, folder / "compare_robustness.png")
        histories = {(r.arm.name, r.seed): read_log_history(r.output_dir) for r in runs}
        plots["loss"] = plot_losses(histories, folder / "compare_loss.png")
        for path in plots.values():
            print(f"plot written to {path}")
    md_path = args.report or (root / "report.md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    rel = {k: _relative(v, md_path.parent) for k, v in plots.items()}
    md_path.write_text(report.markdown(rel))
    print(f"report written to {md_path}")
    json_path = args.json or (root / "compare.json")
    print(f"written to {report.write_json(json_path)}")
    if args.csv:
        print(f"written to {report.write_csv(args.csv)}")
    return 0


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser(
        "compare", help="plain LoRA vs MacDrop (and a grid) over seeds: train, evaluate on one base, report"
    )
    p.add_argument("config", type=Path, help="the LLaMA-Factory training YAML every arm starts from")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="KEY=V1,V2",
        help="more MacDrop arms: a macdrop_* key (e.g. macdrop_p0=0.5,0.8; macdrop_curriculum=step,exp); "
        "use_dora=false,true makes LoRA and DoRA versions of both arms (repeatable: the product)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the runs go: DIR/ARM/seedS (default: the YAML's output_dir + '-compare')",
    )
    p.add_argument(
        "--train-command",
        default=None,
        help="how one run is trained, the YAML appended (default: llamafactory-cli train; launcher "
        "settings such as FORCE_TORCHRUN pass through the environment)",
    )
    p.add_argument("--plan-only", action="store_true", help="check every arm and print the plan; train nothing")
    p.add_argument("--no-eval", action="store_true", help="train the runs only")
    p.add_argument(
        "--quiet-train",
        action="store_true",
        help="training output to the log files; only the trainer's loss lines are shown",
    )
    add_corpus_options(p)
    add_zeroshot_options(p)
    add_generation_options(p, items_option=False)
    p.add_argument(
        "--mode", default="zero,retain", help="robustness attacks on the base's massive rows (default zero,retain)"
    )
    p.add_argument(
        "--robustness",
        type=_robustness,
        default="all",
        help="which families are measured under the attacks: all (default), or comma-separated ppl, zeroshot, gen "
        "(the others on the clean model only; generation is the expensive one)",
    )
    p.add_argument(
        "--k-sweep", type=_ks, default=[1, 3, 5], help="k values of the attacks (default 1,3,5; none: clean only)"
    )
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap iterations of the paired intervals (default 2000)"
    )
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None, help="default: DIR/compare.json")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="markdown report (default: DIR/report.md)")
    p.add_argument("--plot", type=Path, default=None, help="folder for the figures (default: DIR/plots)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (evaluation, and the training runs' own)"
    )
    p.set_defaults(func=cmd_compare)
