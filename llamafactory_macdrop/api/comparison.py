"""``md.compare``: plain LoRA vs MacDrop (and a grid) over seeds: train, evaluate on one base, pair.

The order is the command line's: every arm checked (MacDrop's pre-load checks and LLaMA-Factory's
own parser) and the evaluation options read before anything trains; then one LLaMA-Factory run
per arm x seed (resumable: finished runs are skipped); then ONE base load, every adapter attached
in turn, evaluated clean and under the attacks, and the paired bootstrap. The report is returned
(``.table()``, ``.to_dict()``, ``.plot(folder)``, ``.markdown()``); with ``plan_only`` or
``no_eval`` the plan is (``.table()``, ``.to_dict()``).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.values import comma_list
from .options import namespace

Echo = Optional[Callable[[str], None]]

#: what ``robustness`` names: the families measured under the attacks (ppl always)
FAMILIES = ("ppl", "zeroshot", "gen")


@dataclass
class ComparePlan:
    """The arms x seeds a comparison trains, where, with what, and each run's state."""

    root: Path
    seeds: list[int]
    arms: list[Any]  # analysis.compare.runs.Arm
    runs: list[Any]  # analysis.compare.runs.Run
    command: list[str]
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"[compare] note: {note}" for note in self.notes]
        lines.append(
            f"[compare] {len(self.arms)} arms x {len(self.seeds)} seeds under {self.root}; training with: "
            f"{shlex.join(self.command)} CONFIG"
        )
        lines.append("  arm" + " " * 29 + "  ".join(f"seed {s:<4}" for s in self.seeds))
        for arm in self.arms:
            states = [r.state() for r in self.runs if r.arm is arm]
            lines.append(
                f"  {arm.name:<32}"
                + "  ".join(f"{s:<9}" for s in states)
                + (f"  (paired with {arm.control})" if arm.control else "")
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.root),
            "seeds": self.seeds,
            "arms": [a.to_dict() for a in self.arms],
            "runs": [{"name": r.name, "output_dir": str(r.output_dir), "state": r.state()} for r in self.runs],
            "train_command": self.command,
            "notes": self.notes,
        }


def default_train_command() -> list[str]:
    """``llamafactory-cli train`` of this interpreter's environment (found even when it is not on PATH)."""
    here = Path(sys.executable).parent / "llamafactory-cli"
    return [str(here) if here.is_file() else (shutil.which("llamafactory-cli") or "llamafactory-cli"), "train"]


def child_env() -> dict:
    """The environment for the training command: ours, with this interpreter's bin folder first on
    PATH, so what LLaMA-Factory's launcher starts (torchrun, deepspeed) comes from the same
    environment as ``llamafactory-cli`` even when it is not activated."""
    import os

    env = dict(os.environ)
    here = str(Path(sys.executable).parent)
    if here not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = here + os.pathsep + env.get("PATH", "")
    return env


def families(text: str) -> set[str]:
    names = set(comma_list(text))
    return set(FAMILIES) if "all" in names else names | {"ppl"}


def read_base(path: Path) -> dict:
    """The training YAML every arm starts from, refused in one line where a comparison cannot use it."""
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


def _check_base_inputs(base: dict, sources) -> None:
    """The base model's folder and what its tokenizer puts before the corpora (``bos``/``bos_token``),
    before anything trains."""
    from ..analysis.compare.runs import CompareError
    from .evaluation import resolve_sources
    from .model_input import ModelInput

    source = ModelInput(str(base["model_name_or_path"])).check()  # read_base made sure it is there
    if sources:
        tokenizer = source.tokenizer
        if tokenizer is None:
            raise CompareError(f"{source.label}: no tokenizer found next to the model (the corpora need one)")
        resolve_sources(sources, tokenizer, source.facts())


@dataclass
class Prepared:
    """Everything a comparison checked and read before anything trains (also what each job rebuilds)."""

    args: Any
    base: dict
    plan: ComparePlan
    sources: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    settings: list = field(default_factory=list)
    gen_tasks: Any = None
    judge: Any = None


