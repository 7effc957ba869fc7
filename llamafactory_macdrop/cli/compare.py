"""``macdrop compare``: plain LoRA vs MacDrop (and a grid), seeds, one evaluation, one report."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from .evaluation import add_corpus_options, add_zeroshot_options


def _default_train_command() -> str:
    """``llamafactory-cli train`` of this interpreter's environment (found even when it is not on PATH)."""
    here = Path(sys.executable).parent / "llamafactory-cli"
    return f"{here if here.is_file() else (shutil.which('llamafactory-cli') or 'llamafactory-cli')} train"


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
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 1 (e.g. 1,3,5) or none") from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be >= 1 (the clean model is always evaluated)")
    return ks


def _read_base(path: Path) -> dict:
    import yaml

    from ..analysis.compare_runs import CompareError

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
        raise CompareError(f"{path}: finetuning_type={data['finetuning_type']} is not allowed: a comparison trains "
                           "LoRA/DoRA adapters (finetuning_type: lora)")
    if data.get("adapter_name_or_path"):
        raise CompareError(f"{path}: adapter_name_or_path is not supported by compare (every arm is evaluated as "
                           "base + its own adapter; merge earlier adapters into the base first)")
    return data


def cmd_compare(args: argparse.Namespace) -> int:
    from ..analysis.attacks import sweep_settings
    from ..analysis.compare_runs import (
        CompareError,
        move_aside,
        parse_grid,
        parse_seeds,
        plan_arms,
        plan_runs,
        train,
    )
    from ..plugin.integration import check_train_config
    from ..plugin.keys import MacDropConfigError
    from .evaluation import read_sources

    # ---- everything that can be checked before anything trains or loads
    base = _read_base(args.config)
    seeds = parse_seeds(args.seeds)
    grid = parse_grid(args.grid or [])
    root = args.output_dir or Path(str(base.get("output_dir", "outputs/run")).rstrip("/") + "-compare")
    arms, notes = plan_arms(base, grid)
    runs = plan_runs(arms, seeds, root)
    command = shlex.split(args.train_command or _default_train_command())
    sources, tasks, settings = [], [], []
    if not args.no_eval:
        sources, tasks = read_sources(args)
        settings = sweep_settings([m.strip() for m in args.mode.split(",") if m.strip()], args.k_sweep)
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
        raise CompareError(f"{stale[0].name} in {stale[0].output_dir} was trained with other settings ({stale[0].stale_key()}): "
                           "use another --output-dir or move that folder away (nothing was trained)")
    if base.get("quantization_bit"):
        notes.append(f"quantization_bit={base['quantization_bit']}: the adapters are evaluated on the base loaded in "
                     f"{args.dtype}, not quantized")
    for note in notes:
        print(f"[compare] note: {note}")
    print(f"[compare] {len(arms)} arms x {len(seeds)} seeds under {root}; training with: {shlex.join(command)} CONFIG")
    print("  arm" + " " * 29 + "  ".join(f"seed {s:<4}" for s in seeds))
    for arm in arms:
        states = [r.state() for r in runs if r.arm is arm]
        print(f"  {arm.name:<32}" + "  ".join(f"{s:<9}" for s in states)
              + (f"  (paired with {arm.control})" if arm.control else ""))
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
            print(f"[compare] {i}/{len(runs)} {run.name}: unfinished folder moved aside to {move_aside(run.output_dir)}")
        print(f"[compare] {i}/{len(runs)} training {run.name} -> {run.output_dir} (log {run.log_path})", flush=True)
        seconds = train(run, command, stream_output=not args.quiet_train, env=env)
        print(f"[compare] {i}/{len(runs)} {run.name}: trained in {seconds:.0f} s", flush=True)
    trained_for = time.time() - train_start
    if args.no_eval:
        print("[compare] --no-eval: every run is trained; rerun without --no-eval to evaluate")
        return 0
    return _evaluate(args, base, root, arms, runs, seeds, sources, tasks, settings, notes, trained_for)


