"""What prediction produces: candidate grids for one test input, and how they are ranked into two attempts.

Generation (greedy, sampling, DFS) fills `gen_logps`; augmentation scoring fills `scores`; a ranking picks
the attempts. Every ranking works on the same candidates, so one run can compare them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from arcfold.data.tasks import same_grid


@dataclass
class Candidate:
    grid: np.ndarray  # in the task's original frame
    gen_logps: dict[int, float] = field(default_factory=dict)  # generating view -> log p of the answer there
    scores: dict[int, float] = field(default_factory=dict)  # scoring view -> teacher-forced log p

    @property
    def votes(self) -> int:
        return len(self.gen_logps)

    @property
    def mean_gen_logp(self) -> float:
        return float(np.mean(list(self.gen_logps.values()))) if self.gen_logps else float("-inf")


@dataclass
class TestPrediction:
    task_id: str
    test_index: int
    candidates: list[Candidate]
    attempts: list[np.ndarray]  # up to two grids, best first
    rankings: dict[str, list[int]] = field(default_factory=dict)  # ranking name -> candidate indices, best first
    stats: dict[str, float] = field(default_factory=dict)  # seconds, forward tokens, views, dropped demos, ...


def merge(candidates: list[Candidate], grid: np.ndarray, view: int, logp: float, cap: int | None = None) -> None:
    """Add a de-augmented grid generated in `view`; duplicates merge, keeping the best log p per view.
    With a cap, a known grid still gains the view's vote but a new one is added only while below the cap."""
    for cand in candidates:
        if same_grid(cand.grid, grid):
            cand.gen_logps[view] = max(logp, cand.gen_logps.get(view, float("-inf")))
            return
    if cap is None or len(candidates) < cap:
        candidates.append(Candidate(np.asarray(grid, dtype=np.int8), {view: logp}))


def rank_by_votes(candidates: list[Candidate]) -> list[int]:
    """The default without augmentation scoring: most votes first, then the higher mean log p."""
    return sorted(range(len(candidates)), key=lambda i: (-candidates[i].votes, -candidates[i].mean_gen_logp, i))
