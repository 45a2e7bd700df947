"""Kaggle submission.json: build, write (atomically), validate, and score with the leaderboard metric.

The metric: a test output is solved when either attempt equals it exactly (shape and cells); a task scores the
fraction of its test outputs solved; the score is the mean over ALL tasks of the challenges, so a task missing
from the submission counts as 0 in the denominator.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from arcfold.data.errors import ArcDataError
from arcfold.data.tasks import Task, parse_grid, read_json, same_grid

PLACEHOLDER = [[0]]
ATTEMPTS = ("attempt_1", "attempt_2")

Grid = np.ndarray | list


def _as_list(grid: Grid | None) -> list[list[int]]:
    if grid is None:
        return [row[:] for row in PLACEHOLDER]
    return np.asarray(grid).astype(int).tolist()


def build_submission(tasks: Sequence[Task], attempts: Mapping[str, Mapping[int, Sequence[Grid]]]) -> dict:
    """Every task and every test input gets two attempts; a missing prediction becomes the placeholder.

    attempts[task_id][test_index] is a list of up to two grids, best first."""
    sub: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        per_test = attempts.get(task.id, {})
        entries = []
        for i in range(len(task.test)):
            grids = list(per_test.get(i, []))[:2]
            entries.append({name: _as_list(grids[k] if k < len(grids) else None) for k, name in enumerate(ATTEMPTS)})
        sub[task.id] = entries
    return sub


def strict_json(obj: Any) -> Any:
    """obj with every NaN or infinite float as None (JSON has no NaN; json.dump would write a bare NaN)."""
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write strict JSON (NaN as null) via a temporary file and a rename: a crash never leaves half a file. The
    file gets the mode any other new file gets (0644 under the usual umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(strict_json(obj), f, allow_nan=False)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # e.g. a numpy value json cannot write: leave no stray temp file
        raise
    return path


def write_submission(
    path: str | Path, tasks: Sequence[Task], attempts: Mapping[str, Mapping[int, Sequence[Grid]]]
) -> Path:
    sub = build_submission(tasks, attempts)
    validate_submission(sub, tasks, file=str(path))
    return write_json_atomic(path, sub)


def validate_submission(
    sub: Any, tasks: Sequence[Task], file: str = "submission.json", require_all: bool = True
) -> None:
    """Raise ArcDataError unless `sub` is a well-formed submission for these tasks: one entry per test input,
    each with two valid grids, and no task id the challenges lack. With require_all (what Kaggle needs) every
    task must be there; without it a missing task is allowed (the scorer counts it as 0)."""
    if not isinstance(sub, dict):
        raise ArcDataError(f"expected an object of task id -> attempts, got {type(sub).__name__}", file=file)
    for task in tasks:
        if task.id not in sub:
            if not require_all:
                continue
            raise ArcDataError("task missing from the submission", file=file, task=task.id, field="id")
        entries = sub[task.id]
        if not isinstance(entries, list) or len(entries) != len(task.test):
            n = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise ArcDataError(
                f"expected {len(task.test)} entries (one per test input), got {n}",
                file=file,
                task=task.id,
                field="entries",
            )
        for i, entry in enumerate(entries):
            for name in ATTEMPTS:
                if not isinstance(entry, dict) or name not in entry:
                    raise ArcDataError(f"missing '{name}'", file=file, task=task.id, field=f"test[{i}]")
                parse_grid(entry[name], file=file, task=task.id, field=f"test[{i}].{name}")
            other = sorted(set(entry) - set(ATTEMPTS))
            if other:  # an answer under another key would be ignored by Kaggle's scorer, or the file refused
                raise ArcDataError(
                    f"unexpected key(s) {other}: an entry holds only attempt_1 and attempt_2",
                    file=file,
                    task=task.id,
                    field=f"test[{i}]",
                )
    known = {t.id for t in tasks}
    extra = [k for k in sub if k not in known]
    if extra:
        raise ArcDataError(
            f"{len(extra)} task id(s) not in the challenges (a submission for another dataset?): {extra[:5]}",
            file=file,
            task=extra[0],
            field="id",
        )


def load_submission(path: str | Path, tasks: Sequence[Task], require_all: bool = True) -> dict:
    sub = read_json(path)
    validate_submission(sub, tasks, file=str(path), require_all=require_all)
    return sub


@dataclass
class Score:
    """The leaderboard metric and its parts. score_tasks is the headline: the mean over ALL tasks of the
    fraction of that task's test outputs solved (either attempt exactly right)."""

    score_tasks: float
    score_pairs: float
    n_tasks: int
    n_pairs: int
    solved: float  # fractional credit summed over tasks (the leaderboard's numerator, e.g. 8.5)
    solved_pairs: int
    solved_task_ids: list[str]  # tasks with at least one solved output
    per_task: dict[str, float] = field(default_factory=dict)
    per_pair: dict[str, list[bool]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"score {self.score_tasks:.4f} ({self.solved:g}/{self.n_tasks} tasks), "
            f"per output {self.score_pairs:.4f} ({self.solved_pairs}/{self.n_pairs})"
        )


def grid_equal(a: Any, b: np.ndarray | None) -> bool:
    try:
        a = np.asarray(a)
    except (ValueError, TypeError):
        return False
    return same_grid(a, b)


def score_submission(sub: Mapping[str, Any], tasks: Sequence[Task]) -> Score:
    """Score against the tasks' test outputs; a task missing from `sub` scores 0."""
    if not tasks:
        raise ArcDataError("no tasks to score against", field="solutions")
    per_task, per_pair = {}, {}
    for task in tasks:
        if not task.has_solutions:
            raise ArcDataError("no solution for a test input", task=task.id, field="solutions")
        entries = sub.get(task.id)
        entries = entries if isinstance(entries, list) else []
        hits = []
        for i, pair in enumerate(task.test):
            entry = entries[i] if i < len(entries) and isinstance(entries[i], dict) else {}
            hits.append(any(grid_equal(entry.get(a), pair.output) for a in ATTEMPTS if a in entry))
        per_pair[task.id] = hits
        per_task[task.id] = sum(hits) / len(hits)
    n_pairs = sum(len(h) for h in per_pair.values())
    solved_pairs = sum(sum(h) for h in per_pair.values())
    solved = sum(per_task.values())
    return Score(
        score_tasks=solved / len(tasks),
        score_pairs=solved_pairs / n_pairs,
        n_tasks=len(tasks),
        n_pairs=n_pairs,
        solved=solved,
        solved_pairs=solved_pairs,
        solved_task_ids=[t for t, s in per_task.items() if s > 0],
        per_task=per_task,
        per_pair=per_pair,
    )
