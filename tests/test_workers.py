"""Folds across workers, end to end on a CPU: two worker processes and two Ray actors give the same run as one
process, a worker killed mid-fold costs nothing but time, and a submitit_local sweep lands under one MLflow parent.

The tiny random model finds no valid grid with the DFS, so submissions are placeholders: runs are also compared on
every test input's answer NLL and every fold's final loss, which depend on every weight of the trained adapter.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from arcfold import pipeline
from arcfold.checks import check
from arcfold.config import register

register()
# Four folds of one task each, long enough in training (8 epochs: 64 steps) to be killed in the middle.
SMALL = [
    "experiment=smoke",  # the random tiny model on ARC-AGI-2 tasks (the default demo runs the shipped model)
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.limit=4",
    "data.order=size",
    "folds=per_task",
    "train.epochs=8",
    "inference=dfs",
    "inference.max_seconds=120",
    "tracking=off",
    "save_adapters=none",
]


def run(tmp_path: Path, *overrides: str) -> Path:
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"outputs={tmp_path}", *SMALL, *overrides])
    check(cfg)
    run_dir = tmp_path / "run"
    pipeline.run(cfg, run_dir)
    return run_dir


def table(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


def outcome_of(run_dir: Path) -> dict:
    """What must not depend on where the folds ran."""
    folds = sorted(table(run_dir / "folds.csv"), key=lambda r: int(r["fold"]))
    return {
        "submission": json.loads((run_dir / "submission.json").read_text()),
        "nll": {(r["task"], r["test_index"]): r["answer_nll"] for r in table(run_dir / "tasks.csv")},
        "losses": [(r["fold"], r["steps"], r["final_loss"]) for r in folds],
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    run_dir = run(tmp_path_factory.mktemp("one"))
    assert len({r["pid"] for r in table(run_dir / "workers.csv")}) == 1
    return outcome_of(run_dir)


@pytest.mark.slow
def test_two_worker_processes_run_every_fold_once_and_give_what_one_process_gives(tmp_path, one_process):
    run_dir = run(tmp_path, "devices=2")
    folds = table(run_dir / "folds.csv")
    assert sorted(int(r["fold"]) for r in folds) == [0, 1, 2, 3]  # each fold exactly once
    assert {r["attempt"] for r in folds} == {"1"}
    workers = table(run_dir / "workers.csv")
    assert len(workers) == 2 and {r["state"] for r in workers} == {"finished"}
    assert {r["worker"] for r in folds} == {"0", "1"}  # both took folds
    assert all(int(r["pid"]) != os.getpid() and r["threads"] == "1" for r in workers)
    assert outcome_of(run_dir) == one_process
    checkpointed = sorted(p.name for p in (run_dir / "checkpoint").glob("fold_*.json"))
    assert checkpointed == [f"fold_{f}.json" for f in range(4)]  # the parent persisted every outcome


@pytest.mark.slow
def test_a_worker_killed_mid_fold_leaves_a_complete_run_with_that_fold_run_again(tmp_path, one_process):
    status = tmp_path / "run" / "workers.csv"
    killed: dict = {}

    def kill_a_worker_in_the_middle_of_a_fold() -> None:  # found through the executor's own record
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            busy = [r for r in table(status) if r["state"].startswith("fold")] if status.exists() else []
            if busy:
                time.sleep(0.3)  # well inside the fold's training (about 1 s or more)
                still = [r for r in table(status) if r["pid"] == busy[0]["pid"] and r["state"] == busy[0]["state"]]
                if still:
                    os.kill(int(still[0]["pid"]), signal.SIGKILL)
                    killed.update(still[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_in_the_middle_of_a_fold)
    killer.start()
    try:
        run_dir = run(tmp_path, "devices=2")
    finally:
        killer.join()
    assert killed, "no worker was seen in the middle of a fold"
    fold = int(killed["state"].split()[1])
    workers = {r["worker"]: r for r in table(status)}
    assert workers[killed["worker"]]["state"] == "died (killed by SIGKILL)"
    folds = {int(r["fold"]): r for r in table(run_dir / "folds.csv")}
    assert sorted(folds) == [0, 1, 2, 3]
    assert folds[fold]["attempt"] == "2" and folds[fold]["worker"] != killed["worker"]
    assert outcome_of(run_dir) == one_process  # nothing lost, nothing different


@pytest.mark.slow
def test_ray_actors_run_a_four_fold_run(tmp_path, one_process):
    pytest.importorskip("ray")
    run_dir = run(tmp_path, "executor=ray", "devices=2")
    workers = table(run_dir / "workers.csv")
    assert [r["device"] for r in workers] == ["ray:cpu", "ray:cpu"]
    assert all(int(r["pid"]) != os.getpid() for r in workers)
    assert sorted(int(r["fold"]) for r in table(run_dir / "folds.csv")) == [0, 1, 2, 3]
    assert outcome_of(run_dir) == one_process
    import ray

    assert not ray.is_initialized()  # the run's local Ray instance is shut down


@pytest.mark.slow
def test_a_submitit_local_sweep_lands_under_one_mlflow_parent(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(pipeline.__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    overrides = [o for o in SMALL if not o.startswith(("tracking", "folds", "data.limit", "train.epochs"))]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arcfold",
            "-m",
            "hydra/launcher=submitit_local",
            f"outputs={tmp_path / 'outputs'}",
            *overrides,
            "data.limit=1",
            "train.epochs=1",
            "folds=1",
            "lora.rank=2,4",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("arcfold").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("arcfold.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert sorted(c.data.params["lora.rank"] for c in children) == ["2", "4"]
    assert all(
        c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children
    )
    # Each job ran in a process of its own, not in the launching one.
    pids = {table(Path(c.data.tags["run_dir"]) / "workers.csv")[0]["pid"] for c in children}
    assert len(pids) == 2 and str(proc.pid) not in pids


def test_the_slurm_launcher_example_composes_into_submitit_slurm():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=a100"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("a100", 4, 720)
