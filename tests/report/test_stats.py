"""The paired bootstrap: coverage of a known difference, pairing, and the mean +- sd helper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arcfold.report.stats import Interval, mean_sd, paired_bootstrap


def arc_like(rng: np.random.Generator, n_tasks: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-task scores in {0, 0.5, 1} (two test outputs per task), a task-specific difficulty shared by both
    configurations; A solves each output with probability p_t + delta, B with p_t: E[a_t - b_t] = delta exactly."""
    p = rng.uniform(0.0, 0.8, n_tasks)
    a = rng.binomial(2, p + delta) / 2
    b = rng.binomial(2, p) / 2
    return a, b


@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_a_95_percent_interval_covers_the_true_difference_about_95_percent_of_the_time(delta):
    rng = np.random.default_rng(12345)
    covered = 0
    for sim in range(200):
        a, b = arc_like(rng, 80, delta)
        iv = paired_bootstrap(a, b, n_boot=2000, level=0.95, seed=sim)
        covered += iv.low <= delta <= iv.high
    assert 0.90 <= covered / 200 <= 1.0, covered


def test_a_50_percent_interval_covers_about_half_the_time():
    # The level is honoured, not just "wide enough": a 50% interval must miss about half the time.
    rng = np.random.default_rng(7)
    covered = 0
    for sim in range(200):
        a, b = arc_like(rng, 80, 0.1)
        iv = paired_bootstrap(a, b, n_boot=2000, level=0.5, seed=sim)
        covered += iv.low <= 0.1 <= iv.high
    assert 0.38 <= covered / 200 <= 0.62, covered


def test_pairing_removes_the_shared_task_difficulty():
    # Task difficulty varies a lot, the difference hardly at all: the paired interval must be narrow (an
    # unpaired bootstrap of the same data would be about as wide as the spread of difficulties allows).
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1, 100)
    a = difficulty + 0.05 + rng.normal(0, 0.01, 100)
    b = difficulty + rng.normal(0, 0.01, 100)
    iv = paired_bootstrap(a, b, n_boot=4000)
    assert iv.mean == pytest.approx(np.mean(a - b))
    assert iv.high - iv.low < 0.01 and iv.excludes_zero and iv.low > 0
    unpaired_sd = math.sqrt(a.var() / 100 + b.var() / 100)
    assert iv.high - iv.low < 0.05 * unpaired_sd


def test_the_interval_is_reproducible_and_drops_nan_pairs():
    a = [1.0, 0.0, 1.0, math.nan, 0.5]
    b = [0.0, 0.0, 1.0, 1.0, math.nan]
    iv = paired_bootstrap(a, b, n_boot=500, seed=4)
    assert iv == paired_bootstrap(a, b, n_boot=500, seed=4)
    assert iv.n_tasks == 3 and iv.mean == pytest.approx(1 / 3)
    assert iv.low >= 0 and iv.high <= 1  # every resampled mean lies between the smallest and largest d_t
    assert math.isnan(paired_bootstrap([math.nan], [1.0]).mean)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_excludes_zero_reads_both_sides():
    assert Interval(0.1, 0.05, 0.2, 0.95, 10).excludes_zero
    assert Interval(-0.1, -0.2, -0.01, 0.95, 10).excludes_zero
    assert not Interval(0.1, -0.01, 0.2, 0.95, 10).excludes_zero


def test_mean_sd_uses_the_sample_sd_and_skips_missing_values():
    mean, sd = mean_sd([8.19, 11.94, 10.0, math.nan])
    assert mean == pytest.approx(np.mean([8.19, 11.94, 10.0]))
    assert sd == pytest.approx(np.std([8.19, 11.94, 10.0], ddof=1))
    assert math.isnan(mean_sd([1.0])[1]) and math.isnan(mean_sd([])[0])


def test_weights_make_the_mean_a_weighted_mean_over_tasks_and_resamples():
    a, b, w = np.array([1.0, 2.0, 4.0]), np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 2.0])
    iv = paired_bootstrap(a, b, n_boot=2000, weights=w, seed=1)
    assert iv.mean == pytest.approx((1 + 2 + 8) / 4) and 1.0 <= iv.low <= iv.mean <= iv.high <= 4.0
    assert paired_bootstrap(a, b, weights=np.ones(3)).mean == pytest.approx(paired_bootstrap(a, b).mean)
    assert paired_bootstrap(a, b, weights=[1.0, 0.0, math.nan]).n_tasks == 1  # no weight: not a task here
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, weights=[1.0, 2.0])