def prepare(config, options: dict) -> Prepared:
    """The arms, the runs and the evaluation inputs, every check made: one line for what is wrong,
    before anything trains or loads."""
    from ..analysis.attack.attacks import sweep_settings
    from ..analysis.compare.runs import CompareError, parse_grid, parse_seeds, plan_arms, plan_runs
    from ..plugin.keys import MacDropConfigError
    from ..plugin.lf.arguments import check_train_config
    from .evaluation import read_generation, read_sources
    from .model_input import ModelInput

    args = namespace("compare", {"config": Path(config)}, options)
    base = read_base(args.config)
    seeds = parse_seeds(args.seeds)
    grid = parse_grid(args.grid or [])
    root = args.output_dir or Path(str(base.get("output_dir", "outputs/run")).rstrip("/") + "-compare")
    arms, notes = plan_arms(base, grid)
    runs = plan_runs(arms, seeds, root)
    command = shlex.split(args.train_command) if args.train_command else default_train_command()
    prep = Prepared(args, base, ComparePlan(root, seeds, arms, runs, command, notes))
    _check_schedule(args)
    if not args.no_eval:
        prep.sources, prep.tasks = read_sources(args, need_text=False)
        prep.gen_tasks, prep.judge = read_generation(args, ModelInput(str(base["model_name_or_path"])))
        if not (prep.sources or prep.tasks or prep.gen_tasks):
            raise CompareError(
                "nothing to evaluate: give --text-file, --dataset, --zeroshot or --gen-tasks (or --no-eval)"
            )
        modes = comma_list(args.mode)
        if any(m not in ("zero", "retain") for m in modes):
            raise CompareError(
                f"--mode {args.mode!r} is not allowed: compare's robustness attacks are zero and/or retain"
            )
        prep.settings = sweep_settings(modes, args.k_sweep)
        _check_ks(base, args.k_sweep)
        _check_base_inputs(base, prep.sources)
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
    return prep


def _check_schedule(args) -> None:
    """--parallel, --devices, --ray and --gpus-per-run: what runs the jobs, checked before anything trains."""
    import torch

    from ..analysis.compare.runs import CompareError
    from ..analysis.compare.schedule import parse_devices

    if args.parallel < 1:
        raise CompareError(f"--parallel {args.parallel} is not allowed: give a number >= 1")
    if args.ray is not None and args.devices is not None:
        raise CompareError("--ray schedules the runs on the cluster's GPUs: give --ray or --devices, not both")
    if args.ray is None and args.gpus_per_run is not None:
        raise CompareError("--gpus-per-run is for --ray (with --devices a run gets its group's GPUs)")
    if args.gpus_per_run is not None and args.gpus_per_run < 0:
        raise CompareError(f"--gpus-per-run {args.gpus_per_run:g} is not allowed: give a number >= 0")
    if args.devices is not None:
        groups = parse_devices(args.devices)
        if args.parallel not in (1, len(groups)):
            raise CompareError(
                f"--parallel {args.parallel} with {len(groups)} device groups in --devices: one run per group "
                f"(leave --parallel out, or give {len(groups)})"
            )
    elif args.parallel > 1 and args.ray is None and torch.cuda.is_available():
        raise CompareError(
            f"--parallel {args.parallel} on a machine with GPUs: say which GPUs each run gets with --devices "
            "(e.g. '0,1;2,3'), or every run would see them all"
        )


def compare(config, *, echo: Echo = print, **options):
    """Train every arm x seed (``llamafactory-cli train``), evaluate every adapter on one base, pair.

    ``config``: the LLaMA-Factory training YAML every arm starts from. ``options``: ``macdrop
    compare``'s options by name (docs/cli.md), e.g. ``seeds=[0, 1, 2]``,
    ``grid=["macdrop_p0=0.5,0.8"]``, ``text_file=["held_out.txt"]``, ``zeroshot=["arc_easy"]``,
    ``k_sweep=[1, 3, 5]``, ``parallel=2`` or ``devices="0,1;2,3"`` (runs side by side), ``ray=ADDRESS``.
    Returns an :class:`~..analysis.compare.report.CompareReport`, or the :class:`ComparePlan` with
    ``plan_only`` / ``no_eval``."""
    from .evaluation import progress_quieted

    with progress_quieted(options.get("no_progress") is True):
        return _compare(config, echo=echo, **options)


