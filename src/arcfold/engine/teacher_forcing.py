"""Teacher forcing: the summed log-probability of each candidate answer after its prompt.

`answer_logps(model, prompts, answers)`: answers[v][i] is scored after prompts[v], the log p of every answer token
under the model's full softmax (engine.logits), summed in float64. It runs one of three ways, which give the same
numbers:

- Prompt reuse (the default): every prompt runs once and its answers are scored on its KV cache. Where the
  model's attention takes a custom mask over full attention (engine.prompt_cache), the prompts are prefilled
  into one batched cache and a prompt's answers are packed side by side after it ("tree attention": the mask
  keeps them apart), `rows_answer_logps`, which also scores on caches the DFS already holds (engine.predict).
  Else each (prompt, answer) row runs on its own copy of the prompt's cache (`_copied`: flash kernels take no
  mask, and a sliding-window cache past its window cannot be cropped back to the prompt).
- `reuse_prompts=False`: every prompt + answer runs in full, in right-padded batches of similar length
  (`_from_scratch`): the canonical one-row number the DFS settles near-threshold branches on, and the baseline
  the benchmarks measure reuse against.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from transformers import DynamicCache

from arcfold.engine.generate import eval_mode, model_device
from arcfold.engine.logits import base_model, hidden_states, token_logps
from arcfold.engine.prompt_cache import PromptRows, feed, prefill, tree_attention_supported

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_PAD = 0  # filler id after a short answer: causal attention keeps it from touching the real tokens

Scores = list[list[float]]  # scores[v][i]: summed log p of answers[v][i]


@dataclass(frozen=True)
class Cost:
    """What a call pushed through the model: tokens (padding included) and forward passes."""

    tokens: int = 0
    passes: int = 0

    def __add__(self, other: object) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.tokens + other.tokens, self.passes + other.passes)


def answer_logps(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int = 8,
    *,
    reuse_prompts: bool = True,
) -> tuple[Scores, Cost]:
    """Sum of log p (full softmax, float64 sum) of each answers[v][i]'s tokens after prompts[v], and what that
    pushed through the model. `reuse_prompts=False` runs every prompt + answer in full (module
    docstring).
    The model runs in eval mode under torch.inference_mode; its train/eval mode comes back after."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but answers for {len(answers)}")
    if not all(prompts) or not all(a for view_answers in answers for a in view_answers):
        raise ValueError("every prompt and every answer needs at least one token")
    with eval_mode(model):
        if not reuse_prompts:
            flat = [(prompt, a) for prompt, view_answers in zip(prompts, answers) for a in view_answers]
            flat_scores, cost = _from_scratch(model, flat, batch_size)
            rows = iter(flat_scores)
            return [[next(rows) for _ in view_answers] for view_answers in answers], cost
        if tree_attention_supported(model):
            return _packed(model, prompts, answers, batch_size)
        return _copied(model, prompts, answers, batch_size)


# ------------------------------------------------------------------------------------------ shared plumbing


def _block_sums(
    model: torch.nn.Module, hidden: torch.Tensor, blocks: torch.Tensor, targets: torch.Tensor, count: int
) -> list[float]:
    """Summed log p per answer: blocks[r, q] names the answer (0..count-1) whose token targets[r, q] position q of
    row r predicts, -1 where nothing is read. The head runs at the read positions only (engine.logits)."""
    real = blocks >= 0
    logps = token_logps(model, hidden[real], targets[real])
    return torch.zeros(count, dtype=torch.float64, device=hidden.device).index_add_(0, blocks[real], logps).tolist()


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [_PAD] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


T = TypeVar("T")


