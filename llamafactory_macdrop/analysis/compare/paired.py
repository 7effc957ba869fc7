"""Paired differences between two arms of a comparison, with a bootstrap interval over items.

Why this statistic: with 2-3 training seeds, a t-interval over seeds is either undefined or
meaninglessly wide, and an unpaired comparison throws away that both arms were scored on the
SAME evaluation items, in every seed. So the items (perplexity windows, zero-shot documents)
are resampled with replacement ONCE per iteration and that one draw is applied to both arms
(paired) and to every seed (the seeds score the same items: drawing per seed would treat one
item as several independent ones and shrink the interval by up to the square root of the seed
count); the metric is recomputed for each arm and seed from the drawn items, and the per-seed
differences are averaged over seeds. Repeating that ``iterations`` times gives the distribution
whose percentiles are the interval. ``n`` is the number of distinct paired items the interval
rests on (for a mean over tasks, the documents of all its tasks); each was scored in every seed.

What the interval covers: how much the difference would move on another draw of evaluation
items of the same kind, for these trained adapters. It does not cover how much another training
seed would move it; that spread is reported separately (``per_seed``), and the verdict asks for
both: an interval that excludes 0 and the same sign in every seed.

Metrics are computed from item values by their own rule: perplexity = exp(sum NLL / sum tokens)
over the chosen windows, accuracy = mean of 0/1 scores, a mean over tasks = mean of the task
accuracies (each task resampled on its own), a generation metric = mean of the item scores over
the items every run scored (a judge answer that did not parse in one run leaves that item out of
every run's pair; their number is reported as ``items_unscored_in_some_run``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ...errors import MacDropError


class PairedError(MacDropError, ValueError):
    """Two arms whose items cannot be paired."""


#: the fewest paired items a bootstrap interval (and so a verdict) rests on. Below it the resampling
#: distribution is a handful of atoms: one item resamples to itself (the "interval" is a point),
#: two to three values; its percentile interval then covers far less often than it says. Fewer
#: items give the mean difference and no verdict, with the reason.
MIN_ITEMS = 10


@dataclass(frozen=True)
class PerplexityItems:
    """Per-window NLL sums (nats) and predicted-token counts of one corpus."""

    nll: tuple[float, ...]
    tokens: tuple[int, ...]

    kind = "ppl"

    def __len__(self) -> int:
        return len(self.nll)

    def value(self, idx: Optional[np.ndarray] = None) -> np.ndarray | float:
        nll, tok = np.asarray(self.nll, dtype=np.float64), np.asarray(self.tokens, dtype=np.float64)
        if idx is None:
            return math.exp(nll.sum() / tok.sum())
        return np.exp(nll[idx].sum(axis=-1) / tok[idx].sum(axis=-1))


@dataclass(frozen=True)
class AccuracyItems:
    """Per-document 0/1 scores of one zero-shot task."""

    scores: tuple[float, ...]

    kind = "acc"

    def __len__(self) -> int:
        return len(self.scores)

    def value(self, idx: Optional[np.ndarray] = None) -> np.ndarray | float:
        s = np.asarray(self.scores, dtype=np.float64)
        return float(s.mean()) if idx is None else s[idx].mean(axis=-1)


@dataclass(frozen=True)
class ScoreItems:
    """Per-item scores of one generation task and metric (exact match, F1, ROUGE-L, chrF, the
    judge's 1-5, ...); NaN where an item has no score (the judge's answer did not parse). Pairing
    keeps the items every run scored (:func:`paired_difference`), so both arms and every seed
    still rest on the same items."""

    scores: tuple[float, ...]

    kind = "gen"

    def __len__(self) -> int:
        return len(self.scores)

    def value(self, idx: Optional[np.ndarray] = None) -> np.ndarray | float:
        s = np.asarray(self.scores, dtype=np.float64)
        if idx is None:
            return float(np.nanmean(s)) if np.isfinite(s).any() else float("nan")
        return np.nanmean(s[idx], axis=-1)

    def kept(self, keep: np.ndarray) -> "ScoreItems":
        return ScoreItems(tuple(np.asarray(self.scores, dtype=np.float64)[keep].tolist()))


@dataclass(frozen=True)
class MeanAccuracyItems:
    """Several tasks' scores; the metric is the unweighted mean of the task accuracies."""

    tasks: tuple[AccuracyItems, ...]

    kind = "acc"

    def __len__(self) -> int:
        return sum(len(t) for t in self.tasks)


def metric_value(items) -> float:
    """The metric on all items (what the report's per-run values are)."""
    if isinstance(items, MeanAccuracyItems):
        return float(np.mean([t.value() for t in items.tasks]))
    return float(items.value())


def _check_pair(name: str, a, b) -> None:
    if type(a) is not type(b):
        raise PairedError(f"{name}: the arms' items are of different kinds")
    if isinstance(a, MeanAccuracyItems):
        if len(a.tasks) != len(b.tasks):
            raise PairedError(f"{name}: the arms were scored on different task sets")
        for x, y in zip(a.tasks, b.tasks):
            _check_pair(name, x, y)
    elif len(a) != len(b):
        raise PairedError(f"{name}: the arms were scored on different items ({len(a)} vs {len(b)})")
    if isinstance(a, PerplexityItems) and a.tokens != b.tokens:
        raise PairedError(f"{name}: the arms' windows differ in length, so they are not the same windows")


def _draws(items, rng: np.random.Generator, iterations: int):
    """One bootstrap draw of item indices per iteration, shaped like ``items`` (per task for a mean)."""
    if isinstance(items, MeanAccuracyItems):
        return [_draws(t, rng, iterations) for t in items.tasks]
    return rng.integers(0, len(items), size=(iterations, len(items)))


