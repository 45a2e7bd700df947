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
from itertools import chain, zip_longest
from typing import Callable, Iterable, TypeVar

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


T = TypeVar("T")


def _alternate(first: Iterable[T], second: Iterable[T], same: Callable[[T, T], bool]) -> list[T]:
    """first[0], second[0], first[1], second[1], ... without repeats."""
    out: list[T] = []
    for item in chain.from_iterable(zip_longest(first, second)):
        if item is not None and not any(same(item, kept) for kept in out):
            out.append(item)
    return out


def with_base_answers(adapted: TestPrediction, base: TestPrediction) -> TestPrediction:
    """The adapter's prediction with the base model's (the same test input, adapter off) alternated in: attempt 1
    is the adapter's best, attempt 2 the base model's best where it differs (else the adapter's second), and every
    ranking alternates the same way. Two attempts thus hedge an adapter that learnt its demonstrations rather than
    the rule (inference.base_attempt). Candidates: the adapter's, then those only the base model found (with the base
    model's scores, so the oracle counts them); stats: the adapter's, and the base prediction's seconds and tokens."""
    candidates = list(adapted.candidates)
    merged = []  # base candidate -> its index among `candidates`
    for cand in base.candidates:
        found = next((j for j, c in enumerate(candidates) if same_grid(c.grid, cand.grid)), None)
        if found is None:
            candidates.append(cand)
            found = len(candidates) - 1
        merged.append(found)
    rankings = {
        name: _alternate(order, [merged[j] for j in base.rankings.get(name, [])], int.__eq__)
        for name, order in adapted.rankings.items()
    }
    attempts = _alternate(adapted.attempts, base.attempts, same_grid)[:2]
    stats = {
        **adapted.stats,
        "base_seconds": base.stats.get("seconds", 0.0),
        "base_forward_tokens": base.stats.get("forward_tokens", 0.0),
    }
    return TestPrediction(
        adapted.task_id, adapted.test_index, candidates, attempts, rankings, stats, answer_nll=adapted.answer_nll
    )


__all__ = [
    "AGGREGATES",
    "GEN_BONUS",
    "Candidate",
    "TestPrediction",
    "aggregate",
    "merge",
    "rank",
    "with_base_answers",
]
