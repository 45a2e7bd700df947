"""Thresholded search: every completion whose total probability is at least min_prob, for many prompts at once.

A completion's probability only shrinks along its path, so a prefix whose cumulative NLL exceeds -ln(min_prob)
can be pruned without losing anything, and at most 1/min_prob prefixes of any one length survive. Which order
the tree is walked in does not change the set found, so this walks it breadth-wise, batched: the prompts (the
views of a test input) are prefilled once, `batch_size` per KV cache (engine.prompt_cache), and every step feeds
the newest token of every open branch of every prompt in ONE forward. Branches of one prompt share its cache row
under a tree mask (each sees its prompt and its own ancestors), so a step costs one forward however many
branches are open, and a prompt is never copied. Pruned branches' columns are dropped from the cache once they
outnumber the live ones.

Exactness. Log-probs come from the full-vocabulary softmax in float32 (engine.logits), summed in float64. A child
is kept iff its NLL <= -ln(min_prob) + NLL_TOLERANCE. A batched forward's numbers differ from a one-row forward's
by float noise (padding, kernel choice), so a decision within TIE_BAND of the threshold is made on a canonical
number instead: the path re-scored from scratch, alone, in one forward (engine.teacher_forcing, batch 1). So the
set found does not depend on the batch size, the padding or the order, and matches a one-row search
(tests/engine/one_row_dfs.py, the tests' reference) that settles ties the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Collection

import torch

from arcfold.data.codec import GridCodec
from arcfold.engine.generate import Completion, GenStats, eval_mode, model_device
from arcfold.engine.logits import column_logps
from arcfold.engine.prompt_cache import PromptRows, feed, prefill, tree_attention_supported
from arcfold.engine.teacher_forcing import answer_logps

NLL_TOLERANCE = 1e-6  # nats; far above float64 accumulation error, far below any meaningful gap


def tie_band(model: torch.nn.Module) -> float:
    """How close to the threshold (nats) a batched NLL is settled canonically: far above float32 noise between
    batch layouts (~1e-6 over an answer), and above 16-bit noise for a bf16 / fp16 model."""
    dtype = next(model.parameters()).dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def canonical_nll(model: torch.nn.Module, prompt: list[int], path: list[int]) -> float:
    """The NLL of `path` after `prompt`, from one forward over prompt + path alone (batch 1, no cache, no
    padding): the number every search decides a near-threshold branch on."""
    (logp,), _ = answer_logps(model, [prompt], [[path]], batch_size=1, reuse_prompts=False)
    return -logp[0]


@dataclass
class _Branch:
    row: int
    path: list[int]  # answer tokens so far
    nll: float
    columns: list[int] = field(default_factory=list)  # cache offsets (after the prompts) of the fed path tokens


@dataclass
class Searched:
    """dfs's result: completions per prompt (best first), the work done, and the prompt caches kept for scoring."""

    completions: list[list[Completion]]
    stats: GenStats
    kept: dict[int, tuple[PromptRows, int]]  # prompt index -> (rows holding it, its row there)
    branches_fed: int = 0  # search branches the forwards served (padding slots not counted)
    prefills: int = 0  # forwards that ran prompts (one per cache)
    kept_bytes: int = 0

    @property
    def rows_per_forward(self) -> float:
        """Branches each search forward served (prefills aside)."""
        searches = self.stats.forward_passes - self.prefills
        return self.branches_fed / searches if searches > 0 else 0.0


def dfs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    codec: GridCodec,
    min_prob: float,
    max_new_tokens: int,
    batch_size: int = 8,
    max_seconds: float | None = None,
    max_candidates: int | None = None,
    keep: Collection[int] = (),
    keep_bytes: float = 0.0,
) -> Searched:
    """All completions of each prompt (ending in eos, at most max_new_tokens tokens) with probability >= min_prob,
    each with its full-softmax log p, best first.

    `batch_size` prompts share a cache and every forward (the answer does not depend on it). `max_seconds` stops
    between forwards (stats.timed_out); `max_candidates` keeps each prompt's best that many (stats.capped).
    `keep`: prompts whose prefilled cache is returned (cropped back to the prompt) for scoring to reuse, while
    their caches together fit `keep_bytes`."""
    if not 0.0 < min_prob <= 1.0:
        raise ValueError(f"min_prob must be in (0, 1], got {min_prob}")
    if not tree_attention_supported(model):
        raise ValueError(
            "the DFS feeds branches under a tree mask, which needs sdpa or eager attention over full attention in "
            "every layer (model.attn_implementation=sdpa; sliding-window models: inference=greedy or sample)"
        )
    start = time.perf_counter()
    deadline = None if max_seconds is None else start + max_seconds
    out = Searched([[] for _ in prompts], GenStats(), {})
    step = max(1, batch_size)
    with eval_mode(model):
        for first in range(0, len(prompts), step):
            if deadline is not None and time.perf_counter() > deadline:
                out.stats.timed_out = True
                break
            group = list(range(first, min(first + step, len(prompts))))
            rows, tokens = prefill(model, [prompts[i] for i in group])
            out.stats.forward_tokens += tokens
            out.stats.forward_passes += 1
            out.prefills += 1
            _Search(model, rows, [prompts[i] for i in group], codec, min_prob, max_new_tokens, deadline, out).run(
                [out.completions[i] for i in group]
            )
            wanted = [r for r, i in enumerate(group) if i in keep]
            if wanted and not out.stats.timed_out:
                rows.crop_to_prompts()
                rows.select(wanted)
                if out.kept_bytes + rows.nbytes() <= keep_bytes:
                    out.kept_bytes += rows.nbytes()
                    out.kept.update({group[r]: (rows, new_row) for new_row, r in enumerate(wanted)})
    for found in out.completions:
        found.sort(key=lambda c: (-c.logp, c.ids))
        if max_candidates is not None and len(found) > max_candidates:
            del found[max_candidates:]
            out.stats.capped = True
    out.stats.seconds = time.perf_counter() - start
    return out


