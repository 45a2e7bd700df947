"""Candidates and their ranking (engine.candidates): merging generated grids, the aggregates, the orderings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arcfold.engine.candidates import (
    AGGREGATES,
    GEN_BONUS,
    Candidate,
    aggregate,
    merge,
    rank,
    with_base_answers,
)
from arcfold.engine.candidates import (
    TestPrediction as Prediction,  # aliased: pytest would collect a Test* class
)

SCORE_BASED = tuple(a for a in AGGREGATES if a != "votes")


def random_candidates(rng: np.random.Generator, n: int, views: int = 6) -> list[Candidate]:
    cands = []
    for i in range(n):
        gen = {int(v): float(-rng.exponential(2)) for v in rng.choice(8, size=rng.integers(0, 4), replace=False)}
        scores = {v: float(-rng.exponential(20)) for v in range(views)}
        cands.append(Candidate(np.full((1, 1), i % 10, dtype=np.int8), gen, scores))
    return cands


def test_merge_counts_one_vote_per_view_and_keeps_the_best_logp():
    grid = np.array([[1, 2], [3, 4]], dtype=np.int8)
    cands: list[Candidate] = []
    merge(cands, grid, 0, -2.0)
    merge(cands, grid.copy(), 0, -1.0)  # the same grid again in view 0: its better log p
    merge(cands, grid.copy(), 3, -5.0)
    merge(cands, grid.T, 1, -0.5, cap=1)  # a new grid past the cap: dropped
    merge(cands, grid.copy(), 4, -3.0, cap=1)  # a known grid still gains the view's vote
    assert len(cands) == 1 and cands[0].grid.dtype == np.int8
    assert cands[0].gen_logps == {0: -1.0, 3: -5.0, 4: -3.0} and cands[0].votes == 3
    assert cands[0].mean_gen_logp == pytest.approx(-3.0)


def test_aggregates_and_ranks():
    assert GEN_BONUS == 3.0
    rng = np.random.default_rng(0)
    for trial in range(20):
        cands = random_candidates(rng, 7)
        for c in cands:
            assert aggregate(c, "sum_logp") == pytest.approx(sum(c.scores.values()))
            assert aggregate(c, "max") == max(c.scores.values()) and aggregate(c, "min") == min(c.scores.values())
            bonus = sum(lp + 3 for lp in c.gen_logps.values())  # GEN_BONUS: the 2024 submission's 3
            assert aggregate(c, "sum_logp_bonus") == pytest.approx(aggregate(c, "sum_logp") + bonus)
            mean_prob = np.mean(np.exp(list(c.scores.values())))
            if mean_prob > 0:
                assert math.exp(aggregate(c, "mean_prob")) == pytest.approx(mean_prob, rel=1e-9)
            assert aggregate(c, "votes") == c.votes
        for name in AGGREGATES:
            assert sorted(rank(cands, name)) == list(range(7))
        # Votes: most votes first, then the higher mean gen log p, then the index.
        by_votes = sorted(range(7), key=lambda i: (-cands[i].votes, -cands[i].mean_gen_logp, i))
        assert rank(cands, "votes") == by_votes

        # A candidate best under every view (and with the most, best votes, for the bonus) wins every score.
        best = int(rng.integers(7))
        cands[best].scores = {v: max(c.scores[v] for c in cands) + 0.5 for v in cands[best].scores}
        cands[best].gen_logps = {v: -0.01 for v in range(8)}
        for name in SCORE_BASED:
            assert rank(cands, name)[0] == best, (trial, name)


def test_rank_ties_and_underflow():
    one = np.zeros((1, 1), dtype=np.int8)
    # Equal scores: more votes first, then the better mean gen log p, then the index.
    tied = [
        Candidate(one, {0: -1.0}, {0: -5.0}),
        Candidate(one, {0: -2.0, 1: -2.0}, {0: -5.0}),
        Candidate(one, {0: -0.5}, {0: -5.0}),
        Candidate(one, {}, {0: -5.0}),
    ]
    assert rank(tied, "sum_logp") == [1, 2, 0, 3]
    # Long answers: exp(log p) underflows to 0 for both, yet mean_prob still orders them.
    far = [Candidate(one, {}, {0: -2001.0, 1: -2001.0}), Candidate(one, {}, {0: -2000.0, 1: -2002.0})]
    assert rank(far, "mean_prob") == [1, 0]
    assert rank(far, "sum_logp") == [0, 1]  # equal sums: the index decides


def test_missing_or_mismatched_scores_raise():
    one = np.zeros((1, 1), dtype=np.int8)
    unscored = [Candidate(one, {0: -1.0}), Candidate(one, {1: -2.0, 2: -1.0})]
    assert rank(unscored, "votes") == [1, 0]
    with pytest.raises(ValueError, match="score_candidates"):
        rank(unscored, "sum_logp")
    with pytest.raises(ValueError, match="different views"):
        rank([Candidate(one, {}, {0: -1.0}), Candidate(one, {}, {1: -1.0})], "sum_logp")
    assert rank([], "sum_logp") == []


def test_nvarc_is_the_generating_views_minus_the_mean_nll():
    one = np.zeros((1, 1), dtype=np.int8)
    # NVARC's rule (reference 4b): (views whose search produced it) - (mean NLL under the scoring views).
    found_often = Candidate(one, {0: -3.0, 1: -2.5, 2: -4.0}, {v: -(0.5 + v / 8) for v in range(8)})  # NLL 0.9375
    likely = Candidate(one, {5: -0.1}, {v: -0.5 for v in range(8)})  # NLL 0.5
    assert aggregate(found_often, "nvarc") == pytest.approx(3 - 0.9375)
    assert aggregate(likely, "nvarc") == pytest.approx(1 - 0.5)
    assert "nvarc" in AGGREGATES  # ranked and logged (detail/score_nvarc) with the other aggregations
    assert rank([likely, found_often], "nvarc") == [1, 0]  # a vote is worth one nat of mean NLL
    assert rank([likely, found_often], "sum_logp") == [0, 1]


def prediction(rng: np.random.Generator, pool: list[np.ndarray]) -> Prediction:
    """Candidates drawn from `pool` (distinct grids), every ranking, and sum_logp's top two as the attempts."""
    picked = rng.choice(len(pool), size=rng.integers(0, len(pool) + 1), replace=False)
    cands = [
        Candidate(pool[i], {0: float(-rng.exponential())}, {v: float(-rng.exponential()) for v in range(3)})
        for i in picked
    ]
    rankings = {name: rank(cands, name) for name in AGGREGATES}
    return Prediction("t", 0, cands, [cands[j].grid for j in rankings["sum_logp"][:2]], rankings, {"seconds": 1.0})


