"""The paired statistics of ``macdrop compare`` against hand computations and the normal approximation.

The oracles here are written out by hand: the point estimates from their definitions
(perplexity = exp(sum NLL / sum tokens), accuracy = mean score, per seed, averaged over seeds),
and the interval's width against the textbook standard error of a mean of paired differences
(CLT), which the bootstrap must approach for large n. The seeds score the SAME items, so the unit
is the item: its difference averaged over seeds.
"""

from __future__ import annotations

import math
import random

import pytest

from llamafactory_macdrop.analysis.compare.paired import (
    AccuracyItems,
    MeanAccuracyItems,
    PairedError,
    PerplexityItems,
    paired_difference,
)


def _acc(scores):
    return AccuracyItems(tuple(float(s) for s in scores))


def test_point_estimates_and_n_by_hand():
    # the same 4 documents in both seeds; seed 0: control 2/4 right, treatment 3/4; seed 1: 1/4 and 1/4
    control = {0: _acc([1, 0, 1, 0]), 1: _acc([0, 0, 1, 0])}
    treatment = {0: _acc([1, 1, 1, 0]), 1: _acc([0, 1, 0, 0])}
    d = paired_difference("acc/x/clean", control, treatment, higher_is_better=True, iterations=500)
    assert d.per_seed == pytest.approx([0.75 - 0.5, 0.25 - 0.25])
    assert d.mean_diff == pytest.approx((0.25 + 0.0) / 2)
    assert d.n == 4
    assert d.seeds == [0, 1]  # distinct documents, each scored in both seeds
    assert d.low <= d.mean_diff <= d.high

    # perplexity by its definition: exp(total NLL / total predicted tokens), windows of unequal length
    a = PerplexityItems((10.0, 12.0, 3.0), (5, 5, 2))
    b = PerplexityItems((9.0, 12.5, 2.0), (5, 5, 2))
    d = paired_difference("ppl/t/clean", {3: a}, {3: b}, higher_is_better=False, iterations=500)
    assert d.mean_diff == pytest.approx(math.exp(23.5 / 12) - math.exp(25.0 / 12))
    assert d.n == 3
    assert d.per_seed == pytest.approx([d.mean_diff])

    # a mean over tasks: the mean of the task differences, n counts every task's documents
    ctl = MeanAccuracyItems((_acc([1, 0]), _acc([0, 0, 0])))
    trt = MeanAccuracyItems((_acc([1, 1]), _acc([0, 0, 1])))
    d = paired_difference("acc/mean/clean", {0: ctl}, {0: trt}, higher_is_better=True, iterations=500)
    assert d.mean_diff == pytest.approx(((1.0 - 0.5) + (1 / 3 - 0.0)) / 2)
    assert d.n == 5


def test_interval_matches_the_normal_approximation_for_large_n():
    rng = random.Random(7)
    n, seeds = 1500, (0, 1, 2)
    easy = [rng.random() for _ in range(n)]  # item difficulty, shared by every seed and arm
    # what the treatment does to each item, the same in every seed (helps some, hurts others)
    effect = [rng.choice((-0.3, 0.0, 0.35)) for _ in range(n)]
    control, treatment = {}, {}
    for seed in seeds:
        control[seed] = _acc([1.0 if rng.random() < 0.3 + 0.4 * e else 0.0 for e in easy])
        treatment[seed] = _acc([1.0 if rng.random() < 0.3 + 0.4 * e + x else 0.0 for e, x in zip(easy, effect)])
    d = paired_difference("acc/t/clean", control, treatment, higher_is_better=True, iterations=4000, seed=1)
    # textbook: the unit is the document, its difference averaged over the seeds; se = sd / sqrt(n)
    per_item = [sum(treatment[s].scores[i] - control[s].scores[i] for s in seeds) / len(seeds) for i in range(n)]
    mean = sum(per_item) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in per_item) / (n - 1) / n)
    assert d.mean_diff == pytest.approx(mean)
    assert d.n == n
    assert d.low == pytest.approx(mean - 1.96 * se, abs=0.12 * 1.96 * se)
    assert d.high == pytest.approx(mean + 1.96 * se, abs=0.12 * 1.96 * se)


def test_false_verdicts_stay_near_the_nominal_rate():
    """No true difference on average (the treatment helps some documents and hurts as many others)
    and seeds that answer alike (each arm's answers the same in all 3 seeds, as trained adapters
    often are): at 95 %, a 'better' or 'worse' verdict should come in about 5 % of experiments. A
    bootstrap that drew every seed's items on its own would count each document three times and
    call a difference in about a quarter of them."""
    rng = random.Random(3)
    false = 0
    for trial in range(120):
        a = [rng.random() < 0.5 for _ in range(150)]
        b = [x if rng.random() < 0.7 else not x for x in a]  # flips both ways, mean effect 0
        control = {s: _acc(a) for s in (0, 1, 2)}
        treatment = {s: _acc(b) for s in (0, 1, 2)}
        d = paired_difference("acc/t/clean", control, treatment, higher_is_better=True, iterations=400, seed=trial)
        false += d.direction != "none"
    assert false <= 14, f"{false}/120 experiments called a difference that is not there"


