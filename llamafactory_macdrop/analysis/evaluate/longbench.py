"""LongBench (THUDM; Bai et al., ACL 2024) through lm-eval's stock ``longbench_*`` tasks.

Why: the paper's long-context table (REFERENCE.md §7) is LongBench on its 16 English datasets with
prompts middle-truncated to 7,500 tokens. lm-eval 0.4.13 ships the tasks (prompts, budgets, stop
strings, LongBench's metric functions); the ONE thing it does not do is LongBench's truncation,
which is added here as a hook on the task's ``doc_to_text`` (:func:`truncate_middle`, pred.py's
rule: the rendered prompt's ids with the tokenizer's default special tokens; above ``max_length``
the decoded first ``int(max_length / 2)`` ids + the last ones, special tokens skipped). lm-eval
applies the chat template AFTER it, as pred.py does. The truncation is named in the protocol.

Names: ``longbench`` is the 16 English datasets in the paper's order (lm-eval's own ``longbench``
group also holds the five Chinese ones), ``longbench_<dataset>`` one of them, as lm-eval names it.
trec, triviaqa, samsum, lcc and repobench-p run without the chat template (pred.py's list; the
protocol's ``plain_prompt_tasks``).

Data: ``--longbench-dir DIR`` with LongBench's release files ``DIR/<dataset>.jsonl`` (read as the
task's ``custom_dataset``; a row without ``question`` gets it from ``input``, the field THUDM's
files use); without it, the stock dataset (``Xnhyacinth/LongBench``, from the Hugging Face cache
when the hub is not reachable). The metrics need lm-eval's ``[longbench]`` extra (jieba,
fuzzywuzzy, rouge), which lm-eval's loader imports with the tasks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

from .harness import rows_split, stock_config, stock_task
from .lm_tasks import StockGenTask, TaskError

GROUP = "longbench"
PREFIX = "longbench_"
DEFAULT_MAX_LENGTH = 7500
DATASETS = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
TASKS = tuple(PREFIX + d for d in DATASETS)
NO_CHAT_TEMPLATE_TASKS = frozenset(PREFIX + d for d in ("trec", "triviaqa", "samsum", "lcc", "repobench-p"))
_QA = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")
#: dataset -> judge rubric kind (judge.RUBRICS)
DATASET_KINDS = {
    **dict.fromkeys((*_QA, "passage_count", "passage_retrieval_en"), "context_qa"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum", "lcc", "repobench-p"), "open"),
    "trec": "short_qa",
}


class LongBenchError(TaskError):
    """LongBench cannot be set up (one line: the task, file or value, and what is wrong or allowed)."""


def expand_names(names: Sequence[str]) -> list[str]:
    """Task names in order, the group expanded to its 16 tasks, duplicates dropped."""
    out: list[str] = []
    for name in names:
        if name not in (GROUP, *TASKS):
            raise LongBenchError(
                f"unknown LongBench task {name!r}: give {GROUP} (the 16 English datasets) or one of {', '.join(TASKS)}"
            )
        out += TASKS if name == GROUP else [name]
    return list(dict.fromkeys(out))


def truncate_middle(prompt: str, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """LongBench pred.py's truncation (module docstring)."""
    ids = list(tokenizer(prompt, truncation=False)["input_ids"])
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2  # = int(max_length / 2) for a positive integer
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
        ids[-half:], skip_special_tokens=True
    )


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LongBenchError(f"{path}:{number}: not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict) or "context" not in row or not row.get("answers"):
                raise LongBenchError(
                    f"{path}:{number}: not a LongBench row (input, context, answers, all_classes, ...)"
                )
            rows.append({**row, "question": row.get("question", row.get("input", ""))})
    if not rows:
        raise LongBenchError(f"{path}: no rows")
    return rows


def max_gen_toks(task: str) -> int:
    """The answer budget lm-eval's YAML gives the task (LongBench's dataset2maxlen)."""
    return int(stock_config(f"longbench/{task[len(PREFIX) :]}.yaml")["generation_kwargs"]["max_gen_toks"])


def check_longbench(
    names: Sequence[str],
    data_dir: Optional[Path] = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_positions: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
) -> None:
    """Refuse (one line) before any model loads: unknown names, missing files, a ``max_length`` that
    is no integer >= 2 or whose prompt and answer do not fit the model's positions."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise LongBenchError(f"--max-length {max_length!r} is not allowed: an integer >= 2 (the paper's: 7500)")
    tasks = expand_names(names)
    if data_dir is not None:
        missing = [
            f"{t[len(PREFIX) :]}.jsonl" for t in tasks if not (Path(data_dir) / f"{t[len(PREFIX) :]}.jsonl").is_file()
        ]
        if missing:
            raise LongBenchError(
                f"LongBench data not found for {', '.join(missing)} in {data_dir} (--longbench-dir: LongBench's "
                "release layout, DIR/<dataset>.jsonl)"
            )
    if max_positions is not None:
        budget = max(max_new_tokens or max_gen_toks(t) for t in tasks)
        if max_length + budget > max_positions:
            raise LongBenchError(
                f"--max-length {max_length} + a {budget}-token answer is more than the model's "
                f"{max_positions} positions: give --max-length {max_positions - budget} or less"
            )


def load_longbench(
    names: Sequence[str],
    *,
    tokenizer: Any,
    data_dir: Optional[Path] = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: Optional[int] = None,
) -> list[StockGenTask]:
    """lm-eval's tasks of ``names``, their prompts middle-truncated to ``max_length`` tokens of ``tokenizer``."""
    out = []
    for name in expand_names(names):
        dataset = name[len(PREFIX) :]
        overrides: dict[str, Any] = {}
        data = f"Xnhyacinth/LongBench {dataset} (stock: hub or cache)"
        if data_dir is not None:
            path = Path(data_dir) / f"{dataset}.jsonl"
            overrides = dict(custom_dataset=partial(rows_split, _rows(path), "test"))
            data = str(path)
        deviations = [
            f"LongBench's middle truncation of the prompt to {max_length} tokens (pred.py), before the chat template"
        ]
        try:
            task = stock_task(f"longbench/{dataset}.yaml", **overrides)
        except Exception as err:  # noqa: BLE001 - the datasets/hub error of a missing copy, one line
            raise LongBenchError(f"{name}: its data does not load ({' '.join(str(err).split())[:300]})") from None
        if max_new_tokens is not None:
            task.config.generation_kwargs["max_gen_toks"] = max_new_tokens
            deviations.append(f"max_gen_toks {max_new_tokens} (--max-new-tokens)")
        original = task.doc_to_text
        task.doc_to_text = lambda doc, doc_to_text=None, _o=original: truncate_middle(
            _o(doc, doc_to_text), tokenizer, max_length
        )
        chat = False if name in NO_CHAT_TEMPLATE_TASKS else None
        spec = StockGenTask(name, task, DATASET_KINDS[dataset], data, "test", 0, tuple(deviations), chat)
        out.append(replace(spec, extra={"truncation": {"rule": "LongBench pred.py middle", "max_length": max_length}}))
    return out
