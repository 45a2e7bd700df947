"""A resume trusts nothing it reads: every checkpoint file parses and names only what this run has, the checkpoint
was made with this config and these tasks, the run dir holds no link, and the saved config neither fails on a
dropped key nor turns on an unsafe switch. Refusals are one line naming the file (field `resume`).

Fast: hand-made tasks and files, no model (the resume of a real killed run is in test_resilience.py)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from arcfold.data import ArcDataError, Pair, Task
from arcfold.engine.candidates import Candidate
from arcfold.engine.candidates import TestPrediction as Prediction
from arcfold.run.checkpoint import Checkpoint, resumed_config
from arcfold.run.records import FoldOutcome, FoldRow, InputRecord, TrainingRecord


def task(task_id: str, colour: int = 1, tests: int = 2) -> Task:
    grid = np.array([[colour, 0], [0, colour]], dtype=np.int8)
    return Task(task_id, (Pair(grid, grid.T),), tuple(Pair(grid, grid) for _ in range(tests)))


FOLDS = [[task("aaaa0001"), task("aaaa0002")], [task("bbbb0001", 3)]]
CONFIG = OmegaConf.create({"lora": {"rank": 8}, "folds": 2, "budget": {"seconds": None}, "resume": None})


def record(task_id: str = "aaaa0001", index: int = 0, fold: int = 0) -> InputRecord:
    grid = np.array([[1, 0], [0, 1]], dtype=np.int8)
    pred = Prediction(task_id, index, [Candidate(grid, {0: -0.1}, {0: -0.2})], [grid], {"votes": [0]}, {})
    return InputRecord(task_id, index, fold, pred, nll=0.5)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir whose first session saved one input of fold 0 and finished fold 1."""
    store = Checkpoint(tmp_path / "run", FOLDS, resume=False, config=CONFIG)
    store.save_input(record())
    store.save_fold(FoldOutcome(1, FoldRow(fold=1, tasks=1), [record("bbbb0001", 0, 1), record("bbbb0001", 1, 1)]))
    return tmp_path / "run"


def resume(run_dir: Path, folds=FOLDS, config=CONFIG) -> Checkpoint:
    store = Checkpoint(run_dir, folds, resume=True, config=config)
    store.finished(), [store.inputs(f) for f in range(len(folds))], [store.training(f) for f in range(len(folds))]
    return store


def refusal(run_dir: Path, path: Path, folds=FOLDS, config=CONFIG) -> str:
    with pytest.raises(ArcDataError) as err:
        resume(run_dir, folds, config)
    text = str(err.value)
    assert text.startswith(f"{path}: resume: "), text
    assert "\n" not in text and text.isprintable() and len(text) < 400
    return text


def test_what_a_run_wrote_resumes_whole(run_dir):
    store = resume(run_dir)
    assert [r.to_json() for r in store.inputs(0)] == [record().to_json()]
    assert [r.task for r in store.finished()[1].inputs] == ["bbbb0001", "bbbb0001"]
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == [
        "fold_0",
        "fold_1.json",
        "folds.json",
        "made_with.json",
    ]


def write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def edit(path: Path, change) -> Path:
    return write(path, change(json.loads(path.read_text())))


INPUT = Path("checkpoint/fold_0/inputs/aaaa0001.0.json")
FOLD_1 = Path("checkpoint/fold_1.json")


