"""`python -m arcfold` (or `arcfold`): the Hydra app over conf/. One Hydra job = one run = one MLflow run.

python -m arcfold folds=8 lora.rank=32 train.epochs=6
python -m arcfold -m folds=2,4,8 lora.rank=16,32
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from arcfold.checks import ConfigError, check
from arcfold.config import register
from arcfold.data import ArcDataError

log = logging.getLogger("arcfold")
register()


def job_threads(launcher: Any, cores: int) -> int | None:
    """CPU threads for each of a parallel sweep's jobs: the cores split among the launcher's concurrent jobs
    (torch gives every process all cores, and jobs that share them run 10-20x slower). None: not parallel."""
    n_jobs = launcher.get("n_jobs") if launcher is not None else None
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return None
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's rule: -1 is every core, -2 all but one
    return max(1, cores // jobs)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@hydra.main(version_base="1.3", config_path="pkg://arcfold.conf", config_name="config")
def run_app(cfg: DictConfig) -> float | None:
    from arcfold.run.progress import quiet_libraries, shows_bars

    quiet_libraries(shows_bars(cfg.report.progress))  # before the libraries load: their bars and known warnings

    from arcfold import pipeline
    from arcfold.report.comparison import PRESETS
    from arcfold.run.checkpoint import resumed_config
    from arcfold.run.failures import Interrupted, free_memory, interrupts, outcome
    from arcfold.run.progress import summary_table
    from arcfold.run.tracker import NullTracker, Tracker
    from arcfold.track.runs import read_parent
    from arcfold.track.sweep import end_parent, job_name
    from arcfold.track.tracker import RunTracker, config_params

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    sweep_id = Path(hc.sweep.dir).name if sweeping else ""
    try:  # resume=DIR: DIR's own config and DIR as the run dir (this session's log goes to DIR/resumed/<time>)
        if cfg.resume and sweeping:
            raise ConfigError("resumes one run, not a sweep (resume each job's dir on its own)", key="resume")
        if cfg.repeats > 1 and not sweeping:
            raise ConfigError(f"repeats={cfg.repeats} runs {cfg.repeats} seeds as a sweep: add -m", key="repeats")
        cfg = resumed_config(cfg, hc.overrides.task) if cfg.resume else cfg
    except (ArcDataError, ConfigError) as err:
        refuse(err, sweeping)
        return None
    run_dir = Path(cfg.resume or hc.runtime.output_dir)
    threads = job_threads(hc.launcher, available_cores()) if sweeping else None
    if threads:
        import torch

        torch.set_num_threads(threads)
    parent = read_parent(hc.sweep.dir) if sweeping else None
    tracker: Tracker = NullTracker()
    if cfg.tracking.enabled:
        tracker = RunTracker(
            cfg.tracking.uri,
            cfg.tracking.experiment,
            cfg.outputs,
            run_name=cfg.tracking.run_name
            or (
                job_name(list(hc.overrides.task), parent["swept"])
                if parent
                else " ".join(hc.overrides.task) or "default"
            ),
            parent_run_id=parent["run_id"] if parent else None,
            tags={
                "sweep_id": sweep_id,
                "run_dir": str(run_dir),
                "overrides": " ".join(hc.overrides.task),
                "experiment": str(hc.runtime.choices.get("experiment")),
                "torch_threads": str(threads or "default"),
            },
            run_dir=run_dir,
            system_metrics=cfg.tracking.system_metrics,
            system_metrics_interval=cfg.tracking.system_metrics_interval,
            artifacts=OmegaConf.select(cfg, "tracking.artifacts"),
        )
    status, tags, exit_code = "FAILED", {"arcfold.outcome": "error"}, 0
    try:
        with interrupts():  # SIGINT / SIGTERM: the pipeline unwinds, writing what exists
            check(cfg)
            # The presets chosen (variant=no_ttt) too: a sweep over them is compared by their names.
            chosen = {k: str(hc.runtime.choices[k]) for k in PRESETS if hc.runtime.choices.get(k)}
            tracker.log_params({**config_params(cfg), **chosen})
            if cfg.stage == "pretrain":
                from arcfold import pretrain

                pretrained = pretrain.run(cfg, run_dir, tracker)
            else:
                result = pipeline.run(cfg, run_dir, tracker)
        status, tags = outcome(0 if cfg.stage == "pretrain" else len(result.failures))
    except Interrupted as sig:
        status, tags, exit_code = "KILLED", {"arcfold.outcome": "killed"}, sig.exit_code
    except (ArcDataError, ConfigError) as err:
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
    if cfg.stage == "pretrain":
        log.info("pretrained model in %s: %s", cfg.pretrain.out or run_dir / "model", pretrained)
        return pretrained["heldout_solved"]
    score = result.summary.get("score")
    log.info(
        "run finished in %.1fs: %s",
        result.summary.get("seconds_total", 0.0),
        result.score().summary() if result.has_solutions else "no solutions, not scored",
    )
    if result.failures:
        log.warning("%d tasks failed (see the error column of tasks.csv); MLflow status FAILED", len(result.failures))
    log.info("\n%s", summary_table(result.summary, len(result.failures), run_dir, tracker.link(cfg.tracking.ui_url)))
    return score


def refuse(err: ArcDataError | ConfigError, sweeping: bool) -> None:
    """Bad input or config: one clear line, no traceback, exit code 2. In a sweep, the other jobs go on."""
    log.error("%s", err)
    if not sweeping:
        print(f"arcfold: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """The entry point. Hydra's own errors (an unknown group option, a bad override, a wrong type) become one line
    and exit 2 as well, like arcfold's: Hydra raises them instead of printing its report when HYDRA_FULL_ERROR is
    set, which we do unless the user set it (then the full traceback is what they asked for)."""
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        run_app()
    except (HydraException, ValueError) as err:
        if user_wants_traceback or not composing(err):
            raise
        print(f"arcfold: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def composing(err: BaseException) -> bool:
    """Raised while Hydra composed the config, before any run: a job's own errors keep their traceback."""
    if isinstance(err, (ConfigCompositionException, OverrideParseException)):
        return True
    tb = err.__traceback__  # a plain ValueError of Hydra's defaults list (e.g. `experiment=null`)
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}hydra{os.sep}_internal{os.sep}" in tb.tb_frame.f_code.co_filename


def one_line(err: BaseException) -> str:
    """Hydra's message and its cause's (OmegaConf names the key), folded into one line, without the search path."""
    text = str(err).split("Config search path")[0]
    if err.__cause__ is not None and str(err.__cause__) not in text:
        text += f": {err.__cause__}"
    return " ".join(text.split())


if __name__ == "__main__":
    main()
