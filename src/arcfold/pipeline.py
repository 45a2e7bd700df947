"""One arcfold run, start to end: load, split into folds, train an adapter per fold, predict, score, report.

Read this file to see the whole run; each step's details live in the module it calls. Every test input's
outcome lands in the checkpoint (arcfold.run.checkpoint) and the submission as it is made, so a killed run resumes
where it stopped; the budget (arcfold.run.budget) caps training and cuts inference to meet a deadline; a failure
stops the run or, under on_error=skip, costs only its task or fold and is recorded (arcfold.run.failures).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from arcfold.data import ArcDataError, Task
from arcfold.data.augment import view_count
from arcfold.data.folds import split
from arcfold.data.sources import load_tasks
from arcfold.data.synthetic import write_kaggle
from arcfold.orchestrate.executor import Done, Executor, Lost, Ready, WorkerRow
from arcfold.report.runplots import write_run_plots
from arcfold.run.budget import FoldWork, Planner, input_units, total_seconds, train_units
from arcfold.run.checkpoint import Checkpoint
from arcfold.run.failures import describe, skips
from arcfold.run.ledger import FoldJob, Ledger
from arcfold.run.progress import Progress
from arcfold.run.records import FoldOutcome, FoldRow, InputRecord, describe_cuts
from arcfold.run.results import RunResults
from arcfold.run.timings import Timings
from arcfold.run.tracker import NullTracker, Tracker
from arcfold.run.worker import ENGINE, Engine

log = logging.getLogger(__name__)


@dataclass
class Session:
    """What the run keeps while its folds run elsewhere (arcfold.orchestrate): its results, checkpoint, budget,
    clock and progress, and the ledger where the folds' reports land."""

    cfg: Any
    run_dir: Path
    folds: list[list[Task]]
    results: RunResults
    store: Checkpoint
    planner: Planner
    clock: Timings
    progress: Progress  # live progress: folds, tasks predicted, ETA
    ledger: Ledger = field(init=False)
    workers: dict[int, WorkerRow] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.planner, self.store, self.results, on_input=self.input_landed, on_span=self.clock.add)

    def input_landed(self, rec: InputRecord) -> None:
        """A test input landed: the task counts as predicted once all its test inputs have (the fold too, once all
        its tasks have: its summary line follows)."""
        task = next(t for t in self.results.tasks if t.id == rec.task)
        if finished(task, self.results):
            fold = self.folds[rec.fold] if 0 <= rec.fold < len(self.folds) else []
            self.progress.task_done(task.id, fold_done=all(finished(t, self.results) for t in fold))

    def begin(self, job: FoldJob) -> FoldJob:
        """A fold handed to a worker: the budget's plan and the checkpoint's state go with it."""
        self.progress.fold(job.fold, len(job.tasks))
        return job.begin(self.planner, self.store)


