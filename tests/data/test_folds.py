"""Folds: a seeded partition of the tasks; random folds of equal size, balanced folds of similar token cost."""

from __future__ import annotations

import pytest

from arcfold.data import ArcDataError, Task, make_folds, train_tokens

KS = [1, 2, 8, 120]


def ids(folds: list[list[Task]]) -> list[list[str]]:
    return [[t.id for t in fold] for fold in folds]


def cost(task: Task) -> int:
    return train_tokens(task.train)


def assert_partition(folds: list[list[Task]], tasks: list[Task]) -> None:
    flat = [t.id for fold in folds for t in fold]
    assert sorted(flat) == sorted(t.id for t in tasks)  # every task once, none twice, none invented
    assert all(fold for fold in folds)


@pytest.mark.parametrize("strategy", ["random", "balanced"])
@pytest.mark.parametrize("k", KS)
def test_folds_partition_the_tasks_deterministically(eval_tasks: list[Task], strategy: str, k: int) -> None:
    folds = make_folds(eval_tasks, k, strategy, seed=7)
    assert len(folds) == k
    assert_partition(folds, eval_tasks)
    assert ids(folds) == ids(make_folds(eval_tasks, k, strategy, seed=7))
    assert ids(folds) == ids(make_folds(list(eval_tasks), k, strategy, seed=7, cost=cost))


def test_per_task_is_one_fold_per_task(eval_tasks: list[Task]) -> None:
    folds = make_folds(eval_tasks, None, "per_task")
    assert len(folds) == len(eval_tasks) and all(len(f) == 1 for f in folds)
    assert_partition(folds, eval_tasks)


@pytest.mark.parametrize("k", KS)
def test_random_fold_sizes_differ_by_at_most_one(eval_tasks: list[Task], k: int) -> None:
    for tasks in (eval_tasks, eval_tasks[:37]):
        if k > len(tasks):
            continue
        sizes = [len(f) for f in make_folds(tasks, k, "random", seed=3)]
        assert max(sizes) - min(sizes) <= 1


def test_random_folds_change_with_the_seed(eval_tasks: list[Task]) -> None:
    seen = {tuple(map(tuple, ids(make_folds(eval_tasks, 8, "random", seed=s)))) for s in range(5)}
    assert len(seen) == 5


@pytest.mark.parametrize("k", [2, 4, 8])
def test_balanced_folds_have_closer_token_totals_than_random(eval_tasks: list[Task], k: int) -> None:
    def spread(folds: list[list[Task]]) -> int:
        totals = [sum(cost(t) for t in fold) for fold in folds]
        return max(totals) - min(totals)

    balanced = spread(make_folds(eval_tasks, k, "balanced", seed=0))
    # Greedy into the lightest fold: the heaviest and lightest differ by at most one task's cost.
    assert balanced <= max(cost(t) for t in eval_tasks)
    random_spreads = [spread(make_folds(eval_tasks, k, "random", seed=s)) for s in range(5)]
    assert balanced < min(random_spreads)
    mean_total = sum(cost(t) for t in eval_tasks) / k
    assert balanced < 0.05 * mean_total


def test_balanced_never_leaves_a_fold_empty_even_with_zero_costs(eval_tasks: list[Task]) -> None:
    folds = make_folds(eval_tasks[:10], 4, "balanced", cost=lambda t: 0)
    assert_partition(folds, eval_tasks[:10])


@pytest.mark.parametrize(
    "k, strategy, field",
    [
        (0, "random", "folds: got 0"),
        (121, "random", "folds: got 121; allowed: an integer from 1 to the 120 tasks"),
        (None, "balanced", "folds: got None"),
    ],
)
def test_bad_fold_settings_name_the_field(eval_tasks: list[Task], k: int | None, strategy: str, field: str) -> None:
    with pytest.raises(ArcDataError, match=field):
        make_folds(eval_tasks, k, strategy)


def test_a_repeated_task_is_refused(eval_tasks: list[Task]) -> None:
    with pytest.raises(ArcDataError, match="twice"):
        make_folds(eval_tasks[:3] + eval_tasks[:1], 2)
