"""The one-row DFS: the search arcfold ran before the batched one (engine.dfs), kept as the tests' reference.

One prompt, one KV cache of batch 1, depth first: each forward feeds one path. A `guess` (the best candidate so
far, in this view's frame) runs with the prompt in one forward, so walking down it costs nothing. Backtracking
crops the cache to the longest prefix shared with the next path. It settles near-threshold branches exactly as
engine.dfs does (engine.dfs.canonical_nll), so the two must find the same completions with the same log-probs
whatever the batch. benchmarks/bench_dfs.py times it against the batched search.
"""

from __future__ import annotations

import math
import time
from typing import Literal, Sequence

import torch
from transformers import DynamicCache

from arcfold.data.codec import GridCodec
from arcfold.engine.dfs import NLL_TOLERANCE, canonical_nll, tie_band
from arcfold.engine.generate import Completion, GenStats, eval_mode, model_device
from arcfold.engine.logits import column_logps, hidden_states

Explore = Literal["likely", "unlikely"]


class _PathCache:
    """A DynamicCache for prompt + some answer tokens, tracking which answer tokens it holds."""

    def __init__(self, model: torch.nn.Module, codec: GridCodec, stats: GenStats, cache: DynamicCache) -> None:
        self.model = model
        self.device = model_device(model)
        self.allowed = torch.tensor(codec.output_tokens, dtype=torch.long, device=self.device)
        self.stats = stats
        self.cache = cache
        self.held: list[int] = []  # answer tokens currently in the cache, after the prompt

    def _run(self, tokens: Sequence[int], keep: int) -> list[list[float]]:
        """Feed tokens on top of the cache; log p of each output token at the last `keep` positions."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        hidden = hidden_states(self.model, ids, self.cache, keep)[0]
        self.stats.forward_tokens += len(tokens)
        self.stats.forward_passes += 1
        # Full-vocabulary softmax, read at the output tokens' columns only: probabilities are not renormalised.
        return column_logps(self.model, hidden, self.allowed).tolist()

    def prefill(self, prompt: Sequence[int], guess: Sequence[int]) -> list[list[float]]:
        """Prompt and guess in one pass: the distributions after prompt + guess[:k] for k = 0..len(guess)."""
        dists = self._run(list(prompt) + list(guess), len(guess) + 1)
        self.held = list(guess)
        return dists

    def extend(self, path: list[int]) -> list[float]:
        """The distribution after prompt + path, with the cache left holding exactly prompt + path."""
        common = 0
        limit = min(len(self.held), len(path) - 1)  # feed at least the last token: its logits are the answer
        while common < limit and self.held[common] == path[common]:
            common += 1
        stale = len(self.held) - common
        if stale:
            self.cache.crop(-stale)  # negative = tokens to remove (the only form transformers 5 accepts)
        dist = self._run(path[common:], 1)[0]
        self.held = list(path)
        return dist

    def back_to_prompt(self) -> None:
        if self.held:
            self.cache.crop(-len(self.held))
            self.held = []


def one_row_dfs(
    model: torch.nn.Module,
    prompt: list[int],
    codec: GridCodec,
    min_prob: float,
    max_new_tokens: int,
    guess: list[int] | None = None,
    max_seconds: float | None = None,
    max_candidates: int | None = None,
    explore: Explore = "likely",
    cache: DynamicCache | None = None,
) -> tuple[list[Completion], GenStats]:
    """All completions (ending in eos, at most max_new_tokens tokens) with probability >= min_prob.

    Returns them best first, each with its full-softmax log p, and the search's stats. `max_seconds` and
    `max_candidates` stop early (stats.timed_out / stats.capped). `explore="unlikely"` walks the least likely
    child first: a testing hook (same result, more work) that checks the cache never carries stale state.
    `cache`: an empty DynamicCache to search in, left holding exactly the prompt afterwards."""
    if not 0.0 < min_prob <= 1.0:
        raise ValueError(f"min_prob must be in (0, 1], got {min_prob}")
    if cache is not None and cache.get_seq_length():
        raise ValueError(f"dfs needs an empty cache, got one holding {cache.get_seq_length()} tokens")
    start = time.perf_counter()
    stats = GenStats()
    found: list[Completion] = []
    if max_new_tokens < 1:
        return found, stats
    deadline = None if max_seconds is None else start + max_seconds
    threshold, band = -math.log(min_prob), tie_band(model)
    tokens, eos = codec.output_tokens, codec.eos_id
    guess = list(guess or [])[:max_new_tokens]

    def children(dist: list[float], nll: float, path: list[int]) -> list[tuple[float, int]]:
        kept = []
        for tok, lp in zip(tokens, dist):
            child = nll - lp
            if child > threshold + band:
                continue
            if child >= threshold - band:  # the batched search's rule: settled on the canonical number
                child = canonical_nll(model, prompt, path + [tok])
                if child > threshold + NLL_TOLERANCE:
                    continue
            kept.append((child, tok))
        kept.sort(reverse=explore == "unlikely")  # (nll, token): ties broken by token id, deterministically
        return kept

    with eval_mode(model):
        path_cache = _PathCache(model, codec, stats, DynamicCache() if cache is None else cache)
        guess_dists = path_cache.prefill(prompt, guess)
        # Frames: [depth, children (nll, token), next child, on the guess path]; `path` is the top frame's node.
        stack: list[list] = [[0, children(guess_dists[0], 0.0, []), 0, bool(guess)]]
        path: list[int] = []
        while stack:
            if deadline is not None and time.perf_counter() > deadline:
                stats.timed_out = True
                break
            if max_candidates is not None and len(found) >= max_candidates:
                stats.capped = True
                break
            frame = stack[-1]
            depth, kids, i, on_guess = frame
            if i == len(kids):
                stack.pop()
                if depth:
                    path.pop()
                continue
            frame[2] = i + 1
            nll, tok = kids[i]
            if tok == eos:
                found.append(Completion(path + [eos], -nll))
                continue
            if depth + 2 > max_new_tokens:  # no room left for the eos after this token
                continue
            path.append(tok)
            child_on_guess = on_guess and depth < len(guess) and guess[depth] == tok
            # Along the guess the distribution is already known from the prefill: no forward at all.
            dist = guess_dists[depth + 1] if child_on_guess else path_cache.extend(path)
            stack.append([depth + 1, children(dist, nll, path), 0, child_on_guess])
        path_cache.back_to_prompt()
    found.sort(key=lambda c: (-c.logp, c.ids))
    stats.seconds = time.perf_counter() - start
    return found, stats
