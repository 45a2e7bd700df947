"""Generation strategies behind one interface: greedy and sampling, batched over prompts with a KV cache.

Log-probability convention (shared with the DFS and with teacher-forced scoring): decoding may only pick
`codec.output_tokens` (nothing else can form a grid), but every reported log p is taken under the model's FULL
softmax over the whole vocabulary at temperature 1, unmasked. So a completion's `logp` is exactly what a
teacher-forced forward pass over prompt + completion would sum, whatever strategy produced it.

Why our own decoding loop rather than `model.generate`: the loop reads the argmax and the full-softmax log p off
the same logits tensor (no output_logits / compute_transition_scores round trip), drops finished rows from the
batch and the cache (`DynamicCache.batch_select_indices`), seeds sampling with its own torch.Generator instead of
the global RNG, counts forward tokens for the benchmarks, and is the same few forward calls the DFS uses, which
stay stable across transformers versions (generate's cache and output arguments do not).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from arcfold.data.codec import GridCodec
from arcfold.engine.logits import head_logits, hidden_states, picked_logps

Pick = Callable[[torch.Tensor], torch.Tensor]  # (rows, output-token logits) -> chosen column per row


@dataclass
class Completion:
    ids: list[int]  # generated answer tokens, ending with eos when complete
    logp: float  # sum of the tokens' log-probabilities under the full softmax (see the module docstring)


@dataclass
class GenStats:
    forward_tokens: int = 0  # tokens pushed through the model: prompts, decoded tokens, left padding included
    forward_passes: int = 0
    seconds: float = 0.0
    timed_out: bool = False  # a wall-clock cap stopped the work early
    capped: bool = False  # a candidate cap stopped the search early

    def add(self, other: "GenStats") -> None:
        self.forward_tokens += other.forward_tokens
        self.forward_passes += other.forward_passes
        self.seconds += other.seconds
        self.timed_out |= other.timed_out
        self.capped |= other.capped


# ------------------------------------------------------------------------------------------ model plumbing


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode under torch.inference_mode for the duration; the caller's train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ batched decoding


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _decode_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    codec: GridCodec,
    max_new_tokens: int,
    pick: Pick,
    deadline: float | None,
    stats: GenStats,
) -> list[Completion]:
    """Decode one batch of prompts until every row has produced eos or max_new_tokens tokens.

    Left padding + attention mask + explicit position ids (a padded row's first real token is position 0).
    `pick(logits_over_output_tokens) -> column` chooses each row's next token among codec.output_tokens."""
    device = model_device(model)
    allowed = torch.tensor(codec.output_tokens, dtype=torch.long, device=device)
    eos = codec.eos_id
    ids, mask = _left_pad(prompts, codec.pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    results = [Completion([], 0.0) for _ in prompts]
    active = list(range(len(prompts)))  # original row of each cache row
    logits = head_logits(model, hidden_states(model, ids, cache, 1, mask, positions)[:, -1])
    stats.forward_tokens += ids.numel()
    stats.forward_passes += 1
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        choice = allowed[pick(logits.index_select(-1, allowed))]  # head_logits are fp32 whatever the model's dtype
        chosen_logp = picked_logps(logits, choice).tolist()  # under the full softmax (module docstring)
        tokens = choice.tolist()
        keep = []
        for row, (tok, lp) in enumerate(zip(tokens, chosen_logp)):
            res = results[active[row]]
            res.ids.append(tok)
            res.logp += lp
            if tok != eos:
                keep.append(row)
        if not keep or step + 1 == max_new_tokens or (deadline is not None and time.perf_counter() > deadline):
            stats.timed_out |= bool(keep) and step + 1 < max_new_tokens
            break
        if len(keep) < len(active):  # drop finished rows: no more compute spent on them
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, next_pos, choice = mask[index], next_pos[index], choice[index]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits = head_logits(model, hidden_states(model, choice[:, None], cache, 1, mask, next_pos)[:, -1])
        next_pos = next_pos + 1
        stats.forward_tokens += len(active)
        stats.forward_passes += 1
    return results


def _run(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    codec: GridCodec,
    max_new_tokens: int,
    batch_size: int,
    pick: Pick,
    max_seconds: float | None,
) -> tuple[list[Completion], GenStats]:
    """Decode all rows in batches of similar prompt length (less padding); results in the input order."""
    start = time.perf_counter()
    deadline = None if max_seconds is None else start + max_seconds
    stats = GenStats()
    out: list[Completion] = [Completion([], 0.0) for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with eval_mode(model):
        for first in range(0, len(order), max(1, batch_size)):
            if deadline is not None and time.perf_counter() > deadline:
                stats.timed_out = True  # the rest stay empty (invalid) completions
                break
            batch = order[first : first + batch_size]
            done = _decode_batch(model, [rows[i] for i in batch], codec, max_new_tokens, pick, deadline, stats)
            for i, completion in zip(batch, done):
                out[i] = completion
    stats.seconds = time.perf_counter() - start
    return out, stats


def greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    codec: GridCodec,
    max_new_tokens: int,
    batch_size: int = 8,
    max_seconds: float | None = None,
) -> tuple[list[list[Completion]], GenStats]:
    """The argmax chain over codec.output_tokens for each prompt: one Completion per prompt.

    logp is under the full unmasked softmax (module docstring); a row that hits max_new_tokens (or the
    wall-clock cap) before eos comes back without the eos, which decodes to no grid."""
    if max_new_tokens < 1 or not prompts:
        return [[Completion([], 0.0)] for _ in prompts], GenStats()
    completions, stats = _run(
        model, list(prompts), codec, max_new_tokens, batch_size, lambda logits: logits.argmax(-1), max_seconds
    )
    return [[c] for c in completions], stats


def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    codec: GridCodec,
    max_new_tokens: int,
    n: int,
    temperature: float,
    seed: int,
    batch_size: int = 8,
    max_seconds: float | None = None,
) -> tuple[list[list[Completion]], GenStats]:
    """n samples per prompt from softmax(logits / temperature) restricted to codec.output_tokens.

    Seeded by its own torch.Generator, so results depend only on (seed, prompts, model). logp is still the
    model's full-softmax log p at temperature 1 (module docstring), not the sampling distribution's."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1 or not prompts or n < 1:
        return [[Completion([], 0.0) for _ in range(max(n, 0))] for _ in prompts], GenStats()
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    rows = [p for p in prompts for _ in range(n)]
    flat, stats = _run(model, rows, codec, max_new_tokens, batch_size, pick, max_seconds)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))], stats
