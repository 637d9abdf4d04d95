"""Training by time: how many optimizer steps fit a wall-clock budget on this machine.

With ``train.minutes`` set, the training loop times a short probe on the real model and data (a few
optimizer steps that are then undone, one validation and one sample grid, both kept as the run's step-0
figures), and `plan_steps` fixes the step count from those timings. The plan is written to the run
(run.json and every checkpoint), so ``--resume`` continues exactly and ``train.steps=N`` repeats the run.
The schedule is fitted to the planned steps: warm-up at most a quarter of them (the cool-down of
warmup-stable-decay is a fraction of the steps already).

A probe of a few seconds cannot see what happens later: another job starting on the machine, thermal
throttling, a slower part of the data. So the run checks its pace at every tenth of its steps
(`revision_points`) and, where the measured steps would miss the budget or leave a good part of it
unused, `revise_steps` re-plans the step count from what is left of the budget at the measured pace. In
the second half a revision only shortens the run: lengthening it there would raise a learning rate that
has begun to decay. Each revision is recorded in the plan; a resumed run keeps the step count
its checkpoint recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from duomodal.config import ConfigError

PROBE_SECONDS = 3.0  # timed probe steps run until this long (at most PROBE_FRACTION of the budget)...
PROBE_FRACTION = 0.01
PROBE_MIN_STEPS = 2  # ...and at least this many, after
PROBE_WARMUP_STEPS = 1  # untimed first steps (allocation, first-touch caches)
PROBE_MAX_STEPS = 50
MARGIN_FRACTION = 0.05  # of the budget, kept for checkpoints, the loss plot and a long run's steps drifting 5-6% slower than the probe's (measured)
MAX_WARMUP_FRACTION = 0.25  # the warm-up fitted into a planned run takes at most this share of its steps
REVISION_POINTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # of the planned steps: pace checks
GROWTH_BEFORE = 0.5  # a revision after this share of the steps only shortens the run (the decay has begun)
REVISION_THRESHOLDS = (0.05, 0.05)  # re-plan only when the steps that fit are this share fewer / more
MAX_GROWTH = 2.0  # a revision at most doubles the step count (a pace measured over a quiet moment)


class BudgetError(ConfigError):
    """A time budget that no training fits."""


@dataclass(frozen=True)
class StepPlan:
    """The step count a budget buys, with the timings it was planned from (all seconds)."""

    minutes: float  # the budget
    steps: int  # optimizer steps planned
    warmup_steps: int  # the schedule's warm-up, fitted to `steps`
    step_s: float  # one optimizer step, measured by the probe
    probe_steps: int  # probe steps timed (undone afterwards)
    validation_s: float  # one validation, measured
    samples_s: float  # one sample grid, measured
    before_s: float  # spent before planning: data preparation, step-0 validation and samples, the probe
    planned_s: float  # what the plan's steps, validations and sample grids should take
    revisions: tuple[tuple[int, int, int, float], ...] = ()  # (at step, steps before, steps after, s a step)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "revisions": [list(r) for r in self.revisions]}  # as JSON gives it back

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepPlan:
        revisions = tuple(tuple(r) for r in data.get("revisions", ()))
        return cls(**{**data, "revisions": revisions})

    @property
    def first_steps(self) -> int:
        """The step count planned from the probe, before any revision."""
        return self.revisions[0][1] if self.revisions else self.steps

    def revised(self, step: int, steps: int, step_s: float) -> StepPlan:
        """This plan with its step count changed at `step`, the warm-up kept (it is over or nearly)."""
        return replace(self, steps=steps, revisions=(*self.revisions, (step, self.steps, steps, step_s)))


def check_budget(minutes: float | None, setting: str = "train.minutes") -> None:
    """Raises BudgetError for a budget of zero or less (None = no budget)."""
    if minutes is not None and not minutes > 0:
        raise BudgetError(f"{setting} must be above 0 minutes, got {minutes:g}")


def probe_seconds(minutes: float) -> float:
    """How long the probe times steps for a budget of `minutes` (after its minimum number of steps)."""
    return min(PROBE_SECONDS, PROBE_FRACTION * minutes * 60.0)


def tasks_due(steps: int, every: int) -> int:
    """How many times a task done every `every` steps (0 = only at the end) runs in a run of `steps`
    steps, the one after the last step included (as the training loop does it)."""
    periodic = (steps - 1) // every if every > 0 and steps > 0 else 0
    return periodic + 1


def planned_seconds(steps: int, step_s: float, validation_s: float, val_every: int, samples_s: float,
                    sample_every: int) -> float:
    """Seconds that `steps` optimizer steps take with their validations and sample grids."""
    return (steps * step_s + tasks_due(steps, val_every) * validation_s
            + tasks_due(steps, sample_every) * samples_s)


def plan_steps(minutes: float, before_s: float, step_s: float, probe_steps: int, validation_s: float,
               val_every: int, samples_s: float, sample_every: int, warmup_steps: int) -> StepPlan:
    """The most steps whose steps, validations and sample grids fit in what is left of `minutes` after
    `before_s`, less a margin. Raises BudgetError when the budget is used up before planning (naming
    what the probe took) or leaves no room for a single step."""
    check_budget(minutes)
    budget_s = minutes * 60.0
    available = budget_s * (1 - MARGIN_FRACTION) - before_s
    if available <= 0:
        raise BudgetError(
            f"train.minutes={minutes:g} ({budget_s:.0f} s) is shorter than the probe: preparing the data and "
            f"timing this machine took {before_s:.0f} s; give at least {_suggest(before_s, step_s)} minutes"
        )
    low = _most_that_fit(
        lambda steps: planned_seconds(steps, step_s, validation_s, val_every, samples_s, sample_every) <= available)
    if low < 1:
        raise BudgetError(
            f"train.minutes={minutes:g} leaves no time for a step after {before_s:.0f} s of preparation and "
            f"probe (a step takes {step_s:.2f} s, a validation {validation_s:.1f} s); give at least "
            f"{_suggest(before_s, step_s + validation_s + samples_s)} minutes"
        )
    return StepPlan(
        minutes=minutes, steps=low, warmup_steps=min(warmup_steps, int(low * MAX_WARMUP_FRACTION)),
        step_s=step_s, probe_steps=probe_steps, validation_s=validation_s, samples_s=samples_s, before_s=before_s,
        planned_s=planned_seconds(low, step_s, validation_s, val_every, samples_s, sample_every),
    )


def time_probe(step: Callable[[], object], minutes: float, agree: Callable[[bool], bool]) -> tuple[int, float]:
    """Run probe steps (`step()` is one optimizer step) until PROBE_MIN_STEPS timed ones and probe_seconds
    are done, or PROBE_MAX_STEPS: (steps timed, seconds a step). `agree(done)` tells whether any process
    is done, so that under DDP every rank stops at the same step."""
    for _ in range(PROBE_WARMUP_STEPS):
        step()
    started, seconds, timed = time.perf_counter(), probe_seconds(minutes), 0
    while True:
        step()
        timed += 1
        done = timed >= PROBE_MAX_STEPS or (timed >= PROBE_MIN_STEPS and time.perf_counter() - started >= seconds)
        if agree(done):
            return timed, (time.perf_counter() - started) / timed


class PaceChecks:
    """The steps where a planned run checks its pace (`revision_points`; none when off or after a resume),
    and the pace since the last check."""

    def __init__(self, steps: int = 0, enabled: bool = False):
        self.at = revision_points(steps) if enabled else []
        self.mark = (0, 0.0)  # (step, seconds in steps) where the pace since the last check is measured from

    def due(self, step: int) -> bool:
        return bool(self.at) and step >= self.at[0]

    def pace(self, step: int, step_seconds: float) -> float:
        """Seconds a step since the last check, `step_seconds` being the run's total in steps so far."""
        self.at = [s for s in self.at if s > step]
        (mark_step, mark_seconds), self.mark = self.mark, (step, step_seconds)
        return (step_seconds - mark_seconds) / max(1, step - mark_step)

    def keep_before(self, steps: int) -> None:
        """A revision to `steps` steps: no check at or after the new last step."""
        self.at = [s for s in self.at if s < steps]


