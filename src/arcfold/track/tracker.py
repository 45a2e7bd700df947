"""MLflow tracking: one MLflow run per Hydra job (RunTracker), the store it writes to, and the config as params.

The store defaults to sqlite:///<outputs>/mlflow.db. A new experiment in a SQLite store keeps its artifacts beside
the database the URI names (<dir of mlflow.db>/mlartifacts/<experiment>), unless tracking.artifacts names another
place; a tracking server's experiments use the server's own artifact store. The metrics' MLflow names, and the
run description that leads a run's page with its headline, are in arcfold.track.names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

from omegaconf import DictConfig, OmegaConf

from arcfold.data.submission import write_json_atomic
from arcfold.track.links import run_link
from arcfold.track.names import headline_first, mlflow_name, waits_for_not_zero

log = logging.getLogger(__name__)


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


def sqlite_file(uri: str) -> Path | None:
    """The database file a sqlite: URI names (sqlite:////abs/mlflow.db, or sqlite:///rel.db from the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def artifact_location(uri: str, name: str, artifacts: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: `artifacts` (tracking.artifacts: a path or an URI) if set; for a
    SQLite store, beside its database (not in ./mlruns of whatever directory the run starts from); else None,
    the store's own choice (a tracking server's artifact store)."""
    if artifacts:
        return artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()
    db = sqlite_file(uri)
    return (db.parent / "mlartifacts" / name).as_uri() if db is not None else None


def ensure_experiment(uri: str, name: str, artifacts: str | None = None) -> str:
    """Create the store (migrations) and the experiment if needed; return the experiment id. An existing
    experiment keeps the artifact location it was created with."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name, artifacts))
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
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """The MLflow run of one Hydra job (arcfold.run.tracker.NullTracker stands in when tracking is off)."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "arcfold",
        outputs: str | Path = "outputs",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_dir: str | Path | None = None,
        system_metrics: bool = False,
        system_metrics_interval: float = 10.0,
        artifacts: str | None = None,
    ):
        """With run_dir, the run's id and store are remembered there (RUN_FILE); a tracker made for a run dir
        that already names its MLflow run (a resume) continues that run instead of creating another. With
        system_metrics, MLflow samples CPU, memory (and GPU) every system_metrics_interval seconds. artifacts:
        where a new experiment keeps its artifacts (see artifact_location)."""
        self.resumed = False
        self.monitor: Any = None
        self.logged: set[str] = set()  # MLflow names logged: a zero of a waiting series is logged once one is
        self.summary: dict[str, float] = {}  # the run-level figures (no step), under their plain names
        from mlflow.tracking import MlflowClient

        previous = read_run_file(run_dir) if run_dir else None
        self.uri = previous["uri"] if previous else tracking_uri(uri, outputs)
        self.client = MlflowClient(tracking_uri=self.uri)
        if previous:
            self.run_id: str = previous["run_id"]
            self.resumed = True
            self.client.update_run(self.run_id, status="RUNNING")
            run = self.client.get_run(self.run_id)
            self.experiment_id = run.info.experiment_id
            times = int(run.data.tags.get("arcfold.resumed", "0")) + 1
            self.logged = set(run.data.metrics)
            self.client.set_tag(self.run_id, "arcfold.resumed", str(times))
            log.info("MLflow run %s in %s, resumed", self.run_id, self.uri)
        else:
            self.experiment_id = ensure_experiment(self.uri, experiment, artifacts)
            all_tags = {"git_commit": git_commit(), "hostname": socket.gethostname(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id  # how MLflow nests a run under its parent
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            if run_dir:
                write_json_atomic(Path(run_dir) / RUN_FILE, {"run_id": self.run_id, "uri": self.uri})
            log.info("MLflow run %s in %s", self.run_id, self.uri)
        if system_metrics:  # MLflow's sampler thread: system/cpu_utilization_percentage, memory, GPU, ...
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Its INFO lines (started, stopping, "skip logging GPU metrics") say nothing a run's log needs.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

            self.monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=system_metrics_interval,
                resume_logging=self.resumed,
                tracking_uri=self.uri,
            )
            self.monitor.start()

    def link(self, ui_url: str | None = None) -> str | None:
        """Where the run's page is in the MLflow UI."""
        return run_link(self.uri, self.experiment_id, self.run_id, ui_url)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        values = {k: str(v)[:6000] for k, v in params.items()}
        if self.resumed:  # MLflow refuses a param logged again with another value: a resume's changes become a tag
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in values.items() if k in logged and logged[k] != v}
            if changed:
                self.client.set_tag(
                    self.run_id,
                    "arcfold.resume_changed",
                    ", ".join(f"{k}: {logged[k]} -> {v}" for k, v in changed.items())[:5000],
                )
            values = {k: v for k, v in values.items() if k not in logged}
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """The figures under their MLflow names (arcfold.track.names), the headline first; a failure or budget
        figure only once it is not zero."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key in headline_first([k for k, v in metrics.items() if v is not None]):
            name, value = mlflow_name(key), float(metrics[key])
            if step is None:
                self.summary[key] = value
            if value == 0 and name not in self.logged and waits_for_not_zero(key):
                continue
            self.logged.add(name)
            items.append(Metric(name, value, now, step or 0))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_series(self, key: str, values: Sequence[float], first_step: int = 0) -> None:
        """One metric's history in batches (a per-step loss), steps first_step, first_step + 1, ..."""
        import time

        from mlflow.entities import Metric

        now, name = int(time.time() * 1000), mlflow_name(key)
        items = [Metric(name, float(v), now, first_step + i) for i, v in enumerate(values)]
        self.logged.update([name] if items else [])
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
        """End the run: its description (the headline, which leads the run's page) and tags, then its status."""
        if self.monitor is not None:
            self.monitor.finish()  # before the status changes: the sampler stops on a terminated run
        note = describe_run(self.summary)
        self.set_tags({**({"mlflow.note.content": note} if note else {}), **(tags or {})})
        self.client.set_terminated(self.run_id, status)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def describe_run(m: Mapping[str, float]) -> str | None:
    """The run description (MLflow's note, Markdown): score, oracle, answer NLL and seconds, rounded; None for
    a run that reported none of them (refused before starting, or stage=pretrain)."""
    if not {"score", "answer_nll", "seconds_total"} & set(m):
        return None
    parts = []
    if "score" in m:
        solved = f" ({int(m['solved'])} of {int(m['tasks'])} tasks" if {"solved", "tasks"} <= set(m) else " ("
        parts.append(f"**score {_fmt(m['score'], 3)}**{solved}; per test output {_fmt(m.get('score_pairs'), 3)})")
        parts.append(f"**oracle** {_fmt(m.get('oracle'), 3)}")
    elif "tasks" in m:
        parts.append(f"no solutions, not scored ({int(m['tasks'])} tasks)")
    parts.append(f"**answer NLL** {_fmt(m.get('answer_nll'), 4)}")
    folds = f" in {int(m['n_folds'])} folds" if "n_folds" in m else ""
    parts.append(f"**{_fmt(m.get('seconds_total'), 1)} s**{folds}")
    note = " · ".join(parts)
    if m.get("failed_tasks"):
        note += f"\n\n{int(m['failed_tasks'])} tasks failed: see the error column of tasks.csv."
    return note


def read_run_file(run_dir: str | Path) -> dict[str, str] | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The flattened config as MLflow params: one param per setting (derived counts such as n_folds are metrics)."""
    return flatten(cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True)))  # a DictConfig's is a dict