def _chunks(order: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


# ------------------------------------------------------------------------------------------ from scratch


def _from_scratch(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int
) -> tuple[list[float], Cost]:
    """Sum log p of each answer after its prompt, every prompt + answer run in full (right-padded batches).

    Returns the scores and what that pushed through the model. Right padding needs no attention mask: a
    causal model never lets a real position see the filler that follows it."""
    device = model_device(model)
    scores = [0.0] * len(pairs)
    cost = Cost()
    # Similar lengths together: less padding.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for batch in _chunks(order, batch_size):
        # The last answer token is only a target, never an input.
        seqs = [pairs[i][0] + pairs[i][1][:-1] for i in batch]
        ids = _padded(seqs, device)
        first = min(len(pairs[i][0]) for i in batch) - 1  # earliest position that predicts an answer token
        hidden = hidden_states(model, ids, None, ids.shape[1] - first)
        offset = ids.shape[1] - hidden.shape[1]  # hidden states cover positions offset..end
        cost += Cost(ids.numel(), 1)
        # Answer tokens of row r are predicted at positions len(prompt)-1 ... len(prompt)+len(answer)-2.
        blocks = torch.full(hidden.shape[:2], -1, dtype=torch.long)
        targets = torch.full(hidden.shape[:2], _PAD, dtype=torch.long)
        for r, i in enumerate(batch):
            prompt, answer = pairs[i]
            start = len(prompt) - 1 - offset
            blocks[r, start : start + len(answer)] = r
            targets[r, start : start + len(answer)] = torch.tensor(answer)
        sums = _block_sums(model, hidden, blocks.to(device), targets.to(device), len(batch))
        for i, score in zip(batch, sums):
            scores[i] = score
    return scores, cost


# ------------------------------------------------------------------------------------------ prompt reuse


def _same_length_groups(
    prompts: Sequence[list[int]], answers: Sequence[Sequence[list[int]]], size: int
) -> Iterator[list[int]]:
    """Views with answers to score, grouped by prompt length (the 4 D8 views that keep a grid's shape, and the 4
    that transpose it), `size` at a time: one cache per group, no padding."""
    same_length: dict[int, list[int]] = {}
    for v, prompt in enumerate(prompts):
        if answers[v]:
            same_length.setdefault(len(prompt), []).append(v)
    for views in same_length.values():
        yield from _chunks(views, size)


def _answer_inputs(prompt: Sequence[int], answer: Sequence[int]) -> list[int]:
    """What the model reads to score `answer` over a cache of prompt[:-1]: the prompt's last token, then every
    answer token but the last (position t predicts answer[t])."""
    return [prompt[-1], *answer[:-1]]


# ------------------------------------------------------------------------------------------ packed answers


def _pack(lengths: dict[int, int], cap: int) -> list[list[int]]:
    """First-fit decreasing: the keys of `lengths` in packs whose lengths sum to at most `cap` (an item longer
    than `cap` gets a pack of its own)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for item in sorted(lengths, key=lambda i: -lengths[i]):
        for p, free in enumerate(room):
            if lengths[item] <= free:
                packs[p].append(item)
                room[p] -= lengths[item]
                break
        else:
            packs.append([item])
            room.append(cap - lengths[item])
    return packs


def _pack_cap(base: PreTrainedModel, rows: int, batch_size: int, prompt_len: int, longest: int) -> int:
    """Packed tokens per row: see `rows_answer_logps`. Without a known vocabulary and hidden size, the logits of a
    from-scratch batch's answers are the bound."""
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    vocab, hidden = getattr(config, "vocab_size", None), getattr(config, "hidden_size", None)
    per_forward = batch_size * longest  # tokens whose logits a from-scratch batch keeps
    if vocab and hidden:
        per_forward = max(per_forward, batch_size * (prompt_len + longest) * hidden // vocab)
    return max(longest, min(prompt_len // 2, per_forward // rows))


def rows_answer_logps(
    model: torch.nn.Module, rows: PromptRows, answers: Sequence[Sequence[list[int]]], batch_size: int = 8
) -> tuple[Scores, Cost]:
    """answers[r][i] scored after row r's prompt in `rows` (engine.prompt_cache), packed ("tree attention"): the
    scores and what that pushed through the model. The cache is left as it was.

    An answer's first token is read off the prompt's last hidden state; the rest of its tokens but the last are
    fed as one block (position len(prompt) + j for its token j) that sees the prompt and its own earlier tokens
    only, several blocks per row side by side, then cropped off again. The budget (`_pack_cap`): one packed
    forward's tokens stay within the larger of what a from-scratch batch holds anyway: its answers' logits
    (batch_size x longest answer x vocabulary) or one layer's hidden states (batch_size x (prompt + longest) x
    hidden size). And a row packs at most max(longest answer, prompt / 2) tokens: the dense mask computes a
    packed x packed block of which only the answers' own causal triangles are used, so this keeps that waste
    under half the useful packed x prompt work."""
    if len(answers) != rows.rows:
        raise ValueError(f"answers for {len(answers)} rows, the cache holds {rows.rows}")
    device = rows.last.device
    scores = [[0.0] * len(a) for a in answers]
    flat = [(r, i) for r, row_answers in enumerate(answers) for i in range(len(row_answers))]
    if not flat:
        return scores, Cost()
    firsts = token_logps(
        model,
        rows.last[torch.tensor([r for r, _ in flat], device=device)],
        torch.tensor([answers[r][i][0] for r, i in flat], device=device),
    ).tolist()
    for (r, i), lp in zip(flat, firsts):
        scores[r][i] = lp
    inputs = [{i: len(a) - 1 for i, a in enumerate(row_answers) if len(a) > 1} for row_answers in answers]
    if not any(inputs):
        return scores, Cost()
    longest = max(n for lengths in inputs for n in lengths.values())
    cap = _pack_cap(base_model(model), rows.rows, batch_size, min(rows.lengths), longest)
    packs = [_pack(lengths, cap) for lengths in inputs]
    extra = rows.columns() - rows.width
    cost = Cost()
    for k in range(max(map(len, packs))):
        row_packs = [view_packs[k] if k < len(view_packs) else [] for view_packs in packs]
        width = max(max(sum(inputs[r][i] for i in pack) for r, pack in enumerate(row_packs)), 1)
        ids = torch.zeros((rows.rows, width), dtype=torch.long)
        depths = torch.zeros((rows.rows, width), dtype=torch.long)
        targets = torch.zeros((rows.rows, width), dtype=torch.long)
        blocks = torch.full((rows.rows, width), -1, dtype=torch.long)
        owners: list[tuple[int, int]] = []  # block b is answers[r][i]
        for r, pack in enumerate(row_packs):
            start = 0
            for i in pack:
                answer, n = answers[r][i], inputs[r][i]
                ids[r, start : start + n] = torch.tensor(answer[:-1])
                targets[r, start : start + n] = torch.tensor(answer[1:])
                depths[r, start : start + n] = torch.arange(n)
                blocks[r, start : start + n] = len(owners)
                owners.append((r, i))
                start += n
        pos = torch.arange(width)
        causal = (
            (blocks[:, :, None] == blocks[:, None, :])
            & (blocks[:, None, :] >= 0)
            & (pos[None, None] <= pos[None, :, None])
        )
        visible = torch.cat([torch.zeros((rows.rows, width, extra), dtype=torch.bool), causal], dim=-1)
        hidden = feed(model, rows, ids, depths, visible)
        rows.cache.crop(-width)  # back to what it held
        cost += Cost(ids.numel(), 1)
        blocks, targets = blocks.to(device), targets.to(device)
        for (r, i), lp in zip(owners, _block_sums(model, hidden, blocks, targets, len(owners))):
            scores[r][i] += lp
    return scores, cost


def _packed(
    model: torch.nn.Module, prompts: Sequence[list[int]], answers: Sequence[Sequence[list[int]]], batch_size: int
) -> tuple[Scores, Cost]:
    """Prompt reuse by packing: each group of same-length prompts prefilled once, its answers packed on it."""
    scores = [[0.0] * len(a) for a in answers]
    cost = Cost()
    for group in _same_length_groups(prompts, answers, batch_size):
        rows, prompt_tokens = prefill(model, [prompts[v] for v in group])
        group_scores, answer_cost = rows_answer_logps(model, rows, [answers[v] for v in group], batch_size)
        cost += Cost(prompt_tokens, 1) + answer_cost
        for v, view_scores in zip(group, group_scores):
            scores[v] = view_scores
    return scores, cost


# ------------------------------------------------------------------------------------------ copied caches


def _copied(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int,
) -> tuple[Scores, Cost]:
    """Prompt reuse for any cache: each (view, answer) row on its own copy of the prompt's cache.

    For each group of same-length views, the prompts but their last token run once; then (view, answer) rows run
    in batches, longest answers first, each on its own copy of the group's cache with the right view per row
    (`batch_select_indices`); the group's last batch takes the cache itself. Why a copy: a forward appends to
    the cache it is given, and a `crop` back to the prompt is not possible for every cache (a sliding-window
    layer past its window refuses it). The deep copy costs one pass over the group's cache, small next to the
    forward it feeds, and it is exact for any cache."""
    device = model_device(model)
    scores = [[0.0] * len(a) for a in answers]
    cost = Cost()
    for group in _same_length_groups(prompts, answers, batch_size):
        cache = DynamicCache()
        if len(prompts[group[0]]) > 1:
            hidden_states(model, torch.tensor([prompts[v][:-1] for v in group], device=device), cache, 1)
            cost += Cost(len(group) * (len(prompts[group[0]]) - 1), 1)
        rows = [(r, v, i) for r, v in enumerate(group) for i in range(len(answers[v]))]
        rows.sort(key=lambda row: -len(answers[row[1]][row[2]]))
        batches = list(_chunks(rows, batch_size))
        for n, batch in enumerate(batches):
            # Right padding after each row's answer: causal attention keeps it from the real tokens.
            ids = _padded([_answer_inputs(prompts[v], answers[v][i]) for _, v, i in batch], device)
            view_cache = cache if n == len(batches) - 1 else copy.deepcopy(cache)  # the last may spend it
            view_cache.batch_select_indices(torch.tensor([r for r, _, _ in batch], device=device))
            hidden = hidden_states(model, ids, view_cache, ids.shape[1])
            cost += Cost(ids.numel(), 1)
            lengths = torch.tensor([len(answers[v][i]) for _, v, i in batch], device=device)
            read = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]
            blocks = torch.where(read, torch.arange(len(batch), device=device)[:, None], -1)
            targets = _padded([answers[v][i] for _, v, i in batch], device)
            for (_, v, i), score in zip(batch, _block_sums(model, hidden, blocks, targets, len(batch))):
                scores[v][i] = score
    return scores, cost


__all__ = ["Cost", "Scores", "answer_logps", "rows_answer_logps"]
