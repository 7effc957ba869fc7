"""Dropout-probability curricula: how p decays from p0 over training.

Counting follows the paper's Algorithm 1 and HF Trainer: ``step`` is the 1-based OPTIMIZER step
(all micro-batches of one gradient-accumulation cycle share it), ``total_steps`` the number of
optimizer steps of the run, ``epoch`` the 1-based epoch the step belongs to, ``num_epochs`` the
number of epochs. With these, the step curriculum reaches exactly 0 at the last step.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Progress:
    """Where training stands when a step begins."""

    step: int  # 1-based optimizer step t
    total_steps: int  # T
    epoch: int = 1  # 1-based epoch e
    num_epochs: int = 1  # E

    def __post_init__(self) -> None:
        if self.step < 1 or self.total_steps < 1 or self.epoch < 1 or self.num_epochs < 1:
            raise ValueError(f"progress counters are 1-based and positive, got {self}")


def _clip(p: float) -> float:
    return min(1.0, max(0.0, p))


@dataclass(frozen=True)
class StepCurriculum:
    """p = p0 * (1 - t/T): linear decay per optimizer step, 0 at the last step."""

    p0: float

    def probability(self, progress: Progress) -> float:
        return _clip(self.p0 * (1.0 - min(progress.step, progress.total_steps) / progress.total_steps))


@dataclass(frozen=True)
class EpochBeforeCurriculum:
    """p = p0 * (1 - (e-1)/E): constant within an epoch, p0 in the first epoch."""

    p0: float

    def probability(self, progress: Progress) -> float:
        e = min(progress.epoch, progress.num_epochs)
        return _clip(self.p0 * (1.0 - (e - 1) / progress.num_epochs))


@dataclass(frozen=True)
class EpochAfterCurriculum:
    """p = p0 * (1 - e/E): constant within an epoch, 0 in the last epoch."""

    p0: float

    def probability(self, progress: Progress) -> float:
        e = min(progress.epoch, progress.num_epochs)
        return _clip(self.p0 * (1.0 - e / progress.num_epochs))


@dataclass(frozen=True)
class ExpCurriculum:
    """p = p0 * exp(-alpha * t)."""

    p0: float
    alpha: float

    def probability(self, progress: Progress) -> float:
        return _clip(self.p0 * math.exp(-self.alpha * progress.step))


@dataclass(frozen=True)
class ConstantCurriculum:
    """p = p0 throughout (the paper's scope ablation)."""

    p0: float

    def probability(self, progress: Progress) -> float:
        return _clip(self.p0)


def build_curriculum(name: str, p0: float, alpha: float = 0.01):
    """The curriculum object for a ``macdrop_curriculum`` value."""
    if name == "step":
        return StepCurriculum(p0)
    if name == "epoch_before":
        return EpochBeforeCurriculum(p0)
    if name == "epoch_after":
        return EpochAfterCurriculum(p0)
    if name == "exp":
        return ExpCurriculum(p0, alpha)
    if name == "constant":
        return ConstantCurriculum(p0)
    raise ValueError(f"unknown curriculum {name!r}")


EPOCH_CURRICULA = ("epoch_before", "epoch_after")


def epoch_curriculum_problem(curriculum: str, num_epochs: int) -> Optional[str]:
    """Why an epoch curriculum cannot mean what the paper means with ``num_epochs`` epochs (None if it can).

    p is constant within an epoch, so with one epoch ``epoch_after`` is 0 throughout and
    ``epoch_before`` is the constant p0; an iterable dataset has no epoch count (HF Trainer then
    sets E = sys.maxsize and p never leaves its first value).
    """
    if curriculum not in EPOCH_CURRICULA:
        return None
    if num_epochs >= sys.maxsize:
        return "the run has no epoch count (an iterable/streaming dataset with max_steps: E = sys.maxsize)"
    if num_epochs <= 1:
        constant = "p = 0" if curriculum == "epoch_after" else "p = macdrop_p0"
        return f"the run trains {num_epochs} epoch (num_train_epochs, or max_steps within one epoch), so {constant} throughout"
    return None
