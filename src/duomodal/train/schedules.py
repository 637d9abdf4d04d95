"""Schedules as plain functions of the optimizer step: exact on resume, easy to test."""

from __future__ import annotations

import math


def cosine_anneal(step: int, start: float, end: float, steps: int) -> float:
    """`start` at step 0, `end` from step `steps` on, half a cosine in between."""
    if steps <= 0 or step >= steps:
        return end
    progress = max(step, 0) / steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up from 1/warmup to 1 over `warmup_steps`, then a
    cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    return cosine_anneal(step - warmup_steps, 1.0, min_ratio, decay_steps)


def warmup_stable_decay(step: int, total_steps: int, warmup_steps: int, cooldown_fraction: float,
                        min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up as in `warmup_cosine`, then 1 until the last
    `cooldown_fraction` of the steps, then a linear decay that reaches `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown = max(1, round(total_steps * cooldown_fraction))
    start = max(warmup_steps, total_steps - cooldown)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / max(total_steps - start, 1))
    return 1.0 + (min_ratio - 1.0) * progress


def cosine_warmup_weight(step: int, target: float, warmup_steps: int) -> float:
    """0 at step 0 rising to `target` at `warmup_steps` on half a cosine (the KL weight)."""
    return cosine_anneal(step, 0.0, target, warmup_steps)