def revision_points(steps: int) -> list[int]:
    """The steps of a planned run of `steps` steps at which its pace is checked."""
    return sorted({max(1, round(steps * fraction)) for fraction in REVISION_POINTS} - {steps})


def revise_steps(plan: StepPlan, step: int, elapsed_s: float, step_s: float, val_every: int,
                 sample_every: int) -> int | None:
    """The step count that fits what is left of the plan's budget at `step`, `elapsed_s` seconds into the
    run, with steps taking `step_s` (validations and sample grids slowed or sped up alike); None when it
    is within REVISION_THRESHOLDS of the planned count (a pace a little off is what the margin is for).
    At least one more step; at most MAX_GROWTH times the probe's plan, and no more than planned after
    GROWTH_BEFORE of it."""
    if step_s <= 0 or plan.step_s <= 0:
        return None
    scale = step_s / plan.step_s
    available = plan.minutes * 60.0 * (1 - MARGIN_FRACTION) - plan.before_s - elapsed_s

    def left_s(total: int) -> float:  # the steps from `step` to `total` and the tasks still due on the way
        return ((total - step) * step_s
                + _tasks_left(total, step, val_every) * plan.validation_s * scale
                + _tasks_left(total, step, sample_every) * plan.samples_s * scale)

    ceiling = max(step + 1, int(plan.first_steps * MAX_GROWTH) if step <= GROWTH_BEFORE * plan.steps else plan.steps)
    fits = max(step + 1, min(ceiling, step + _most_that_fit(lambda more: left_s(step + more) <= available)))
    fewer, more = REVISION_THRESHOLDS
    return fits if not (1 - fewer) * plan.steps <= fits <= (1 + more) * plan.steps else None


def _tasks_left(total: int, step: int, every: int) -> int:
    """Of the tasks due in a run of `total` steps, those not run by `step` (the periodic ones fall on
    multiples of `every`, the last one after the last step)."""
    return tasks_due(total, every) - (step // every if every > 0 else 0)


def _most_that_fit(fits: Callable[[int], bool]) -> int:
    """The largest n >= 0 with fits(n), for a fits() that holds up to some n and not after (0 if fits(1)
    does not hold)."""
    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # between low (fits) and high (does not)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _suggest(spent_s: float, more_s: float) -> str:
    """A budget in minutes, rounded up to a tenth, that holds `spent_s` and ten times `more_s`."""
    needed = (spent_s + 10 * more_s) / (1 - MARGIN_FRACTION) / 60
    return f"{(int(needed * 10) + 1) / 10:g}"