def test_verdicts():
    same = {0: _acc([1, 0, 1, 1, 0] * 20), 1: _acc([0, 1, 1, 0, 1] * 20)}
    d = paired_difference("acc/t/clean", same, same, higher_is_better=True, iterations=300)
    assert (d.mean_diff, d.low, d.high, d.direction) == (0.0, 0.0, 0.0, "none")
    assert "no difference detectable" in d.verdict

    # every document better in both seeds: detectable, in the right direction for each metric kind
    worse = {s: _acc([0.0] * 50) for s in (0, 1)}
    better = {s: _acc([1.0] * 25 + [0.0] * 25) for s in (0, 1)}
    d = paired_difference("acc/t/clean", worse, better, higher_is_better=True, iterations=300)
    assert d.direction == "better"
    assert d.low > 0
    lower_nll = {0: PerplexityItems((1.0,) * 40, (4,) * 40)}
    higher_nll = {0: PerplexityItems((2.0,) * 40, (4,) * 40)}
    d = paired_difference("ppl/t/clean", higher_nll, lower_nll, higher_is_better=False, iterations=300)
    assert d.direction == "better"
    assert d.high < 0
    d = paired_difference("ppl/t/clean", lower_nll, higher_nll, higher_is_better=False, iterations=300)
    assert d.direction == "worse"

    # a big gain in one seed, a small loss in the other: the item interval may exclude 0, the seeds disagree
    ctl = {0: _acc([0.0] * 200), 1: _acc([1.0] * 200)}
    trt = {0: _acc([1.0] * 100 + [0.0] * 100), 1: _acc([1.0] * 100 + [0.0] * 4 + [1.0] * 96)}
    d = paired_difference("acc/t/clean", ctl, trt, higher_is_better=True, iterations=500)
    assert d.low > 0
    assert d.per_seed[1] < 0
    assert d.direction == "none"
    assert "seeds disagree" in d.verdict


def test_unpairable_items_are_refused():
    with pytest.raises(PairedError, match="different items"):
        paired_difference("acc/t/clean", {0: _acc([1, 0])}, {0: _acc([1, 0, 1])}, higher_is_better=True)
    with pytest.raises(PairedError, match="seed 1 vs seed 0"):  # the seeds must score the same items
        paired_difference(
            "acc/t/clean", {0: _acc([1, 0]), 1: _acc([1])}, {0: _acc([0, 0]), 1: _acc([0])}, higher_is_better=True
        )
    with pytest.raises(PairedError, match="share no seed"):
        paired_difference("acc/t/clean", {0: _acc([1])}, {1: _acc([1])}, higher_is_better=True)
    with pytest.raises(PairedError, match="not the same windows"):
        paired_difference(
            "ppl/t/clean",
            {0: PerplexityItems((1.0,), (3,))},
            {0: PerplexityItems((1.0,), (4,))},
            higher_is_better=False,
        )


def test_too_few_items_give_no_verdict():
    """One window, whatever the difference: the bootstrap resamples it to itself (a point "interval"),
    so no verdict; from MIN_ITEMS items on the interval decides again."""
    from llamafactory_macdrop.analysis.compare.paired import MIN_ITEMS

    low = {0: PerplexityItems((1.0,), (4,))}
    high = {0: PerplexityItems((3.0,), (4,))}
    d = paired_difference("ppl/t/clean", low, high, higher_is_better=False, iterations=200)
    assert (d.direction, d.n) == ("none", 1)
    assert d.verdict.startswith("no verdict: too few items for an interval: 1 paired windows (at least 10)")
    many_low = {0: PerplexityItems((1.0,) * MIN_ITEMS, (4,) * MIN_ITEMS)}
    many_high = {0: PerplexityItems((3.0,) * MIN_ITEMS, (4,) * MIN_ITEMS)}
    assert paired_difference("ppl/t/clean", many_low, many_high, higher_is_better=False).direction == "worse"
    few_docs = {0: MeanAccuracyItems((_acc([1.0] * 30), _acc([1.0, 0.0])))}  # one task of two documents
    d = paired_difference("acc/mean/clean", few_docs, few_docs, higher_is_better=True, iterations=200)
    assert d.verdict.startswith("no verdict: too few items for an interval: 2 items in a task")
