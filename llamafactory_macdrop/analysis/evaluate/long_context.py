"""The long-context tasks of ``--gen-tasks``: the needle probe and LongBench, checked early, built late.

Why two steps: their prompts are cut in tokens (the needle's length as fed, LongBench's middle
truncation), so they need the tokenizer and the generator's encoding (chat template or not),
which exist only after the model loads; but a length above the model's positions, a missing
LongBench file or a bad option must fail in one line BEFORE the model loads. :meth:`check` runs
on config.json and the files; :meth:`build` makes the tasks the generation runner then treats
like any other.

Names: ``needle`` (needle.py), ``longbench`` (the 16 English datasets) and ``longbench_<dataset>``
(longbench.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .needle import NeedleSpec, max_positions

DEFAULT_LONGBENCH_LENGTH = 7500  # the paper's v2 budget (LongBench's own for 8k models)


def is_long_context(name: str) -> bool:
    return name == "needle" or name == "longbench" or name.startswith("longbench_")


@dataclass
class LongContextTasks:
    """The long-context names of a ``--gen-tasks`` list and their options."""

    needle: Optional[NeedleSpec] = None
    longbench: list[str] = field(default_factory=list)
    longbench_dir: Optional[Path] = None
    max_length: Optional[int] = None
    limit: Optional[int] = None  # LongBench: the first N rows of each file (the needle: at most N needles per cell)
    max_new_tokens: Optional[int] = None  # --max-new-tokens: every task's budget

    def __bool__(self) -> bool:
        return self.needle is not None or bool(self.longbench)

    @property
    def longbench_length(self) -> int:
        return self.max_length if self.max_length is not None else DEFAULT_LONGBENCH_LENGTH

    def check(self, config: Optional[dict], encode: Optional[Callable[[str], Sequence[int]]] = None) -> None:
        """Everything that can be refused from config.json, the files and (``encode``: the
        tokenizer, as the runner will feed a prompt) the prompt's fixed parts."""
        if self.needle is not None:
            self.needle.check(config, encode)
        if self.longbench:
            from .longbench import check_longbench

            check_longbench(
                self.longbench,
                self.longbench_dir,
                max_length=self.longbench_length,
                max_positions=max_positions(config),
                max_new_tokens=self.max_new_tokens,
            )

    def build(self, tokenizer: Any, encode: Callable[[str], Sequence[int]], config: Optional[dict]) -> list:
        """The tasks, in the order: needle, then LongBench's (``encode``: how a one-turn prompt is fed)."""
        out: list = []
        if self.needle is not None:
            out.append(self.needle.build(encode, tokenizer, max_positions(config)))
        if self.longbench:
            from .longbench import load_longbench

            tasks = load_longbench(
                self.longbench,
                tokenizer=tokenizer,
                data_dir=self.longbench_dir,
                max_length=self.longbench_length,
                max_new_tokens=self.max_new_tokens,
            )
            out += [replace(t, limit=self.limit) for t in tasks]
        return out
