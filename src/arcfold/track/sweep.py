"""A sweep in MLflow: its parent run, created once by SweepCallback before any job starts (two processes that
create a new SQLite store at the same moment race on its migrations); the jobs find the parent run's id in
<sweep dir>/mlflow_parent.json, which also works for jobs in other processes (submitit). After the last job the
callback compares the runs onto the parent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from arcfold.report.comparison import markdown_table, table_rows, verdict
from arcfold.track.runs import PARENT_FILE, Source, child_runs, printed_links, read_parent, summarise
from arcfold.track.tracker import RunTracker

log = logging.getLogger(__name__)


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
    runs onto the parent (arcfold.cli.compare), mark it finished and print the link to the sweep's runs table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        tracker = RunTracker(
            config.tracking.uri,
            config.tracking.experiment,
            config.outputs,
            run_name=f"sweep {sweep_dir.name}",
            tags={"sweep_id": sweep_dir.name, "arcfold.role": "sweep", "sweep_overrides": " ".join(overrides)},
            artifacts=OmegaConf.select(config, "tracking.artifacts"),
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

        client = MlflowClient(tracking_uri=parent["uri"])
        try:  # the jobs' results are safe in MLflow whatever happens here: a failed summary must not hide them
            runs = child_runs(client, parent["run_id"])
            source = Source(parent["uri"], [r.info.run_id for r in runs], parent["run_id"], sweep_dir)
            baseline = first_job(runs, sweep_dir)
            comparison, files, links = summarise(source, sweep_dir / "compare", baseline, ui_url=config.tracking.ui_url)
            if comparison is not None:
                print(f"\n{markdown_table(table_rows(comparison))}\n\n{verdict(comparison)}\n")
                print(printed_links(files, links))
        except Exception as err:
            log.error(
                "the sweep's summary failed (python -m arcfold.cli.compare %s retries it): %s",
                sweep_dir,
                err,
                exc_info=True,
            )
        finally:
            end_parent(sweep_dir, "FINISHED")


def first_job(runs: list[Any], sweep_dir: Path) -> str | None:
    """The run of the sweep's job 0, which takes the first value of every swept list: the comparison's baseline
    (`-m variant=no_ttt,per_task` is compared against no_ttt, whatever order the values sort in). None where
    job 0 logged nothing to compare (the first configuration is the baseline then)."""
    target = (sweep_dir / "0").resolve()
    for run in runs:
        if run.data.params and Path(run.data.tags.get("run_dir", "")).resolve() == target:
            return run.info.run_id
    return None


def end_parent(sweep_dir: str | Path, status: str) -> None:
    """Mark the sweep's parent run ended (FINISHED after the last job; KILLED when a signal stops the sweep)."""
    parent = read_parent(sweep_dir)
    if parent is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=parent["uri"]).set_terminated(parent["run_id"], status)