def _evaluate(args, base, root, arms, runs, seeds, sources, tasks, settings, notes, trained_for) -> int:
    import json

    import torch

    from ..analysis.attacks import AttackError, AttackTargets
    from ..analysis.compare_eval import OneBaseEvaluator, text_digest
    from ..analysis.compare_report import CompareReport, RunRecord, higher_is_better
    from ..analysis.compare_runs import read_log_history
    from ..analysis.paired import metric_value, paired_difference
    from ..core.locator import LOCATOR_FILE, locate_massive_weights
    from .common import load_model, load_tokenizer
    from .evaluation import prepare_corpora, quiet_progress, zeroshot_evaluator

    if args.no_progress:
        quiet_progress()
    model_path = str(base["model_name_or_path"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    eval_start = time.time()
    print(f"[compare] evaluation: loading {model_path} once ({args.dtype}, {device}); every adapter is attached to it in turn")
    model, tokenizer = load_model(model_path, args.dtype).to(device), load_tokenizer(model_path)
    if tokenizer is None:
        raise AttackError(f"{model_path}: no tokenizer found next to the model")
    max_k = max([s.k for s in settings] + [1])
    located = locate_massive_weights(model, max_k, tokenizer=tokenizer, layer=base.get("macdrop_layer"),
                                     indices=base.get("macdrop_indices"), probe_token=base.get("macdrop_probe_token"))
    targets = AttackTargets(located.layer, located.indices, expert=located.expert)
    print(f"  attacks: the base model's massive rows, layer {targets.layer} (0-based), rows {targets.indices}")
    corpora = prepare_corpora(sources, model, tokenizer)
    zeroshot = zeroshot_evaluator(args, tasks, model, tokenizer)
    protocol = {"model": model_path, "dtype": args.dtype, "settings": [s.label for s in settings],
                "targets": targets.to_dict(),
                "corpora": [{**c.protocol(), "text_sha256_16": text_digest(c.source.text)} for c in corpora],
                "zeroshot": {"tasks": tasks, "limit": args.limit, "splits": zeroshot.splits() if zeroshot else {}}}
    protocol["robustness"] = args.robustness
    evaluator = OneBaseEvaluator(model, model_path, targets, settings, corpora, zeroshot, batch_size=args.batch_size,
                                 progress=not args.no_progress, protocol=protocol,
                                 zeroshot_under_attack=args.robustness == "all")
    base_items, reused = evaluator.evaluate_cached(root / "eval" / "base.json", None, "base")
    base_record = RunRecord("base", None, None, {m: metric_value(v) for m, v in base_items.items()}, evaluation_reused=reused)
    items, records = {}, []
    for i, run in enumerate(runs, 1):
        print(f"[compare] evaluating {i}/{len(runs)}: {run.name}", flush=True)
        items[(run.arm.name, run.seed)], reused = evaluator.evaluate_cached(
            root / "eval" / f"{run.arm.name}-seed{run.seed}.json", run.output_dir, run.name)
        if reused:
            print("  (items reused from an earlier evaluation with the same protocol)")
        records.append(RunRecord(run.arm.name, run.seed, str(run.output_dir),
                                 {m: metric_value(v) for m, v in items[(run.arm.name, run.seed)].items()},
                                 _train_info(run, read_log_history(run.output_dir)), reused))
        if run.arm.macdrop:
            trained = run.output_dir / LOCATOR_FILE
            if trained.is_file():
                t = json.loads(trained.read_text())
                if t.get("layer") != targets.layer or list(t.get("indices", []))[:len(targets.indices)] != targets.indices[:len(t.get("indices", []))]:
                    notes.append(f"{run.name} dropped layer {t.get('layer')} rows {t.get('indices')}; the attacks use "
                                 f"layer {targets.layer} rows {targets.indices} (located on the base here)")
    evaluator.verify_base()
    eval_seconds = time.time() - eval_start

    paired = []
    for arm in arms:
        if not arm.macdrop or arm.control is None:
            continue
        for metric in items[(arm.name, seeds[0])]:
            control = {s: items[(arm.control, s)][metric] for s in seeds}
            treatment = {s: items[(arm.name, s)][metric] for s in seeds}
            paired.append(paired_difference(metric, control, treatment, treatment_name=arm.name, control_name=arm.control,
                                            higher_is_better=higher_is_better(metric), iterations=args.bootstrap,
                                            confidence=args.confidence))
    train_total = sum(r.train.get("seconds") or 0 for r in records)
    report = CompareReport(str(args.config), str(root), seeds, [a.to_dict() for a in arms], model_path, protocol,
                           base_record, records, paired, notes, restored_bitwise=True,
                           cost={"training (sum over runs)": train_total, "training (this call)": trained_for,
                                 "evaluation (this call)": eval_seconds})
    headline = report.headline_metrics()
    print("\nper arm (mean ± sd over seeds):")
    print(report.arms_table(headline))
    print("\npaired difference (arm − control):")
    print(report.paired_table(headline))
    print()
    for line in report.verdicts():
        print(f"verdict: {line}")
    print("base weights restored bitwise after every adapter: yes")
    plots = {}
    if not args.no_plot:
        from ..analysis.compare_plots import plot_losses, plot_metrics, plot_robustness

        folder = args.plot or (root / "plots")
        plots["metrics"] = plot_metrics(report, folder / "compare_metrics.png")
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


def _train_info(run, history) -> dict:
    mark = run.marker() or {}
    losses = [h for h in history if "loss" in h]
    ps = [h["macdrop_p"] for h in history if "macdrop_p" in h]
    steps = max((h.get("step", 0) for h in history), default=None)
    info = {"seconds": mark.get("train_seconds"), "steps": steps,
            "final_loss": losses[-1]["loss"] if losses else None,
            "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None)}
    if ps:
        info.update(p_first=ps[0], p_last=ps[-1])
    return info


def register(sub) -> None:
    """Add this group's sub-commands to the ``macdrop`` parser."""
    p = sub.add_parser("compare", help="plain LoRA vs MacDrop (and a grid) over seeds: train, evaluate on one base, report")
    p.add_argument("config", type=Path, help="the LLaMA-Factory training YAML every arm starts from")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                   help="more MacDrop arms: a macdrop_* key (e.g. macdrop_p0=0.5,0.8; macdrop_curriculum=step,exp); "
                        "use_dora=false,true makes LoRA and DoRA versions of both arms (repeatable: the product)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the runs go: DIR/ARM/seedS (default: the YAML's output_dir + '-compare')")
    p.add_argument("--train-command", default=None,
                   help="how one run is trained, the YAML appended (default: llamafactory-cli train; launcher "
                        "settings such as FORCE_TORCHRUN pass through the environment)")
    p.add_argument("--plan-only", action="store_true", help="check every arm and print the plan; train nothing")
    p.add_argument("--no-eval", action="store_true", help="train the runs only")
    p.add_argument("--quiet-train", action="store_true",
                   help="training output to the log files; only the trainer's loss lines are shown")
    add_corpus_options(p)
    add_zeroshot_options(p)
    p.add_argument("--mode", default="zero,retain", help="robustness attacks on the base's massive rows (default zero,retain)")
    p.add_argument("--robustness", choices=("all", "ppl"), default="all",
                   help="what is measured under the attacks: every metric (default) or perplexity only (zero-shot clean only)")
    p.add_argument("--k-sweep", type=_ks, default=[1, 3, 5], help="k values of the attacks (default 1,3,5; none: clean only)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap iterations of the paired intervals (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None, help="default: DIR/compare.json")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="markdown report (default: DIR/report.md)")
    p.add_argument("--plot", type=Path, default=None, help="folder for the figures (default: DIR/plots)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the evaluation")
    p.set_defaults(func=cmd_compare)
