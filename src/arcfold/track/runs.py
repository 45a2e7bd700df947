"""Runs read back from MLflow: which runs a target names (a sweep dir, a parent, run ids, a filter), their params,
metrics and per-task results, and a comparison of them logged onto the sweep's parent run.

The parent says what it is: its description (MLflow's note, leading its page) names the sweep, the verdict (the
best configuration with its mean and interval, or "no clear winner"), what its metrics are, and links to the
report and the runs table; its metrics are the leading configuration's means, rounded, under the children's
headline names (so its row lines up with theirs), and the sweep's counts under `sweep/`.
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

from arcfold.report.comparison import Comparison, RunRecord, compare, verdict
from arcfold.report.comparison_files import report_blocks, write_report
from arcfold.report.document import to_markdown
from arcfold.report.stats import mean_sd
from arcfold.track.links import artifact_file, artifact_link, run_link, sweep_view_link
from arcfold.track.names import headline_first
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


def child_runs(client: Any, parent_id: str) -> list[Any]:
    """The parent's child runs (MLflow Run objects: params and tags included), oldest first."""
    parent = client.get_run(parent_id)
    runs = _all_runs(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def children(client: Any, parent_id: str) -> list[str]:
    return [r.info.run_id for r in child_runs(client, parent_id)]


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
    """From a run's tasks.csv: each task's score (fraction of its test outputs solved), mean answer NLL, and the
    number of its test outputs with an NLL (the weight that makes the per-task means a per-output mean)."""
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
        "answer_nll_outputs": {t: float(len(v)) for t, v in nll.items()},
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
) -> tuple[Comparison | None, dict[str, Path], dict[str, str]]:
    """Compare the source's runs into `out`; with a parent run, log the report to it and set its summary. The
    links into the MLflow UI (with a parent): the report, the parent run's page and the sweep's runs table."""
    records = read_runs(source.uri, source.run_ids)
    usable = [r for r in records if r.params]  # a job refused before its params were logged has nothing to compare
    comparison, files, links = None, {}, {}
    title = f"arcfold comparison: {source.sweep_dir.name if source.sweep_dir else source.parent_id or 'runs'}"
    if usable:
        comparison = compare(usable, baseline, level, n_boot)
        files = write_report(comparison, out, title)
    if source.parent_id:
        links = log_to_parent(source, source.parent_id, records, comparison, files, ui_url, title)
    return comparison, files, links


def log_to_parent(
    source: Source,
    pid: str,
    records: Sequence[RunRecord],
    c: Comparison | None,
    files: dict[str, Path],
    ui_url: str | None,
    title: str = "arcfold comparison",
) -> dict[str, str]:
    """The parent run tells the sweep's story (see the module doc); returns the links to the report, the parent
    and the runs table."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=source.uri)
    now = int(datetime.now().timestamp() * 1000)
    experiment_id = client.get_run(pid).info.experiment_id
    failed_jobs = sum(r.status != "FINISHED" for r in records)
    failed_tasks = sum(r.metrics.get("failed_tasks", 0.0) for r in records)
    summary: dict[str, float] = {"sweep/jobs": len(records)}
    summary.update({"sweep/failed_jobs": failed_jobs} if failed_jobs else {})
    summary.update({"failed_tasks": failed_tasks} if failed_tasks else {})
    tags = {"arcfold.role": "sweep"}
    links = {"parent": run_link(source.uri, experiment_id, pid, ui_url)}
    if c is not None:
        lead = c.configurations[c.leader]
        summary["sweep/configurations"] = len(c.configurations)
        for metric, digits in (("score", 4), ("oracle", 4), ("selection_accuracy", 4), ("answer_nll", 4)):
            mean, sd = mean_sd(lead.metric(metric))
            summary[metric] = round(mean, digits)
            if metric == "score" and math.isfinite(sd):
                summary["score_sd"] = round(sd, digits)
        summary["seconds_total"] = round(mean_sd(lead.metric("seconds_total"))[0], 1)
        tags.update(
            best_configuration=lead.label if c.best is not None else "no clear winner",
            leading_configuration=lead.label,
            leading_runs=",".join(r.run_id for r in lead.runs),
        )
        # The leading configuration's swept values under the children's param names: the parent row shows them
        # in the same columns. A later compare with another leader cannot overwrite a param: the tags say it.
        logged = client.get_run(pid).data.params
        params = [Param(k, v) for k, v in lead.values.items() if logged.get(k) in (None, v)]
        try:
            client.log_batch(pid, params=params)
        except MlflowException as err:
            log.warning("parent run %s: leading params not logged (%s); see the tags", pid, err)
        links["report"] = artifact_link(source.uri, experiment_id, pid, "compare/report.html", ui_url)
        links["runs table"] = sweep_view_link(source.uri, pid, c.swept, [c.repeat_key] if c.repeat_key else [], ui_url)
        tags.update({"arcfold.ui_link": links["runs table"], "arcfold.report_link": links["report"]})
        tags["mlflow.note.content"] = describe_sweep(source, c, records, links)
    finite = {k: float(v) for k, v in summary.items() if v is not None and math.isfinite(v)}
    client.log_batch(pid, metrics=[Metric(k, finite[k], now, 0) for k in headline_first(list(finite))])
    for k, v in tags.items():
        client.set_tag(pid, k, v)
    for key, path in files.items():
        if key != "report":
            client.log_artifact(pid, str(path), "compare")
    if c is not None and "report" in files:  # MLflow's Markdown view shows images only from an http(s) address
        with tempfile.TemporaryDirectory() as tmp:
            md = Path(tmp) / "report.md"
            image = lambda p: artifact_file(source.uri, pid, f"compare/{p.name}", ui_url)  # noqa: E731
            md.write_text(to_markdown(report_blocks(c, title, files), image_src=image))
            client.log_artifact(pid, str(md), "compare")
    return links


def printed_links(files: dict[str, Path], links: dict[str, str]) -> str:
    """What a comparison prints after its table: the report on disk, then the links into the MLflow UI."""
    lines = [f"report: {files['report']}"] if "report" in files else []
    names = {"report": "MLflow report", "parent": "MLflow parent run", "runs table": "MLflow runs table"}
    return "\n".join(lines + [f"{names[k]}: {links[k]}" for k in names if k in links])


def describe_sweep(source: Source, c: Comparison, records: Sequence[RunRecord], links: dict[str, str]) -> str:
    """The parent's description (Markdown): the verdict, the links, what the sweep ran and what the metrics are."""
    lead = c.configurations[c.leader]
    name = source.sweep_dir.name if source.sweep_dir else source.parent_id
    sizes = sorted({len(conf.runs) for conf in c.configurations})
    repeats = f", {'/'.join(map(str, sizes))} runs each" if sizes != [1] else ""
    swept = f" of {', '.join(c.swept)}" if c.swept else ""
    failed = sum(r.status != "FINISHED" for r in records)
    head, _, rest = verdict(c).partition(": ")
    return "\n\n".join(
        [
            f"**{head[0].upper() + head[1:]}**: {rest}.",
            f"[Comparison report]({links['report']}) · [Runs table]({links['runs table']})",
            f"Sweep {name}: {len(records)} runs, {len(c.configurations)} configurations{swept}{repeats}, over "
            f"{len(c.tasks)} tasks" + (f", {failed} runs not FINISHED" if failed else "") + ". This run's metrics "
            f"are {lead.label}'s means over its runs (score_sd: their sd), rounded; the sweep's counts are under "
            "sweep/.",
        ]
    )
