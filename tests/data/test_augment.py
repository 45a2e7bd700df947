"""Augmented views: exact inverses on every real grid, aligned test pairs, seeded plans of 8 * epochs views."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from arcfold.data import Task, Transform, epoch_plan, make_views

SEED = 1234


@pytest.mark.parametrize("colours", ["all", "keep_zero"])
def test_every_view_inverts_every_eval_grid_exactly(eval_tasks: list[Task], colours: str) -> None:
    for task in eval_tasks:
        views = make_views(task, n=1, seed=SEED, colours=colours)  # the 8 D8 symmetries, sampled colours
        assert sorted(v.d8 for v in views) == list(range(8))
        for view in views:
            for pair in task.train + task.test:
                for grid in (pair.input, pair.output):
                    moved = view.grid(grid)
                    assert moved.dtype == np.int8
                    assert moved.shape in (grid.shape, grid.shape[::-1])
                    back = view.invert(moved)
                    assert back.shape == grid.shape and np.array_equal(back, grid), (task.id, view)


@pytest.mark.parametrize("colours", ["all", "keep_zero", "none"])
def test_colour_maps_move_every_cell_and_respect_the_mode(eval_tasks: list[Task], colours: str) -> None:
    for task in eval_tasks[:40]:
        for view in make_views(task, n=2, seed=SEED, colours=colours, identity_first=False):
            if colours == "keep_zero":
                assert view.colours[0] == 0
            if colours == "none":
                assert view.colours == tuple(range(10))
            grid = task.train[0].input
            # The histogram of colour c in the grid is the histogram of colours[c] in the view.
            before = Counter(int(c) for c in grid.ravel())
            after = Counter(int(c) for c in view.grid(grid).ravel())
            assert after == {view.colours[c]: n for c, n in before.items()}


def test_all_colour_mode_moves_the_background_sometimes(eval_tasks: list[Task]) -> None:
    views = [v for t in eval_tasks[:10] for v in make_views(t, n=2, seed=SEED, colours="all")]
    assert any(v.colours[0] != 0 for v in views)
    assert len({v.colours for v in views}) > len(views) // 2  # really sampled, not one fixed permutation


def test_the_eight_symmetries_are_distinct_and_match_numpy() -> None:
    grid = np.arange(6, dtype=np.int8).reshape(2, 3)  # no symmetry of its own: all 8 images differ
    images = {Transform(d8).grid(grid).tobytes() + bytes(Transform(d8).grid(grid).shape) for d8 in range(8)}
    assert len(images) == 8
    assert np.array_equal(Transform(1).grid(grid), np.rot90(grid))
    assert np.array_equal(Transform(4).grid(grid), grid.T)
    assert np.array_equal(Transform(6).grid(grid), np.rot90(grid.T, 2))


def test_inverse_undoes_a_non_involutive_colour_map() -> None:
    cycle = tuple((c + 1) % 10 for c in range(10))  # 0->1->2..., its own inverse is the opposite cycle
    grid = np.array([[0, 1, 2], [9, 8, 7]], dtype=np.int8)
    for d8 in range(8):
        view = Transform(d8, cycle)
        assert np.array_equal(view.invert(view.grid(grid)), grid)
        assert np.array_equal(Transform(0, cycle).grid(grid), (grid + 1) % 10)


def test_task_view_keeps_test_pairs_aligned_and_reorders_demos(eval_tasks: list[Task]) -> None:
    for task in eval_tasks:
        for view in make_views(task, n=1, seed=SEED, colours="all"):
            moved = view.task(task)
            assert moved.id == task.id
            order = view.demo_order or tuple(range(len(task.train)))
            assert sorted(order) == list(range(len(task.train)))
            for new, old in zip(moved.train, [task.train[i] for i in order], strict=True):
                assert np.array_equal(new.input, view.grid(old.input))
                assert np.array_equal(new.output, view.grid(old.output))
            for new, old in zip(moved.test, task.test, strict=True):  # test i stays test i
                assert np.array_equal(new.input, view.grid(old.input))
                assert np.array_equal(view.invert(new.output), old.output)


def test_a_demo_order_from_another_task_is_refused(eval_tasks: list[Task]) -> None:
    task = next(t for t in eval_tasks if len(t.train) == 3)
    with pytest.raises(ValueError, match="permutation"):
        Transform(0, demo_order=(0, 1)).task(task)


def test_views_are_seeded_and_start_with_the_identity(eval_tasks: list[Task]) -> None:
    task = eval_tasks[0]
    views = make_views(task, n=3, seed=SEED)
    assert len(views) == 24 and views[0].is_identity
    assert views == make_views(task, n=3, seed=SEED)
    # Depends on the seed and the task only, not on what was drawn before in this process.
    make_views(eval_tasks[1], n=5, seed=SEED)
    assert views == make_views(task, n=3, seed=SEED)
    assert views != make_views(task, n=3, seed=SEED + 1)
    assert not any(v.is_identity for v in make_views(task, n=1, seed=SEED, identity_first=False)[1:])


def keys(plan: list[tuple[Task, Transform]]) -> list[tuple[str, Transform]]:
    return [(task.id, view) for task, view in plan]


@pytest.mark.parametrize("epochs", [1, 3])
def test_epoch_plan_has_eight_views_per_task_and_epoch(eval_tasks: list[Task], epochs: int) -> None:
    tasks = eval_tasks[:12]
    plan = epoch_plan(tasks, epochs, seed=SEED)
    assert len(plan) == 8 * epochs * len(tasks)
    per_task = Counter(task.id for task, _ in plan)
    assert per_task == {t.id: 8 * epochs for t in tasks}
    # Each epoch covers the 8 symmetries of each task once.
    d8s = Counter((task.id, view.d8) for task, view in plan)
    assert set(d8s.values()) == {epochs} and len(d8s) == 8 * len(tasks)
    assert keys(plan) == keys(epoch_plan(tasks, epochs, seed=SEED))
    assert keys(plan) != keys(epoch_plan(tasks, epochs, seed=SEED + 1))
    # Shuffled into one pass: not task by task.
    assert [t.id for t, _ in plan] != sorted((t.id for t, _ in plan), key=[x.id for x in tasks].index)


def test_epoch_plan_shuffles_demos_only_when_asked(eval_tasks: list[Task]) -> None:
    tasks = [t for t in eval_tasks if len(t.train) >= 3][:5]
    shuffled = epoch_plan(tasks, 2, seed=SEED)
    assert any(v.demo_order != tuple(sorted(v.demo_order)) for _, v in shuffled)
    assert all(v.demo_order == () for _, v in epoch_plan(tasks, 2, seed=SEED, shuffle_demos=False))
    assert all(v.colours == tuple(range(10)) for _, v in epoch_plan(tasks, 1, seed=SEED, colours="none"))


@pytest.mark.parametrize("epochs", [1, 2])
def test_epoch_plan_without_d8_keeps_every_view_upright_and_the_rest_of_the_plan(
    eval_tasks: list[Task], epochs: int
) -> None:
    tasks = eval_tasks[:12]
    full = epoch_plan(tasks, epochs, seed=SEED)
    upright = epoch_plan(tasks, epochs, seed=SEED, d8=False)
    assert all(view.d8 == 0 for _, view in upright)
    # The same views but for the symmetry: 8 * epochs per task, the same colours and demonstration orders.
    assert keys(upright) == [(task.id, Transform(0, v.colours, v.demo_order)) for task, v in full]
