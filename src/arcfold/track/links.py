"""Links into the MLflow UI: a run's page and a sweep's runs table."""

from __future__ import annotations

import json
from typing import Any

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
