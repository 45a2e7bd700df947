"""One error type for bad input, whose message always names the file, the task and the field."""

from __future__ import annotations


class ArcDataError(ValueError):
    """Malformed ARC input. str(err) is one line: `FILE: task ID: FIELD: what is wrong`. Whatever the input held
    (a newline, NUL or escape in a task id or a file name), the message is one printable line."""

    def __init__(self, problem: str, *, file: str | None = None, task: str | None = None, field: str | None = None):
        self.problem, self.file, self.task, self.field = problem, file, task, field
        parts = [file or "<input>"]
        if task is not None:
            parts.append(f"task {task if _plain(task) else shown(task)}")
        if field is not None:
            parts.append(field)
        super().__init__(printable(": ".join(parts + [problem])))


def shown(value: object, limit: int = 40) -> str:
    """A value from a file as it can be printed: its repr (control characters escaped), cut to `limit`."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(str(value))} characters)"


def printable(text: str) -> str:
    """`text` with every character that is not printable (newline, NUL, escape, ...) escaped: one safe line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _plain(task_id: str) -> bool:
    return bool(task_id) and task_id.isascii() and task_id.isprintable() and " " not in task_id and len(task_id) <= 64
