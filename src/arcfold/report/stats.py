"""Noise-aware numbers for comparisons: mean +- sd over seeds, and the paired bootstrap over tasks.

Two configurations scored on the same tasks differ by d_t = a_t - b_t per task (each a mean over that
configuration's seeds). The bootstrap resamples tasks with replacement, keeping each task's pair together, and
reads the percentile interval of the mean difference: it says how much the difference could move had the
benchmark drawn other tasks of the same kind. Seed noise enters through the per-task means (one seed per
configuration: the interval covers task sampling only), and the table's sd over seeds shows it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """The mean paired difference over tasks and its bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    level: float
    n_tasks: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    weights: Sequence[float] | np.ndarray | None = None,
) -> Interval:
    """Interval for mean(a - b) over tasks, a[t] and b[t] being the same task's values (NaN pairs dropped).

    weights: a weight per task (e.g. its number of test outputs): the mean is then sum(w d) / sum(w), over the
    original tasks and over each resample, so a per-task mean of per-output values gives the per-output mean."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need two equal 1-d arrays, got shapes {x.shape} and {y.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    w_all = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    if w_all.shape != x.shape:
        raise ValueError(f"weights need the values' shape {x.shape}, got {w_all.shape}")
    keep = ~(np.isnan(x) | np.isnan(y) | np.isnan(w_all)) & (w_all > 0)
    d, w = (x - y)[keep], w_all[keep]
    if d.size == 0:
        return Interval(math.nan, math.nan, math.nan, level, 0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // d.size)  # index blocks of ~2M entries: bounded memory for any task count
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, d.size, size=(min(chunk, n_boot - start), d.size))
        means[start : start + idx.shape[0]] = (d[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float((d * w).sum() / w.sum()), float(low), float(high), level, int(d.size))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof=1) of the finite values; sd is NaN for fewer than two."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


__all__ = ["Interval", "paired_bootstrap", "mean_sd"]