@pytest.mark.parametrize(
    "file, damage, problem",
    [
        ("checkpoint/folds.json", lambda p: write(p, '[["aaaa0001"'), "not valid JSON"),
        ("checkpoint/folds.json", lambda p: write(p, {"a": 1}), "not a fold assignment"),
        (
            "checkpoint/folds.json",
            lambda p: write(p, [["aaaa0001", "zzzz9999"], ["bbbb0001"]]),
            "names task zzzz9999, which this run's data does not have",
        ),
        ("checkpoint/folds.json", lambda p: write(p, [["../../x"], ["bbbb0001"]]), "breaks the id rule"),
        ("checkpoint/folds.json", lambda p: write(p, [["aaaa0002", "aaaa0001"], ["bbbb0001"]]), "(from fold 0 on)"),
        ("checkpoint/made_with.json", lambda p: write(p, "{"), "not valid JSON"),
        ("checkpoint/made_with.json", lambda p: write(p, []), "not the record of a checkpoint's settings and tasks"),
        (
            "checkpoint/made_with.json",
            lambda p: edit(p, lambda d: {**d, "settings": {**d["settings"], "lora.rank": 16}}),
            "made with another config: lora.rank was 16, is 8",
        ),
        (
            "checkpoint/made_with.json",
            lambda p: edit(p, lambda d: {**d, "tasks": {**d["tasks"], "aaaa0002": "0" * 16}}),
            "made with other data: task aaaa0002 has other grids",
        ),
        (str(FOLD_1), lambda p: write(p, "\x00garbage"), "not valid JSON"),
        (str(FOLD_1), lambda p: write(p, {"fold": 1}), "not a checkpoint file arcfold wrote (KeyError"),
        (str(FOLD_1), lambda p: edit(p, lambda d: {**d, "fold": 0}), "holds fold 0, not fold 1"),
        (
            str(FOLD_1),
            lambda p: edit(p, lambda d: {**d, "inputs": [{**d["inputs"][0], "task": "aaaa0001"}]}),
            "inputs[0] names task 'aaaa0001' in fold 1: not a task of this run's fold 1",
        ),
        (
            str(FOLD_1),
            lambda p: edit(p, lambda d: {**d, "inputs": [{**d["inputs"][0], "index": 5}]}),
            "task bbbb0001's test inputs",
        ),
        (
            str(FOLD_1),
            lambda p: edit(p, lambda d: {**d, "row": {**d["row"], "steps": "many"}}),
            "not numbers or text",
        ),
        (str(FOLD_1), lambda p: edit(p, lambda d: {**d, "events": [{"at": 1}]}), "not the budget's records"),
        ("checkpoint/fold_7.json", lambda p: write(p, {}), "not a fold of this run's 2"),
        ("checkpoint/fold_x.json", lambda p: write(p, {}), "not a fold of this run's 2"),
        (str(INPUT), lambda p: write(p, ""), "not valid JSON"),
        (
            str(INPUT),
            lambda p: edit(p, lambda d: {**d, "task": "../../../x"}),
            "names task '../../../x' in fold 0: not a task",
        ),
        (
            str(INPUT),
            lambda p: edit(
                p, lambda d: {**d, "task": "aaaa0002", "prediction": {**d["prediction"], "task_id": "aaaa0002"}}
            ),
            "not the one its name says",
        ),
        (str(INPUT), lambda p: edit(p, lambda d: {**d, "fold": 1}), "in fold 1: not a task of this run's fold 0"),
        (str(INPUT), lambda p: edit(p, lambda d: {**d, "nll": "low"}), "not a record of one of"),
        (
            str(INPUT),
            lambda p: edit(p, lambda d: {**d, "prediction": {**d["prediction"], "attempts": [[[42]]]}}),
            "prediction.attempts[0]: cell [0][0] is 42",
        ),
        (
            str(INPUT),
            lambda p: edit(p, lambda d: {**d, "prediction": {**d["prediction"], "rankings": {"votes": [3]}}}),
            "its prediction is not one of",
        ),
        (
            str(INPUT),
            lambda p: edit(p, lambda d: {**d, "prediction": {**d["prediction"], "test_index": 1}}),
            "its prediction is not one of",
        ),
        ("checkpoint/fold_0/training.json", lambda p: write(p, {"stats": None, "evil": 1}), "TypeError"),
        ("checkpoint/fold_0/training.json", lambda p: write(p, {"stats": {"steps": "x"}}), "not a training record"),
    ],
)
def test_a_checkpoint_file_that_does_not_parse_or_names_what_this_run_lacks_is_refused(run_dir, file, damage, problem):
    damage(run_dir / file)
    assert problem in refusal(run_dir, run_dir / file)


@pytest.mark.parametrize("adapter", [None, b"", b"\x08\0\0\0\0\0\0\0{}garbage"])
def test_a_fold_trained_by_an_earlier_session_needs_a_whole_safetensors_adapter(run_dir, adapter):
    write(run_dir / "checkpoint/fold_0/training.json", {"stats": {"steps": 3, "losses": [1.0, 0.5]}})
    weights = run_dir / "checkpoint/fold_0/adapter/adapter_model.safetensors"
    if adapter is not None:
        weights.parent.mkdir(parents=True)
        weights.write_bytes(adapter)
    assert "adapter_model.safetensors: resume:" in refusal(run_dir, weights)