def run(cfg: Any, run_dir: Path, tracker: Tracker | None = None, engine: Engine = ENGINE) -> RunResults:
    """The run: the folds' adapters trained and their tasks predicted by `engine` (arcfold.engine's functions)."""
    start = time.perf_counter()  # the budget counts from here: the margin covers the process's start-up
    tracker = tracker or NullTracker()
    run_dir = Path(run_dir)
    clock = Timings()

    with clock("load"):
        tasks, everything = load_tasks(cfg.data)
        if cfg.data.name == "synthetic":  # the generated tasks as Kaggle files: data=kaggle reads them back
            write_kaggle(everything, run_dir / "data")
        folds = split(tasks, cfg.folds, cfg.split.strategy, cfg.split.seed)
        results = RunResults(tasks, everything)
        store = Checkpoint(run_dir, folds, resume=bool(cfg.resume), config=cfg)
        done = store.restore(results, len(folds))  # what an earlier session of this run finished
        results.write_submission(run_dir / "submission.json")  # valid from the first second: all placeholders
        work = [
            remaining_work(fold, cfg, f in done or store.training(f) is not None, results)
            for f, fold in enumerate(folds)
        ]
        planner = Planner(cfg.budget, work, start, full_views=view_count(cfg.inference.n))
        unfinished = sum(not finished(t, results) for t in tasks)  # tasks with a test input still to predict
        progress = Progress(cfg.report.progress, unfinished, len(folds), cfg.report.progress_every)
        s = Session(cfg, run_dir, folds, results, store, planner, clock, progress)
    saved_folds = {"none": set(), "last": {len(folds) - 1}, "all": set(range(len(folds)))}[cfg.save_adapters]
    jobs = [FoldJob(f, fold, save_adapter=f in saved_folds) for f, fold in enumerate(folds) if f not in done]

    loaded = False
    try:
        # The folds run in this process, in a worker process per device, or on Ray actors; what they report
        # as they go (test inputs, trainings, the budget's measurements, phase spans) lands in the session's ledger.
        with Executor(cfg, run_dir, s.ledger, engine) as executor, progress:
            s.workers, planner.workers = executor.workers, len(executor.devices)
            clock.device = ",".join(executor.devices)
            tracker.set_tags({"device": clock.device})
            earlier = f"; folds {sorted(done)} finished in an earlier session" if done else ""
            log.info("%d tasks in %d folds on %s%s", len(tasks), len(folds), clock.device, earlier)
            for event in executor.run(jobs, begin=s.begin):
                if isinstance(event, Ready):
                    if not loaded:  # the first model is loaded: say what the adapters will take
                        loaded = True
                        clock.seconds["load"] += event.info.load_seconds
                        tracker.log_metrics({"adapters_disk_mb": adapters_disk(event.info, len(saved_folds), run_dir)})
                    continue
                log_fold(land(event, s), s, tracker)
    finally:  # even on a failure or a signal, the scores and tables of the work done so far land
        report(s, tracker, start)
    return results


def land(event: Done | Lost, s: Session) -> FoldRow:
    """A finished fold: its row (with the fold's scores) into the results, its outcome into the checkpoint (a
    resume skips it). A fold lost with its workers gets placeholders, recorded, or stops the run."""
    job = event.job
    if isinstance(event, Lost):
        if not skips(s.cfg):
            raise RuntimeError(f"fold {job.fold}: {event.reason}")
        error = f"fold {job.fold}: {event.reason}"
        for key in [(t.id, i) for t in job.tasks for i in range(len(t.test))]:
            if key not in s.results.recorded:  # its placeholders, recorded and submitted
                s.ledger.report("input", InputRecord(*key, job.fold, error=error))
        row = FoldRow(fold=job.fold, tasks=len(job.tasks), error=error, metrics=s.results.metrics(job.tasks))
        outcome = FoldOutcome(job.fold, row, [], [])
    else:
        report = event.report
        metrics = s.results.metrics(job.tasks)
        row = FoldRow.landed(report, event.worker, event.attempt, event.round_trip, metrics)
        outcome = FoldOutcome(job.fold, row, report.inputs, report.events)
    s.store.save_fold(outcome)
    s.results.add_fold(outcome)
    return row


def log_fold(row: FoldRow, s: Session, tracker: Tracker) -> None:
    """A fold's figures as fold_* metrics at its step, its loss curve, and its one summary line."""
    f = row.fold
    values = {f"fold_{k}": v for k, v in row.values().items() if k != "fold" and isinstance(v, (int, float))}
    tracker.log_metrics(values, step=f)
    # train_loss: one series over the run's optimiser steps, fold after fold (resumed runs too)
    first_step = sum(int(r.steps) for r in s.results.folds if r.fold < f)
    tracker.log_series("train_loss", s.results.losses.get(f, []), first_step=first_step)
    log.info(  # the fold's one line in a log (report.progress lines), with where the run is
        "fold %d/%d: %d tasks, %d steps, loss %.4f, train %.1fs, inference %.1fs, score %.3f; %s",
        f + 1,
        len(s.folds),
        row.tasks,
        row.steps,
        row.final_loss,
        row.train_seconds,
        row.inference_seconds,
        row.metrics.get("score", math.nan),
        s.progress.status(),
    )


def finished(task: Task, results: RunResults) -> bool:
    return all((task.id, i) in results.recorded for i in range(len(task.test)))


