"""One error type for bad input, whose message always names the file, the task and the field."""

from __future__ import annotations


class ArcDataError(ValueError):
    """Malformed ARC input. str(err) is one line: `FILE: task ID: FIELD: what is wrong`."""

    def __init__(self, problem: str, *, file: str | None = None, task: str | None = None, field: str | None = None):
        self.problem, self.file, self.task, self.field = problem, file, task, field
        parts = [file or "<input>"]
        if task is not None:
            parts.append(f"task {task}")
        if field is not None:
            parts.append(field)
        super().__init__(": ".join(parts + [problem]))
