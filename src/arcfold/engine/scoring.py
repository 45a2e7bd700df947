"""Augmentation scoring ("product of experts") and the teacher-forced NLL of a task's true output.

`score_candidates` re-scores every unique candidate under m augmented views of its task: the view's prompt followed
by the view's image of the candidate, summing the log-probabilities of the candidate's tokens (engine.teacher_forcing:
each view's prompt runs once, or not at all where the DFS still holds it, `held`). The aggregates of
engine.candidates then turn the per-view scores into one number to rank by. `answer_nll` is the mean per-token NLL
of the true output over views: how likely training made the right answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from arcfold.data.augment import Transform
from arcfold.data.codec import GridCodec
from arcfold.data.tasks import Task
from arcfold.engine.candidates import AGGREGATES, Candidate  # AGGREGATES: read here by tests/test_checks.py
from arcfold.engine.prompt_cache import PromptRows
from arcfold.engine.teacher_forcing import Scores, answer_logps, rows_answer_logps

Held = Mapping[int, tuple[PromptRows, int]]  # view -> the cache rows holding its prompt (engine.dfs), its row there


@dataclass
class Work:
    """What a scoring pass cost."""

    seconds: float = 0.0
    tokens: int = 0
    passes: int = 0
    held_views: int = 0


def _scores(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int,
    held: Held,
    work: Work,
) -> Scores:
    """answers[v][i] after prompts[v]: on the rows that hold the prompt where `held` has them, the rest from
    their prompts (each run once)."""
    scores: Scores = [[] for _ in prompts]
    caches: dict[int, tuple[PromptRows, list[int]]] = {}  # id(rows) -> rows, the view in each of its rows
    for v, (rows, row) in held.items():
        if answers[v]:
            caches.setdefault(id(rows), (rows, [-1] * rows.rows))[1][row] = v
    for rows, views in caches.values():
        got, cost = rows_answer_logps(model, rows, [answers[v] if v >= 0 else [] for v in views], batch_size)
        for v, row_scores in zip(views, got):
            if v >= 0:
                scores[v] = row_scores
                work.held_views += 1
        work.tokens, work.passes = work.tokens + cost.tokens, work.passes + cost.passes
    rest = [v for v in range(len(prompts)) if v not in held and answers[v]]
    if rest:
        # One answer per prompt (the true output): nothing to share, and one forward per batch beats two.
        reuse = any(len(answers[v]) > 1 for v in rest)
        got, cost = answer_logps(
            model, [prompts[v] for v in rest], [answers[v] for v in rest], batch_size, reuse_prompts=reuse
        )
        for v, row_scores in zip(rest, got):
            scores[v] = row_scores
        work.tokens, work.passes = work.tokens + cost.tokens, work.passes + cost.passes
    return scores


def _view_prompt(
    codec: GridCodec, task: Task, test_index: int, view: Transform, max_len: int, reserve: int
) -> list[int]:
    return codec.encode_prompt(
        view.pairs(task.train), view.grid(task.test[test_index].input), max_len=max_len, reserve=reserve
    ).ids


def score_candidates(
    model: torch.nn.Module,
    codec: GridCodec,
    task: Task,
    test_index: int,
    candidates: list[Candidate],
    views: list[Transform],
    max_len: int,
    batch_size: int = 8,
    prompts: Sequence[list[int]] | None = None,
    held: Held | None = None,
) -> dict[str, float]:
    """Fill `c.scores[v]` (v = index into `views`) with the teacher-forced log p of each candidate under each view.

    Candidates with the same grid are scored once and share the numbers. `prompts[v]`, when given, is view v's
    prompt (engine.predict passes the generation's, which reserve room for any answer it could have produced);
    by default each prompt reserves room for the longest candidate, so all candidates of one view see the same
    prompt. `held[v]`: the DFS's cache rows still holding prompts[v]; read, never changed. Returns the work's
    stats."""
    work = Work()
    start = time.perf_counter()
    unique: dict[tuple[tuple[int, ...], bytes], list[Candidate]] = {}
    for cand in candidates:
        grid = np.asarray(cand.grid, dtype=np.int8)
        unique.setdefault((grid.shape, grid.tobytes()), []).append(cand)
    groups = list(unique.values())
    if groups:
        answers = [[codec.encode_answer(view.grid(np.asarray(g[0].grid))) for g in groups] for view in views]
        if prompts is None:
            prompts = [
                _view_prompt(codec, task, test_index, view, max_len, max(map(len, view_answers)))
                for view, view_answers in zip(views, answers)
            ]
        elif len(prompts) != len(views):
            raise ValueError(f"{len(prompts)} prompts for {len(views)} views")
        scores = _scores(model, prompts, answers, batch_size, held or {}, work)
        for v, view_scores in enumerate(scores):
            for group, score in zip(groups, view_scores):
                for cand in group:
                    cand.scores[v] = score
    return {
        "scoring_seconds": time.perf_counter() - start,
        "scoring_tokens": float(work.tokens),
        "scoring_passes": float(work.passes),
        "scoring_views": float(len(views) if groups else 0),
        "scoring_candidates": float(len(groups)),
        "scoring_kept_views": float(work.held_views),
    }


def answer_nll(
    model: torch.nn.Module,
    codec: GridCodec,
    task: Task,
    test_index: int,
    views: list[Transform],
    max_len: int,
    batch_size: int = 8,
    prompts: Sequence[list[int] | None] | None = None,
    held: Held | None = None,
    work: Work | None = None,
) -> float:
    """Mean over views of the per-token NLL of the true test output, teacher-forced in each view's frame; what it
    cost is added to `work` where given.

    `prompts` and `held` as in score_candidates (engine.predict hands in the DFS's); a view without a prompt
    given gets one that reserves room for the answer. Works for a PeftModel as is; for the base model alone, call it
    inside `peft_model.disable_adapter()`."""
    truth = task.test[test_index].output
    if truth is None:
        raise ValueError(f"task {task.id} has no known output for test input {test_index}")
    if not views:
        raise ValueError("answer_nll needs at least one view")
    work = work if work is not None else Work()
    start = time.perf_counter()
    answers = [codec.encode_answer(view.grid(truth)) for view in views]
    given = list(prompts) if prompts is not None else [None] * len(views)
    full = [
        p if p is not None else _view_prompt(codec, task, test_index, v, max_len, len(a))
        for p, v, a in zip(given, views, answers)
    ]
    logps = _scores(model, full, [[a] for a in answers], batch_size, held or {}, work)
    work.seconds += time.perf_counter() - start
    return float(np.mean([-lp / len(a) for (lp,), a in zip(logps, answers)]))


__all__ = ["AGGREGATES", "Held", "Work", "answer_nll", "score_candidates"]
