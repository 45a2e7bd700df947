"""A run's task plots are named by arcfold.data.ids.task_path: inside plots/tasks/, whatever the task id."""

from __future__ import annotations

import numpy as np
import pytest

from arcfold.data import ArcDataError, Pair, Task
from arcfold.engine.candidates import Candidate
from arcfold.engine.candidates import TestPrediction as Prediction
from arcfold.report.runplots import write_run_plots
from arcfold.run.records import InputRecord
from arcfold.run.results import RunResults


def results_of(task_id: str) -> RunResults:
    grid = np.array([[1, 2], [3, 4]], dtype=np.int8)
    task = Task(task_id, (Pair(grid, grid),), (Pair(grid, grid),))
    results = RunResults([task], [task])
    results.add_input(InputRecord(task_id, 0, 0, Prediction(task_id, 0, [Candidate(grid)], [grid])))
    return results


def test_a_task_plot_lands_in_plots_tasks_under_its_id(tmp_path):
    written = write_run_plots(results_of("00576224"), [], tmp_path / "plots", render_tasks=1)
    assert tmp_path / "plots" / "tasks" / "solved_00576224_0.png" in written


@pytest.mark.parametrize("task_id", ["../../../pwned_task", "/tmp/abs_escape", "a\\b"])
def test_a_task_id_that_is_a_path_never_names_a_plot(tmp_path, task_id):
    """The loaders refuse such ids; were one to reach the plots, the name is refused, not written elsewhere."""
    (tmp_path / "plots").mkdir()
    with pytest.raises(ArcDataError, match="task file name"):
        write_run_plots(results_of(task_id), [], tmp_path / "plots" / "run", render_tasks=1)
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".png" and "run" not in p.parts]
