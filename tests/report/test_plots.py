"""Every plot is a real PNG whose pixels show what it claims (palette colours, series, phases)."""

from __future__ import annotations

import math

import numpy as np

from arcfold.report import plots
from arcfold.report.stats import Interval


def test_loss_per_fold_draws_one_line_per_fold(tmp_path, read_png, has_colour):
    losses = {0: list(np.linspace(3, 1, 40)), 1: list(np.linspace(2.5, 1.5, 25))}
    image = read_png(plots.loss_per_fold(losses, tmp_path / "loss.png"))
    assert has_colour(image, "#1f77b4") and has_colour(image, "#ff7f0e")  # matplotlib's first two line colours
    empty = read_png(plots.loss_per_fold({0: []}, tmp_path / "none.png"), min_bytes=3000, min_colours=5)
    assert not has_colour(empty, "#1f77b4")


def test_phase_timeline_colours_each_phase(tmp_path, read_png, has_colour):
    spans = [
        {"phase": "load", "fold": None, "device": "cpu", "start": 0.0, "end": 2.0},
        {"phase": "train", "fold": 0, "device": "cpu", "start": 2.0, "end": 9.0},
        {"phase": "inference", "fold": 0, "device": "cpu", "start": 9.0, "end": 12.0},
        {"phase": "train", "fold": 1, "device": "cpu", "start": 12.0, "end": 18.0},
        {"phase": "inference", "fold": 1, "device": "cpu", "start": 18.0, "end": 20.0},
        {"phase": "scoring", "fold": None, "device": "cpu", "start": 20.0, "end": 21.0},
    ]
    image = read_png(plots.phase_timeline(spans, tmp_path / "timeline.png"))
    for phase in ("load", "train", "inference", "scoring"):
        assert has_colour(image, plots.PHASE_COLOURS[phase]), phase


def test_solved_matrix_shows_solved_unsolved_and_missing_cells(tmp_path, read_png, has_colour):
    values = np.array([[1.0, 0.0, math.nan], [0.5, 1.0, 0.0]])
    image = read_png(plots.solved_matrix(values, ["t1", "t2"], ["a", "b", "c"], tmp_path / "m.png"))
    assert has_colour(image, "#2ca02c", 500)  # solved cells
    assert has_colour(image, "#f4f4f4", 500)  # unsolved cells
    assert has_colour(image, "#9a9a9a", 500)  # the run that has no value for t1


def test_task_rendering_uses_the_arc_palette(tmp_path, read_png, has_colour):
    grid = np.arange(10).reshape(2, 5)
    image = read_png(plots.task_rendering("abc", grid, [grid, None], grid.T, tmp_path / "task.png"))
    for colour in plots.ARC_COLOURS:
        assert has_colour(image, colour, 50), colour


def test_per_config_and_differences_show_seeds_and_intervals(tmp_path, read_png, has_colour):
    image = read_png(
        plots.per_config(["rank=4", "rank=8"], [[0.1, 0.2, 0.15], [0.3, 0.25, math.nan]], "score", tmp_path / "s.png")
    )
    assert has_colour(image, "#d62728")  # the mean +- sd markers
    ivs = [Interval(0.1, 0.05, 0.15, 0.95, 40), Interval(0.01, -0.02, 0.04, 0.95, 40)]
    image = read_png(plots.differences(["a", "b"], ivs, "score", "base", tmp_path / "d.png"))
    assert has_colour(image, "#d62728", 5) and has_colour(image, "#1f77b4", 5)  # excludes zero / does not