def _compare(config, *, echo: Echo = print, **options):
    """``compare`` without the progress handling (:func:`compare`)."""
    from ..analysis.compare.runs import move_aside, train

    say = echo or (lambda line: None)
    started = time.time()
    prep = prepare(config, options)
    args, plan = prep.args, prep.plan
    say(plan.table())
    if args.plan_only:
        return plan
    if args.parallel > 1 or args.devices is not None or args.ray is not None:
        schedule = _run_jobs(config, options, prep, say)
        trained_for = time.time() - started
    else:
        # ---- training: one normal LLaMA-Factory run per arm x seed, one after another
        schedule, env, runs = None, child_env(), plan.runs
        train_start = time.time()
        for i, run in enumerate(runs, 1):
            state = run.state()
            if state == "finished":
                say(f"[compare] {i}/{len(runs)} {run.name}: finished before, skipped")
                continue
            if state == "crashed":
                say(
                    f"[compare] {i}/{len(runs)} {run.name}: unfinished folder moved aside to {move_aside(run.output_dir)}"
                )
            say(f"[compare] {i}/{len(runs)} training {run.name} -> {run.output_dir} (log {run.log_path})")
            seconds = train(run, plan.command, stream_output=not args.quiet_train, env=env)
            say(f"[compare] {i}/{len(runs)} {run.name}: trained in {seconds:.0f} s")
        trained_for = time.time() - train_start
    if args.no_eval:
        say("[compare] --no-eval: every run is trained; rerun without --no-eval to evaluate")
        return plan
    report = _evaluate(prep, trained_for, say)
    if schedule is not None:  # the jobs trained and evaluated; this process paired what they cached
        report.schedule = [o.to_dict() for o in schedule]
        report.cost = {
            "wall (this call)": time.time() - started,
            "training (sum over runs)": report.cost["training (sum over runs)"],
            "jobs (sum of their wall times)": sum(o.seconds for o in schedule),
        }
    return report


# ----------------------------------------------------------------------------- jobs side by side
JOB_OPTIONS = {"parallel", "devices", "ray", "gpus_per_run", "plan_only"}


def _run_jobs(config, options: dict, prep: Prepared, say) -> list:
    """Every run (train unless finished, then evaluate) and the base's evaluation as jobs side by
    side; one line per job that failed, the others finish; then refuse if any failed."""
    import json
    import sys

    from ..analysis.compare.runs import CompareError
    from ..analysis.compare.schedule import Job, parse_devices, run_local, run_ray

    args, plan = prep.args, prep.plan
    folder = plan.root / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "options.json"
    mine = {k: v for k, v in options.items() if k not in JOB_OPTIONS}
    spec.write_text(json.dumps({"config": str(Path(config).resolve()), "options": mine}, indent=1, default=str) + "\n")
    names = ([] if args.no_eval else ["base"]) + [_job_name(r) for r in plan.runs]
    jobs = [
        Job(
            name,
            [sys.executable, "-m", "llamafactory_macdrop.api.comparison", "--job", str(spec), name],
            plan.root / "logs" / f"{name}.job.log",
            folder / f"{name}.json",
        )
        for name in names
    ]
    env = child_env()
    if args.ray is not None:
        gpus = args.gpus_per_run if args.gpus_per_run is not None else 0.0
        say(f"[compare] {len(jobs)} jobs as Ray tasks on {args.ray} ({gpus:g} GPUs each)")
        outcomes = run_ray(jobs, args.ray, gpus, env, say)
    else:
        slots = parse_devices(args.devices) if args.devices is not None else [None] * args.parallel
        say(
            f"[compare] {len(jobs)} jobs, {len(slots)} at a time"
            + (f" on GPU groups {args.devices}" if args.devices else "")
        )
        outcomes = run_local(jobs, slots, env, say)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise CompareError(
            f"{len(failed)} of {len(jobs)} jobs failed ({'; '.join(o.error for o in failed)}); the others are "
            "trained and evaluated: rerun the same command to retry only what failed"
        )
    return outcomes


def _job_name(run) -> str:
    return f"{run.arm.name}-seed{run.seed}"


def run_job(spec: Path, name: str) -> int:
    """One job of a parallel comparison, in its own process: train the run unless it is finished,
    then evaluate its adapter (or the base alone) into the comparison's evaluation cache."""
    import json

    from ..analysis.compare.runs import CompareError, move_aside, train

    data = json.loads(Path(spec).read_text())
    prep = prepare(data["config"], data["options"])
    plan, record = prep.plan, {}
    run = next((r for r in plan.runs if _job_name(r) == name), None)
    if run is None and name != "base":
        raise CompareError(f"no run {name!r} in this comparison")
    if run is not None:
        state = run.state()
        record["trained"] = state != "finished"
        if state == "crashed":
            print(f"[compare] {run.name}: unfinished folder moved aside to {move_aside(run.output_dir)}", flush=True)
        record["train_seconds"] = (
            train(run, plan.command, stream_output=True, env=child_env())
            if state != "finished"
            else (run.marker() or {}).get("train_seconds")
        )
    if not prep.args.no_eval:
        start = time.time()
        evaluator, _ = _evaluator(prep, print)
        cache = plan.root / "eval" / ("base.json" if run is None else f"{name}.json")
        _, record["reused"] = evaluator.evaluate_cached(
            cache, None if run is None else run.output_dir, "base" if run is None else run.name
        )
        record["eval_seconds"] = round(time.time() - start, 1)
    result = plan.root / "jobs" / f"{name}.json"
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(result)
    return 0


