"""Task ids: the one rule every id meets when it is read, and the one way to name a file after a task.

An id comes from files someone else wrote (a challenges or solutions file, the file names of a task folder, a
checkpoint to resume) and ends up in file names (checkpoint inputs, plots). So every loader checks each id with
`id_problem` and refuses one that breaks RULE; every path built from an id comes from `task_path`, which returns
a path inside the given folder or refuses. No other code joins a task id into a path.

ARC ids are 8 hex digits and generated ones `family-seed-index`: nothing a run needs is a path. Ids that differ
only in case ("abc" and "ABC") would name the same file on a case-insensitive file system (macOS, Windows): a
source holding both is refused too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from arcfold.data.errors import ArcDataError, shown

MAX_ID_LENGTH = 64
RULE = (
    f"1 to {MAX_ID_LENGTH} ASCII letters, digits, '_', '-' or '.', not starting with '.' "
    "(and no two ids of a source that differ only in case)"
)
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def id_problem(task_id: object) -> str | None:
    """What makes `task_id` break the rule (one line, the id shown safely), or None for a good id."""
    if not isinstance(task_id, str):
        return f"task id {shown(task_id)} is a {type(task_id).__name__}, not a string"
    if not task_id:
        return "empty task id"
    if len(task_id) > MAX_ID_LENGTH:
        return f"task id {shown(task_id)} is {len(task_id)} characters, more than {MAX_ID_LENGTH}"
    if not _ID.fullmatch(task_id):
        return f"task id {shown(task_id)} breaks the id rule: {RULE}"
    return None


def id_error(task_id: object, seen: dict[str, str], *, file: str | None, field: str = "id") -> ArcDataError | None:
    """The error of an id that breaks the rule, or that is one in `seen` (lower-cased id -> id) again, in any
    case; None for a good new id, which goes into `seen`."""
    problem = id_problem(task_id)
    if problem:
        return ArcDataError(problem, file=file, field=field)
    assert isinstance(task_id, str)  # id_problem refuses anything else
    other = seen.get(task_id.lower())
    if other is None:
        seen[task_id.lower()] = task_id
        return None
    if other == task_id:
        return ArcDataError(f"task id {shown(task_id)} appears twice", file=file, field=field)
    return ArcDataError(
        f"task ids {shown(other)} and {shown(task_id)} differ only in case (one file on a case-insensitive file "
        "system)",
        file=file,
        field=field,
    )


def check_ids(ids: Iterable[object], *, file: str | None, field: str = "id") -> None:
    """Refuse (ArcDataError naming `file` and the id) the first id that breaks the rule or repeats one before it
    (in any case)."""
    seen: dict[str, str] = {}
    for task_id in ids:
        error = id_error(task_id, seen, file=file, field=field)
        if error:
            raise error


def task_path(root: str | Path, task_id: str, suffix: str = "", prefix: str = "") -> Path:
    """The file `<root>/<prefix><task_id><suffix>`: one name directly inside `root`, or ArcDataError.

    The id must meet the rule; prefix and suffix (written by arcfold: "solved_", ".0.json") may not hold a
    separator either, so the name can be neither a path nor "." / ".."."""
    problem = id_problem(task_id)
    if problem:
        raise ArcDataError(problem, file=str(root), field="task file name")
    name = f"{prefix}{task_id}{suffix}"
    if any(c in name for c in "/\\\0") or name in (".", "..") or len(name.encode()) > 255:
        raise ArcDataError(f"{shown(name)} is not a file name", file=str(root), field="task file name")
    path = Path(root) / name
    if path.parent != Path(root) or path.name != name:
        raise ArcDataError(f"{shown(name)} does not stay inside the folder", file=str(root), field="task file name")
    return path


__all__ = ["MAX_ID_LENGTH", "RULE", "check_ids", "id_error", "id_problem", "task_path"]
