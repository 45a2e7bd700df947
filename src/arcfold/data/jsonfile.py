"""Reading JSON files with errors that name the file, and duplicate keys found rather than silently dropped.

Python's json module keeps the last of two equal keys. In a Kaggle file the top-level keys are task ids, so a
duplicated id would quietly lose a task; inside a task a duplicated "input" would quietly replace a grid. Both
are reported here, attributed to the task they belong to, so a loader can raise or (on_invalid="skip") skip
just that task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from arcfold.data.errors import ArcDataError

# One duplicate key: the object that held it twice, and the key.
Duplicate = tuple[dict, str]


def parse_json_file(path: str | Path, task: str | None = None) -> tuple[Any, list[Duplicate]]:
    """The parsed file and the duplicate keys met on the way; unreadable or invalid JSON is an ArcDataError."""
    path = Path(path)
    duplicates: list[Duplicate] = []

    def keep_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                duplicates.append((obj, key))
            obj[key] = value
        return obj

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ArcDataError(f"cannot read file ({reason})", file=str(path), task=task) from None
    try:
        return json.loads(text, object_pairs_hook=keep_duplicates), duplicates
    except json.JSONDecodeError as err:
        raise ArcDataError(
            f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", file=str(path), task=task
        ) from None


def duplicate_errors(
    data: Any, duplicates: list[Duplicate], file: str, task: str | None = None
) -> dict[str | None, ArcDataError]:
    """One error per task that has a duplicate key (the first found), keyed by task id.

    With `task` the whole file is that one task; otherwise the top-level keys are task ids. The key None holds
    a duplicate that belongs to no task (inside a value that a later duplicate replaced)."""
    errors: dict[str | None, ArcDataError] = {}
    owner: str | None
    for obj, key in duplicates:
        if task is not None:
            owner, path = task, _path_to(data, obj)
            problem = f"duplicate key '{key}'"
        elif obj is data:
            owner, path, problem = key, "id", "duplicate task id"
        else:
            owner, path = _owner(data, obj)
            problem = f"duplicate key '{key}'"
        if path is not None and path != "id":
            path = f"{path}.{key}" if path else key
        errors.setdefault(owner, ArcDataError(problem, file=file, task=owner, field=path))
    return errors


def read_json(path: str | Path, task: str | None = None) -> Any:
    """Read a JSON file; a missing file, bad JSON or a duplicated key is an ArcDataError naming the file
    (and the task: `task` when the file holds one task, else the top-level key the problem is under)."""
    data, duplicates = parse_json_file(path, task)
    if duplicates:
        raise next(iter(duplicate_errors(data, duplicates, str(path), task).values()))
    return data


def _owner(data: Any, target: dict) -> tuple[str | None, str | None]:
    """The top-level key whose value holds `target`, and the path to it inside that value."""
    if isinstance(data, dict):
        for key, value in data.items():
            path = _path_to(value, target)
            if path is not None:
                return key, path
    return None, None


def _path_to(node: Any, target: dict, path: str = "") -> str | None:
    """A readable path ("train[0]") from node to the object `target` (compared by identity), or None."""
    if node is target:
        return path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        if isinstance(child, (dict, list)):
            sub = (
                f"{path}.{key}" if isinstance(key, str) and path else key if isinstance(key, str) else f"{path}[{key}]"
            )
            found = _path_to(child, target, sub)
            if found is not None:
                return found
    return None
