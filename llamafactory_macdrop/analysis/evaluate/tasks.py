"""What lm-eval has no task for: Spec-Bench-style JSONL files (and the needle's items, needle.py).

A user task is a JSONL file in Spec-Bench's ``question.jsonl`` format, one object a line:
``question_id`` (int or string, unique), ``category`` (string), ``turns`` (non-empty list of
strings: a conversation answered turn by turn, each later turn after the model's OWN earlier
answers), optional ``reference`` (a list of strings, ``reference[i]`` for turn ``i``, as in
MT-bench's files; or a string for turn 1). Reference metrics where a reference exists: ROUGE-L
(``rouge_score``, Porter stemmer), sentence chrF and sentence BLEU (``sacrebleu``'s defaults), the
best over references, the mean over turns; an item without one has no score (``None``), and a
task's aggregate counts only items with one (``n``). No stop string, 256 new tokens unless
``--max-new-tokens``. A category picks the judge rubric (:data:`CATEGORY_KINDS`, else
``open``). The task is named after the file (``question`` for question.jsonl).

The stock tasks (gsm8k, nq_open, squadv2, LongBench) are lm-eval's: lm_tasks.py, longbench.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ...core.values import comma_list
from .lm_tasks import ALIASES, BUILTIN_TASKS, TaskError, data_root, load_stock

__all__ = ["TaskError", "data_root", "TaskItem", "GenerationTask", "load_tasks", "parse_task_list"]

#: Spec-Bench's and MT-bench's categories -> judge rubric kind (judge.RUBRICS)
CATEGORY_KINDS = {"math_reasoning": "math", "math": "math", "qa": "short_qa", "rag": "context_qa"}
JSONL_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class TaskItem:
    """One question: its turns, per turn the gold answers (any one counts; ``()``: none)."""

    id: str
    turns: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]
    kind: str
    category: Optional[str] = None
    #: what places the item in a grid (the needle's ``length``, ``depth``, ...): kept in its records and rows
    meta: Optional[Mapping[str, Any]] = None


@dataclass(frozen=True)
class GenerationTask:
    """A named set of our own items with the budget, stop strings and reference metrics they share."""

    name: str
    items: tuple[TaskItem, ...]
    max_new_tokens: int
    stop: tuple[str, ...]
    metrics: tuple[str, ...]  # names in METRICS
    source: str  # the file read
    prompt_format: str  # one line saying how a prompt is built
    available: int = field(default=0)  # items in the source before ``limit``
    extra_protocol: Optional[Mapping[str, Any]] = None  # what else defines the items (the needle's grid)

    def __len__(self) -> int:
        return len(self.items)

    def protocol(self, chat_template: bool = True) -> dict[str, Any]:
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(json.dumps([item.id, list(item.turns), [list(r) for r in item.references]]).encode("utf-8"))
        return {
            "task": self.name,
            "source": self.source,
            "items": len(self.items),
            "available": self.available,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "metrics": list(self.metrics),
            "prompt_format": self.prompt_format,
            **(dict(self.extra_protocol) if self.extra_protocol else {}),
            "items_sha256_16": digest.hexdigest()[:16],  # compare's cache key: a changed file re-evaluates
        }


# ----------------------------------------------------------------------------- reference metrics
@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l(prediction: str, golds: Sequence[str]) -> float:
    return max((_rouge().score(g, prediction)["rougeL"].fmeasure for g in golds), default=0.0)


def _chrf(prediction: str, golds: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, list(golds)).score)


def _bleu(prediction: str, golds: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, list(golds)).score)


def _needle(prediction: str, golds: Sequence[str]) -> float:
    from .needle import needle_match

    return needle_match(prediction, golds)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "rouge_l": _rouge_l,
    "chrf": _chrf,
    "bleu": _bleu,
    "needle_match": _needle,
}


def score_turns(
    metrics: Sequence[str], outputs: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, Optional[float]]:
    """Each metric over the turns that have references (mean), None where no turn has one."""
    scored = [(out, golds) for out, golds in zip(outputs, references) if golds]
    out: dict[str, Optional[float]] = {}
    for name in metrics:
        values = [METRICS[name](text, list(golds)) for text, golds in scored]
        out[name] = sum(values) / len(values) if values else None
    return out


def aggregate(per_item: Sequence[Mapping[str, Optional[float]]]) -> dict[str, dict[str, float]]:
    """Per metric: the mean over the items that have a score, and how many they are (``n``)."""
    names = list(dict.fromkeys(name for scores in per_item for name in scores))
    out = {}
    for name in names:
        values = [s[name] for s in per_item if s.get(name) is not None]
        out[name] = {"mean": sum(values) / len(values) if values else float("nan"), "n": len(values)}
    return out


# ----------------------------------------------------------------------------- JSONL files
def _jsonl_item(where: str, row: Any) -> TaskItem:
    if not isinstance(row, dict) or any(k not in row for k in ("question_id", "category", "turns")):
        raise TaskError(f"{where}: not a Spec-Bench question (question_id, category, turns and optionally reference)")
    qid, category, turns = row["question_id"], row["category"], row["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or str(qid) == "":
        raise TaskError(f"{where}: question_id {qid!r} is not an integer or a non-empty string")
    if not isinstance(category, str):
        raise TaskError(f"{where}: category {category!r} is not a string")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise TaskError(f"{where}: turns must be a non-empty list of non-empty strings")
    reference = row.get("reference") or []
    reference = [reference] if isinstance(reference, str) else reference
    if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
        raise TaskError(f"{where}: reference must be a list of strings (one per turn) or a string")
    if len(reference) > len(turns):
        raise TaskError(f"{where}: {len(reference)} references for {len(turns)} turns (reference[i] is turn i's)")
    references = tuple((r,) if r.strip() else () for r in reference) + ((),) * (len(turns) - len(reference))
    return TaskItem(str(qid), tuple(turns), references, CATEGORY_KINDS.get(category, "open"), category=category)


def load_jsonl_task(path: str | Path, max_new_tokens: int = JSONL_MAX_NEW_TOKENS) -> GenerationTask:
    """A user task from a Spec-Bench-style ``question.jsonl`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file (a task is one of {', '.join(BUILTIN_TASKS)} or a .jsonl file)")
    items, seen = [], {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{number}: not JSON ({err.msg} at column {err.colno})") from None
            item = _jsonl_item(f"{path}:{number}", row)
            if item.id in seen:
                raise TaskError(f"{path}:{number}: question_id {item.id!r} again (first on line {seen[item.id]})")
            seen[item.id] = number
            items.append(item)
    if not items:
        raise TaskError(f"{path}: no questions (one JSON object a line: question_id, category, turns)")
    return GenerationTask(
        path.stem,
        tuple(items),
        max_new_tokens,
        (),
        ("rouge_l", "chrf", "bleu"),
        str(path),
        "the turns as written; later turns after the model's own earlier answers",
        available=len(items),
    )


# ----------------------------------------------------------------------------- choosing tasks
def parse_task_list(text: str) -> list[str]:
    """``gsm8k,nq_open,FILE.jsonl`` -> names in order, duplicates dropped; refuses an empty list."""
    names = list(dict.fromkeys(comma_list(text)))
    if not names:
        raise TaskError(f"--gen-tasks {text!r}: no task named; choose from {', '.join(BUILTIN_TASKS)} or .jsonl files")
    return names


def load_task(name: str, limit: Optional[int] = None, *, data_root=None, max_new_tokens: Optional[int] = None):
    """A stock task by name (lm_tasks.py) or a JSONL file by path; ``limit`` N keeps the first N items."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TaskError(f"--limit {limit!r} is not allowed: give N >= 1 (the first N items of each task)")
    if ALIASES.get(name, name) in BUILTIN_TASKS:
        task = load_stock(name, data_root)
        if max_new_tokens is not None:
            kwargs = getattr(task.task.config, "generation_kwargs", None)
            if not kwargs or task.name == "squadv2":  # squadv2's class fixes its own requests
                raise TaskError(f"{task.name}: its budget is lm-eval's own; --max-new-tokens does not apply to it")
            kwargs["max_gen_toks"] = max_new_tokens
            task = replace(task, deviations=(*task.deviations, f"max_gen_toks {max_new_tokens} (--max-new-tokens)"))
        return replace(task, limit=limit)
    if name.endswith(".jsonl") or "/" in name or Path(name).is_file():
        task = load_jsonl_task(name, max_new_tokens or JSONL_MAX_NEW_TOKENS)
        return replace(task, items=task.items[:limit]) if limit is not None else task
    raise TaskError(
        f"unknown task {name!r}: choose from {', '.join(BUILTIN_TASKS)}, needle, longbench, longbench_<dataset>, "
        "or give a Spec-Bench-style .jsonl file"
    )


def load_tasks(names: Sequence[str], limit: Optional[int] = None, *, data_root=None, max_new_tokens=None) -> list:
    """Every task of ``names`` (all are loaded, and so checked, before anything generates)."""
    tasks = [load_task(n, limit, data_root=data_root, max_new_tokens=max_new_tokens) for n in names]
    taken: dict[str, str] = {}
    for task in tasks:
        if task.name in taken:
            raise TaskError(f"two tasks are named {task.name!r}: rename a file")
        taken[task.name] = task.name
    return tasks