class _Search:
    """One cache's search: the open branches of all its rows, a depth per forward."""

    def __init__(
        self,
        model: torch.nn.Module,
        rows: PromptRows,
        prompts: list[list[int]],
        codec: GridCodec,
        min_prob: float,
        max_new_tokens: int,
        deadline: float | None,
        out: Searched,
    ) -> None:
        self.model, self.rows, self.prompts, self.codec = model, rows, prompts, codec
        self.threshold = -math.log(min_prob)
        self.band = tie_band(model)
        self.max_new, self.deadline, self.out = max_new_tokens, deadline, out
        self.allowed = torch.tensor(codec.output_tokens, dtype=torch.long, device=model_device(model))

    def children(self, branch: _Branch, dist: list[float], found: list[Completion]) -> list[_Branch]:
        """The branch's children that stay within the threshold; those ending in eos go to `found`."""
        kids = []
        for tok, lp in zip(self.codec.output_tokens, dist):
            nll = branch.nll - lp
            if nll > self.threshold + self.band:
                continue
            if nll >= self.threshold - self.band:  # within float noise of the threshold: decide canonically
                nll = canonical_nll(self.model, self.prompts[branch.row], branch.path + [tok])
                if nll > self.threshold + NLL_TOLERANCE:
                    continue
            if tok == self.codec.eos_id:
                found.append(Completion(branch.path + [tok], -nll))
            elif len(branch.path) + 2 <= self.max_new:  # room left for the eos after this token
                kids.append(_Branch(branch.row, branch.path + [tok], nll, list(branch.columns)))
        return kids

    def run(self, found: list[list[Completion]]) -> None:
        if self.max_new < 1:
            return
        open_ = [_Branch(r, [], 0.0) for r in range(self.rows.rows)]
        dists = column_logps(self.model, self.rows.last, self.allowed).tolist()
        while True:
            fresh = [kid for b, d in zip(open_, dists) for kid in self.children(b, d, found[b.row])]
            if not fresh:
                return
            if self.deadline is not None and time.perf_counter() > self.deadline:
                self.out.stats.timed_out = True
                return
            open_, dists = fresh, self.expand(fresh)

    def expand(self, branches: list[_Branch]) -> list[list[float]]:
        """One forward: each branch's newest token in its row; the next-token distributions, in branch order."""
        extra = self.rows.columns() - self.rows.width
        live = sum(len(b.columns) for b in branches)  # an upper bound on the columns still read
        if extra > 2 * live + 64:  # mostly dead columns: drop them (amortised, memory stays within 3x the live)
            extra = self.compact(branches)
        per_row: list[list[_Branch]] = [[] for _ in range(self.rows.rows)]
        for b in branches:
            per_row[b.row].append(b)
        width = max(len(bs) for bs in per_row)
        ids = torch.zeros((self.rows.rows, width), dtype=torch.long)
        depths = torch.zeros((self.rows.rows, width), dtype=torch.long)
        visible = torch.zeros((self.rows.rows, width, extra + width), dtype=torch.bool)
        slots = []
        for r, bs in enumerate(per_row):
            for q, b in enumerate(bs):
                ids[r, q] = b.path[-1]
                depths[r, q] = len(b.path) - 1
                b.columns.append(extra + q)
                visible[r, q, b.columns] = True
                slots.append((r, q))
        hidden = feed(self.model, self.rows, ids, depths, visible)
        self.out.stats.forward_tokens += ids.numel()
        self.out.stats.forward_passes += 1
        self.out.branches_fed += len(branches)
        index = torch.tensor(slots, device=hidden.device)
        picked = hidden[index[:, 0], index[:, 1]]
        return column_logps(self.model, picked, self.allowed).tolist()

    def compact(self, branches: list[_Branch]) -> int:
        """Drop the columns no open branch reads; returns the columns left after the prompts."""
        keep = [sorted({c for b in branches if b.row == r for c in b.columns}) for r in range(self.rows.rows)]
        moves = self.rows.compact(keep)
        for b in branches:
            b.columns = [moves[b.row][c] for c in b.columns]
        return self.rows.columns() - self.rows.width


__all__ = ["NLL_TOLERANCE", "Searched", "canonical_nll", "dfs", "tie_band"]
