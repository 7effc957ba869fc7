"""LongBench (THUDM; Bai et al., ACL 2024) as offline generation tasks: the 16 English datasets.

Why this module: the paper's long-context table (REFERENCE.md §7, arXiv 2410.01866v2) is LongBench
on its 16 English datasets with prompts middle-truncated to 7,500 tokens. The data cannot be
downloaded here, so it is read from files the user already has; the prompts, token budgets, stop
strings and metric functions are lm-eval's (0.4.13 ships ``lm_eval/tasks/longbench/``), read from
the installed package at run time, so that a result here means what lm-eval's and LongBench's mean.

Tasks. ``longbench`` is the group of the 16 English datasets, in the paper's order (single-doc QA,
multi-doc QA, summarization, few-shot, synthetic, code): narrativeqa, qasper, multifieldqa_en,
hotpotqa, 2wikimqa, musique, gov_report, qmsum, multi_news, trec, triviaqa, samsum, passage_count,
passage_retrieval_en, lcc, repobench-p. The list is LongBench's 21 datasets (its pred.py, and
lm-eval's six ``_longbench_<category>.yaml`` groups, whose union is the same 21) less the five
Chinese ones (multifieldqa_zh, dureader, vcsum, lsht, passage_retrieval_zh): the paper's "16 English
datasets". NB lm-eval's own ``longbench`` group holds all 21; this one does not. A single task is
named as lm-eval names it: ``longbench_<dataset>`` (``longbench_hotpotqa``, ``longbench_2wikimqa``,
``longbench_repobench-p``). The LongBench-E variants (``_e``) are not offered.

Data (:func:`check_longbench` finds it before any model loads; a miss is ONE line naming the
missing files and every place looked):

* ``data_dir`` (the CLI's ``--longbench-dir DIR``): LongBench's release layout, ``DIR/<dataset>.jsonl``
  (THUDM/LongBench's ``data.zip``, unpacked), one JSON object a line with ``input``, ``context``,
  ``answers`` (list), ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``. When it is
  given, only it is searched.
* otherwise, best effort, the Hugging Face caches (``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``,
  else ``~/.cache/huggingface/datasets``; hub: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), first hit
  wins: ``downloads/extracted/*/data/<dataset>.jsonl`` (data.zip as THUDM's loading script
  extracted it); THUDM's ``data.zip`` in the hub cache (member ``data/<dataset>.jsonl``); the arrow
  files of a ``load_dataset`` of ``THUDM/LongBench`` or lm-eval's ``Xnhyacinth/LongBench``
  (``<namespace>___long_bench/<dataset>/<version>/<hash>/*-test*.arrow``; several hashes: the
  newest); their hub parquet files (``datasets--<namespace>--LongBench/snapshots/*/<dataset>/``,
  test split). Arrow and parquet are read with pyarrow, nothing is fetched. The cache layouts are
  those of datasets 2.14-4.0 and huggingface_hub; other layouts are not found (give the folder).

Rows are read in file order; ``limit`` N keeps the first N. An item's id is the row's ``_id`` (or
its 1-based line/row number when it has none); a row without ``question`` (THUDM's files have
``input``) renders ``{{question}}`` from ``input``.

Prompts, budgets, stops: each task's lm-eval YAML (``<dataset>.yaml``; its ``!function`` tags are
read as text, never imported): ``doc_to_text`` rendered with jinja2 the way lm-eval renders it
(``StrictUndefined``, trailing newline kept), ``generation_kwargs.max_gen_toks`` as the budget
(LongBench's dataset2maxlen), ``generation_kwargs.until`` as the stop strings ("\\n" for trec,
triviaqa, samsum; none for the rest).

Truncation, LongBench's pred.py rule exactly (:func:`truncate_middle`): the rendered prompt is
tokenized as pred.py does, with the tokenizer's DEFAULT special tokens (a Llama BOS counts; pred.py
drops them only for ChatGLM3), and when it has more than ``max_length`` ids, ``half =
int(max_length / 2)``: the prompt becomes ``decode(ids[:half]) + decode(ids[-half:])``, both with
``skip_special_tokens=True`` (so a BOS in the first half costs one content token, and an odd
``max_length`` keeps ``max_length - 1``). Why in the middle: LongBench's instructions sit at both
ends. The default ``max_length`` 7,500 is the MacDrop paper's v2 setting. The budget covers the
prompt text only: the chat template and the new tokens come on top.

Chat template: LongBench applies the model's chat prompt AFTER truncation, and not at all for
trec, triviaqa, samsum, lsht, lcc and repobench-p ("chat models are better off without" it, pred.py;
lm-eval's README says the same). Those tasks (:data:`NO_CHAT_TEMPLATE_TASKS`) carry
``chat_template=False``, which the generation runner honours (plain prompts for them, the
protocol's ``plain_prompt_tasks``); the prompt text here is the same either way (the template
wraps the truncated text).

Metrics (:func:`metric`): per item, lm-eval's copy of LongBench's own functions (``metrics.py`` of
the installed lm-eval, loaded from its file), under LongBench's eval.py rules: the item's score is
the MAX over its answers (starting from 0), and for trec, triviaqa and samsum (and lsht) the
prediction is cut to its first line first (``prediction.lstrip("\\n").split("\\n")[0]``); no other
post-processing (lm-eval's ``process_results`` strips the prediction's whitespace first and leaves
the first-line cut to its ``until``; LongBench's eval.py does neither, nor does this). Scores are on 0..1 per item; LongBench reports 100 x the task
mean (rounded to 2 decimals). Names: ``longbench_<function without _score>``, with ``:<dataset>``
appended where the dataset changes the scoring (first-line cut, or classification's classes):

* ``longbench_qa_f1`` (qa_f1_score): narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique
* ``longbench_qa_f1:triviaqa`` (qa_f1_score, first line): triviaqa
* ``longbench_rouge`` (rouge_score): gov_report, qmsum, multi_news
* ``longbench_rouge:samsum`` (rouge_score, first line): samsum
* ``longbench_classification:trec`` (classification_score, first line, trec's all_classes): trec
* ``longbench_retrieval`` (retrieval_score): passage_retrieval_en
* ``longbench_count`` (count_score): passage_count
* ``longbench_code_sim`` (code_sim_score): lcc, repobench-p

(The table is what lm-eval's YAML files say today; each task's metric is read from its
``metric_list``.) Classification is scored against one class list per task, as LongBench's eval.py
does (it uses the last row's ``all_classes`` for every item): :func:`load_longbench` binds it, so
resolve ``longbench_classification:<dataset>`` after loading. lm-eval's metrics.py imports jieba,
fuzzywuzzy and rouge at its top; none is needed by the QA, classification, retrieval and count
functions, so a missing one is stood in for while the file loads, and only the tasks that need it
are refused (one line, before any model loads): ROUGE tasks need ``rouge``, code tasks need
``fuzzywuzzy`` (``pip install rouge fuzzywuzzy``, or lm-eval's ``[longbench]`` extra).

Judge kinds (tasks.KINDS): ``context_qa`` for the QA, triviaqa and synthetic tasks (the answer is
in the given text), ``short_qa`` for trec (a label), ``open`` for summarization and code.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import yaml

from .tasks import GenerationTask, TaskError, TaskItem

GROUP = "longbench"
PREFIX = "longbench_"
DEFAULT_MAX_LENGTH = 7500

#: the 16 English datasets, in the paper's order (module docstring)
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

#: tasks LongBench's pred.py runs WITHOUT the chat prompt (its list, less the Chinese lsht)
NO_CHAT_TEMPLATE_TASKS = frozenset(PREFIX + d for d in ("trec", "triviaqa", "samsum", "lcc", "repobench-p"))

#: datasets whose prediction LongBench's eval.py cuts to its first line (lsht is Chinese, not here)
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum"})

#: dataset -> judge rubric kind (tasks.KINDS)
DATASET_KINDS = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"), "context_qa"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum", "lcc", "repobench-p"), "open"),
    "trec": "short_qa",
    "triviaqa": "context_qa",
    "passage_count": "context_qa",
    "passage_retrieval_en": "context_qa",
}

#: lm-eval metrics.py's per-answer functions used by the English tasks
METRIC_FUNCTIONS = (
    "qa_f1_score",
    "rouge_score",
    "classification_score",
    "retrieval_score",
    "count_score",
    "code_sim_score",
)

#: function -> (the name metrics.py imports for it, the package that provides it)
_LIBRARIES = {"rouge_score": ("Rouge", "rouge"), "code_sim_score": ("fuzz", "fuzzywuzzy")}

#: what metrics.py imports at its top (a missing one is stood in for while it loads)
_METRICS_IMPORTS = ("jieba", "fuzzywuzzy", "rouge")

_ROW_KEYS = "input, context, answers, length, dataset, language, all_classes, _id"

#: dataset -> the class list bound for classification (set by load_longbench)
_CLASSES: dict[str, tuple[str, ...]] = {}


class LongBenchError(TaskError):
    """LongBench cannot be set up (one line: the task, file or value, and what is wrong or allowed)."""


# ----------------------------------------------------------------------------- names
def is_longbench(name: str) -> bool:
    """Whether ``name`` is the LongBench group or one of its 16 tasks."""
    return name == GROUP or name in TASKS


def expand_names(names: Sequence[str]) -> list[str]:
    """Task names in order, the group expanded to its 16 tasks, duplicates dropped."""
    out: list[str] = []
    for name in names:
        if name == GROUP:
            out.extend(TASKS)
        elif name in TASKS:
            out.append(name)
        else:
            raise LongBenchError(
                f"unknown LongBench task {name!r}: give {GROUP} (the 16 English datasets) or one of {', '.join(TASKS)}"
            )
    return list(dict.fromkeys(out))


def _dataset(task: str) -> str:
    return task[len(PREFIX) :]


# ----------------------------------------------------------------------------- lm-eval's files
def lm_eval_longbench_dir() -> Path:
    """The installed lm-eval's ``tasks/longbench/`` folder (found without importing lm-eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LongBenchError(
            "lm-eval is not installed: LongBench's prompts, budgets and metrics are read from its "
            "lm_eval/tasks/longbench/ (pip install 'llamafactory-macdrop[eval]')"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "longbench"
    if not folder.is_dir():
        raise LongBenchError(f"{folder}: no such folder (an lm-eval with LongBench's tasks is needed, 0.4.13 has them)")
    return folder


