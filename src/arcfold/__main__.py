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


def release_memory() -> None:
    """Hydra's basic launcher runs a sweep's jobs one after another in this process: free the last job's model."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@hydra.main(version_base="1.3", config_path="pkg://arcfold.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from arcfold import pipeline
    from arcfold.progress import summary_table
    from arcfold.tracking import RunTracker, config_params, job_name, read_parent

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    sweep_id = Path(hc.sweep.dir).name if sweeping else ""
    parent = read_parent(hc.sweep.dir) if sweeping else None
    tracker = RunTracker(
        cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, cfg.outputs,
        run_name=cfg.tracking.run_name or (job_name(list(hc.overrides.task), parent["swept"]) if parent
                                           else " ".join(hc.overrides.task) or "default"),
        parent_run_id=parent["run_id"] if parent else None,
        tags={"sweep_id": sweep_id, "run_dir": str(run_dir), "overrides": " ".join(hc.overrides.task)},
        system_metrics=cfg.tracking.system_metrics, system_metrics_interval=cfg.tracking.system_metrics_interval)
    status = "FAILED"
    try:
        if cfg.repeats > 1 and not sweeping:
            raise ArcDataError(f"repeats={cfg.repeats} runs {cfg.repeats} seeds as a sweep: add -m", file="config",
                               field="repeats")
        check(cfg)
        tracker.log_params(config_params(cfg))
        result = pipeline.run(cfg, run_dir, tracker)
        status = "FINISHED"
    except ArcDataError as err:
        # Bad input: one clear line, no traceback, and still a valid submission. In a sweep, the other jobs go on.
        log.error("%s", err)
        pipeline.write_placeholder_submission(cfg.data, run_dir)
        if not sweeping:
            print(f"arcfold: error: {err}", file=sys.stderr)
            sys.exit(2)
        return None
    finally:
        tracker.finish(status)
        release_memory()
    score = result.summary.get("score")
    log.info("run finished in %.1fs: %s", result.summary.get("seconds_total", 0.0),
             result.score().summary() if result.has_solutions else "no solutions, not scored")
    log.info("\n%s", summary_table(result.summary, len(result.failures), run_dir, tracker.link(cfg.tracking.ui_url)))
    return score


if __name__ == "__main__":
    main()
