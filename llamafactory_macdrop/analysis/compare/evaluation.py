"""The evaluation side of ``macdrop compare``: every adapter on ONE loaded base model.

Why one base: loading an 8B base per arm and per task would cost more than the evaluation itself,
and every arm must be scored on exactly the same base weights. So the base is loaded once, each
run's adapter is attached (peft), evaluated under every attack setting, and removed again
(``unload``: peft puts the original modules back); a SHA-256 of every base tensor, taken before
the first adapter and again after each one is removed (before its results are cached), proves
the base came back bit for bit, and the attacker checks its rows after each adapter. Adapters
that train whole copies of base modules (peft's ``modules_to_save``, trainable token rows:
LLaMA-Factory's ``additional_target``, ``resize_vocab``) are refused: ``unload`` would leave the
trained copy in the base.

Robustness: the attacks (top-k zeroing / retaining of the BASE model's massive rows, located once
on the base) edit the frozen base weights UNDER the adapter, so each arm is measured as the paper
measures it: how much the fine-tuned model still depends on those rows.

Items, not only means: every perplexity comes with its per-window NLL sums and every accuracy with
its per-document scores, which the paired statistics (:mod:`.paired`) resample. Each run's items
are cached in ``<comparison>/eval/`` under a key of everything that defines them (base, adapter
files and marker, base weights, corpora, tasks, settings, targets, dtype, device, batch sizes,
library versions): a rerun evaluates only what is new.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..attack.attacks import AttackSetting, AttackTargets, ModelAttacker
from ..models.identity import file_digest, fingerprint, library_versions
from ..sweep.loop import evaluate_settings
from .paired import AccuracyItems, MeanAccuracyItems, PerplexityItems, ScoreItems
from .runs import MARKER, CompareError


def metric_name(kind: str, dataset: str, setting: str) -> str:
    """``ppl/english.txt/clean``, ``acc/arc_easy/zero k=5``, ``acc/mean/retain k=1``,
    ``gen/nq_open/f1/clean``, ``judge/nq_open/zero k=5``, ``gen/needle@4096/needle_match/clean``
    (the needle's items of one length)."""
    return f"{kind}/{dataset}/{setting}"


def parse_metric(name: str) -> tuple[str, str, str]:
    kind, rest = name.split("/", 1)
    dataset, setting = rest.rsplit("/", 1)
    return kind, dataset, setting


def check_adapter(adapter_dir: Path) -> None:
    """Refuse adapters whose removal would not give the base back (see the module docstring)."""
    from ..models.loading import AdapterError, read_adapter_config

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise CompareError(f"{adapter_dir}: no adapter_config.json (finetuning_type must be lora)")
    try:
        config = read_adapter_config(adapter_dir, option="adapter")
    except AdapterError as err:
        raise CompareError(str(err)) from None
    for key in ("modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise CompareError(
                f"{adapter_dir}: its adapter trains whole base modules ({key}={config[key]}, from "
                "LLaMA-Factory's additional_target/resize_vocab), which cannot be removed from one shared "
                "base; compare adapters without them"
            )


# ----------------------------------------------------------------------------- item (de)serialisation
def items_to_json(items) -> dict[str, Any]:
    if isinstance(items, ScoreItems):
        return {"kind": "gen", "scores": [None if v != v else v for v in items.scores]}
    if isinstance(items, PerplexityItems):
        return {"kind": "ppl", "nll": list(items.nll), "tokens": list(items.tokens)}
    if isinstance(items, AccuracyItems):
        return {"kind": "acc", "scores": list(items.scores)}
    return {"kind": "mean_acc", "tasks": [items_to_json(t) for t in items.tasks]}


def items_from_json(data: dict[str, Any]):
    if data["kind"] == "gen":
        return ScoreItems(tuple(float("nan") if v is None else float(v) for v in data["scores"]))
    if data["kind"] == "ppl":
        return PerplexityItems(tuple(data["nll"]), tuple(data["tokens"]))
    if data["kind"] == "acc":
        return AccuracyItems(tuple(data["scores"]))
    return MeanAccuracyItems(tuple(items_from_json(t) for t in data["tasks"]))


class OneBaseEvaluator:
    """Evaluates the base and any number of adapters on it; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        model_path: str,
        targets: AttackTargets,
        settings: Sequence[AttackSetting],
        corpora: Sequence = (),
        zeroshot=None,
        *,
        batch_size: int = 1,
        progress: bool = True,
        echo: Optional[Callable[[str], None]] = print,
        protocol: Optional[dict[str, Any]] = None,
        zeroshot_under_attack: bool = True,
        generation=None,
        generation_under_attack: bool = True,
    ) -> None:
        self.base = model
        self.model_path = model_path
        self.targets = targets
        self.settings = list(settings)
        self.corpora = list(corpora)
        self.zeroshot = zeroshot
        self.batch_size = batch_size
        self.progress = progress
        self.echo = echo or (lambda _: None)
        self.protocol = protocol or {}
        self.zeroshot_under_attack = zeroshot_under_attack  # False: zero-shot on the clean model only
        self.generation = generation  # a GenerationSuite, or None
        self.generation_under_attack = generation_under_attack  # False: generation tasks on the clean model only
        self.last_gen_items: list[dict[str, Any]] = []  # per item of the last evaluation (JSONL beside the cache)
        self.gen_seconds = 0.0  # generation and judging, over every evaluation of this call
        self._fingerprint = fingerprint(model)

    # ------------------------------------------------------------------ one model
    def evaluate(self, adapter_dir: Optional[Path] = None, label: str = "base") -> dict[str, Any]:
        """metric name -> items for the base (``adapter_dir`` None) or the base + that adapter."""
        from ...core.architectures import find_ffn_blocks
        from ..models.loading import attach_adapter

        if adapter_dir is not None:
            check_adapter(adapter_dir)
        model = attach_adapter(self.base, adapter_dir, self.model_path) if adapter_dir is not None else self.base
        out: dict[str, Any] = {}
        try:
            attacker = ModelAttacker(model, self.targets, find_ffn_blocks(model))
            if self.zeroshot is not None:
                self.zeroshot.rebind(model)
            if self.generation is not None:
                self.generation.rebind(model)
            self.last_gen_items = []
            tasks: dict[str, list] = {}

            def record(setting: AttackSetting, dataset: str, res) -> None:
                if getattr(res, "components", None):  # LongBench's average: each task resampled on its own
                    tasks_items = tuple(AccuracyItems(tuple(v)) for v in res.components.values() if v)
                    out[metric_name("gen", f"{res.task}/average", setting.label)] = MeanAccuracyItems(tasks_items)
                    self.echo(
                        f"  {label:<28} {setting.label:<12} {res.task:<16} average {res.metrics['average']['mean']:.3f}"
                    )
                    return
                if hasattr(res, "items") and hasattr(res, "metrics"):  # a generation task
                    for m in res.metrics:
                        scores = tuple(float("nan") if v is None else float(v) for v in res.item_scores(m))
                        out[metric_name("gen", f"{dataset}/{m}", setting.label)] = ScoreItems(scores)
                        lengths = [it.get("length") for it in res.items]
                        for length in dict.fromkeys(n for n in lengths if n is not None):  # the needle, per length
                            mine = tuple(v for v, n in zip(scores, lengths) if n == length)
                            out[metric_name("gen", f"{dataset}@{length}/{m}", setting.label)] = ScoreItems(mine)
                    if res.judge is not None:
                        scores = tuple(float("nan") if v is None else float(v) for v in res.item_scores("judge"))
                        out[metric_name("judge", dataset, setting.label)] = ScoreItems(scores)
                    self.last_gen_items += [{"run": label, "setting": setting.label, **item} for item in res.items]
                    self.gen_seconds += res.seconds + res.judge_seconds
                    shown = ", ".join(f"{m} {a['mean']:.3f}" for m, a in res.metrics.items())
                    self.echo(f"  {label:<28} {setting.label:<12} {dataset:<16} {shown}  ({res.seconds:.1f} s)")
                    return
                if hasattr(res, "ppl"):
                    out[metric_name("ppl", dataset, setting.label)] = PerplexityItems(res.window_nll, res.window_tokens)
                    self.echo(
                        f"  {label:<28} {setting.label:<12} {dataset:<16} ppl {res.ppl:10.3f}  ({res.seconds:.1f} s)"
                    )
                    return
                tasks.setdefault(setting.label, []).append(AccuracyItems(res.items))
                out[metric_name("acc", dataset, setting.label)] = tasks[setting.label][-1]
                self.echo(f"  {label:<28} {setting.label:<12} {dataset:<16} acc {100 * res.acc:6.1f}  (n={res.n})")
                if self.zeroshot is not None and len(tasks[setting.label]) == len(self.zeroshot.tasks) > 1:
                    out[metric_name("acc", "mean", setting.label)] = MeanAccuracyItems(tuple(tasks[setting.label]))

            evaluate_settings(
                model,
                attacker,
                self.settings,
                self.corpora,
                self.zeroshot,
                on_result=record,
                label=lambda s: f"{label} / {s.label}",
                batch_size=self.batch_size,
                progress=self.progress,
                per_item=True,
                zeroshot_for=lambda s: s.mode == "clean" or self.zeroshot_under_attack,
                generation=self.generation,
                generation_for=lambda s: s.mode == "clean" or self.generation_under_attack,
                echo=self.echo if self.progress else None,
            )
        finally:
            if adapter_dir is not None:
                self.base = model.unload()  # the original modules back, adapter gone
                if hasattr(self.base, "peft_config"):  # what peft leaves on the base; the next adapter would warn
                    del self.base.peft_config
        self.verify_base(label)
        return out

    def verify_base(self, after: str = "the evaluation") -> None:
        """Raise unless every base tensor is bit for bit what it was before the first adapter."""
        now = fingerprint(self.base)
        changed = [k for k in self._fingerprint if now.get(k) != self._fingerprint[k]]
        if changed or set(now) != set(self._fingerprint):
            raise CompareError(
                f"the base model is not bit for bit the same after {after}: "
                f"{(changed or sorted(set(now) ^ set(self._fingerprint)))[:3]}; its results were not kept"
            )

    # ------------------------------------------------------------------ cached
    def cache_key(self, adapter_dir: Optional[Path]) -> str:
        """Everything the items depend on: the protocol (corpora, tasks, settings, targets, dtype,
        device, batch sizes: the caller's), the base weights, the libraries, and the adapter's own
        files and marker (a run retrained into the same folder gets new items)."""
        adapter = None
        if adapter_dir is not None:
            folder = Path(adapter_dir)
            adapter = {f.name: file_digest(f) for f in sorted(folder.glob("adapter_*")) if f.is_file()}
            marker = folder / MARKER
            adapter["marker"] = marker.read_text() if marker.is_file() else None
        base = hashlib.sha256(json.dumps(self._fingerprint, sort_keys=True).encode()).hexdigest()
        blob = json.dumps(
            {"protocol": self.protocol, "base": base, "versions": library_versions(), "adapter": adapter},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def evaluate_cached(
        self, cache_file: Path, adapter_dir: Optional[Path] = None, label: str = "base"
    ) -> tuple[dict[str, Any], bool]:
        """(items, reused): the cached items when the key matches, else a fresh evaluation (cached)."""
        key = self.cache_key(adapter_dir)
        if cache_file.is_file():
            try:
                data = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                data = {}  # unreadable: evaluated again
            if data.get("key") == key:
                return {m: items_from_json(v) for m, v in data["items"].items()}, True
        items = self.evaluate(adapter_dir, label)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        if self.last_gen_items:
            gen_file = cache_file.with_name(cache_file.stem + ".generation.jsonl")
            gen_file.write_text("".join(json.dumps(item) + "\n" for item in self.last_gen_items))
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"key": key, "label": label, "items": {m: items_to_json(v) for m, v in items.items()}})
        )
        tmp.replace(cache_file)
        return items, False


def evaluate_runs(
    evaluator: OneBaseEvaluator, runs: Sequence, root: Path, echo: Callable[[str], None] = print
) -> tuple[dict, dict]:
    """(items, reused) keyed by ``(arm, seed)`` plus ``("base", None)``: the base alone first,
    then every run's adapter, each through the cache in ``root/eval/``."""
    items, reused = {}, {}
    items[("base", None)], reused[("base", None)] = evaluator.evaluate_cached(root / "eval" / "base.json", None, "base")
    for i, run in enumerate(runs, 1):
        echo(f"[compare] evaluating {i}/{len(runs)}: {run.name}")
        key = (run.arm.name, run.seed)
        items[key], reused[key] = evaluator.evaluate_cached(
            root / "eval" / f"{run.arm.name}-seed{run.seed}.json", run.output_dir, run.name
        )
        if reused[key]:
            echo("  (items reused from an earlier evaluation with the same protocol)")
    return items, reused


def trained_rows_note(run, targets: AttackTargets) -> Optional[str]:
    """A note when a MacDrop run dropped other rows than the ones the attacks use (located on the base here)."""
    from ...core.locator import LOCATOR_FILE

    path = Path(run.output_dir) / LOCATOR_FILE
    if not run.arm.macdrop or not path.is_file():
        return None
    trained = json.loads(path.read_text())
    rows = list(trained.get("indices", []))
    common = min(len(rows), len(targets.indices))
    if trained.get("layer") == targets.layer and set(rows[:common]) == set(targets.indices[:common]):
        return None
    return (
        f"{run.name} dropped layer {trained.get('layer')} rows {rows}; the attacks use layer {targets.layer} "
        f"rows {targets.indices} (located on the base here)"
    )


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
