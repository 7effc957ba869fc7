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
    names = {t.strip() for t in text.split(",") if t.strip()}
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


def compare(config, *, echo: Echo = print, **options):
    """Train every arm x seed (``llamafactory-cli train``), evaluate every adapter on one base, pair.

    ``config``: the LLaMA-Factory training YAML every arm starts from. ``options``: ``macdrop
    compare``'s options by name (docs/cli.md), e.g. ``seeds=[0, 1, 2]``,
    ``grid=["macdrop_p0=0.5,0.8"]``, ``text_file=["held_out.txt"]``, ``zeroshot=["arc_easy"]``,
    ``k_sweep=[1, 3, 5]``. Returns an :class:`~..analysis.compare.report.CompareReport`, or the
    :class:`ComparePlan` with ``plan_only`` / ``no_eval``."""
    from ..analysis.attack.attacks import sweep_settings
    from ..analysis.compare.runs import CompareError, move_aside, parse_grid, parse_seeds, plan_arms, plan_runs, train
    from ..cli.evaluation import read_generation
    from ..plugin.keys import MacDropConfigError
    from ..plugin.lf.arguments import check_train_config
    from .evaluation import quiet_progress, read_sources

    args = namespace("compare", {"config": Path(config)}, options)
    say = echo or (lambda line: None)
    if args.no_progress:  # first: tqdm reads TQDM_DISABLE when it is imported (LLaMA-Factory's checks import it)
        quiet_progress()
    # ---- everything that can be checked before anything trains or loads
    base = read_base(args.config)
    seeds = parse_seeds(args.seeds)
    grid = parse_grid(args.grid or [])
    root = args.output_dir or Path(str(base.get("output_dir", "outputs/run")).rstrip("/") + "-compare")
    arms, notes = plan_arms(base, grid)
    runs = plan_runs(arms, seeds, root)
    command = shlex.split(args.train_command) if args.train_command else default_train_command()
    sources, tasks, settings, gen_tasks, judge = [], [], [], None, None
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
    plan = ComparePlan(root, seeds, arms, runs, command, notes)
    say(plan.table())
    if args.plan_only:
        return plan

    # ---- training: one normal LLaMA-Factory run per arm x seed
    env = child_env()
    train_start = time.time()
    for i, run in enumerate(runs, 1):
        state = run.state()
        if state == "finished":
            say(f"[compare] {i}/{len(runs)} {run.name}: finished before, skipped")
            continue
        if state == "crashed":
            say(f"[compare] {i}/{len(runs)} {run.name}: unfinished folder moved aside to {move_aside(run.output_dir)}")
        say(f"[compare] {i}/{len(runs)} training {run.name} -> {run.output_dir} (log {run.log_path})")
        seconds = train(run, command, stream_output=not args.quiet_train, env=env)
        say(f"[compare] {i}/{len(runs)} {run.name}: trained in {seconds:.0f} s")
    trained_for = time.time() - train_start
    if args.no_eval:
        say("[compare] --no-eval: every run is trained; rerun without --no-eval to evaluate")
        return plan
    return _evaluate(args, base, plan, sources, tasks, settings, trained_for, gen_tasks, judge, say)


def _evaluate(args, base, plan: ComparePlan, sources, tasks, settings, trained_for, gen_tasks, judge, say):
    from ..analysis.attack.attacks import AttackTargets
    from ..analysis.compare.evaluation import (
        OneBaseEvaluator,
        evaluate_runs,
        library_versions,
        text_digest,
        trained_rows_note,
    )
    from ..analysis.compare.paired import metric_value
    from ..analysis.compare.report import CompareReport, RunRecord, pair_all
    from ..cli.evaluation import generation_suite
    from ..core.first_token import template_first_token
    from ..core.locator import locate_massive_weights
    from .evaluation import device_for, prepare_corpora, zeroshot_evaluator
    from .model_input import ModelInput

    root, runs, arms, seeds, notes = plan.root, plan.runs, plan.arms, plan.seeds, plan.notes
    source = ModelInput(str(base["model_name_or_path"]))
    device = device_for(args.device)
    eval_start = time.time()
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
    corpora = prepare_corpora(sources, model, tokenizer, echo=say)
    zeroshot = zeroshot_evaluator(args, tasks, model, tokenizer, echo=say)
    suite = generation_suite(args, gen_tasks, judge, model, tokenizer, echo=say)
    protocol = {
        "model": source.label,
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
        source.label,
        targets,
        settings,
        corpora,
        zeroshot,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        protocol=protocol,
        zeroshot_under_attack="zeroshot" in families(args.robustness),
        generation=suite,
        generation_under_attack="gen" in families(args.robustness),
    )
    items, reused = evaluate_runs(evaluator, runs, root, echo=say)
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
    return CompareReport(
        str(args.config),
        str(root),
        seeds,
        [a.to_dict() for a in arms],
        source.label,
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