def _resampled_diff(a, b, idx) -> np.ndarray:
    """Bootstrap values of metric(b) - metric(a) on the drawn items ``idx`` (the same for both)."""
    if isinstance(a, MeanAccuracyItems):
        return sum(_resampled_diff(x, y, i) for x, y, i in zip(a.tasks, b.tasks, idx)) / len(a.tasks)
    return b.value(idx) - a.value(idx)


@dataclass
class PairedDifference:
    """metric(treatment) - metric(control), averaged over the seeds both arms have."""

    metric: str
    treatment: str
    control: str
    mean_diff: float
    low: float
    high: float
    n: int  # distinct paired items the interval rests on (each scored in every seed)
    seeds: list[int]
    per_seed: list[float]  # the difference in each seed
    confidence: float
    iterations: int
    higher_is_better: bool
    verdict: str = ""
    direction: str = ""  # better | worse | none (for the treatment)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out.update(self.extra)
        return out


def paired_difference(
    metric: str,
    control: dict[int, Any],
    treatment: dict[int, Any],
    *,
    treatment_name: str = "macdrop",
    control_name: str = "plain",
    higher_is_better: bool,
    iterations: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The paired bootstrap of ``metric`` over the seeds both ``control`` and ``treatment`` have
    (seed -> items); see the module docstring for what it means."""
    if not 0 < confidence < 1:
        raise PairedError(f"confidence {confidence} is not allowed: give a number between 0 and 1")
    if iterations < 100:
        raise PairedError(f"--bootstrap {iterations} is not allowed: give at least 100 iterations")
    seeds = sorted(set(control) & set(treatment))
    if not seeds:
        raise PairedError(f"{metric}: {treatment_name} and {control_name} share no seed")
    rng = np.random.default_rng(seed)
    dropped = 0
    if isinstance(control[seeds[0]], ScoreItems):  # the items every run scored, so the pairs are real pairs
        for s in seeds:
            _check_pair(metric, control[s], treatment[s])
            _check_pair(f"{metric} (seed {s} vs seed {seeds[0]})", control[seeds[0]], control[s])
        keep = np.all(
            [np.isfinite(np.asarray(x.scores, dtype=np.float64)) for s in seeds for x in (control[s], treatment[s])],
            axis=0,
        )
        dropped = int((~keep).sum())
        if not keep.any():
            raise PairedError(f"{metric}: no item was scored in every run ({dropped} items unscored somewhere)")
        control = {s: control[s].kept(keep) for s in seeds}
        treatment = {s: treatment[s].kept(keep) for s in seeds}
    first = control[seeds[0]]
    per_seed, boot = [], np.zeros(iterations)
    for s in seeds:
        a, b = control[s], treatment[s]
        _check_pair(metric, a, b)
        _check_pair(f"{metric} (seed {s} vs seed {seeds[0]})", first, a)  # the seeds scored the same items
        per_seed.append(metric_value(b) - metric_value(a))
    idx = _draws(first, rng, iterations)
    for s in seeds:
        boot += _resampled_diff(control[s], treatment[s], idx)
    n = len(first)
    boot /= len(seeds)
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(boot, [tail, 1 - tail]))
    result = PairedDifference(
        metric,
        treatment_name,
        control_name,
        float(np.mean(per_seed)),
        low,
        high,
        n,
        seeds,
        per_seed,
        confidence,
        iterations,
        higher_is_better,
    )
    if dropped:
        result.extra["items_unscored_in_some_run"] = dropped
    fewest = min(len(t) for t in first.tasks) if isinstance(first, MeanAccuracyItems) else n
    if fewest < MIN_ITEMS:
        what = "items in a task" if isinstance(first, MeanAccuracyItems) else f"paired {_item_word(first)}"
        result.extra["no_interval"] = (
            f"too few items for an interval: {fewest} {what} (at least {MIN_ITEMS}); evaluate on more "
            "(a longer text or more windows for perplexity, a larger --limit for tasks)"
        )
    result.direction, result.verdict = verdict(result)
    return result


def _item_word(items) -> str:
    return {"ppl": "windows", "acc": "documents", "gen": "items"}.get(getattr(items, "kind", ""), "items")


def verdict(d: PairedDifference) -> tuple[str, str]:
    """(better | worse | none, one sentence): a difference counts only if the interval excludes 0
    AND every seed's difference has the interval's sign."""
    if d.extra.get("no_interval"):
        return "none", f"no verdict: {d.extra['no_interval']} (mean difference {d.mean_diff:+.4g})"
    excludes = d.low > 0 or d.high < 0
    sign = 1 if d.low > 0 else -1
    agree = all((x > 0) if sign > 0 else (x < 0) for x in d.per_seed)
    interval = f"{d.mean_diff:+.4g} [{d.low:+.4g}, {d.high:+.4g}], n={d.n}, {len(d.seeds)} seed(s)"
    if len(d.seeds) == 1:
        interval += "; one seed: training-seed variation not seen"
    if not excludes:
        return "none", f"no difference detectable at this size ({interval})"
    if not agree:
        return "none", f"the item interval excludes 0 but the seeds disagree in sign ({interval}): not detectable"
    good = (sign > 0) == d.higher_is_better
    return (
        ("better", f"{d.treatment} better than {d.control} ({interval})")
        if good
        else ("worse", f"{d.treatment} worse than {d.control} ({interval})")
    )


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one seed) of a metric over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
