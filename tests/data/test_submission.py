"""Submissions and the leaderboard metric: perfect, empty, fractional, attempt_2-only and missing tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arcfold.data import (
    PLACEHOLDER,
    ArcDataError,
    Pair,
    Task,
    build_submission,
    load_submission,
    score_submission,
    validate_submission,
    write_submission,
)


def answers(tasks: list[Task]) -> dict[str, dict[int, list[np.ndarray]]]:
    return {t.id: {i: [p.output] for i, p in enumerate(t.test)} for t in tasks}


def test_the_solutions_score_one(eval_tasks: list[Task], tmp_path: Path) -> None:
    path = write_submission(tmp_path / "sub" / "submission.json", eval_tasks, answers(eval_tasks))
    sub = load_submission(path, eval_tasks)
    score = score_submission(sub, eval_tasks)
    assert (score.score_tasks, score.score_pairs, score.n_tasks, score.n_pairs) == (1.0, 1.0, 120, 167)
    assert score.solved == 120 and score.solved_pairs == 167 and len(score.solved_task_ids) == 120
    # The correct grid as attempt_2 counts just as well.
    swapped = build_submission(
        eval_tasks, {t.id: {i: [PLACEHOLDER, p.output] for i, p in enumerate(t.test)} for t in eval_tasks}
    )
    assert score_submission(swapped, eval_tasks).score_tasks == 1.0
    assert not list(tmp_path.glob("sub/.*.tmp"))  # the atomic write left no temp file


def test_placeholders_score_zero(eval_tasks: list[Task]) -> None:
    sub = build_submission(eval_tasks, {})
    validate_submission(sub, eval_tasks)  # the placeholder is a valid grid
    assert all(e == {"attempt_1": PLACEHOLDER, "attempt_2": PLACEHOLDER} for es in sub.values() for e in es)
    score = score_submission(sub, eval_tasks)
    assert (score.score_tasks, score.score_pairs, score.solved, score.solved_task_ids) == (0.0, 0.0, 0, [])


def test_random_subsets_of_right_answers_score_their_fractions(eval_tasks: list[Task]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        right = {t.id: rng.random(len(t.test)) < 0.4 for t in eval_tasks}
        wrong = lambda g: (g + 1) % 10  # noqa: E731  same shape, every cell wrong
        sub = build_submission(
            eval_tasks,
            {
                t.id: {i: [p.output if right[t.id][i] else wrong(p.output)] for i, p in enumerate(t.test)}
                for t in eval_tasks
            },
        )
        score = score_submission(sub, eval_tasks)
        expected = {t: float(np.mean(r)) for t, r in right.items()}
        assert score.per_task == pytest.approx(expected)
        assert score.score_tasks == pytest.approx(np.mean(list(expected.values())))
        assert score.solved_pairs == sum(int(r.sum()) for r in right.values())
        assert sorted(score.solved_task_ids) == sorted(t for t, r in right.items() if r.any())


def grid(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.int8)


DEMO = Pair(grid([1]), grid([2]))
MULTI = Task(
    "multi",
    (DEMO,),
    (Pair(grid([0]), grid([1, 2])), Pair(grid([0]), grid([3], [4])), Pair(grid([0]), grid([5, 5], [5, 5]))),
)
SECOND = Task("second", (DEMO,), (Pair(grid([0]), grid([7, 8])),))
ABSENT = Task("absent", (DEMO,), (Pair(grid([0]), grid([9])),))


def test_hand_built_fractions_attempt_2_and_a_missing_task() -> None:
    tasks = [MULTI, SECOND, ABSENT]
    sub = {
        "multi": [
            {"attempt_1": [[1, 2]], "attempt_2": [[0]]},  # right on attempt_1
            {"attempt_1": [[3, 4]], "attempt_2": [[3], [5]]},  # same cells, wrong shape / wrong cell
            {"attempt_1": [[5, 5]], "attempt_2": [[5, 5], [5, 5]]},  # right on attempt_2 only
        ],
        "second": [{"attempt_1": [[8, 7]], "attempt_2": [[7, 8]]}],  # only attempt_2 is right
    }
    with pytest.raises(ArcDataError, match="task absent: id: task missing"):
        validate_submission(sub, tasks)
    validate_submission(sub, tasks, require_all=False)
    score = score_submission(sub, tasks)
    assert score.per_pair == {"multi": [True, False, True], "second": [True], "absent": [False]}
    assert score.per_task == pytest.approx({"multi": 2 / 3, "second": 1.0, "absent": 0.0})
    assert score.solved == pytest.approx(5 / 3)
    assert score.score_tasks == pytest.approx((2 / 3 + 1 + 0) / 3)  # the missing task stays in the denominator
    assert (score.solved_pairs, score.n_pairs, score.n_tasks) == (3, 5, 3)
    assert score.score_pairs == pytest.approx(3 / 5)
    assert score.solved_task_ids == ["multi", "second"]
    assert json.loads(json.dumps(score.to_dict()))["score_tasks"] == pytest.approx(5 / 9)


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda s: s["multi"][1].update(attempt_1=[[1, 2], [3]]), "test[1].attempt_1", "ragged"),
        (lambda s: s["multi"][0].update(attempt_2=[]), "test[0].attempt_2", "empty"),
        (lambda s: s["multi"][2].update(attempt_1=[[10]]), "test[2].attempt_1", "outside colours"),
        (lambda s: s["multi"][0].pop("attempt_2"), "test[0]", "missing 'attempt_2'"),
        (lambda s: s["multi"].pop(), "entries", "expected 3 entries"),
        (lambda s: s.update(stranger=[]), "id", "not in the challenges"),
    ],
)
def test_malformed_submissions_name_task_and_field(change, field: str, words: str) -> None:
    sub = build_submission([MULTI, SECOND], {})
    change(sub)
    with pytest.raises(ArcDataError) as caught:
        validate_submission(sub, [MULTI, SECOND], file="my_submission.json", require_all=False)
    message = str(caught.value)
    assert message.startswith("my_submission.json: task ") and f": {field}:" in message and words in message


def test_write_submission_refuses_a_bad_grid_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ArcDataError, match="test\\[0\\].attempt_1"):
        write_submission(tmp_path / "s.json", [SECOND], {"second": {0: [np.zeros((31, 1), dtype=np.int8)]}})
    assert list(tmp_path.iterdir()) == []