class _YamlLoader(yaml.SafeLoader):
    """yaml.safe_load that reads lm-eval's ``!function module.name`` tag as text (never imports it)."""


_YamlLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@dataclass(frozen=True)
class LongBenchConfig:
    """What one task takes from lm-eval's YAML: the prompt template, the budget, the stops, the metric."""

    dataset: str
    path: Path
    doc_to_text: str
    max_gen_toks: int
    until: tuple[str, ...]
    function: str  # the per-answer function in metrics.py (its metric_list's native metric)

    @property
    def task(self) -> str:
        return PREFIX + self.dataset

    @property
    def metric(self) -> str:
        """The metric name this task's items are scored with (module docstring)."""
        name = PREFIX + self.function[: -len("_score")]
        scoped = self.dataset in FIRST_LINE_DATASETS or self.function == "classification_score"
        return f"{name}:{self.dataset}" if scoped else name


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


@lru_cache(maxsize=None)
def lm_eval_config(dataset: str) -> LongBenchConfig:
    """lm-eval's ``<dataset>.yaml`` for one of :data:`DATASETS`, checked to be the config expected."""
    path = lm_eval_longbench_dir() / f"{dataset}.yaml"
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.load(fh, Loader=_YamlLoader)
    except (OSError, yaml.YAMLError) as err:
        raise LongBenchError(f"{path}: cannot read lm-eval's {PREFIX}{dataset} config ({_one_line(err)})") from None

    def bad(what: str) -> LongBenchError:
        return LongBenchError(f"{path}: {what} (expected lm-eval's {PREFIX}{dataset} config)")

    if not isinstance(raw, dict) or raw.get("task") != PREFIX + dataset:
        raise bad(f"task is {raw.get('task') if isinstance(raw, dict) else None!r}")
    text, kwargs = raw.get("doc_to_text"), raw.get("generation_kwargs")
    if not isinstance(text, str) or not text:
        raise bad("no doc_to_text template")
    if not isinstance(kwargs, dict):
        raise bad("no generation_kwargs")
    budget, until = kwargs.get("max_gen_toks"), kwargs.get("until", [])
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise bad(f"generation_kwargs.max_gen_toks {budget!r} is not an integer >= 1")
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(s, str) and s for s in until):
        raise bad(f"generation_kwargs.until {until!r} is not a list of strings")
    natives = [m.get("metric") for m in raw.get("metric_list") or [] if isinstance(m, dict)]
    natives = [m for m in natives if m in METRIC_FUNCTIONS]
    if len(natives) != 1:
        raise bad(f"metric_list names no single one of {', '.join(METRIC_FUNCTIONS)}")
    return LongBenchConfig(dataset, path, text, budget, tuple(until), natives[0])


