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
    ) -> None:
        self.tokenizer, self.tasks, self.judge = tokenizer, list(tasks), judge
        self.batch_size, self.chat_template = batch_size, chat_template
        self.rebind(model)

    def rebind(self, model: nn.Module) -> None:
        """Generate with ``model`` from now on (the base with another adapter); tasks and judge stay."""
        self.generator = BatchedGenerator(
            model, self.tokenizer, batch_size=self.batch_size, chat_template=self.chat_template
        )

    def protocol(self) -> dict[str, Any]:
        return {
            "tasks": [t.protocol() for t in self.tasks],
            "decoding": "greedy",
            "batch_size": self.batch_size,
            "chat_template": self.generator.chat_template,
            "judge": self.judge.protocol() if self.judge is not None else None,
        }

    def evaluate(self, label: str = "", echo: Optional[Callable[[str], None]] = None) -> list[GenTaskResult]:
        """Every task on the model as it is now (progress per task: items/s, tokens/s)."""
        out = []
        for task in self.tasks:
            requests = task.requests()

            def progress(p: GenerationProgress, task=task) -> None:
                if echo:
                    echo(f"  generate {label:<22} {task.name:<12} {p.line()}")

            start = time.perf_counter()
            results = self.generator.generate(requests, progress=progress)
            seconds = time.perf_counter() - start
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
                )
            )
        return out
