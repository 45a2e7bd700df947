"""`python -m arcfold` (or `arcfold`): the Hydra app over conf/. One Hydra job = one run = one MLflow run.

    python -m arcfold folds=8 lora.rank=32 train.epochs=6
    python -m arcfold -m folds=2,4,8 lora.rank=16,32
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from arcfold.config import check, register
from arcfold.data import ArcDataError

log = logging.getLogger("arcfold")
register()


@hydra.main(version_base="1.3", config_path="pkg://arcfold.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from arcfold import pipeline
    from arcfold.checkpoint import resumed_config
    from arcfold.failures import Interrupted, free_memory, interrupts, outcome
    from arcfold.tracking import RunTracker, config_params, end_parent, read_parent

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    sweep_id = Path(hc.sweep.dir).name if sweeping else ""
    try:  # resume=DIR: DIR's own config and DIR as the run dir (this session's log goes to DIR/resumed/<time>)
        if cfg.resume and sweeping:
            raise ArcDataError("resumes one run, not a sweep (resume each job's dir on its own)", file="config",
                               field="resume")
        cfg = resumed_config(cfg, hc.overrides.task) if cfg.resume else cfg
    except ArcDataError as err:
        refuse(err, sweeping)
        return None
    run_dir = Path(cfg.resume or hc.runtime.output_dir)
    tracker = RunTracker(
        cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, cfg.outputs,
        run_name=cfg.tracking.run_name or (" ".join(hc.overrides.task) or "default"),
        parent_run_id=read_parent(hc.sweep.dir) if sweeping else None,
        tags={"sweep_id": sweep_id, "run_dir": str(run_dir), "overrides": " ".join(hc.overrides.task)},
        run_dir=run_dir)
    status, tags, exit_code = "FAILED", {"arcfold.outcome": "error"}, 0
    try:
        with interrupts():  # SIGINT / SIGTERM: the pipeline unwinds, writing what exists
            check(cfg)
            tracker.log_params(config_params(cfg))
            result = pipeline.run(cfg, run_dir, tracker)
        status, tags = outcome(len(result.failures))
    except Interrupted as sig:
        status, tags, exit_code = "KILLED", {"arcfold.outcome": "killed"}, sig.exit_code
    except ArcDataError as err:
        pipeline.write_placeholder_submission(cfg.data, run_dir)  # still a valid submission
        refuse(err, sweeping)
        return None
    finally:
        tracker.finish(status, tags)
        free_memory()  # Hydra's basic launcher runs a sweep's jobs one after another in this process
    if exit_code:
        log.warning("stopped by a signal; what was finished is in %s (resume=%s finishes the run)", run_dir, run_dir)
        if sweeping and cfg.tracking.enabled:
            end_parent(hc.sweep.dir, "KILLED")  # the sweep stops here: its remaining jobs never start
        sys.exit(exit_code)
    score = result.summary.get("score")
    log.info("run finished in %.1fs: %s", result.summary.get("seconds_total", 0.0),
             result.score().summary() if result.has_solutions else "no solutions, not scored")
    if result.failures:
        log.warning("%d tasks failed (see the error column of tasks.csv); MLflow status FAILED", len(result.failures))
    log.info("outputs: %s", run_dir)
    return score


def refuse(err: ArcDataError, sweeping: bool) -> None:
    """Bad input: one clear line, no traceback, exit code 2. In a sweep, the other jobs go on."""
    log.error("%s", err)
    if not sweeping:
        print(f"arcfold: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
