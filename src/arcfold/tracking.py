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
from typing import Any, Mapping, Sequence, cast

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
    """The MLflow run of one Hydra job. A no-op when tracking is disabled, so the pipeline never branches."""

    def __init__(
        self,
        enabled: bool,
        uri: str | None = None,
        experiment: str = "arcfold",
        outputs: str | Path = "outputs",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_dir: str | Path | None = None,
        system_metrics: bool = False,
        system_metrics_interval: float = 10.0,
    ):
        """With run_dir, the run's id and store are remembered there (RUN_FILE); a tracker made for a run dir
        that already names its MLflow run (a resume) continues that run instead of creating another. With
        system_metrics, MLflow samples CPU, memory (and GPU) every system_metrics_interval seconds."""
        self.enabled = enabled
        self.run_id: str | None = None
        self.resumed = False
        self.monitor: Any = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        previous = read_run_file(run_dir) if run_dir else None
        self.uri = previous["uri"] if previous else tracking_uri(uri, outputs)
        self.client = MlflowClient(tracking_uri=self.uri)
        if previous:
            self.run_id, self.resumed = previous["run_id"], True
            self.client.update_run(self.run_id, status="RUNNING")
            run = self.client.get_run(self.run_id)
            self.experiment_id = run.info.experiment_id
            times = int(run.data.tags.get("arcfold.resumed", "0")) + 1
            self.client.set_tag(self.run_id, "arcfold.resumed", str(times))
            log.info("MLflow run %s in %s, resumed", self.run_id, self.uri)
        else:
            self.experiment_id = ensure_experiment(self.uri, experiment, outputs)
            all_tags = {"git_commit": git_commit(), "hostname": socket.gethostname(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id  # how MLflow nests a run under its parent
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            if run_dir:
                write_json_atomic(Path(run_dir) / RUN_FILE, {"run_id": self.run_id, "uri": self.uri})
            log.info("MLflow run %s in %s", self.run_id, self.uri)
        if system_metrics:  # MLflow's sampler thread: system/cpu_utilization_percentage, memory, GPU, ...
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=system_metrics_interval,
                resume_logging=self.resumed,
                tracking_uri=self.uri,
            )
            self.monitor.start()

    def link(self, ui_url: str | None = None) -> str | None:
        """Where the run's page is in the MLflow UI."""
        return run_link(self.uri, self.experiment_id, self.run_id, ui_url) if self.run_id else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run_id is None:  # tracking disabled
            return
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
        if self.run_id is None:  # tracking disabled
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_series(self, key: str, values: Sequence[float], first_step: int = 0) -> None:
        """One metric's history in batches (a per-step loss), steps first_step, first_step + 1, ..."""
        if self.run_id is None:  # tracking disabled
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is not None:  # tracking enabled
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
        if self.monitor is not None:
            self.monitor.finish()  # before the status changes: the sampler stops on a terminated run
        if self.enabled and self.run_id:
            self.set_tags(tags or {})
            self.client.set_terminated(self.run_id, status)


# The runs table's metric columns, headline first (the params shown are the swept ones).
HEADLINE_METRICS = ("score", "oracle", "selection_accuracy", "answer_nll", "seconds_total", "failed_tasks")


def ui_base(uri: str, ui_url: str | None = None) -> str:
    """Where the MLflow UI is: ui_url, else a tracking server's own address, else `make ui`'s."""
    if ui_url:
        return ui_url.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_link(uri: str, experiment_id: str, run_id: str, ui_url: str | None = None) -> str:
    return f"{ui_base(uri, ui_url)}/#/experiments/{experiment_id}/runs/{run_id}"


def sweep_view_link(
    uri: str, parent_id: str, configuration: list[str], repeats: list[str], ui_url: str | None = None
) -> str:
    """A link to the classic runs table showing the sweep's runs grouped by configuration (the `configuration`
    params; each group row shows the average over its runs, every run listed under it, not collapsed under the
    parent), the swept params (`repeats`: the seed) and the headline metrics as the first columns.

    MLflow's shared view state: the UI reads the experiment tag mlflow.sharedViewState.<key> named by the link's
    viewStateShareKey (search facets, columns, grouping; it ignores run expansion, hence the filter on the parent:
    the children are listed without it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    columns = [f"params.`{p}`" for p in configuration + repeats] + [f"metrics.`{m}`" for m in HEADLINE_METRICS]
    state: dict[str, Any] = {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_id}'",
        "orderByKey": "metrics.`score`",
        "orderByAsc": False,
        "runsHiddenMode": "SHOW_ALL",
        "selectedColumns": columns,
        "columnOrder": columns,
    }
    if configuration:
        state["groupBy"] = {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "param", "groupByData": p} for p in configuration],
        }
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{parent_id}", json.dumps(state))
    return (
        f"{ui_base(uri, ui_url)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={parent_id}"
    )


def read_run_file(run_dir: str | Path) -> dict[str, str] | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_parent(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The sweep's parent run (run_id, uri, swept keys), written by SweepCallback before the jobs started (None
    outside a sweep)."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a multirun gives more than one value, in order; a later override of a key replaces an earlier
    one (the command line comes after hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept: dict[str, bool] = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        many = o.is_sweep_override() and (not o.is_discrete_sweep() or len(list(o.sweep_string_iterator())) > 1)
        swept[_key(o.get_key_element())] = many
    return [k for k, many in swept.items() if many]


def job_name(job_overrides: list[str], swept: list[str]) -> str:
    """A sweep job's run name: its swept values only ("lora.rank=8 seed=1"), not every constant override."""
    chosen = {_key(o): o for o in job_overrides if _key(o) in swept}
    order = sorted(swept, key=lambda k: k == "seed")  # the configuration first, its repeat last
    return " ".join(chosen[k] for k in order if k in chosen) or "default"


class SweepCallback(Callback):
    """Before a multirun's jobs: create the store and the sweep's parent run. After the last job: compare the
    runs onto the parent (arcfold.compare), mark it finished and print the link to the sweep's runs table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        tracker = RunTracker(
            True,
            config.tracking.uri,
            config.tracking.experiment,
            config.outputs,
            run_name=f"sweep {sweep_dir.name}",
            tags={"sweep_id": sweep_dir.name, "arcfold.role": "sweep", "sweep_overrides": " ".join(overrides)},
        )
        tracker.log_params({"sweep.overrides": " ".join(overrides), "sweep.dir": str(sweep_dir)})
        (sweep_dir / PARENT_FILE).write_text(
            json.dumps({"run_id": tracker.run_id, "uri": tracker.uri, "swept": swept_keys(overrides)})
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = read_parent(sweep_dir)
        if parent is None:
            return
        from mlflow.tracking import MlflowClient

        from arcfold.compare import Source, children, summarise
        from arcfold.report.sweep import markdown_table, table_rows

        client = MlflowClient(tracking_uri=parent["uri"])
        try:  # the jobs' results are safe in MLflow whatever happens here: a failed summary must not hide them
            source = Source(parent["uri"], children(client, parent["run_id"]), parent["run_id"], sweep_dir)
            comparison, files, link = summarise(source, sweep_dir / "compare", ui_url=config.tracking.ui_url)
            if comparison is not None:
                print(
                    f"\n{markdown_table(table_rows(comparison))}\n\nreport: {files['report']}\n"
                    f"MLflow runs table: {link}"
                )
        except Exception as err:
            log.error(
                "the sweep's summary failed (python -m arcfold.compare %s retries it): %s",
                sweep_dir,
                err,
                exc_info=True,
            )
        finally:
            end_parent(sweep_dir, "FINISHED")


def end_parent(sweep_dir: str | Path, status: str) -> None:
    """Mark the sweep's parent run ended (FINISHED after the last job; KILLED when a signal stops the sweep)."""
    parent = read_parent(sweep_dir)
    if parent is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=parent["uri"]).set_terminated(parent["run_id"], status)


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The flattened config as MLflow params: one param per setting (derived counts such as n_folds are metrics)."""
    return flatten(cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True)))  # a DictConfig's is a dict
