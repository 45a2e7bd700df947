"""Links into the MLflow UI: a run's page, an artifact's page, an artifact's file, and a sweep's runs table.

MLflow 3.17's UI opens in its GenAI mode unless told otherwise; the classic (machine-learning) view of any page is
asked for by the `workflowType=machine_learning` query of the page's hash route, which every link here carries
(an experiment tag, mlflow.experimentKind, does not change the mode in 3.17).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

CLASSIC = "workflowType=machine_learning"
# The runs table's metric columns, headline first (the params shown are the swept ones).
HEADLINE_METRICS = ("score", "oracle", "answer_nll", "seconds_total", "selection_accuracy")


def ui_base(uri: str, ui_url: str | None = None) -> str:
    """Where the MLflow UI is: ui_url, else a tracking server's own address, else `make ui`'s."""
    if ui_url:
        return ui_url.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_link(uri: str, experiment_id: str, run_id: str, ui_url: str | None = None) -> str:
    """A run's page (its Overview: the description, the metrics, the params), in the classic view."""
    return f"{ui_base(uri, ui_url)}/#/experiments/{experiment_id}/runs/{run_id}?{CLASSIC}"


def artifact_link(uri: str, experiment_id: str, run_id: str, path: str, ui_url: str | None = None) -> str:
    """A run's Artifacts tab with `path` open (an .html artifact renders there, a .md one as Markdown)."""
    return f"{ui_base(uri, ui_url)}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?{CLASSIC}"


def artifact_file(uri: str, run_id: str, path: str, ui_url: str | None = None) -> str:
    """The artifact's file itself, as the UI serves it: what a Markdown artifact shown in MLflow can use as an
    image (MLflow's Markdown view shows only images with an http(s) address)."""
    return f"{ui_base(uri, ui_url)}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def sweep_view_link(
    uri: str, parent_id: str, configuration: list[str], repeats: list[str], ui_url: str | None = None
) -> str:
    """A link to the classic runs table showing the sweep's runs grouped by configuration (the `configuration`
    params; each group row shows the average over its runs, every run listed under it, not collapsed under the
    parent), the swept params and the headline metrics as the first columns. The repeats' params (`repeats`:
    the seed) are columns only when there is no grouping: a group row would show their average (seed 0.5); the
    run names carry them.

    MLflow's shared view state: the UI reads the experiment tag mlflow.sharedViewState.<key> named by the link's
    viewStateShareKey (search facets, columns, grouping; it ignores run expansion, hence the filter on the parent:
    the children are listed without it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    shown = configuration if configuration else repeats
    columns = [f"params.`{p}`" for p in shown] + [f"metrics.`{m}`" for m in HEADLINE_METRICS]
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
    return f"{ui_base(uri, ui_url)}/#/experiments/{experiment_id}/runs?{CLASSIC}&viewStateShareKey={parent_id}"
