"""One run's plots: training loss per fold, the phase timeline, and a few solved and failed test inputs drawn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from arcfold.data.ids import task_path
from arcfold.data.submission import grid_equal
from arcfold.report import plots
from arcfold.run.results import RunResults

log = logging.getLogger(__name__)


def chosen_inputs(results: RunResults, count: int) -> list[tuple[str, Any, int]]:
    """Up to `count` solved and `count` failed test inputs that have a prediction and a true output, in task
    order: (status, task, test index)."""
    picked: dict[str, list[tuple[str, Any, int]]] = {"solved": [], "failed": []}
    for task in results.tasks:
        for i, pair in enumerate(task.test):
            pred = results.predictions.get((task.id, i))
            if pred is None or pair.output is None:
                continue
            status = "solved" if any(grid_equal(g, pair.output) for g in pred.attempts) else "failed"
            if len(picked[status]) < count:
                picked[status].append((status, task, i))
    return picked["solved"] + picked["failed"]


def write_run_plots(results: RunResults, spans: Sequence[dict[str, Any]], out: Path, render_tasks: int) -> list[Path]:
    """The run's PNGs in `out`; a plot that fails costs that plot only (the run's results are already on disk)."""
    written: list[Path] = []

    def draw(name: str | Path, plot: Callable[..., Path], *args: Any) -> None:
        try:
            written.append(plot(*args, path=out / name))
        except Exception as err:  # matplotlib trouble must not fail a finished run
            log.warning("plot %s not written: %s: %s", name, type(err).__name__, err)

    draw("loss.png", plots.loss_per_fold, results.losses)
    draw("timeline.png", plots.phase_timeline, spans)
    for status, task, i in chosen_inputs(results, render_tasks):
        draw(
            task_path("tasks", task.id, f"_{i}.png", prefix=f"{status}_"),  # tasks/solved_<id>_<i>.png
            plots.task_rendering,
            f"{task.id} test {i}",
            task.test[i].input,
            results.predictions[(task.id, i)].attempts,
            task.test[i].output,
        )
    return written
