"""Augmentation scoring ("product of experts") and the teacher-forced NLL of a task's true output.

`score_candidates` re-scores every unique candidate under m augmented views of its task: the view's prompt followed
by the view's image of the candidate, summing the log-probabilities of the candidate's tokens (engine.teacher_forcing:
each view's prompt runs once, or not at all where its KV cache is handed in). The aggregates of engine.candidates
then turn the per-view scores into one number to rank by. `answer_nll` is the mean per-token NLL of the true output
over views: how likely training made the right answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from arcfold.data.augment import Transform
from arcfold.data.codec import GridCodec
from arcfold.data.tasks import Task
from arcfold.engine.candidates import AGGREGATES, Candidate  # AGGREGATES: read here by tests/test_checks.py
from arcfold.engine.teacher_forcing import answer_logps


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
    kept: Mapping[int, DynamicCache] | None = None,
) -> dict[str, float]:
    """Fill `c.scores[v]` (v = index into `views`) with the teacher-forced log p of each candidate under each view.

    Candidates with the same grid are scored once and share the numbers. `prompts[v]`, when given, is view v's
    prompt (engine.predict passes the generation's, which reserve room for any answer it could have produced);
    by default each prompt reserves room for the longest candidate, so all candidates of one view see the same
    prompt. `kept[v]`: a KV cache already holding prompts[v] (engine.teacher_forcing); it is read, never changed.
    Returns timing and token stats."""
    start = time.perf_counter()
    unique: dict[tuple[tuple[int, ...], bytes], list[Candidate]] = {}
    for cand in candidates:
        grid = np.asarray(cand.grid, dtype=np.int8)
        unique.setdefault((grid.shape, grid.tobytes()), []).append(cand)
    groups = list(unique.values())
    tokens = 0
    if groups:
        answers = [[codec.encode_answer(view.grid(np.asarray(g[0].grid))) for g in groups] for view in views]
        if prompts is None:
            prompts = [
                _view_prompt(codec, task, test_index, view, max_len, max(map(len, view_answers)))
                for view, view_answers in zip(views, answers)
            ]
        elif len(prompts) != len(views):
            raise ValueError(f"{len(prompts)} prompts for {len(views)} views")
        scores, tokens = answer_logps(model, prompts, answers, batch_size, kept)
        for v, view_scores in enumerate(scores):
            for group, score in zip(groups, view_scores):
                for cand in group:
                    cand.scores[v] = score
    return {
        "scoring_seconds": time.perf_counter() - start,
        "scoring_tokens": float(tokens),
        "scoring_views": float(len(views) if groups else 0),
        "scoring_candidates": float(len(groups)),
        "scoring_kept_views": float(len(kept or {}) if groups else 0),
    }


def answer_nll(
    model: torch.nn.Module,
    codec: GridCodec,
    task: Task,
    test_index: int,
    views: list[Transform],
    max_len: int,
    batch_size: int = 8,
) -> float:
    """Mean over views of the per-token NLL of the true test output, teacher-forced in each view's frame.

    Works for a PeftModel as is; for the base model alone, call it inside `peft_model.disable_adapter()`."""
    truth = task.test[test_index].output
    if truth is None:
        raise ValueError(f"task {task.id} has no known output for test input {test_index}")
    if not views:
        raise ValueError("answer_nll needs at least one view")
    answers = [codec.encode_answer(view.grid(truth)) for view in views]
    prompts = [_view_prompt(codec, task, test_index, v, max_len, len(a)) for v, a in zip(views, answers)]
    # One answer per prompt and the prompts differ per view: nothing to share, so each runs in full.
    logps, _ = answer_logps(model, prompts, [[a] for a in answers], batch_size, reuse_prompts=False)
    return float(np.mean([-lp / len(a) for (lp,), a in zip(logps, answers)]))


__all__ = ["AGGREGATES", "answer_nll", "score_candidates"]
