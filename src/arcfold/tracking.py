"""MLflow tracking: one MLflow run per Hydra job, a sweep's runs grouped under one parent run.

The store defaults to sqlite:///<outputs>/mlflow.db with artifacts under <outputs>/mlartifacts. A sweep's
parent run (and the database itself) is created once by SweepCallback before any job starts, because two
processes that create a new SQLite store at the same moment race on its migrations; the jobs find the parent
run's id in <sweep dir>/mlflow_parent.json, which also works for jobs in other processes (submitit).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from arcfold.data.submission import write_json_atomic

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
RUN_FILE = "mlflow_run.json"  # in a run dir: its MLflow run, which a resume of that dir continues


def tracking_uri(uri: str | None, outputs: str | Path) -> str:
    """The store to use: the config's uri, else $MLFLOW_TRACKING_URI, else a SQLite file under outputs/."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(outputs).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ensure_experiment(uri: str, name: str, outputs: str | Path) -> str:
    """Create the store (migrations) and the experiment if needed; return the experiment id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the database, not in ./mlruns of whatever cwd
        artifacts = (Path(outputs).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # another process created it between our lookup and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"rank": 32}} -> {"lora.rank": 32}; lists become their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """The MLflow run of one Hydra job. A no-op when tracking is disabled, so the pipeline never branches."""

    def __init__(self, enabled: bool, uri: str | None = None, experiment: str = "arcfold",
                 outputs: str | Path = "outputs", run_name: str | None = None, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, run_dir: str | Path | None = None):
        """With run_dir, the run's id and store are remembered there (RUN_FILE); a tracker made for a run dir
        that already names its MLflow run (a resume) continues that run instead of creating another."""
        self.enabled = enabled
        self.run_id: str | None = None
        self.resumed = False
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        previous = read_run_file(run_dir) if run_dir else None
        self.uri = previous["uri"] if previous else tracking_uri(uri, outputs)
        self.client = MlflowClient(tracking_uri=self.uri)
        if previous:
            self.run_id, self.resumed = previous["run_id"], True
            self.client.update_run(self.run_id, status="RUNNING")
            times = int(self.client.get_run(self.run_id).data.tags.get("arcfold.resumed", "0")) + 1
            self.client.set_tag(self.run_id, "arcfold.resumed", str(times))
            log.info("MLflow run %s in %s, resumed", self.run_id, self.uri)
            return
        experiment_id = ensure_experiment(self.uri, experiment, outputs)
        all_tags = {"git_commit": git_commit(), "hostname": socket.gethostname(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id  # how MLflow nests a run under its parent
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        if run_dir:
            write_json_atomic(Path(run_dir) / RUN_FILE, {"run_id": self.run_id, "uri": self.uri})
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        values = {k: str(v)[:6000] for k, v in params.items()}
        if self.resumed:  # MLflow refuses a param logged again with another value: a resume's changes become a tag
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in values.items() if k in logged and logged[k] != v}
            if changed:
                self.client.set_tag(self.run_id, "arcfold.resume_changed",
                                    ", ".join(f"{k}: {logged[k]} -> {v}" for k, v in changed.items())[:5000])
            values = {k: v for k, v in values.items() if k not in logged}
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
        if self.enabled and self.run_id:
            self.set_tags(tags or {})
            self.client.set_terminated(self.run_id, status)


def read_run_file(run_dir: str | Path) -> dict[str, str] | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_parent(sweep_dir: str | Path) -> str | None:
    """The sweep's parent run id, written by SweepCallback before the jobs started (None outside a sweep)."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text())["run_id"] if path.exists() else None


class SweepCallback(Callback):
    """Before a multirun's jobs: create the store and the sweep's parent run. After: mark it finished."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tracker = RunTracker(True, config.tracking.uri, config.tracking.experiment, config.outputs,
                             run_name=f"sweep {sweep_dir.name}",
                             tags={"sweep_id": sweep_dir.name, "arcfold.role": "sweep",
                                   "sweep_overrides": " ".join(config.hydra.overrides.task)})
        tracker.log_params({"sweep.overrides": " ".join(config.hydra.overrides.task),
                            "sweep.dir": str(sweep_dir)})
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": tracker.run_id, "uri": tracker.uri}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.enabled:
            end_parent(config.hydra.sweep.dir, "FINISHED")


def end_parent(sweep_dir: str | Path, status: str) -> None:
    """Mark the sweep's parent run ended (FINISHED after the last job; KILLED when a signal stops the sweep)."""
    path = Path(sweep_dir) / PARENT_FILE
    if path.exists():
        from mlflow.tracking import MlflowClient

        parent = json.loads(path.read_text())
        MlflowClient(tracking_uri=parent["uri"]).set_terminated(parent["run_id"], status)


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The flattened config as MLflow params (folds.k etc. are added by the pipeline once resolved)."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))
