"""Per-task prediction: generate in augmented views, map back, merge, rank into two attempts.

For each test input, every view's prompt is generated from with the configured strategy (greedy, sample or the
thresholded DFS). Completions are decoded in the view's frame (invalid ones are counted and dropped, never
raised), mapped back with the view's inverse transform and merged, so a grid found in several views collects
one vote per view. Ranking is by votes (then mean log p), or by augmentation scoring when cfg.scoring.views > 0;
every ranking lands in TestPrediction.rankings so one run can compare them.

No prompt runs twice after a DFS: the search prefills the views together (engine.dfs) and keeps the caches of the
views that scoring (cfg.scoring.views_from="generation": the first cfg.scoring.views) and the true output's NLL
(`nll_views`) read, within a memory budget (`cache_budget`: half the free device memory on CUDA,
cfg.scoring.cache_mb on a CPU), so both run only their answers' tokens. Per input, the stats give forwards,
tokens and seconds for generation, scoring and the NLL.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from typing import Sequence, cast

import numpy as np
import torch

from arcfold.config import CHOICES, InferenceConfig
from arcfold.data.augment import ColourMode, Transform, make_views, task_rng
from arcfold.data.codec import MAX_OUTPUT_TOKENS, Encoded, GridCodec
from arcfold.data.errors import ArcDataError
from arcfold.data.tasks import Task
from arcfold.engine.candidates import AGGREGATES, Candidate, TestPrediction, merge, rank
from arcfold.engine.dfs import Searched, dfs
from arcfold.engine.generate import Completion, GenStats, eval_mode, greedy, model_device, sample
from arcfold.engine.prompt_cache import PromptRows
from arcfold.engine.scoring import Work, answer_nll, score_candidates

log = logging.getLogger(__name__)

STRATEGIES = CHOICES["inference.strategy"]  # what predict_test runs; arcfold.checks refuses any other


def answer_budget(max_len: int) -> int:
    """Tokens kept free for the answer, and the most a view may generate.

    The longest possible answer (a 30x30 grid) is MAX_OUTPUT_TOKENS = 931, so with the default max_len that
    much is reserved: a prompt never crowds out a legal answer (demonstrations are dropped instead). A small
    max_len (CPU runs) keeps half for the prompt rather than failing on every task."""
    return min(MAX_OUTPUT_TOKENS, max_len // 2)


def generation_prompt(codec: GridCodec, task: Task, index: int, view: Transform, max_len: int) -> Encoded:
    """View `view` of test input `index`'s prompt, with room for the longest answer it may generate
    (answer_budget). Raises ArcDataError when not even one demonstration fits."""
    return codec.encode_prompt(
        view.pairs(task.train), view.grid(task.test[index].input), max_len=max_len, reserve=answer_budget(max_len)
    )


CUDA_CACHE_SHARE = 0.5  # of the free device memory, for prompt caches kept for scoring (the rest: its forwards)


def cache_budget(model: torch.nn.Module, cfg: InferenceConfig) -> float:
    """Bytes of prompt caches a test input may keep from its DFS for scoring and the NLL."""
    device = model_device(model)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * CUDA_CACHE_SHARE
    return cfg.scoring.cache_mb * 2**20


class _TestRun:
    """The generation state of one test input: prompts per view, candidates, counters."""

    def __init__(
        self,
        model: torch.nn.Module,
        codec: GridCodec,
        task: Task,
        index: int,
        cfg: InferenceConfig,
        views: Sequence[Transform],
        nll_views: Sequence[Transform],
    ) -> None:
        self.model, self.codec, self.task, self.index, self.cfg = model, codec, task, index, cfg
        self.nll_views = list(nll_views)
        self.start = time.perf_counter()
        self.deadline = self.start + cfg.max_seconds
        self.max_new = answer_budget(cfg.max_len)
        self.candidates: list[Candidate] = []
        self.gen = GenStats()
        self.n_completions = self.n_invalid = 0
        self.views_done = 0
        self.prompts: list[tuple[int, Transform, list[int]]] = []  # (view index, view, prompt ids)
        self.held: dict[int, tuple[PromptRows, int]] = {}  # view index -> the DFS's cache rows holding its prompt
        self.rows_per_forward = 0.0
        self.search_batch = max(1, cfg.batch_size)  # views per search forward (halved after an out-of-memory error)
        dropped: list[int] = []
        for v, view in enumerate(views):
            try:
                enc = generation_prompt(codec, task, index, view, cfg.max_len)
            except ArcDataError as err:  # even one demonstration does not fit: this view cannot run
                log.warning("task %s test %d view %d skipped: %s", task.id, index, v, err)
                continue
            self.prompts.append((v, view, enc.ids))
            dropped.append(enc.dropped)
        self.prompt_tokens = float(np.mean([len(p) for _, _, p in self.prompts])) if self.prompts else 0.0
        self.dropped_demos = float(np.mean(dropped)) if dropped else 0.0

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def collect(self, v: int, view: Transform, completions: list[Completion]) -> None:
        for completion in completions:
            self.n_completions += 1
            grid = self.codec.decode(completion.ids)
            if grid is None:
                self.n_invalid += 1
                continue
            merge(self.candidates, view.invert(grid), v, completion.logp, self.cfg.max_candidates)

    # ---------------------------------------------------------------------------------------- strategies

    def run_batched(self) -> None:
        """greedy / sample: views decoded together, batch by batch, checking the clock in between."""
        step = max(1, self.cfg.batch_size)
        for first in range(0, len(self.prompts), step):
            if self.remaining() <= 0:
                self.gen.timed_out = True
                break
            chunk = self.prompts[first : first + step]
            ids = [p for _, _, p in chunk]
            if self.cfg.strategy == "greedy":
                out, stats = greedy(self.model, ids, self.codec, self.max_new, step, self.remaining())
            else:
                seed = int(task_rng(self.cfg.seed, "sample", self.task.id, self.index, first).integers(2**31))
                out, stats = sample(
                    self.model,
                    ids,
                    self.codec,
                    self.max_new,
                    self.cfg.samples,
                    self.cfg.temperature,
                    seed,
                    step,
                    self.remaining(),
                )
            self.gen.add(stats)
            for (v, view, _), completions in zip(chunk, out):
                self.collect(v, view, completions)
            self.views_done += len(chunk)

    def views_to_hold(self) -> set[int]:
        """The generation views whose prompt caches scoring and the NLL will read."""
        scoring = self.cfg.scoring
        wanted = set()
        if scoring.views > 0 and scoring.views_from == "generation":
            wanted |= {v for v, _, _ in self.prompts[: scoring.views]}
        wanted |= {v for v, view, _ in self.prompts if view in self.nll_views}
        return wanted

    def run_dfs(self) -> None:
        """Every view's search at once (engine.dfs), its caches kept where scoring or the NLL reads them."""
        if not self.prompts:
            return
        searched = self.search(self.search_batch)
        self.gen.add(searched.stats)
        self.rows_per_forward = searched.rows_per_forward
        self.held = {self.prompts[k][0]: held for k, held in searched.kept.items()}
        for (v, view, _), found in zip(self.prompts, searched.completions):
            self.collect(v, view, found)
        self.views_done = len(self.prompts)

    def search(self, batch: int) -> Searched:
        """engine.dfs with `batch` views per forward, halved on an out-of-memory error until 1 (the answer does not
        depend on it)."""
        hold = self.views_to_hold()
        while True:
            try:
                return dfs(
                    self.model,
                    [ids for _, _, ids in self.prompts],
                    self.codec,
                    self.cfg.min_prob,
                    self.max_new,
                    batch_size=batch,
                    max_seconds=self.remaining(),
                    max_candidates=self.cfg.max_candidates,
                    keep=[k for k, (v, _, _) in enumerate(self.prompts) if v in hold],
                    keep_bytes=cache_budget(self.model, self.cfg),
                )
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
            # Out of the except block: the failed try's tensors went with its traceback.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning(
                "task %s test %d: out of memory searching %d views per forward; again with %d",
                self.task.id,
                self.index,
                batch,
                batch // 2,
            )
            batch //= 2
            self.search_batch = batch

    def nll(self) -> tuple[float | None, dict[str, float]]:
        """The true output's NLL under nll_views, on the DFS's caches where it kept them."""
        if not self.nll_views or self.task.test[self.index].output is None:
            return None, {}
        generation = {view: (v, ids) for v, view, ids in self.prompts}
        prompts = [generation[view][1] if view in generation else None for view in self.nll_views]
        held = {
            j: self.held[generation[view][0]]
            for j, view in enumerate(self.nll_views)
            if view in generation and generation[view][0] in self.held
        }
        cfg = self.cfg
        work = Work()
        value = answer_nll(
            self.model,
            self.codec,
            self.task,
            self.index,
            self.nll_views,
            cfg.max_len,
            cfg.batch_size,
            prompts,
            held,
            work,
        )
        return value, {
            "nll_seconds": work.seconds,
            "nll_tokens": float(work.tokens),
            "nll_passes": float(work.passes),
            "nll_kept_views": float(work.held_views),
        }