def test_a_training_record_without_an_adapter_to_load_needs_none(run_dir):
    write(run_dir / "checkpoint/fold_0/training.json", {"stats": None, "error": "out of memory"})
    assert resume(run_dir).training(0) == TrainingRecord(None, error="out of memory")


def test_a_link_inside_the_run_dir_is_refused(run_dir, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", run_dir / "plots")
    assert "a link inside the run dir" in refusal(run_dir, run_dir / "plots")


def test_another_config_or_other_data_in_the_folds_is_refused(run_dir):
    changed = [[task("aaaa0001"), task("aaaa0002", colour=5)], FOLDS[1]]
    assert "made with other data: task aaaa0002" in refusal(run_dir, run_dir / "checkpoint/made_with.json", changed)
    config = OmegaConf.merge(CONFIG, {"lora": {"rank": 32}, "budget": {"seconds": 60}})  # the budget may change
    assert "lora.rank was 8, is 32" in refusal(run_dir, run_dir / "checkpoint/made_with.json", config=config)


def test_a_checkpoint_from_before_made_with_json_is_compared_by_its_folds_only(run_dir, caplog):
    (run_dir / "checkpoint/made_with.json").unlink()
    with caplog.at_level(logging.WARNING):
        resume(run_dir, config=OmegaConf.merge(CONFIG, {"lora": {"rank": 32}}))
    assert "no made_with.json" in caplog.text
    assert (run_dir / "checkpoint/made_with.json").exists()  # written for the next session


def test_a_fresh_run_refuses_a_dir_that_holds_a_run(run_dir):
    with pytest.raises(ArcDataError, match="holds a run already"):
        Checkpoint(run_dir, FOLDS, resume=False)


@pytest.mark.parametrize("task_id", ["../../../pwned", "/tmp/abs", "a\\b", "a\x00b", ""])
def test_a_record_is_never_saved_outside_its_folder(run_dir, tmp_path, task_id):
    before = sorted(tmp_path.rglob("*"))
    store = Checkpoint(run_dir, FOLDS, resume=True)
    with pytest.raises(ArcDataError, match="task file name"):
        store.save_input(replace(record(), task=task_id))
    assert sorted(tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------- the saved config


def saved(run_dir: Path, text: str) -> Path:
    return write(run_dir / ".hydra" / "config.yaml", text)


def test_a_config_saved_before_run_dir_was_dropped_resumes(tmp_path):
    saved(tmp_path, "run_dir: null\nfolds: 3\nlora:\n  rank: 4\n")
    cfg = resumed_config(OmegaConf.create({"resume": str(tmp_path)}), [f"resume={tmp_path}"])
    assert cfg.folds == 3 and cfg.lora.rank == 4 and "run_dir" not in cfg


@pytest.mark.parametrize(
    "text", ["folds: [1\n", "- 1\n- 2\n", "\x00", "nosuchkey: 1\n", "folds: !!python/object:os.system {}\n"]
)
def test_a_saved_config_that_does_not_load_is_one_line(tmp_path, text):
    path = saved(tmp_path, text)
    with pytest.raises(ArcDataError) as err:
        resumed_config(OmegaConf.create({"resume": str(tmp_path)}), [f"resume={tmp_path}"])
    assert str(err.value).startswith(f"{path}: resume: cannot read the run's config") and str(err.value).isprintable()


@pytest.mark.parametrize("key", ["model.trust_remote_code", "model.allow_pickle"])
def test_an_unsafe_switch_comes_from_the_command_line_never_from_the_run_dir(tmp_path, key):
    group, name = key.split(".")
    saved(tmp_path, f"{group}:\n  {name}: true\n")
    plain = OmegaConf.create({"resume": str(tmp_path)})
    with pytest.raises(ValueError, match=f"sets {key}=true") as err:
        resumed_config(plain, [f"resume={tmp_path}"])
    assert err.value.key == key
    asked = OmegaConf.create({"resume": str(tmp_path), group: {name: True}})
    assert OmegaConf.select(resumed_config(asked, [f"resume={tmp_path}", f"{key}=true"]), key) is True
