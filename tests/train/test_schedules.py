"""Schedules are plain functions of the step: check their values where they matter."""

from __future__ import annotations

import math

import pytest

from duomodal.train.schedules import cosine_anneal, cosine_warmup_weight, warmup_cosine, warmup_stable_decay


def test_warmup_cosine_values():
    # linear warm-up over 10 steps, cosine to 0.1 at step 110
    assert warmup_cosine(0, 110, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(4, 110, 10, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(9, 110, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 110, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 110, 10, 0.1) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert warmup_cosine(110, 110, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 110, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 0, 0.0) == pytest.approx(1.0)


def test_warmup_stable_decay_values():
    # linear warm-up over 10 steps, 1 until the last 40 of 100 steps, then linear to 0.1 at step 100
    assert warmup_stable_decay(0, 100, 10, 0.4, 0.1) == pytest.approx(0.1)
    assert warmup_stable_decay(9, 100, 10, 0.4, 0.1) == pytest.approx(1.0)
    assert warmup_stable_decay(30, 100, 10, 0.4, 0.1) == pytest.approx(1.0)
    assert warmup_stable_decay(59, 100, 10, 0.4, 0.1) == pytest.approx(1.0)
    assert warmup_stable_decay(60, 100, 10, 0.4, 0.1) == pytest.approx(1.0 - 0.9 / 40)
    assert warmup_stable_decay(79, 100, 10, 0.4, 0.1) == pytest.approx(0.55)  # half way down
    assert warmup_stable_decay(99, 100, 10, 0.4, 0.1) == pytest.approx(0.1)
    assert warmup_stable_decay(500, 100, 10, 0.4, 0.1) == pytest.approx(0.1)
    assert warmup_stable_decay(5, 20, 10, 1.0, 0.0) == pytest.approx(0.6)  # a cooldown over all: warm-up first
    assert warmup_stable_decay(10, 20, 10, 1.0, 0.0) == pytest.approx(0.9)


def test_gumbel_temperature_and_kl_weight():
    assert cosine_anneal(0, 1.0, 1 / 16, 1000) == pytest.approx(1.0)
    assert cosine_anneal(500, 1.0, 1 / 16, 1000) == pytest.approx((1 + 1 / 16) / 2)
    assert cosine_anneal(250, 1.0, 1 / 16, 1000) == pytest.approx(1 / 16 + (15 / 16) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_anneal(1000, 1.0, 1 / 16, 1000) == pytest.approx(1 / 16)
    assert cosine_anneal(5000, 1.0, 1 / 16, 1000) == pytest.approx(1 / 16)
    assert cosine_warmup_weight(0, 6.6, 100) == pytest.approx(0.0)
    assert cosine_warmup_weight(50, 6.6, 100) == pytest.approx(3.3)
    assert cosine_warmup_weight(100, 6.6, 100) == pytest.approx(6.6)
    assert cosine_warmup_weight(10, 6.6, 0) == pytest.approx(6.6)
