"""THE bridge to lm-eval-harness: its ``HFLM`` around the model already in memory, for every task.

Why one bridge: zero-shot (log-likelihood), the stock generation tasks (gsm8k, nq_open, squadv2,
LongBench) and our own generation tasks (the needle, Spec-Bench files, the local judge) all run
through the same ``HFLM`` on the loaded (possibly attacked or adapter-carrying) model, so a prompt
is encoded, batched, decoded and stopped exactly as lm-eval does it and nothing is reloaded
between attack settings. lm-eval's stock tasks are read with lm-eval's own YAML loader; only their
data source is swapped for a local copy (``custom_dataset``) where the hub is not reachable.

HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set (unless already set) before lm-eval is imported:
nothing here downloads.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn


def offline() -> None:
    """No downloads; lm-eval's notes on building a task (custom kwargs, default generation_kwargs) kept out
    of the output: what it changed is in the protocol."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(key, "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def stock_config(relative: str) -> dict[str, Any]:
    """lm-eval's own YAML (``relative`` to lm_eval/tasks/), includes and ``!function`` resolved by lm-eval."""
    offline()
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / relative
    try:  # lm-eval >= 0.4.10
        from lm_eval.tasks._yaml_loader import load_yaml

        with warnings.catch_warnings():  # fuzzywuzzy (LongBench's metrics) on import: "slow pure-python"
            warnings.filterwarnings("ignore", message="Using slow pure-python SequenceMatcher")
            return load_yaml(path, resolve_func=True)
    except ImportError:  # older 0.4.x
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(str(path))


def stock_task(relative: str, **overrides: Any):
    """A ``ConfigurableTask`` from lm-eval's YAML with ``overrides`` (the data source, the split)."""
    from lm_eval.api.task import ConfigurableTask

    config = stock_config(relative)
    for key in ("tag", "group", "include"):
        config.pop(key, None)
    config.update(overrides)
    return ConfigurableTask(config=config)


def saved_split(folder: Path, split: str, convert: Optional[Callable] = None, **_: Any):
    """``custom_dataset`` for a ``datasets.save_to_disk`` folder: ``{split: Dataset}``."""
    import datasets

    data = datasets.load_from_disk(str(folder))
    if convert is not None:
        data = data.map(convert, keep_in_memory=True)  # never write cache files into site-packages
    return datasets.DatasetDict({split: data})


def rows_split(rows: Sequence[Mapping[str, Any]], split: str, **_: Any):
    """``custom_dataset`` for rows already read (OLMES request files, LongBench's JSONL)."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list([dict(r) for r in rows])})


def uses_chat_template(tokenizer: Any, asked: bool = True) -> bool:
    """The chat template is applied when asked for and the tokenizer has one (lm-eval's
    ``apply_chat_template``)."""
    return bool(asked and getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """The ids ``HFLM`` feeds for a one-turn prompt, from the tokenizer alone (before the model
    loads): its ``apply_chat_template`` (text) then its ``tok_encode`` (the tokenizer's own special
    tokens, none added when the text already starts with BOS)."""
    if uses_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


class LoadedLM:
    """lm-eval's ``HFLM`` on a model in memory: lm-eval's tasks, and greedy text for our own."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: Optional[int] = None):
        offline()
        self.tokenizer = tokenizer
        self._settings = dict(tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.rebind(model)

    def rebind(self, model: nn.Module) -> None:
        """Evaluate ``model`` from now on (the base with another adapter)."""
        from lm_eval.models.huggingface import HFLM

        self.model = model
        self.lm = HFLM(pretrained=model, **self._settings)  # its device is the model's

    def evaluate(
        self,
        tasks: Mapping[str, Any],
        *,
        limit: Optional[int] = None,
        log_samples: bool = False,
        chat_template: bool = False,
        batch_size: Optional[int] = None,
    ) -> dict[str, Any]:
        """lm-eval's ``evaluate`` on built tasks (its output: ``results``, ``samples``, ``n-samples``)."""
        from lm_eval.evaluator import evaluate

        with self._batch(batch_size):
            return evaluate(
                self.lm,
                {"tasks": dict(tasks), "groups": {}},
                limit=limit,
                bootstrap_iters=0,
                log_samples=log_samples,
                apply_chat_template=uses_chat_template(self.tokenizer, chat_template),
                fewshot_as_multiturn=uses_chat_template(self.tokenizer, chat_template),
            )

    def prompt(self, messages: Sequence[Mapping[str, str]], chat_template: bool) -> str:
        """The text fed for a conversation: lm-eval's ``apply_chat_template``, or without a template
        the turns joined by blank lines (a system text first)."""
        if uses_chat_template(self.tokenizer, chat_template):
            return self.lm.apply_chat_template([dict(m) for m in messages])
        return "\n\n".join(m["content"] for m in messages)

    def encode(self, text: str) -> list[int]:
        return list(self.lm.tok_encode(text))

    def generate(
        self, contexts: Sequence[str], *, until: Sequence[str] = (), max_gen_toks: int = 256, batch_size=None
    ) -> list[str]:
        """Greedy continuations through ``HFLM.generate_until`` (its batching, its EOS and stop
        strings; the text is cut before the first stop string)."""
        from lm_eval.api.instance import Instance

        kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
        requests = [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]
        with self._batch(batch_size):
            return list(self.lm.generate_until(requests, disable_tqdm=True))

    def _batch(self, size: Optional[int]):
        """``HFLM``'s batch size for one call (long prompts batch smaller: ``--gen-batch-tokens``)."""
        from contextlib import contextmanager

        @contextmanager
        def scope():
            before = self.lm.batch_size_per_gpu
            if size is not None:
                self.lm.batch_size_per_gpu = size
            try:
                yield
            finally:
                self.lm.batch_size_per_gpu = before

        return scope()
