"""The tasks a run predicts, from its `data` config: a named ARC set, Kaggle files, a folder, or generated tasks."""

from __future__ import annotations

import logging
from typing import Any

from arcfold.data.synthetic import generate
from arcfold.data.tasks import Task, load_dataset, select

log = logging.getLogger(__name__)


def load_tasks(data: Any) -> tuple[list[Task], list[Task]]:
    """(the tasks this run predicts, every task of the source). The submission covers the latter."""
    source = data.challenges or data.path or data.name
    if data.name == "synthetic":  # generated (arcfold.data.synthetic): the same tasks for the same seed
        everything = generate(list(data.families), data.count, data.seed, list(data.sides))
    else:
        everything = load_dataset(
            data.name, challenges=data.challenges, solutions=data.solutions, path=data.path, on_invalid=data.on_invalid
        )
    chosen = select(everything, ids=list(data.task_ids) or None, limit=data.limit, order=data.order, source=source)
    if len(chosen) < len(everything):
        log.warning(
            "running %d of the %d tasks of %s (data.limit / data.task_ids); the others get placeholders",
            len(chosen),
            len(everything),
            source,
        )
    return chosen, everything
