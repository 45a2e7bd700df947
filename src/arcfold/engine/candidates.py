"""What prediction produces and how it is ranked: candidate grids for one test input, and their ranking into two
attempts.

Generation (greedy, sampling, DFS) fills `gen_logps` (`merge` adds a grid found in a view, or the view's vote to a
grid found before); augmentation scoring (engine.scoring) fills `scores`; an aggregate turns them into one number
per candidate and `rank` orders the candidates by it. Every ranking works on the same candidates, so one run can
compare them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from arcfold.config import CHOICES
from arcfold.data.tasks import same_grid

AGGREGATES = CHOICES["inference.scoring.aggregate"]
GEN_BONUS = 3.0  # the 2024 submission's bonus: each generating view adds (gen log p + 3)


@dataclass
class Candidate:
    grid: np.ndarray  # in the task's original frame
    gen_logps: dict[int, float] = field(default_factory=dict)  # generating view -> log p of the answer there
    scores: dict[int, float] = field(default_factory=dict)  # scoring view -> teacher-forced log p

    @property
    def votes(self) -> int:
        return len(self.gen_logps)

    @property
    def mean_gen_logp(self) -> float:
        return float(np.mean(list(self.gen_logps.values()))) if self.gen_logps else float("-inf")


@dataclass
class TestPrediction:
    task_id: str
    test_index: int
    candidates: list[Candidate]
    attempts: list[np.ndarray]  # up to two grids, best first
    rankings: dict[str, list[int]] = field(default_factory=dict)  # ranking name -> candidate indices, best first
    stats: dict[str, float] = field(default_factory=dict)  # seconds, forward tokens, views, dropped demos, ...
    answer_nll: float | None = None  # the true output's mean per-token NLL, where asked for and known


def merge(candidates: list[Candidate], grid: np.ndarray, view: int, logp: float, cap: int | None = None) -> None:
    """Add a de-augmented grid generated in `view`; duplicates merge, keeping the best log p per view.
    With a cap, a known grid still gains the view's vote but a new one is added only while below the cap."""
    for cand in candidates:
        if same_grid(cand.grid, grid):
            cand.gen_logps[view] = max(logp, cand.gen_logps.get(view, float("-inf")))
            return
    if cap is None or len(candidates) < cap:
        candidates.append(Candidate(np.asarray(grid, dtype=np.int8), {view: logp}))


def _mean_prob(values: np.ndarray, _: Candidate) -> float:
    top = values.max()
    return float(top + math.log(np.exp(values - top).mean())) if np.isfinite(top) else float(top)


# The score-based aggregates: (the candidate's per-view scores, the candidate) -> one number, higher is better.
_BY_SCORES: dict[str, Callable[[np.ndarray, Candidate], float]] = {
    "sum_logp": lambda values, _: float(values.sum()),
    "sum_logp_bonus": lambda values, c: float(values.sum() + sum(lp + GEN_BONUS for lp in c.gen_logps.values())),
    "mean_prob": _mean_prob,
    "max": lambda values, _: float(values.max()),
    "min": lambda values, _: float(values.min()),
    # NVARC's selection (1st on ARC-AGI-2, 2025): the views whose search produced the candidate, minus its mean NLL
    # over the scoring views (mean log p = -mean NLL)
    "nvarc": lambda values, c: float(c.votes + values.mean()),
}


def aggregate(candidate: Candidate, name: str) -> float:
    """One number per candidate, higher is better; `name` is one of AGGREGATES (checked with the config).

    sum_logp: sum of the per-view scores (product of the views' probabilities). sum_logp_bonus: sum_logp plus
    (gen log p + 3) per generating view. mean_prob: the mean probability over views, returned as its LOG
    (log-mean-exp: same order, but no underflow to 0 for long answers). max / min: best / worst view. votes: the
    number of generating views. nvarc (NVARC's rule): votes minus the mean NLL under the scoring views, i.e. votes +
    the mean per-view score. A score-based aggregate of a candidate without scores raises ValueError: it
    would compare an empty sum with real ones; rank by "votes" when nothing was scored."""
    if name == "votes":
        return float(candidate.votes)
    if not candidate.scores:
        raise ValueError(f"aggregate {name!r} needs scores: run score_candidates first (or rank by 'votes')")
    return _BY_SCORES[name](np.fromiter(candidate.scores.values(), dtype=np.float64), candidate)


def rank(candidates: list[Candidate], name: str) -> list[int]:
    """Candidate indices, best first by aggregate `name`; ties go to more votes, then the higher mean gen log p,
    then the index. rank(candidates, "votes") is the ranking without augmentation scoring.

    Score-based aggregates need every candidate scored under the same views (else ValueError): sums over
    different view sets are not comparable."""
    if name != "votes" and candidates:
        view_sets = {frozenset(c.scores) for c in candidates}
        if len(view_sets) > 1:
            raise ValueError(
                f"aggregate {name!r}: candidates were scored under different views; score them all with the same views"
            )
    values = [aggregate(c, name) for c in candidates]
    return sorted(
        range(len(candidates)), key=lambda i: (-values[i], -candidates[i].votes, -candidates[i].mean_gen_logp, i)
    )


__all__ = ["AGGREGATES", "GEN_BONUS", "Candidate", "TestPrediction", "aggregate", "merge", "rank"]