def test_base_answers_alternate_with_the_adapters_in_every_ranking_and_the_attempts():
    rng = np.random.default_rng(0)
    pool = [np.array([[a, b]], dtype=np.int8) for a in range(2) for b in range(3)]
    key = lambda g: g.tobytes()  # noqa: E731
    for trial in range(200):
        adapted, base = prediction(rng, pool), prediction(rng, pool)
        hedged = with_base_answers(adapted, base)
        # the adapter's candidates first, then only the base model's; each grid once
        assert hedged.candidates[: len(adapted.candidates)] == adapted.candidates
        grids = [key(c.grid) for c in hedged.candidates]
        assert len(set(grids)) == len(grids) == len({key(c.grid) for c in adapted.candidates + base.candidates})
        for name in AGGREGATES:
            order = hedged.rankings[name]
            assert sorted(order) == list(range(len(hedged.candidates))), (trial, name)
            # brute force over grids: adapter's first, base's first, adapter's second, ... skipping repeats
            expected: list[bytes] = []
            orders = [[key(p.candidates[j].grid) for j in p.rankings[name]] for p in (adapted, base)]
            for i in range(len(pool)):
                for grid_order in orders:
                    if i < len(grid_order) and grid_order[i] not in expected:
                        expected.append(grid_order[i])
            assert [grids[j] for j in order] == expected, (trial, name)
        assert [key(g) for g in hedged.attempts] == [grids[j] for j in hedged.rankings["sum_logp"][:2]]
        if adapted.attempts and base.attempts and key(base.attempts[0]) != key(adapted.attempts[0]):
            assert key(hedged.attempts[1]) == key(base.attempts[0])  # the base model's best is attempt 2
        assert hedged.stats["seconds"] == 1.0 and hedged.stats["base_seconds"] == 1.0
