"""Augmentation scoring ("product of experts") and the teacher-forced likelihood of a task's true output.

Every unique candidate is re-scored under m augmented views of its task: the view's prompt followed by the
view's image of the candidate, one forward pass, summing the log-probabilities of the candidate's tokens. The
aggregates then turn the per-view scores (and the generation log-probs) into one number to rank by.

Two scoring paths give the same numbers: `reuse_prefix=True` runs each view's prompt once and scores every
candidate from its KV cache; `reuse_prefix=False` runs each prompt + candidate from scratch (the baseline).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from arcfold.data.augment import Transform
from arcfold.data.codec import GridCodec
from arcfold.data.tasks import Task
from arcfold.engine.candidates import Candidate
from arcfold.engine.generate import eval_mode, forward, model_device

AGGREGATES = ("sum_logp", "sum_logp_bonus", "mean_prob", "max", "min", "votes")
GEN_BONUS = 3.0  # the 2024 submission's bonus: each generating view adds (gen log p + 3)
_PAD = 0  # filler id after a short answer: causal attention keeps it from touching the real tokens


# ------------------------------------------------------------------------------------------ model plumbing

def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under the full softmax, per position, in float64. logsumexp + gather avoids building the
    whole log-softmax tensor, which matters for a large vocabulary."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).double()


def _summed_logps(logits: torch.Tensor, answers: Sequence[Sequence[int]]) -> list[float]:
    """Per row, the summed log p of answers[row] read off logits[row, :len(answer)] (one batched call, so the
    cost does not grow with a Python loop over rows). Positions past an answer's end are masked out."""
    width = logits.shape[1]
    targets = _padded([list(a) + [_PAD] * (width - len(a)) for a in answers], logits.device)
    lengths = torch.tensor([len(a) for a in answers], device=logits.device)
    mask = torch.arange(width, device=logits.device)[None] < lengths[:, None]
    return (_token_logps(logits, targets) * mask).sum(dim=1).tolist()


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [_PAD] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _chunks(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


# ------------------------------------------------------------------------------------------ teacher forcing

def _score_from_scratch(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
                        batch_size: int) -> tuple[list[float], int]:
    """Sum log p of each answer after its prompt, every prompt + answer run in full (right-padded batches).

    Returns the scores and the tokens pushed through the model. Right padding needs no attention mask: a
    causal model never lets a real position see the filler that follows it."""
    device = model_device(model)
    scores = [0.0] * len(pairs)
    tokens = 0
    # Similar lengths together: less padding.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for batch in _chunks(order, batch_size):
        # The last answer token is only a target, never an input.
        seqs = [pairs[i][0] + pairs[i][1][:-1] for i in batch]
        ids = _padded(seqs, device)
        first = min(len(pairs[i][0]) for i in batch) - 1  # earliest position that predicts an answer token
        logits = forward(model, ids, None, ids.shape[1] - first)
        offset = ids.shape[1] - logits.shape[1]  # logits cover positions offset..end
        tokens += ids.numel()
        # Answer tokens of row i are predicted at positions len(prompt)-1 ... len(prompt)+len(answer)-2.
        starts = [len(pairs[i][0]) - 1 - offset for i in batch]
        width = max(len(pairs[i][1]) for i in batch)
        index = torch.tensor([[min(s + j, logits.shape[1] - 1) for j in range(width)] for s in starts],
                             device=device)
        aligned = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        for i, score in zip(batch, _summed_logps(aligned, [pairs[i][1] for i in batch])):
            scores[i] = score
    return scores, tokens


def _score_with_prefix(model: torch.nn.Module, prompts: Sequence[list[int]], answers: Sequence[Sequence[list[int]]],
                       batch_size: int) -> tuple[list[list[float]], int]:
    """Sum log p of each answers[v][i] after prompts[v]: every prompt runs once, its answers from its KV cache.

    Prompts of equal length (the 4 D8 views that keep a grid's shape, and the 4 that transpose it) prefill
    together, up to batch_size at a time, with no padding. Then (view, answer) rows run in batches, longest
    answers first, each on its own copy of the group's cache with the right view per row
    (`batch_select_indices`); the group's last batch takes the cache itself. Why a copy: a forward appends to
    the cache it is given, and a `crop` back to the prompt is not possible for every cache (a sliding-window
    layer past its window refuses it). The deep copy costs one pass over the group's cache, small next to the
    forward it feeds, and it is exact for any cache.
    Returns the scores and the tokens pushed through the model."""
    device = model_device(model)
    scores = [[0.0] * len(a) for a in answers]
    tokens = 0
    same_length: dict[int, list[int]] = {}
    for v, prompt in enumerate(prompts):
        if answers[v]:
            same_length.setdefault(len(prompt), []).append(v)
    for views_of_length in same_length.values():
        for group in _chunks(views_of_length, batch_size):
            cache = DynamicCache()
            logits = forward(model, torch.tensor([prompts[v] for v in group], device=device), cache, 1)
            first_logits = logits[:, -1]  # row r predicts the first token of every answer of view group[r]
            tokens += len(group) * len(prompts[group[0]])
            rows = [(r, v, i) for r, v in enumerate(group) for i in range(len(answers[v]))]
            rows.sort(key=lambda row: -len(answers[row[1]][row[2]]))
            batches = list(_chunks(rows, batch_size))
            for n, batch in enumerate(batches):
                ids = _padded([answers[v][i][:-1] for _, v, i in batch], device)
                out_logits = None
                if ids.shape[1] > 0:  # answers of one token need nothing beyond the prompt's last logits
                    view_cache = cache if n == len(batches) - 1 else copy.deepcopy(cache)  # the last may spend it
                    view_cache.batch_select_indices(torch.tensor([r for r, _, _ in batch], device=device))
                    out_logits = forward(model, ids, view_cache, ids.shape[1])
                    tokens += ids.numel()
                # Row k's answer is predicted by the prompt's last logits, then by its own first len-1 positions.
                step_logits = first_logits[[r for r, _, _ in batch]][:, None]
                if out_logits is not None:
                    step_logits = torch.cat([step_logits, out_logits], dim=1)
                row_scores = _summed_logps(step_logits, [answers[v][i] for _, v, i in batch])
                for (_, v, i), score in zip(batch, row_scores):
                    scores[v][i] = score
    return scores, tokens


def teacher_forced_logp(model: torch.nn.Module, prompt: list[int], answers: list[list[int]],
                        batch_size: int = 8, reuse_prefix: bool = True) -> list[float]:
    """Sum of log p (full softmax, float64 sum) of each answer's tokens given the prompt, in one pass each."""
    if any(not a for a in answers):
        raise ValueError("every answer needs at least one token")
    with eval_mode(model):
        if reuse_prefix:
            return _score_with_prefix(model, [prompt], [answers], batch_size)[0][0]
        return _score_from_scratch(model, [(prompt, a) for a in answers], batch_size)[0]


# ------------------------------------------------------------------------------------------ scoring views

def _view_prompt(codec: GridCodec, task: Task, test_index: int, view: Transform, max_len: int,
                 reserve: int) -> list[int]:
    return codec.encode_prompt(view.pairs(task.train), view.grid(task.test[test_index].input),
                               max_len=max_len, reserve=reserve).ids


def score_candidates(model: torch.nn.Module, codec: GridCodec, task: Task, test_index: int,
                     candidates: list[Candidate], views: list[Transform], max_len: int, batch_size: int = 8,
                     reuse_prefix: bool = True) -> dict[str, float]:
    """Fill `c.scores[v]` (v = index into `views`) with the teacher-forced log p of each candidate under each view.

    Candidates with the same grid are scored once and share the numbers. Every prompt reserves room for the
    longest candidate, so all candidates of one view see the same prompt. Returns timing and token stats."""
    start = time.perf_counter()
    unique: dict[tuple[tuple[int, ...], bytes], list[Candidate]] = {}
    for cand in candidates:
        grid = np.asarray(cand.grid, dtype=np.int8)
        unique.setdefault((grid.shape, grid.tobytes()), []).append(cand)
    groups = list(unique.values())
    tokens = 0
    if groups:
        prompts, answers = [], []
        for view in views:
            view_answers = [codec.encode_answer(view.grid(np.asarray(g[0].grid))) for g in groups]
            prompts.append(_view_prompt(codec, task, test_index, view, max_len, max(map(len, view_answers))))
            answers.append(view_answers)
        with eval_mode(model):
            if reuse_prefix:
                scores, tokens = _score_with_prefix(model, prompts, answers, batch_size)
            else:
                flat = [(p, a) for p, view_answers in zip(prompts, answers) for a in view_answers]
                flat_scores, tokens = _score_from_scratch(model, flat, batch_size)
                scores = [flat_scores[v * len(groups):(v + 1) * len(groups)] for v in range(len(views))]
        for v, view_scores in enumerate(scores):
            for group, score in zip(groups, view_scores):
                for cand in group:
                    cand.scores[v] = score
    return {"scoring_seconds": time.perf_counter() - start, "scoring_tokens": float(tokens),
            "scoring_views": float(len(views) if groups else 0), "scoring_candidates": float(len(groups))}


def answer_nll(model: torch.nn.Module, codec: GridCodec, task: Task, test_index: int, views: list[Transform],
               max_len: int, batch_size: int = 8) -> float:
    """Mean over views of the per-token NLL of the true test output, teacher-forced in each view's frame.

    Works for a PeftModel as is; for the base model alone, call it inside `peft_model.disable_adapter()`."""
    truth = task.test[test_index].output
    if truth is None:
        raise ValueError(f"task {task.id} has no known output for test input {test_index}")
    if not views:
        raise ValueError("answer_nll needs at least one view")
    pairs = []
    for view in views:
        answer = codec.encode_answer(view.grid(truth))
        pairs.append((_view_prompt(codec, task, test_index, view, max_len, len(answer)), answer))
    with eval_mode(model):
        # Prompts differ per view, so there is no prefix to share: score the full sequences, batched over views.
        logps, _ = _score_from_scratch(model, pairs, batch_size)
    return float(np.mean([-lp / len(a) for lp, (_, a) in zip(logps, pairs)]))


# ------------------------------------------------------------------------------------------ aggregation

def aggregate(candidate: Candidate, name: str) -> float:
    """One number per candidate, higher is better.

    sum_logp: sum of the per-view scores (product of the views' probabilities). sum_logp_bonus: sum_logp plus
    (gen log p + 3) per generating view. mean_prob: the mean probability over views, returned as its LOG
    (log-mean-exp: same order, but no underflow to 0 for long answers). max / min: best / worst view. votes: the
    number of generating views. A score-based aggregate of a candidate without scores raises ValueError: it
    would compare an empty sum with real ones; rank by "votes" when nothing was scored."""
    if name not in AGGREGATES:
        raise ValueError(f"unknown aggregate {name!r}; choose one of {AGGREGATES}")
    if name == "votes":
        return float(candidate.votes)
    if not candidate.scores:
        raise ValueError(f"aggregate {name!r} needs scores: run score_candidates first (or rank by 'votes')")
    values = np.fromiter(candidate.scores.values(), dtype=np.float64)
    if name == "sum_logp":
        return float(values.sum())
    if name == "sum_logp_bonus":
        return float(values.sum() + sum(lp + GEN_BONUS for lp in candidate.gen_logps.values()))
    if name == "mean_prob":
        top = values.max()
        return float(top + math.log(np.exp(values - top).mean())) if np.isfinite(top) else float(top)
    return float(values.max() if name == "max" else values.min())


def rank(candidates: list[Candidate], name: str) -> list[int]:
    """Candidate indices, best first; ties go to more votes, then the higher mean gen log p, then the index.

    Score-based aggregates need every candidate scored under the same views (else ValueError): sums over
    different view sets are not comparable."""
    if name not in AGGREGATES:
        raise ValueError(f"unknown aggregate {name!r}; choose one of {AGGREGATES}")
    if name != "votes" and candidates:
        view_sets = {frozenset(c.scores) for c in candidates}
        if len(view_sets) > 1:
            raise ValueError(f"aggregate {name!r}: candidates were scored under different views; "
                             "score them all with the same views")
    values = [aggregate(c, name) for c in candidates]
    return sorted(range(len(candidates)),
                  key=lambda i: (-values[i], -candidates[i].votes, -candidates[i].mean_gen_logp, i))


__all__ = ["AGGREGATES", "score_candidates", "aggregate", "rank", "answer_nll", "teacher_forced_logp"]