def report(s: Session, tracker: Tracker, start: float) -> None:
    """Scores, tables, the timeline and plots, and the run's metrics: on disk first, then to the tracker."""
    results, clock = s.results, s.clock
    with clock("scoring"):
        metrics = results.metrics()
        results.write_scores(s.run_dir)
        tables = results.write_tables(s.run_dir)
    train_tokens_total = sum(r.train_tokens for r in results.folds)
    train_seconds = clock.seconds.get("train", 0.0)
    budget = total_seconds(s.cfg.budget)
    metrics.update(
        {f"seconds_{k}": v for k, v in clock.seconds.items()},
        **worker_metrics(s.workers, results.folds),
        **results.fold_summary(),
        n_folds=len(s.folds),  # a metric: params hold settings only (`folds`, no `folds.k`)
        train_tokens=train_tokens_total,
        train_tokens_per_second=train_tokens_total / train_seconds if train_seconds else 0.0,
        seconds_total=time.perf_counter() - start,
        budget_cuts=len(results.events),
        **({"budget_seconds": budget} if budget is not None else {}),
    )
    results.timings = dict(clock.seconds)
    results.summary = metrics
    results.timeline = list(clock.spans)
    timeline = results.write_timeline(s.run_dir)
    plots = (
        write_run_plots(results, clock.spans, s.run_dir / "plots", s.cfg.report.render_tasks)
        if s.cfg.report.plots
        else []
    )
    try:  # the tracker must not mask what stopped the run (a signal, an error): its failure is only logged
        with clock("logging"):
            tracker.log_metrics(metrics)
            if results.events:
                tracker.set_tags({"arcfold.budget_cuts": describe_cuts(results.events)[:5000]})
            for path in [
                s.run_dir / "submission.json",
                s.run_dir / "scores.json",
                *tables.values(),
                timeline,
                s.run_dir / "workers.csv",
                s.run_dir / ".hydra" / "config.yaml",
            ]:
                tracker.log_artifact(path)
            for path in plots:
                tracker.log_artifact(path, str(path.parent.relative_to(s.run_dir)))
    except Exception as err:
        log.error("could not report to the tracker: %s", describe(err))


def worker_metrics(workers: dict[int, Any], folds: list[FoldRow]) -> dict[str, float]:
    """How busy the workers were, and what the folds lost to overhead (workers.csv and folds.csv have the lines)."""
    busy, idle = sum(w.busy_seconds for w in workers.values()), sum(w.idle_seconds for w in workers.values())
    fold_seconds = sum(r.fold_seconds for r in folds)
    return {
        "workers": len(workers),
        "worker_idle_share": idle / (busy + idle) if busy + idle else 0.0,
        "fold_overhead_share": sum(r.overhead_seconds for r in folds) / fold_seconds if fold_seconds else 0.0,
    }


def remaining_work(fold: Sequence[Task], cfg: Any, trained: bool, results: RunResults) -> FoldWork:
    """What a fold still has to do, for the budget: its training unless done, its unfinished test inputs."""
    return FoldWork(
        0.0 if trained else train_units(fold, cfg.train.epochs),
        sum(
            input_units(t, i, view_count(cfg.inference.n))
            for t in fold
            for i in range(len(t.test))
            if (t.id, i) not in results.recorded
        ),
    )


def adapters_disk(worker: Any, count: int, run_dir: Path) -> float:
    """Say up front what save_adapters will write, and warn if the disk will not hold it; megabytes."""
    megabytes = worker.trainable_parameters * worker.dtype_bytes * count / 2**20
    if not count:
        return megabytes
    free_mb = shutil.disk_usage(next(p for p in [run_dir, *run_dir.parents] if p.exists())).free / 2**20
    log.log(
        logging.WARNING if megabytes > free_mb else logging.INFO,
        "save_adapters: %d adapters, about %.1f MB on disk (%.0f MB free)",
        count,
        megabytes,
        free_mb,
    )
    return megabytes


def write_placeholder_submission(data: Any, run_dir: Path) -> None:
    """For a run stopped before it began (a config error): a valid all-placeholder submission, if the data loads."""
    path = Path(run_dir) / "submission.json"
    if path.exists():
        return
    try:
        _, everything = load_tasks(data)
    except ArcDataError:
        return  # the data itself is what is wrong: there is no task list to write a submission for
    RunResults(everything, everything).write_submission(path)
