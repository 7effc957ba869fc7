import math

import pytest

from llamafactory_macdrop.core.curriculum import (
    Progress,
    build_curriculum,
    epoch_curriculum_problem,
)


def p(name, t, T, e=1, E=1, p0=0.8, alpha=0.01):
    return build_curriculum(name, p0, alpha).probability(Progress(t, T, e, E))


def test_step_decays_linearly_to_zero_at_the_last_step():
    T = 10
    values = [p("step", t, T) for t in range(1, T + 1)]
    assert values == pytest.approx([0.8 * (1 - t / T) for t in range(1, T + 1)])
    assert values[-1] == 0.0
    assert all(a > b for a, b in zip(values, values[1:]))


def test_epoch_before_uses_the_epoch_that_started():
    # p0 * (1 - (e-1)/E): p0 throughout epoch 1, then steps down
    assert [p("epoch_before", 5, 30, e, 3) for e in (1, 2, 3)] == pytest.approx([0.8, 0.8 * 2 / 3, 0.8 / 3])


def test_epoch_after_reaches_zero_in_the_last_epoch():
    assert [p("epoch_after", 5, 30, e, 3) for e in (1, 2, 3)] == pytest.approx([0.8 * 2 / 3, 0.8 / 3, 0.0])


def test_exp_and_constant():
    assert p("exp", 100, 579, alpha=0.01) == pytest.approx(0.8 * math.exp(-1.0))
    assert p("exp", 1, 579, alpha=0.5, p0=1.0) == pytest.approx(math.exp(-0.5))
    assert p("constant", 3, 10) == p("constant", 9, 10) == 0.8


def test_probability_is_clipped_and_steps_beyond_T_are_capped():
    assert p("step", 12, 10) == 0.0
    assert p("epoch_after", 1, 10, 5, 3) == 0.0  # epoch beyond E counts as the last


def test_progress_is_one_based():
    with pytest.raises(ValueError):
        Progress(0, 10)


def test_epoch_curricula_need_several_known_epochs():
    import sys

    assert "p = 0 throughout" in epoch_curriculum_problem("epoch_after", 1)
    assert "p = macdrop_p0 throughout" in epoch_curriculum_problem("epoch_before", 1)
    assert "no epoch count" in epoch_curriculum_problem("epoch_after", sys.maxsize)
    assert epoch_curriculum_problem("epoch_after", 2) is None
    assert epoch_curriculum_problem("step", 1) is None