def _rank(run: _TestRun) -> tuple[dict[str, list[int]], list[int], dict[str, float]]:
    """Every ranking we can compute, the one that picks the attempts, and scoring stats."""
    cfg, candidates = run.cfg, run.candidates
    rankings = {"votes": rank(candidates, "votes")}
    stats = {"scoring_seconds": 0.0, "scoring_tokens": 0.0}
    if cfg.scoring.views <= 0 or not candidates:
        return rankings, rankings["votes"], stats
    if cfg.scoring.views_from == "generation":
        chosen = run.prompts[: cfg.scoring.views]
        views: list[Transform] = [view for _, view, _ in chosen]
        prompts: list[list[int]] | None = [ids for _, _, ids in chosen]
        held = {j: run.held[v] for j, (v, _, _) in enumerate(chosen) if v in run.held}
    else:
        views = make_views(
            run.task,
            math.ceil(cfg.scoring.views / 8),
            cfg.scoring.seed,
            cast(ColourMode, cfg.scoring.colours),
            cfg.shuffle_demos,
        )[: cfg.scoring.views]
        prompts, held = None, {}
    stats.update(
        score_candidates(
            run.model,
            run.codec,
            run.task,
            run.index,
            candidates,
            views,
            max_len=cfg.max_len,
            batch_size=cfg.batch_size,
            prompts=prompts,
            held=held,
        )
    )
    for name in AGGREGATES:
        rankings[name] = rank(candidates, name)
    return rankings, rankings[cfg.scoring.aggregate], stats


