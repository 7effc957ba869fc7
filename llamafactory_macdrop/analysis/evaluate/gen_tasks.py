"""Generation tasks on ONE loaded model: generate (batched), score against references, judge.

Why one runner: ``macdrop attack`` and ``macdrop quantize`` run the tasks under every setting of a
sweep (:func:`~..attack.sweep.evaluate_settings` hands the runner each edited model), and
``macdrop compare`` under every adapter; all three want the same thing per task: the outputs, the
reference metrics per item (:mod:`.scoring`), the judge's scores per item (:mod:`.judge`) and the
cost. Items keep their task order and ids, so two runs of the same tasks pair item by item.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torch import nn

from .generate import BatchedGenerator, GenerationProgress
from .judge import Judge, aggregate_judgements, item_score, judge_requests
from .scoring import aggregate, score_item
from .tasks import GenerationTask


@dataclass
class GenTaskResult:
    """One task under one setting: aggregate rows, per-item records, and the cost."""

    task: str
    metrics: dict[str, dict[str, float]]  # metric -> {"mean", "n"}
    judge: Optional[dict[str, Any]]  # {"mean", "n", "unparsed"} with a judge
    items: list[dict[str, Any]] = field(default_factory=list)  # per item (JSONL)
    seconds: float = 0.0
    new_tokens: int = 0
    judge_seconds: float = 0.0
    #: per grid cell (the needle's length x depth): {"length", "depth", metric -> {"mean", "n"}}
    cells: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_mb: Optional[float] = None  # while generating (protocol's ``peak_memory`` says which)
    #: an average over tasks (LongBench's): task -> its items' scores on its own metric
    components: dict[str, list[float]] = field(default_factory=dict)

    def item_scores(self, metric: str) -> list[Optional[float]]:
        """Per item, in task order: the metric's score (``judge``: the judge's), None where it has none."""
        key = "judge_score" if metric == "judge" else metric
        return [(it["judge_score"] if key == "judge_score" else it["scores"].get(key)) for it in self.items]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class GenerationSuite:
    """The tasks, the generator and the judge, built once; :meth:`evaluate` runs them on the model now."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        tasks: Sequence[GenerationTask],
        *,
        judge: Optional[Judge] = None,
        batch_size: int = 16,
        chat_template: bool = True,
        max_batch_tokens: Optional[int] = None,
    ) -> None:
        self.tokenizer, self.tasks, self.judge = tokenizer, list(tasks), judge
        self.batch_size, self.chat_template, self.max_batch_tokens = batch_size, chat_template, max_batch_tokens
        self.rebind(model)

    def rebind(self, model: nn.Module) -> None:
        """Generate with ``model`` from now on (the base with another adapter); tasks and judge stay."""
        self.model = model
        self.generator = self._generator(self.chat_template)
        self._plain: Optional[BatchedGenerator] = None

    def _generator(self, chat_template: bool) -> BatchedGenerator:
        return BatchedGenerator(
            self.model,
            self.tokenizer,
            batch_size=self.batch_size,
            chat_template=chat_template,
            max_batch_tokens=self.max_batch_tokens,
        )

    def generator_for(self, task: GenerationTask) -> BatchedGenerator:
        """The suite's generator, or a plain-prompt one for a task that never uses a chat template
        (LongBench's few-shot and code tasks, as LongBench feeds them)."""
        if task.chat_template is False and self.generator.chat_template:
            if self._plain is None:
                self._plain = self._generator(False)
            return self._plain
        return self.generator

    def add_tasks(self, tasks: Sequence[GenerationTask]) -> None:
        """Tasks built once the tokenizer is known (the needle, LongBench: their prompts are cut in tokens)."""
        self.tasks += list(tasks)

    def protocol(self) -> dict[str, Any]:
        out = {
            "tasks": [t.protocol() for t in self.tasks],
            "decoding": "greedy",
            "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "chat_template": self.generator.chat_template,
            "attn_implementation": getattr(getattr(self.model, "config", None), "_attn_implementation", None),
            "peak_memory": _memory_kind(self.model),
            "judge": self.judge.protocol() if self.judge is not None else None,
        }
        plain = [t.name for t in self.tasks if t.chat_template is False and self.generator.chat_template]
        if plain:
            out["plain_prompt_tasks"] = plain
        return out

    def evaluate(self, label: str = "", echo: Optional[Callable[[str], None]] = None) -> list[GenTaskResult]:
        """Every task on the model as it is now (progress per task: items/s, tokens/s)."""
        out = []
        for task in self.tasks:
            requests = task.requests()

            def progress(p: GenerationProgress, task=task) -> None:
                if echo:
                    echo(f"  generate {label:<22} {task.name:<12} {p.line()}")

            start = time.perf_counter()
            _reset_peak(self.model)
            results = self.generator_for(task).generate(requests, progress=progress)
            seconds = time.perf_counter() - start
            peak = _peak_mb(self.model)
            scores = [score_item(task.metrics, item, result) for item, result in zip(task.items, results)]
            judged, judge_seconds = None, 0.0
            if self.judge is not None:
                start = time.perf_counter()
                per_item = [judge_requests(item, result) for item, result in zip(task.items, results)]
                flat = self.judge.grade([r for rs in per_item for r in rs])
                judged, i = [], 0
                for rs in per_item:
                    judged.append(flat[i : i + len(rs)])
                    i += len(rs)
                judge_seconds = time.perf_counter() - start
            items = []
            for n, (item, result, score) in enumerate(zip(task.items, results, scores)):
                record = {
                    "task": task.name,
                    "id": item.id,
                    "turns": list(item.turns),
                    "outputs": [t.text for t in result.turns],
                    "stopped": [t.stopped for t in result.turns],
                    "references": [list(r) for r in item.references],
                    "scores": score,
                    "new_tokens": result.new_tokens,
                    "judge_score": None,
                }
                if item.meta:
                    record.update(item.meta)
                if judged is not None:
                    record["judge_score"] = item_score(judged[n])
                    record["judgements"] = [j.to_dict() for j in judged[n]]
                items.append(record)
            out.append(
                GenTaskResult(
                    task.name,
                    aggregate(scores),
                    aggregate_judgements(judged) if judged is not None else None,
                    items,
                    seconds,
                    sum(r.new_tokens for r in results),
                    judge_seconds,
                    cells=_cells(task, scores),
                    peak_memory_mb=peak,
                )
            )
        average = longbench_average(self.tasks, out)
        if average is not None:
            out.append(average)
        return out


