"""Runs read back from MLflow: which runs a target names (a sweep dir, a parent, run ids, a filter), their params,
metrics and per-task results, and a comparison of them logged onto the sweep's parent run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from arcfold.report.comparison import Comparison, RunRecord, compare, write_report
from arcfold.report.stats import mean_sd
from arcfold.track.links import sweep_view_link
from arcfold.track.tracker import tracking_uri

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # in a sweep dir: the sweep's parent run, written before its jobs start


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Source:
    uri: str
    run_ids: list[str]
    parent_id: str | None = None
    sweep_dir: Path | None = None


def _all_runs(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def read_parent(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The sweep's parent run (run_id, uri, swept keys), written by SweepCallback before the jobs started (None
    outside a sweep)."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def children(client: Any, parent_id: str) -> list[str]:
    parent = client.get_run(parent_id)
    runs = _all_runs(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return [r.info.run_id for r in sorted(runs, key=lambda r: r.info.start_time or 0)]


def resolve(targets: Sequence[str], uri: str | None, experiment: str) -> Source:
    """Which store and which runs TARGET names (see the module doc)."""
    from mlflow.tracking import MlflowClient

    if len(targets) == 1 and Path(targets[0]).is_dir():
        sweep_dir = Path(targets[0])
        if not (sweep_dir / PARENT_FILE).exists():
            raise SystemExit(f"arcfold.cli.compare: {sweep_dir} has no {PARENT_FILE}: not a tracked sweep directory")
        parent = json.loads((sweep_dir / PARENT_FILE).read_text())
        uri = uri or parent["uri"]
        return Source(uri, children(MlflowClient(tracking_uri=uri), parent["run_id"]), parent["run_id"], sweep_dir)
    uri = uri or tracking_uri(None, "outputs")
    client = MlflowClient(tracking_uri=uri)
    ids = [t for target in targets for t in target.replace(",", " ").split()]
    if ids and all(RUN_ID.match(i) for i in ids):
        kids = children(client, ids[0]) if len(ids) == 1 else []
        return Source(uri, kids, ids[0]) if kids else Source(uri, ids)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"arcfold.cli.compare: no experiment {experiment!r} in {uri}")
    runs = _all_runs(client, [exp.experiment_id], " ".join(targets))
    return Source(uri, [r.info.run_id for r in runs if r.data.tags.get("arcfold.role") != "sweep"])


def per_task(tasks_csv: Path) -> dict[str, dict[str, float]]:
    """From a run's tasks.csv: each task's score (fraction of its test outputs solved) and mean answer NLL."""
    solved: dict[str, list[float]] = {}
    nll: dict[str, list[float]] = {}
    with open(tasks_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("solved") in ("True", "False"):
                solved.setdefault(row["task"], []).append(float(row["solved"] == "True"))
            value = float(row.get("answer_nll") or "nan")
            if math.isfinite(value):
                nll.setdefault(row["task"], []).append(value)
    out = {
        "score": {t: sum(v) / len(v) for t, v in solved.items()},
        "answer_nll": {t: sum(v) / len(v) for t, v in nll.items()},
    }
    return {k: v for k, v in out.items() if v}


def read_runs(uri: str, run_ids: Sequence[str]) -> list[RunRecord]:
    """Each run's params, metrics and status, and its per-task values from its tasks.csv artifact."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    records = []
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small CSV is noise
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            run = client.get_run(run_id)
            try:
                table = Path(client.download_artifacts(run_id, "tasks.csv", f"{tmp}/{run_id}"))
                tasks = per_task(table)
            except Exception as err:  # a run that died before writing its tables: in the counts, not the stats
                log.warning("run %s: no tasks.csv artifact (%s); compared on its run metrics only", run_id, err)
                tasks = {}
            records.append(
                RunRecord(
                    run_id,
                    run.info.run_name or "",
                    dict(run.data.params),
                    dict(run.data.metrics),
                    run.info.status,
                    tasks,
                )
            )
    return records


def summarise(
    source: Source,
    out: str | Path,
    baseline: str | None = None,
    level: float = 0.95,
    n_boot: int = 10_000,
    ui_url: str | None = None,
) -> tuple[Comparison | None, dict[str, Path], str | None]:
    """Compare the source's runs into `out`; with a parent run, log the report to it, set its summary, and
    return the link to the sweep's runs table (None without a parent)."""
    records = read_runs(source.uri, source.run_ids)
    usable = [r for r in records if r.params]  # a job refused before its params were logged has nothing to compare
    comparison, files, link = None, {}, None
    if usable:
        comparison = compare(usable, baseline, level, n_boot)
        title = f"arcfold comparison: {source.sweep_dir.name if source.sweep_dir else source.parent_id or 'runs'}"
        files = write_report(comparison, out, title)
    if source.parent_id:
        link = log_to_parent(source, source.parent_id, records, comparison, files, ui_url)
    return comparison, files, link


def log_to_parent(
    source: Source,
    pid: str,
    records: Sequence[RunRecord],
    c: Comparison | None,
    files: dict[str, Path],
    ui_url: str | None,
) -> str | None:
    """The parent run tells the sweep's story: jobs, failures, the best configuration, the report and plots."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=source.uri)
    now = int(datetime.now().timestamp() * 1000)
    summary = {
        "jobs": len(records),
        "failed_jobs": sum(r.status != "FINISHED" for r in records),
        "failed_tasks": sum(r.metrics.get("failed_tasks", 0.0) for r in records),
    }
    tags = {"arcfold.role": "sweep"}
    if c is not None:
        best = c.configurations[c.best]
        summary["configurations"] = len(c.configurations)
        for metric in ("score", "oracle", "selection_accuracy", "answer_nll", "seconds_total"):
            mean, sd = mean_sd(best.metric(metric))
            summary[metric] = mean
            if metric == "score":
                summary["score_sd"] = sd
        tags.update({"best_configuration": best.label, "best_runs": ",".join(r.run_id for r in best.runs)})
        # The best configuration's swept values under the children's param names: the parent row shows them in
        # the same columns. A later compare that finds another best cannot overwrite a param: it goes in a tag.
        logged = client.get_run(pid).data.params
        params = [Param(k, v) for k, v in best.values.items() if logged.get(k) in (None, v)]
        try:
            client.log_batch(pid, params=params)
        except MlflowException as err:
            log.warning("parent run %s: best params not logged (%s); see the best_configuration tag", pid, err)
    client.log_batch(
        pid, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items() if v is not None and math.isfinite(v)]
    )
    for k, v in tags.items():
        client.set_tag(pid, k, v)
    for path in files.values():
        client.log_artifact(pid, str(path), "compare")
    if c is None:
        return None
    link = sweep_view_link(source.uri, pid, c.swept, [c.repeat_key] if c.repeat_key else [], ui_url)
    client.set_tag(pid, "arcfold.ui_link", link)
    return link
