"""The batched DFS against the one-row DFS it replaced, on the same test inputs, in one run.

    .venv/bin/python benchmarks/bench_dfs.py                   # 16 generated tasks, no TTT and per-task TTT
    .venv/bin/python benchmarks/bench_dfs.py --tasks 4 --no-ttt  # a quick look

The workload of issue 17: the shipped model (one CPU thread), 16 held-out generated tasks (the default run's
data=synthetic at data.count=16), DFS at min_prob 0.05 over 16 views (inference.n=2), augmentation scoring under
8 views and the true output's NLL under 8; once with the base model (no TTT) and once with an adapter trained on
each task (the default run's train=shipped). For every test input both paths run back to back on the same
model, so load on the machine hits both alike:

- one-row: the search arcfold ran before (tests/engine/one_row_dfs.py): view after view, one row per forward,
  each view guessing the best candidate so far; then scoring, whose own pass runs each of the 8 scoring prompts
  once (the old runner reused the DFS's caches where they fit 1024 MB: 8 prompts of ~150 tokens, a few ms of this
  model), and the NLL from scratch under 8 views, as before.
- batched: the runner's own path (engine.predict.predict_test): every view searched together, one forward per
  depth, scoring and the NLL on the kept prompt caches.

Prints seconds per phase, forwards and tokens, the solved test inputs, the ratio batched / one-row of generation
+ scoring seconds, whether every test input got the same candidates (grids found in the same views), and the
largest difference between the two paths' log-probs of a candidate (fp32 noise: a few 1e-7 per answer token).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from arcfold.config import register
from arcfold.data.augment import make_views, view_count
from arcfold.data.sources import load_tasks
from arcfold.data.tasks import Task
from arcfold.engine.candidates import Candidate, merge, rank
from arcfold.engine.lora import AdapterReset, attach_lora
from arcfold.engine.model import load_model
from arcfold.engine.predict import answer_budget, generation_prompt, predict_test
from arcfold.engine.scoring import answer_nll, score_candidates
from arcfold.engine.train import make_accelerator, train_fold

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from one_row_dfs import one_row_dfs  # noqa: E402  (the tests' reference, not part of the package)


@dataclass
class Row:
    gen: float = 0.0
    scoring: float = 0.0
    nll: float = 0.0
    forwards: int = 0
    tokens: int = 0
    solved: int = 0
    candidates: list[dict] = field(default_factory=list)

    @property
    def gen_scoring(self) -> float:
        return self.gen + self.scoring


def one_row(model, codec, task: Task, i: int, cfg, views, row: Row) -> list[Candidate]:
    """The old runner's predict_test for a DFS: view by view, then scoring, then the NLL."""
    start = time.perf_counter()
    candidates: list[Candidate] = []
    for v, view in enumerate(views):
        prompt = generation_prompt(codec, task, i, view, cfg.max_len).ids
        guess = None
        if candidates:
            guess = codec.encode_answer(view.grid(candidates[rank(candidates, "votes")[0]].grid))
        found, stats = one_row_dfs(model, prompt, codec, cfg.min_prob, answer_budget(cfg.max_len), guess=guess)
        row.forwards += stats.forward_passes
        row.tokens += stats.forward_tokens
        for completion in found:
            grid = codec.decode(completion.ids)
            if grid is not None:
                merge(candidates, view.invert(grid), v, completion.logp, cfg.max_candidates)
    row.gen += time.perf_counter() - start
    scoring_views = views[: cfg.scoring.views]
    prompts = [generation_prompt(codec, task, i, view, cfg.max_len).ids for view in scoring_views]
    if candidates:
        stats = score_candidates(model, codec, task, i, candidates, scoring_views, cfg.max_len, cfg.batch_size, prompts)
        row.scoring += stats["scoring_seconds"]
        row.tokens += int(stats["scoring_tokens"])
    start = time.perf_counter()
    answer_nll(model, codec, task, i, views[: view_count(1)], cfg.max_len, cfg.batch_size)
    row.nll += time.perf_counter() - start
    return candidates


def batched(model, codec, task: Task, i: int, cfg, views, row: Row) -> list[Candidate]:
    pred = predict_test(model, codec, task, i, cfg, views, nll_views=views[: view_count(1)])
    s = pred.stats
    row.gen += s["gen_seconds"]
    row.scoring += s["scoring_seconds"]
    row.nll += s.get("nll_seconds", 0.0)
    row.forwards += int(s["forward_passes"] + s.get("scoring_passes", 0) + s.get("nll_passes", 0))
    row.tokens += int(s["forward_tokens"] + s.get("scoring_tokens", 0) + s.get("nll_tokens", 0))
    return pred.candidates


def attempts(candidates: list[Candidate], aggregate: str) -> list[np.ndarray]:
    return [np.asarray(candidates[k].grid) for k in rank(candidates, aggregate)[:2]] if candidates else []