def longbench_average(tasks: Sequence[GenerationTask], results: Sequence[GenTaskResult]) -> Optional[GenTaskResult]:
    """LongBench's headline: the unweighted mean over its tasks of each task's own metric (the
    paper's "average"), as a result named ``longbench`` with metric ``average`` (``n``: the tasks);
    None with fewer than two LongBench tasks."""
    mine = [(t, r) for t, r in zip(tasks, results) if t.name.startswith("longbench_")]
    if len(mine) < 2:
        return None
    components = {t.name: [float(v) for v in r.item_scores(t.metrics[0]) if v is not None] for t, r in mine}
    means = [sum(v) / len(v) for v in components.values() if v]
    return GenTaskResult(
        "longbench",
        {"average": {"mean": sum(means) / len(means) if means else float("nan"), "n": len(means)}},
        None,
        components=components,  # no seconds or tokens of its own: the tasks' rows have them
    )


# ----------------------------------------------------------------------------- grids and memory
GRID_KEYS = ("length", "depth")


def _cells(task: GenerationTask, scores: Sequence[dict[str, Optional[float]]]) -> list[dict[str, Any]]:
    """Aggregates per (length, depth) where the items carry both (the needle), else none."""
    groups: dict[tuple, list] = {}
    for item, score in zip(task.items, scores):
        meta = item.meta or {}
        if not all(k in meta for k in GRID_KEYS):
            return []
        groups.setdefault(tuple(meta[k] for k in GRID_KEYS), []).append(score)
    return [{**dict(zip(GRID_KEYS, key)), "metrics": aggregate(group)} for key, group in groups.items()]


def _memory_kind(model: nn.Module) -> str:
    return "cuda max_memory_allocated" if _on_cuda(model) else "process peak RSS (CPU; since the process started)"


def _on_cuda(model: nn.Module) -> bool:
    try:
        return next(model.parameters()).is_cuda
    except (StopIteration, AttributeError):
        return False


def _reset_peak(model: nn.Module) -> None:
    if _on_cuda(model):
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_mb(model: nn.Module) -> Optional[float]:
    """MiB: the GPU's peak allocation since the task began, or the process's peak RSS on CPU."""
    if _on_cuda(model):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError):
        return None
