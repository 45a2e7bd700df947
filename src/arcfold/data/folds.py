"""Split tasks into k folds; each fold trains its own adapter and predicts its own tasks."""

from __future__ import annotations

import heapq
from typing import Any, Callable, Literal, Sequence, cast

import numpy as np

from arcfold.data.codec import train_tokens
from arcfold.data.errors import ArcDataError
from arcfold.data.tasks import Task

Strategy = Literal["random", "balanced", "per_task"]


def make_folds(
    tasks: Sequence[Task],
    k: int | None,
    strategy: Strategy = "random",
    seed: int = 0,
    cost: Callable[[Task], int] | None = None,
) -> list[list[Task]]:
    """Every task lands in exactly one fold; the same seed gives the same folds.

    random:    shuffle (seeded) and cut into k folds whose sizes differ by at most one.
    balanced:  similar total training cost per fold (cost(task); default: the task's training tokens, since
               training time is proportional to tokens): greedy, costliest first into the currently lightest
               fold (then the one with fewest tasks), ties between equal costs broken by a seeded shuffle.
    per_task:  one fold per task (k is ignored).
    """
    tasks = list(tasks)
    if not tasks:
        raise ArcDataError("no tasks to split", field="folds")
    if len({t.id for t in tasks}) != len(tasks):
        raise ArcDataError("a task id appears twice: it would land in two folds", field="folds")
    if strategy == "per_task":
        return [[t] for t in tasks]
    if k is None or k < 1 or k > len(tasks):
        raise ArcDataError(
            f"got {k!r}; allowed: an integer from 1 to the {len(tasks)} tasks, or per_task", field="folds"
        )
    order = np.random.default_rng(seed).permutation(len(tasks))
    shuffled = [tasks[i] for i in order]
    if strategy == "random":
        return [list(part) for part in _even_split(shuffled, k)]
    cost = cost or _training_tokens
    costs = [cost(t) for t in shuffled]
    # (total cost, tasks in it, fold index): the count keeps zero-cost tasks from piling into one fold
    # and leaving another empty.
    heap = [(0, 0, f) for f in range(k)]
    folds: list[list[Task]] = [[] for _ in range(k)]
    # Stable sort keeps the seeded shuffle as the tie-break between equal costs.
    for i in sorted(range(len(shuffled)), key=lambda i: -costs[i]):
        total, count, f = heapq.heappop(heap)
        folds[f].append(shuffled[i])
        heapq.heappush(heap, (total + costs[i], count + 1, f))
    return folds


def _training_tokens(task: Task) -> int:
    return train_tokens(task.train)


def _even_split(items: list[Task], k: int) -> list[list[Task]]:
    size, extra = divmod(len(items), k)
    parts, start = [], 0
    for f in range(k):
        end = start + size + (1 if f < extra else 0)
        parts.append(items[start:end])
        start = end
    return parts


def split(tasks: Sequence[Task], folds: Any, strategy: str, seed: int) -> list[list[Task]]:
    """The run's folds from its `folds` value: an int k (cut by `strategy`), or "per_task"."""
    if str(folds) == "per_task":
        return make_folds(tasks, None, "per_task")
    try:
        k = int(folds)
    except (TypeError, ValueError):
        raise ArcDataError(f"folds must be an integer or per_task, got {folds!r}", field="folds") from None
    return make_folds(tasks, k, cast(Strategy, strategy), seed)
