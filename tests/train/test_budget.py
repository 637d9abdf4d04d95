"""Training by time: the planner's arithmetic and its errors (the loop under a mocked clock is in test_loop.py)."""

from __future__ import annotations

import pytest

from duomodal.config import ConfigError
from duomodal.train.budget import BudgetError, StepPlan, plan_steps, revise_steps, revision_points, tasks_due
from duomodal.train.recipe import TrainConfig


def test_tasks_due_counts_the_periodic_ones_and_the_final_one():
    assert tasks_due(12, 4) == 3  # steps 4 and 8, then the one after step 12
    assert tasks_due(13, 4) == 4
    assert tasks_due(12, 0) == 1  # only at the end
    assert tasks_due(1, 4) == 1


def test_the_plan_is_the_most_steps_that_fit():
    # 60 s, 5% kept, 5 s spent: 52 s for steps of 0.5 s, a 2 s validation every 100 steps and at the end,
    # one 1 s sample grid at the end; 98 steps take 52 s, 99 take 52.5 s
    plan = plan_steps(1.0, 5.0, 0.5, 6, 2.0, 100, 1.0, 0, warmup_steps=50)
    assert plan.steps == 98
    assert plan.warmup_steps == 24  # fitted: at most a quarter of the steps
    assert plan.planned_s == pytest.approx(52.0)
    assert plan_steps(10.0, 5.0, 0.5, 6, 2.0, 100, 1.0, 0, warmup_steps=50).warmup_steps == 50


def test_a_revision_re_plans_from_the_measured_pace_only_when_it_is_well_off():
    plan = plan_steps(1.0, 5.0, 0.5, 6, 2.0, 100, 1.0, 0, warmup_steps=50)  # 98 steps, as above
    assert revision_points(98) == [10, 20, 29, 39, 49, 59, 69, 78, 88]  # every tenth of the steps
    # at step 10, 5 s into the run: 47 s left; steps at 0.52 s (4% slower) still fit the margin: no revision
    assert revise_steps(plan, 10, 5.0, 0.52, 100, 0) is None
    # steps at 1 s, twice the probe's: the final validation and samples slow alike (4 s + 2 s), so 41 more
    # steps fit in the 47 s left
    assert revise_steps(plan, 10, 5.0, 1.0, 100, 0) == 51
    # faster steps buy more, but at most twice the probe's plan; a little faster is left alone
    assert revise_steps(plan, 10, 5.0, 0.25, 100, 0) == 188  # (178 more x 0.25 s + 2 validations + samples)
    assert revise_steps(plan, 10, 5.0, 0.2, 100, 0) == 196
    assert revise_steps(plan, 10, 5.0, 0.48, 100, 0) is None
    # past half of the steps a revision only shortens the run (the learning rate is decaying)
    assert revise_steps(plan, 59, 24.5, 0.2, 100, 0) is None
    assert revise_steps(plan, 59, 24.5, 1.0, 100, 0) == 80  # 21 more x 1 s + 6 s in the 27.5 s left
    revised = plan.revised(10, 51, 1.0)
    assert (revised.steps, revised.first_steps, revised.revisions) == (51, 98, ((10, 98, 51, 1.0),))
    assert StepPlan.from_dict(revised.as_dict()) == revised


def test_budget_errors_are_one_line_and_say_what_to_give():
    for minutes in (0, -1.5):
        with pytest.raises(ConfigError, match=rf"^train.minutes must be above 0 minutes, got {minutes:g}$"):
            TrainConfig(minutes=minutes)
    with pytest.raises(BudgetError, match=r"^train.minutes=0.1 \(6 s\) is shorter than the probe: preparing the data "
                                          r"and timing this machine took 9 s; give at least 0.2 minutes$"):
        plan_steps(0.1, 9.0, 0.2, 5, 0.0, 0, 0.0, 0, warmup_steps=0)
    with pytest.raises(BudgetError, match=r"^train.minutes=0.2 leaves no time for a step after 10 s of preparation"):
        plan_steps(0.2, 10.0, 1.0, 5, 3.0, 0, 0.0, 0, warmup_steps=0)