def compare(a: list[Candidate], b: list[Candidate], codec) -> tuple[bool, float, float]:
    """Whether both found the same grids in the same views (so the same votes), and the largest difference of a
    generation log-prob, absolute and per answer token."""
    key = lambda c: (c.grid.shape, np.asarray(c.grid, dtype=np.int8).tobytes())  # noqa: E731
    by_grid = {key(c): c for c in b}
    if len(a) != len(b) or set(by_grid) != {key(c) for c in a}:
        return False, float("nan"), float("nan")
    worst = per_token = 0.0
    for c in a:
        d = by_grid[key(c)]
        if c.gen_logps.keys() != d.gen_logps.keys():
            return False, float("nan"), float("nan")
        for v in c.gen_logps:
            gap = abs(c.gen_logps[v] - d.gen_logps[v])
            worst = max(worst, gap)
            per_token = max(per_token, gap / len(codec.encode_answer(c.grid)))
    return True, worst, per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--min-prob", type=float, default=0.05)
    parser.add_argument("--n", type=int, default=2, help="views = 8 * n")
    parser.add_argument("--batch-size", type=int, default=16, help="inference.batch_size: views per batched cache")
    parser.add_argument("--no-ttt", action="store_true", help="only the workload without TTT")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register()
    overrides = [
        f"data.count={args.tasks}",
        f"data.limit={args.tasks}",
        f"inference.min_prob={args.min_prob}",
        f"inference.n={args.n}",
        f"inference.batch_size={args.batch_size}",
    ]
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    tasks, _ = load_tasks(cfg.data)
    loaded = load_model(cfg.model, cfg.format.name)
    model, codec = attach_lora(loaded.model, cfg.lora), loaded.codec
    fresh = AdapterReset(model)
    accelerator = make_accelerator(cfg.train, loaded.device)
    inference = cfg.inference
    print(
        f"{len(tasks)} tasks, min_prob {inference.min_prob}, {view_count(inference.n)} views, "
        f"batch {inference.batch_size}, scoring {inference.scoring.views} views, torch threads 1"
    )
    workloads = ["no TTT"] + ([] if args.no_ttt else ["per-task TTT"])
    table: dict[tuple[str, str], Row] = {}
    mismatches: list[str] = []
    inputs = 0
    worst = worst_per_token = 0.0
    for workload in workloads:
        rows = (Row(), Row())
        table[workload, "one-row"], table[workload, "batched"] = rows
        for task in tasks:
            fresh.reset(model)
            if workload != "no TTT":
                train_fold(model, codec, [task], cfg.train, accelerator, progress=False)
            views = make_views(task, inference.n, inference.seed, inference.colours, inference.shuffle_demos)
            for i in range(len(task.test)):
                inputs += workload == workloads[0]
                found = [
                    path(model, codec, task, i, inference, views, row) for path, row in zip((one_row, batched), rows)
                ]
                agree, gap, gap_per_token = compare(*found, codec)
                if not agree:
                    mismatches.append(f"{workload}: task {task.id} test {i}")
                worst = max(worst, gap)
                worst_per_token = max(worst_per_token, gap_per_token)
                truth = task.test[i].output
                picked = [attempts(candidates, inference.scoring.aggregate) for candidates in found]
                if [g.tobytes() for g in picked[0]] != [g.tobytes() for g in picked[1]]:
                    mismatches.append(f"{workload}: task {task.id} test {i} (attempts)")
                for grids, row in zip(picked, rows):
                    row.solved += any(g.shape == truth.shape and np.array_equal(g, truth) for g in grids)
    print(
        f"\n{'workload':<14}{'path':<9}{'gen s':>8}{'scoring s':>11}{'gen+scoring':>13}{'NLL s':>8}"
        f"{'forwards':>10}{'tokens':>10}{'solved':>8}"
    )
    for (workload, path), row in table.items():
        print(
            f"{workload:<14}{path:<9}{row.gen:>8.2f}{row.scoring:>11.2f}{row.gen_scoring:>13.2f}{row.nll:>8.2f}"
            f"{row.forwards:>10}{row.tokens:>10}{row.solved:>5}/{inputs}"
        )
    print()
    for workload in workloads:
        old, new = table[workload, "one-row"], table[workload, "batched"]
        print(
            f"{workload}: batched / one-row = {new.gen_scoring / old.gen_scoring:.3f} (generation + scoring), "
            f"{(new.gen_scoring + new.nll) / (old.gen_scoring + old.nll):.3f} with the NLL; "
            f"forwards {new.forwards / max(old.forwards, 1):.3f}"
        )
    print(
        "same candidates (grids, views, votes) and attempts for every test input: "
        + ("yes" if not mismatches else f"NO, {len(mismatches)} differ: " + "; ".join(mismatches[:5]))
    )
    print(f"largest generation log-prob difference: {worst:.2e} ({worst_per_token:.2e} per answer token)")


if __name__ == "__main__":
    main()
