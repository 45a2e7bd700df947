"""Concurrent sweeps: 4 jobs at once (hydra-joblib-launcher) into one SQLite MLflow store lose nothing, and the jobs
split the CPU threads among themselves."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import arcfold as arcfold_pkg
from arcfold.__main__ import available_cores, job_threads
from arcfold.track.names import mlflow_name, waits_for_not_zero
from arcfold.track.tracker import config_params

# One small job: a 1-layer tiny model, 2 small tasks, one epoch, a short cap on each test input's decoding.
SMALL = [
    "experiment=smoke",  # the random tiny model on ARC-AGI-2 tasks (the default demo runs the shipped model)
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.limit=2",
    "train.epochs=1",
    "inference.max_seconds=2",
    "save_adapters=none",
]


@pytest.mark.parametrize(
    "launcher,cores,threads",
    [
        ({"n_jobs": 4}, 16, 4),
        ({"n_jobs": 4}, 2, 1),
        ({"n_jobs": 1}, 16, 16),
        ({"n_jobs": 3}, 16, 5),
        ({"n_jobs": -1}, 16, 1),
        ({"n_jobs": -2}, 16, 1),
        ({"n_jobs": -9}, 16, 2),  # joblib: -k is cores + 1 - k
        ({}, 16, None),
        (None, 16, None),
    ],
)  # the basic launcher (no n_jobs): leave torch's default alone
def test_parallel_jobs_split_the_cores(launcher, cores, threads):
    assert job_threads(launcher, cores) == threads


@pytest.mark.slow
def test_a_four_job_parallel_sweep_loses_no_run_param_or_metric(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(arcfold_pkg.__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "arcfold",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=4",
            f"outputs={tmp_path / 'outputs'}",
            *SMALL,
            "folds=1,2",
            "lora.rank=2,4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "database is locked" not in proc.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("arcfold").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("arcfold.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert {(c.data.params["folds"], c.data.params["lora.rank"]) for c in children} == {
        (str(k), str(r)) for k, r in itertools.product([1, 2], [2, 4])
    }
    threads = str(max(1, available_cores() // 4))
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["torch_threads"] == threads
        run_dir = Path(child.data.tags["run_dir"])
        # Every param: the job's composed config as it saved it, flattened the same way.
        saved = config_params(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
        assert {k: str(v) for k, v in saved.items()} == {k: v for k, v in child.data.params.items() if k in saved}
        # Every metric the job wrote to its scores.json is in MLflow with the same value, under its MLflow name
        # (arcfold.track.names); a failure or budget figure that stayed zero is not logged.
        metrics = json.loads((run_dir / "scores.json").read_text())["metrics"]
        for name, value in metrics.items():
            if value == 0 and waits_for_not_zero(name):
                assert mlflow_name(name) not in child.data.metrics, name
                continue
            logged = child.data.metrics[mlflow_name(name)]
            # scores.json is strict JSON: a NaN metric (nothing to measure) is null there
            assert (value is None and math.isnan(logged)) or logged == pytest.approx(value), name
        k = int(child.data.params["folds"])
        assert len(client.get_metric_history(child.info.run_id, "fold/train_seconds")) == k