@lru_cache(maxsize=None)
def _template(text: str):
    from jinja2 import BaseLoader, Environment, StrictUndefined

    # lm-eval's own environment (lm_eval/utils.py): undefined keys fail, a trailing newline stays
    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    return env.from_string(text)


def render_prompt(config: LongBenchConfig, row: dict[str, Any]) -> str:
    """lm-eval's ``doc_to_text`` for one row (``question`` taken from ``input`` when absent)."""
    from jinja2 import TemplateError

    doc = dict(row)
    if "question" not in doc and "input" in doc:
        doc["question"] = doc["input"]
    try:
        return _template(config.doc_to_text).render(**doc)
    except TemplateError as err:
        raise LongBenchError(f"{config.path}: doc_to_text does not render for a row ({_one_line(err)})") from None


# ----------------------------------------------------------------------------- truncation
def _max_length(max_length: Any) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise LongBenchError(
            f"max_length {max_length!r} is not allowed: an integer >= 2 (tokens kept, half from each end of "
            f"the prompt; the paper's setting is {DEFAULT_MAX_LENGTH})"
        )
    return max_length


def truncate_middle(prompt: str, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """LongBench pred.py's truncation (module docstring): the prompt itself when its ids (with the
    tokenizer's default special tokens) are at most ``max_length``, else the decoded first and last
    ``int(max_length / 2)`` ids, special tokens skipped, joined."""
    max_length = _max_length(max_length)
    ids = list(tokenizer(prompt, truncation=False)["input_ids"])
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2  # = int(max_length / 2) for a positive integer
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    return head + tokenizer.decode(ids[-half:], skip_special_tokens=True)


# ----------------------------------------------------------------------------- where the data is
def _env_path(*names: str) -> Optional[Path]:
    for name in names:
        value = os.environ.get(name)
        if value:
            return Path(os.path.expandvars(value)).expanduser()
    return None


def _hf_home() -> Path:
    home = _env_path("HF_HOME")
    if home is not None:
        return home
    return (_env_path("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "huggingface"


def datasets_cache() -> Path:
    """The datasets library's cache folder, resolved as datasets resolves it (no import)."""
    return _env_path("HF_DATASETS_CACHE") or _hf_home() / "datasets"


def hub_cache() -> Path:
    """huggingface_hub's cache folder, resolved as huggingface_hub resolves it (no import)."""
    return _env_path("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub"


@dataclass(frozen=True)
class _Source:
    """Where one dataset's rows are: a JSONL file, a member of a zip, or arrow/parquet shards."""

    form: str  # "jsonl", "zip", "arrow", "parquet"
    files: tuple[Path, ...]
    member: str = ""
    origin: str = ""

    def describe(self) -> str:
        where = f"{self.files[0]}:{self.member}" if self.member else ", ".join(str(f) for f in self.files)
        return f"{where} ({self.origin})" if self.origin else where


def _newest_group(paths: Sequence[Path]) -> tuple[Path, ...]:
    """The files of the most recently written folder among ``paths``, sorted (shards in order)."""
    if not paths:
        return ()
    folders: dict[Path, list[Path]] = {}
    for path in paths:
        folders.setdefault(path.parent, []).append(path)
    newest = max(folders, key=lambda folder: (folder.stat().st_mtime, str(folder)))
    return tuple(sorted(folders[newest]))


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file()) if root.is_dir() else []


def _zip_has(path: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return member in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _cache_places(dataset: str) -> list[tuple[str, Callable[[], Optional[_Source]]]]:
    """(pattern shown in the error, finder) for each cache place, in the order they are tried."""
    cache, hub = datasets_cache(), hub_cache()
    places: list[tuple[str, Callable[[], Optional[_Source]]]] = []

    extracted = f"downloads/extracted/*/data/{dataset}.jsonl"

    def find_extracted() -> Optional[_Source]:
        found = _glob(cache, extracted)
        return _Source("jsonl", (found[-1],), origin="THUDM/LongBench data.zip, HF datasets cache") if found else None

    places.append((str(cache / extracted), find_extracted))

    member = f"data/{dataset}.jsonl"
    archives = "datasets--THUDM--LongBench/snapshots/*/data.zip"

    def find_zip() -> Optional[_Source]:
        found = [p for p in _glob(hub, archives) if _zip_has(p, member)]
        return _Source("zip", (found[-1],), member, "THUDM/LongBench, HF hub cache") if found else None

    places.append((f"{hub / archives}:{member}", find_zip))

    for namespace in ("THUDM", "Xnhyacinth"):
        arrows = f"{namespace}___long_bench/{dataset}/*/*/*-test*.arrow"

        def find_arrow(arrows=arrows, namespace=namespace) -> Optional[_Source]:
            files = _newest_group(_glob(cache, arrows))
            return _Source("arrow", files, origin=f"{namespace}/LongBench, HF datasets cache") if files else None

        places.append((str(cache / arrows), find_arrow))
    for namespace in ("THUDM", "Xnhyacinth"):
        snapshots = f"datasets--{namespace}--LongBench/snapshots/*/{dataset}"

        def find_parquet(snapshots=snapshots, namespace=namespace) -> Optional[_Source]:
            found = _glob(hub, f"{snapshots}/test/*.parquet") + _glob(hub, f"{snapshots}/*test*.parquet")
            files = _newest_group(found)
            return _Source("parquet", files, origin=f"{namespace}/LongBench, HF hub cache") if files else None

        places.append((f"{hub / snapshots}/(test/*|*test*).parquet", find_parquet))
    return places


def _find(dataset: str, data_dir: Optional[Path]) -> tuple[Optional[_Source], list[str]]:
    """The dataset's rows' source (None: not found) and every place looked, as shown to the user."""
    if data_dir is not None:
        path = Path(data_dir) / f"{dataset}.jsonl"
        return (_Source("jsonl", (path,)) if path.is_file() else None), [str(path)]
    looked = []
    for pattern, finder in _cache_places(dataset):
        looked.append(pattern)
        source = finder()
        if source is not None:
            return source, looked
    return None, looked


def _locate(tasks: Sequence[str], data_dir: Optional[Path]) -> dict[str, _Source]:
    """Every task's source, or ONE error naming every missing file and every place looked."""
    found, missing, looked = {}, [], []
    for task in tasks:
        dataset = _dataset(task)
        source, places = _find(dataset, data_dir)
        if source is None:
            missing.append(dataset)
            looked.append(places)
        else:
            found[dataset] = source
    if not missing:
        return found
    files = ", ".join(f"{d}.jsonl" for d in missing)
    if data_dir is not None:
        folder = Path(data_dir)
        state = "" if folder.is_dir() else ", which is not a folder"
        where = f"in {folder} (--longbench-dir{state}; LongBench's release layout, DIR/<dataset>.jsonl)"
    else:
        patterns = looked[0] if len(missing) == 1 else [p for p, _ in _cache_places("<dataset>")]
        where = f"in {'; '.join(patterns)} (no --longbench-dir given; give one with LongBench's <dataset>.jsonl files)"
    raise LongBenchError(f"LongBench data not found for {files}: looked {where}")


# ----------------------------------------------------------------------------- reading rows
def _json_lines(lines: Iterator[str], where: str) -> Iterator[tuple[str, int, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{where}:{number}", number, json.loads(line)
        except json.JSONDecodeError as err:
            raise LongBenchError(f"{where}:{number}: not JSON ({err.msg} at column {err.colno})") from None


def _table_rows(source: _Source) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    for path in source.files:
        try:
            if source.form == "parquet":
                table = pq.read_table(path)
            else:
                with pa.memory_map(str(path)) as mapped:
                    table = pa.ipc.open_stream(mapped).read_all()
        except (OSError, pa.ArrowException) as err:
            raise LongBenchError(f"{path}: cannot read it as {source.form} ({_one_line(err)})") from None
        for row in table.to_pylist():
            number += 1
            yield f"{path} row {number}", number, row


def _read(source: _Source) -> list[tuple[str, int, Any]]:
    """(where, 1-based number, row) for every row of the source, in its order."""
    if source.form in ("arrow", "parquet"):
        return list(_table_rows(source))
    path = source.files[0]
    try:
        if source.form == "zip":
            with zipfile.ZipFile(path) as archive, archive.open(source.member) as fh:
                return list(_json_lines((b.decode("utf-8") for b in fh), f"{path}:{source.member}"))
        with open(path, encoding="utf-8") as fh:
            return list(_json_lines(fh, str(path)))
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile, KeyError) as err:
        raise LongBenchError(f"{source.describe()}: cannot read it ({_one_line(err)})") from None


def _checked_row(where: str, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise LongBenchError(f"{where}: not a JSON object but {type(row).__name__} (LongBench rows: {_ROW_KEYS})")
    missing = [k for k in ("context", "answers") if k not in row]
    if "input" not in row and "question" not in row:
        missing.append("input")
    if missing:
        raise LongBenchError(f"{where}: missing {', '.join(missing)} (LongBench rows: {_ROW_KEYS})")
    answers = row["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in answers):
        raise LongBenchError(f"{where}: answers {answers!r} is not a list of strings")
    if not answers:
        raise LongBenchError(f"{where}: answers is empty (every LongBench row has at least one)")
    return row


def _item_id(row: dict[str, Any], number: int) -> str:
    value = row.get("_id")
    return str(value) if value not in (None, "") else str(number)


def _task_classes(rows: Sequence[tuple[str, int, Any]], dataset: str) -> tuple[str, ...]:
    """The class list classification is scored against: the last row's, as LongBench's eval.py takes it."""
    where, _, row = rows[-1]
    classes = row.get("all_classes") if isinstance(row, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise LongBenchError(
            f"{where}: all_classes {classes!r} is not a non-empty list of strings ({dataset} needs it)"
        )
    return tuple(classes)


def _build_task(
    config: LongBenchConfig, source: _Source, tokenizer: Any, max_length: int, limit: Optional[int]
) -> GenerationTask:
    rows = _read(source)
    if not rows:
        raise LongBenchError(f"{source.describe()}: no rows (LongBench rows: {_ROW_KEYS})")
    if config.function == "classification_score":
        _CLASSES[config.dataset] = _task_classes(rows, config.dataset)
    items, seen = [], {}
    for where, number, raw in rows if limit is None else rows[:limit]:
        row = _checked_row(where, raw)
        item_id = _item_id(row, number)
        if item_id in seen:
            raise LongBenchError(f"{where}: _id {item_id!r} again (first at {seen[item_id]}); ids must be unique")
        seen[item_id] = where
        prompt = truncate_middle(render_prompt(config, row), tokenizer, max_length)
        golds = tuple(str(a) for a in row["answers"])
        items.append(TaskItem(item_id, (prompt,), (golds,), DATASET_KINDS[config.dataset]))
    chat = "; LongBench runs it without a chat template" if config.task in NO_CHAT_TEMPLATE_TASKS else ""
    return GenerationTask(
        config.task,
        tuple(items),
        config.max_gen_toks,
        config.until,
        (config.metric,),
        source.describe(),
        f"lm-eval {config.task} doc_to_text, middle-truncated to {max_length} tokens{chat}",
        len(rows),
        chat_template=False if config.task in NO_CHAT_TEMPLATE_TASKS else None,
    )


# ----------------------------------------------------------------------------- metrics
class _Absent:
    """Stands for what metrics.py imports from a package that is not installed; calling it refuses."""

    def __init__(self, package: str) -> None:
        self._package = package

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise LongBenchError(_missing_package(self._package))


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(self.__name__)


def _missing_package(package: str) -> str:
    return (
        f"lm-eval's LongBench metric needs the {package!r} package, which is not installed "
        f"(pip install {package}, or lm-eval's [longbench] extra)"
    )


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def lm_eval_metrics() -> types.ModuleType:
    """lm-eval's ``tasks/longbench/metrics.py``, loaded from its file under a private name (so that
    lm-eval's package is not imported); packages it imports that are absent are stood in for."""
    path = lm_eval_longbench_dir() / "metrics.py"
    stand_ins = {p: _AbsentModule(p) for p in _METRICS_IMPORTS if not _importable(p)}
    spec = importlib.util.spec_from_file_location("llamafactory_macdrop._lm_eval_longbench_metrics", path)
    if spec is None or spec.loader is None:
        raise LongBenchError(f"{path}: cannot load lm-eval's LongBench metrics")
    module = importlib.util.module_from_spec(spec)
    sys.modules.update(stand_ins)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any failure of a third-party file is one line
        raise LongBenchError(f"{path}: lm-eval's LongBench metrics do not load ({_one_line(err)})") from None
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    missing = [f for f in METRIC_FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise LongBenchError(f"{path}: has no {', '.join(missing)} (the LongBench metric functions expected)")
    return module


def _check_packages(configs: Sequence[LongBenchConfig]) -> None:
    """Refuse (one line) tasks whose metric needs a package that metrics.py could not import."""
    needed: dict[str, list[str]] = {}
    for config in configs:
        if config.function in _LIBRARIES:
            attr, package = _LIBRARIES[config.function]
            if isinstance(getattr(lm_eval_metrics(), attr, None), _Absent):
                needed.setdefault(package, []).append(config.task)
    if needed:
        which = "; ".join(f"{package} for {', '.join(tasks)}" for package, tasks in needed.items())
        raise LongBenchError(
            f"lm-eval's LongBench metrics need packages that are not installed: {which} "
            f"(pip install {' '.join(needed)}, or lm-eval's [longbench] extra)"
        )


def _parse_metric(name: str) -> tuple[str, str]:
    base, _, dataset = name.partition(":")
    function = base[len(PREFIX) :] + "_score" if base.startswith(PREFIX) else ""
    if function not in METRIC_FUNCTIONS or (dataset and dataset not in DATASETS):
        known = ", ".join(PREFIX + f[: -len("_score")] for f in METRIC_FUNCTIONS)
        raise LongBenchError(f"unknown LongBench metric {name!r}: <name>[:<dataset>], name one of {known}")
    if function == "classification_score" and not dataset:
        raise LongBenchError(f"metric {name!r} needs its dataset (e.g. {base}:trec): its classes are the dataset's")
    return function, dataset


def metric(name: str) -> Callable[[str, Sequence[str]], float]:
    """The per-item scorer for one of the metric names the tasks carry: ``fn(prediction, golds)``,
    0..1, LongBench's rules (module docstring): first line for trec/triviaqa/samsum, max over golds."""
    function, dataset = _parse_metric(name)
    if function in _LIBRARIES and isinstance(getattr(lm_eval_metrics(), _LIBRARIES[function][0], None), _Absent):
        raise LongBenchError(f"metric {name!r}: " + _missing_package(_LIBRARIES[function][1]))
    score_one = getattr(lm_eval_metrics(), function)
    classes: Optional[tuple[str, ...]] = None
    if function == "classification_score":
        classes = _CLASSES.get(dataset)
        if classes is None:
            raise LongBenchError(
                f"metric {name!r} needs {dataset}'s all_classes: load {PREFIX}{dataset} with load_longbench first"
            )
    first_line = dataset in FIRST_LINE_DATASETS
    all_classes = list(classes) if classes is not None else None

    def score(prediction: str, golds: Sequence[str]) -> float:
        if first_line:
            prediction = prediction.lstrip("\n").split("\n")[0]
        best = 0.0
        for gold in golds:
            best = max(best, float(score_one(prediction, gold, all_classes=all_classes)))
        return best

    score.__name__ = name
    return score


# ----------------------------------------------------------------------------- loading
def _limit(limit: Optional[int]) -> Optional[int]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LongBenchError(f"limit {limit!r} is not allowed: N >= 1 (the first N rows of each task) or None for all")
    return limit


def check_longbench(
    names: Sequence[str],
    data_dir: Optional[Path] = None,
    *,
    max_length: Any = DEFAULT_MAX_LENGTH,
    max_positions: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
) -> None:
    """Refuse (one line) before any model loads: unknown names, lm-eval's configs or metrics that do
    not load, a metric package missing for a task, data files not found, a ``max_length`` that is
    no integer >= 2, or one whose prompt and answer budget do not fit the model's positions
    (``max_positions``; the chat template's few tokens come on top). Reads no rows."""
    max_length = _max_length(max_length)
    tasks = expand_names(names)
    configs = [lm_eval_config(_dataset(task)) for task in tasks]
    _check_packages(configs)
    _locate(tasks, Path(data_dir) if data_dir is not None else None)
    if max_positions is not None:
        budget = max(max_new_tokens or c.max_gen_toks for c in configs)
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
    limit: Optional[int] = None,
) -> list[GenerationTask]:
    """The tasks of ``names`` (the group ``longbench`` allowed; duplicates dropped, order kept),
    every prompt rendered and middle-truncated to ``max_length`` tokens of ``tokenizer``;
    ``limit`` N keeps each task's first N rows (``available``: the rows in its file)."""
    max_length, limit = _max_length(max_length), _limit(limit)
    data_dir = Path(data_dir) if data_dir is not None else None
    tasks = expand_names(names)
    configs = [lm_eval_config(_dataset(task)) for task in tasks]
    _check_packages(configs)
    sources = _locate(tasks, data_dir)
    return [_build_task(c, sources[c.dataset], tokenizer, max_length, limit) for c in configs]