def _evaluator(prep: Prepared, say):
    """The base loaded once, its massive rows located, every evaluator built: (evaluator, suite)."""
    from ..analysis.attack.attacks import AttackTargets
    from ..analysis.compare.evaluation import OneBaseEvaluator, text_digest
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights
    from .evaluation import device_for, generation_suite, prepare_corpora, zeroshot_evaluator
    from .model_input import ModelInput

    args, base, settings = prep.args, prep.base, prep.settings
    source = ModelInput(str(base["model_name_or_path"]))
    device = device_for(args.device)
    say(
        f"[compare] evaluation: loading {source.label} once ({args.dtype}, {device}); every adapter is attached "
        "to it in turn"
    )
    tokenizer = source.require_tokenizer("the evaluation needs one")
    model = source.load(args.dtype, device)
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
    say(f"  attacks: the base model's massive rows, layer {targets.layer} (0-based), rows {targets.indices}")
    corpora = prepare_corpora(prep.sources, model, tokenizer, echo=say)
    zeroshot = zeroshot_evaluator(args, prep.tasks, model, tokenizer, echo=say)
    suite = generation_suite(args, prep.gen_tasks, prep.judge, model, tokenizer, echo=say)
    protocol = {
        "model": source.label,
        "dtype": args.dtype,
        "device": device,
        "settings": [s.label for s in settings],
        "targets": targets.to_dict(),
        "batch_size": args.ppl_batch_size,
        "robustness": args.robustness,
        "corpora": [{**c.protocol(), "text_sha256_16": text_digest(c.source.text)} for c in corpora],
        "zeroshot": {
            "tasks": prep.tasks,
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
        source.label,
        targets,
        settings,
        corpora,
        zeroshot,
        batch_size=args.ppl_batch_size,
        progress=not args.no_progress,
        echo=say,
        protocol=protocol,
        zeroshot_under_attack="zeroshot" in families(args.robustness),
        generation=suite,
        generation_under_attack="gen" in families(args.robustness),
    )
    return evaluator, suite


def _evaluate(prep: Prepared, trained_for: float, say):
    """Every run's adapter on the one base (each through the evaluation cache), then the pairs."""
    from ..analysis.compare.evaluation import evaluate_runs, trained_rows_note
    from ..analysis.compare.paired import metric_value
    from ..analysis.compare.report import CompareReport, RunRecord, pair_all
    from ..analysis.models.identity import library_versions

    args, plan = prep.args, prep.plan
    root, runs, arms, seeds, notes = plan.root, plan.runs, plan.arms, plan.seeds, plan.notes
    eval_start = time.time()
    evaluator, suite = _evaluator(prep, say)
    items, reused = evaluate_runs(evaluator, runs, root, echo=say)
    eval_seconds = time.time() - eval_start
    notes += [n for n in (trained_rows_note(r, evaluator.targets) for r in runs) if n]
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
    protocol = evaluator.protocol
    protocol["versions"] = library_versions()
    train_total = sum(r.train.get("seconds") or 0 for r in records)
    return CompareReport(
        str(args.config),
        str(root),
        seeds,
        [a.to_dict() for a in arms],
        evaluator.model_path,
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


def main(argv=None) -> int:
    """``python -m llamafactory_macdrop.api.comparison --job OPTIONS.json NAME``: one job of a parallel comparison."""
    import argparse
    import sys

    from ..errors import MacDropError

    parser = argparse.ArgumentParser(prog="python -m llamafactory_macdrop.api.comparison")
    parser.add_argument("--job", nargs=2, metavar=("OPTIONS_JSON", "NAME"), required=True)
    args = parser.parse_args(argv)
    try:
        return run_job(Path(args.job[0]), args.job[1])
    except MacDropError as err:
        print(f"[macdrop] error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