def predict_test(
    model: torch.nn.Module,
    codec: GridCodec,
    task: Task,
    index: int,
    cfg: InferenceConfig,
    views: Sequence[Transform],
    nll_views: Sequence[Transform] = (),
) -> TestPrediction:
    run = _TestRun(model, codec, task, index, cfg, views, nll_views)
    if cfg.strategy == "dfs":
        run.run_dfs()
    else:
        run.run_batched()
    gen_seconds = time.perf_counter() - run.start
    rankings, order, scoring_stats = _rank(run)
    nll, nll_stats = run.nll()
    run.held.clear()  # the caches' memory goes back before the next test input
    stats = {
        "seconds": time.perf_counter() - run.start,
        "gen_seconds": gen_seconds,
        "scoring_seconds": float(scoring_stats.pop("scoring_seconds")),
        "forward_tokens": float(run.gen.forward_tokens),
        "forward_passes": float(run.gen.forward_passes),
        "n_views": float(run.views_done),
        "n_views_skipped": float(len(views) - len(run.prompts)),
        "n_completions": float(run.n_completions),
        "n_invalid": float(run.n_invalid),
        "n_candidates": float(len(run.candidates)),
        "prompt_tokens": run.prompt_tokens,
        "dropped_demos": run.dropped_demos,
        "timed_out": float(run.gen.timed_out),
        "capped": float(run.gen.capped),
        **{k: float(v) for k, v in scoring_stats.items()},
        **nll_stats,
    }
    if cfg.strategy == "dfs":  # search forwards (prefills aside): how many branches each served
        stats["rows_per_forward"] = run.rows_per_forward
        stats["search_batch"] = float(run.search_batch)
    attempts = [run.candidates[i].grid for i in order[:2]]
    return TestPrediction(task.id, index, run.candidates, attempts, rankings, stats, answer_nll=nll)


def predict_task(
    model: torch.nn.Module,
    codec: GridCodec,
    task: Task,
    cfg: InferenceConfig,
    views: list[Transform] | None = None,
    indices: Sequence[int] | None = None,
    nll_views: Sequence[Transform] = (),
) -> list[TestPrediction]:
    """One TestPrediction per test input (or per one of `indices`), attempts (at most two) in the task's frame.

    views defaults to make_views(task, cfg.n, cfg.seed, ...) = 8 * n views, the identity first. `nll_views`: the
    views the true output's NLL is taken under (TestPrediction.answer_nll; none: not taken), on the DFS's caches
    for those among `views`. The model runs in eval mode under torch.inference_mode (its train/eval mode is
    restored afterwards); a PeftModel works. cfg's choices (strategy, scoring.aggregate) are the checked
    config's (arcfold.checks)."""
    if views is None:
        views = make_views(task, cfg.n, cfg.seed, cast(ColourMode, cfg.colours), cfg.shuffle_demos)
    with eval_mode(model):
        return [
            predict_test(model, codec, task, i, cfg, views, nll_views)
            for i in (range(len(task.test)) if indices is None else indices)
        ]


__all__ = ["STRATEGIES", "answer_budget", "cache_budget", "generation_prompt", "predict_task", "predict_test"]
