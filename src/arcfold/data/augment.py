"""Augmented views of a task: a D8 symmetry, a colour permutation and a demonstration order.

A Transform applies the same symmetry and colour map to every grid of a task and inverts any predicted grid
exactly, so a prediction made in an augmented frame maps back to the original one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from arcfold.config import COLOURS
from arcfold.data.tasks import Pair, Task

ColourMode = Literal["all", "keep_zero", "none"]
N_D8 = 8
IDENTITY_COLOURS = tuple(range(10))


@dataclass(frozen=True)
class Transform:
    """d8 in 0..7: transpose first when d8 >= 4, then d8 % 4 counter-clockwise quarter turns.
    colours[c] is the new colour of colour c. demo_order lists the original demonstration indices in
    their new order (empty = keep the order)."""

    d8: int = 0
    colours: tuple[int, ...] = IDENTITY_COLOURS
    demo_order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.d8 < N_D8:
            raise ValueError(f"d8 must be in 0..7, got {self.d8}")
        if sorted(self.colours) != list(range(10)):
            raise ValueError(f"colours must be a permutation of 0..9, got {self.colours}")

    @property
    def is_identity(self) -> bool:
        return (
            self.d8 == 0
            and self.colours == IDENTITY_COLOURS
            and (not self.demo_order or list(self.demo_order) == sorted(self.demo_order))
        )

    def grid(self, grid: np.ndarray) -> np.ndarray:
        out = np.asarray(self.colours, dtype=np.int8)[grid]
        if self.d8 >= 4:
            out = out.T
        return np.ascontiguousarray(np.rot90(out, self.d8 % 4))

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """The original-frame grid whose transform is `grid` (undo the turns, the transpose, the colours)."""
        out = np.rot90(np.asarray(grid), -(self.d8 % 4))
        if self.d8 >= 4:
            out = out.T
        inverse_colours = np.argsort(np.asarray(self.colours)).astype(np.int8)
        return np.ascontiguousarray(inverse_colours[out])

    def pairs(self, pairs: Sequence[Pair], reorder: bool = True) -> tuple[Pair, ...]:
        order = self.demo_order if (reorder and self.demo_order) else range(len(pairs))
        # A view made for another task (or before demos were dropped) would silently lose or repeat pairs.
        if sorted(order) != list(range(len(pairs))):
            raise ValueError(f"demo_order {self.demo_order} is not a permutation of {len(pairs)} pairs")
        return tuple(
            Pair(self.grid(p.input), None if p.output is None else self.grid(p.output))
            for p in (pairs[i] for i in order)
        )

    def task(self, task: Task) -> Task:
        """The augmented task: demonstrations transformed and reordered, test pairs transformed in place."""
        return Task(task.id, self.pairs(task.train), self.pairs(task.test, reorder=False))


def task_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (e.g. a task id), not on call order."""
    words = [seed & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(words)


def random_colours(rng: np.random.Generator, mode: ColourMode) -> tuple[int, ...]:
    if mode == "none":
        return IDENTITY_COLOURS
    if mode == "keep_zero":
        return (0,) + tuple(int(c) for c in rng.permutation(np.arange(1, 10)))
    if mode == "all":
        return tuple(int(c) for c in rng.permutation(10))
    raise ValueError(f"colour mode must be one of {' | '.join(COLOURS)}, got {mode!r}")


def view_count(n: int) -> int:
    """The views make_views gives for `inference.n` = n (and an epoch's views per task for n epochs)."""
    return N_D8 * n


def make_views(
    task: Task, n: int, seed: int, colours: ColourMode = "all", shuffle_demos: bool = True, identity_first: bool = True
) -> list[Transform]:
    """8 * n views of a task: n rounds of the 8 D8 symmetries, each with its own random colour permutation
    and demonstration order. With identity_first the very first view is the untouched task."""
    rng = task_rng(seed, "views", task.id)
    n_demos = len(task.train)
    views = []
    for round_ in range(n):
        for d8 in range(N_D8):
            if identity_first and round_ == 0 and d8 == 0:
                views.append(Transform())
                continue
            order = tuple(int(i) for i in rng.permutation(n_demos)) if shuffle_demos else ()
            views.append(Transform(d8, random_colours(rng, colours), order))
    return views


def epoch_plan(
    tasks: Sequence[Task],
    epochs: int,
    seed: int,
    colours: ColourMode = "all",
    shuffle_demos: bool = True,
    d8: bool = True,
) -> list[tuple[Task, Transform]]:
    """The training data of the reference's "epochs = augmented copies": for each task and epoch, the 8 D8
    views (each with its own colours and demo order), all shuffled into ONE pass: 8 * epochs per task.
    With d8=False the 8 views of an epoch all keep the task's orientation (colours and order still vary)."""
    plan = []
    for task in tasks:
        rng = task_rng(seed, "epochs", task.id)
        n_demos = len(task.train)
        for _ in range(epochs):
            for symmetry in range(N_D8):
                order = tuple(int(i) for i in rng.permutation(n_demos)) if shuffle_demos else ()
                plan.append((task, Transform(symmetry if d8 else 0, random_colours(rng, colours), order)))
    shuffled = task_rng(seed, "shuffle", len(plan)).permutation(len(plan))
    return [plan[i] for i in shuffled]
