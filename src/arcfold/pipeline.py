"""One arcfold run, start to end: load, split into folds, train an adapter per fold, predict, score, report.

Read this file to see the whole run; each step's details live in the module it calls.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from arcfold.data import ArcDataError, Task, load_dataset, make_folds, make_views, select
from arcfold.data.codec import train_tokens
from arcfold.progress import Progress
from arcfold.results import FoldRow, RunResults

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Where a run reports (MLflow in practice; see arcfold.tracking). The pipeline never imports MLflow."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_series(self, key: str, values: Sequence[float], first_step: int = 0) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class NoTracker:
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_series(self, key: str, values: Sequence[float], first_step: int = 0) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


@dataclass
class Timings:
    """Wall seconds per phase (load, train, inference, scoring, logging), and every timed span for the timeline:
    phase, fold (None: the whole run), device, start and end in seconds from the run's start."""

    seconds: dict[str, float] = field(default_factory=dict)
    spans: list[dict[str, Any]] = field(default_factory=list)
    device: str = ""
    origin: float = field(default_factory=time.perf_counter)

    @contextmanager
    def __call__(self, phase: str, fold: int | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + end - start
            self.spans.append({"phase": phase, "fold": fold, "device": self.device,
                               "start": start - self.origin, "end": end - self.origin})


def load_tasks(data: Any) -> tuple[list[Task], list[Task]]:
    """(the tasks this run predicts, every task of the source). The submission covers the latter."""
    source = data.challenges or data.path or data.name
    everything = load_dataset(data.name, challenges=data.challenges, solutions=data.solutions, path=data.path,
                              on_invalid=data.on_invalid)
    chosen = select(everything, ids=list(data.task_ids) or None, limit=data.limit, order=data.order, source=source)
    if len(chosen) < len(everything):
        log.warning("running %d of the %d tasks of %s (data.limit / data.task_ids); the others get placeholders",
                    len(chosen), len(everything), source)
    return chosen, everything


def split(tasks: Sequence[Task], folds: Any, strategy: str, seed: int) -> list[list[Task]]:
    """`folds` is an int k or "per_task"."""
    if str(folds) == "per_task":
        return make_folds(tasks, None, "per_task")
    try:
        k = int(folds)
    except (TypeError, ValueError):
        raise ArcDataError(f"folds must be an integer or per_task, got {folds!r}", field="folds") from None
    return make_folds(tasks, k, strategy, seed, cost=lambda t: train_tokens(t.train))


def run(cfg: Any, run_dir: Path, tracker: Tracker | None = None) -> RunResults:
    # The engine is imported here, not at module top, so that config tests and `--help` stay torch-free.
    from arcfold.engine.lora import AdapterReset, attach_lora, trainable_parameters
    from arcfold.engine.model import load_model
    from arcfold.engine.train import make_accelerator
    from arcfold.report.runplots import write_run_plots

    tracker = tracker or NoTracker()
    run_dir = Path(run_dir)
    clock = Timings()
    start = time.perf_counter()

    with clock("load"):
        tasks, everything = load_tasks(cfg.data)
        folds = split(tasks, cfg.folds, cfg.split.strategy, cfg.split.seed)
        results = RunResults(tasks, everything)
        results.write_submission(run_dir / "submission.json")  # valid from the first second: all placeholders
        loaded = load_model(cfg.model, cfg.format.name, max_len={"train.max_len": cfg.train.max_len,
                                                                 "inference.max_len": cfg.inference.max_len})
        model = attach_lora(loaded.model, cfg.lora)
        fresh_adapter = AdapterReset(model)  # each fold starts from these weights; the base is never reloaded
        accelerator = make_accelerator(cfg.train, loaded.device)
    clock.device = str(loaded.device)
    clock.spans[-1]["device"] = clock.device  # the load span closed before the device was known
    saved_folds = {"none": set(), "last": {len(folds) - 1}, "all": set(range(len(folds)))}[cfg.save_adapters]
    adapters_mb = trainable_parameters(model) * loaded.dtype.itemsize * len(saved_folds) / 2**20
    tracker.log_metrics({"adapters_disk_mb": adapters_mb})
    log_adapter_disk(len(saved_folds), adapters_mb, run_dir)
    tracker.set_tags({"device": str(loaded.device)})
    log.info("%d tasks in %d folds on %s", len(tasks), len(folds), loaded.device)

    progress = Progress(cfg.report.progress, len(tasks), len(folds), cfg.report.progress_every)
    steps_logged = 0  # train_loss is one series over the run's optimiser steps, fold after fold
    try:
        with progress:
            for f, fold in enumerate(folds):
                progress.fold(f, len(fold))
                fresh_adapter.reset(model)
                try:
                    row = run_fold(f, fold, model, loaded.codec, cfg, accelerator, results, clock, run_dir,
                                   adapter_dtype=loaded.dtype if f in saved_folds else None, progress=progress)
                except Exception as err:  # one fold's failure (out of memory, say) must not cost the other folds
                    log.error("fold %d failed, its tasks get placeholders: %s", f, err, exc_info=True)
                    results.failures.update({t.id: f"fold {f}: {type(err).__name__}: {err}" for t in fold})
                    continue
                tracker.log_metrics({f"fold_{k}": v for k, v in row.items() if k != "fold"}, step=f)
                tracker.log_series("train_loss", results.losses[f], first_step=steps_logged)
                steps_logged += len(results.losses[f])
                log.info("fold %d/%d: %d tasks, %d steps, loss %.4f, train %.1fs, inference %.1fs, score %.3f",
                         f + 1, len(folds), len(fold), row["steps"], row["final_loss"], row["train_seconds"],
                         row["inference_seconds"], row.get("score", math.nan))
    finally:  # even on Ctrl-C, the scores and tables of the work done so far land beside the submission
        with clock("scoring"):
            metrics = results.metrics()
            results.write_scores(run_dir)
            tables = results.write_tables(run_dir)
    train_tokens_total = sum(r["train_tokens"] for r in results.folds)
    train_seconds = clock.seconds.get("train", 0.0)
    with clock("logging"):
        metrics.update({f"seconds_{k}": v for k, v in clock.seconds.items()}, **results.fold_summary(),
                       n_folds=len(folds),  # a metric: params hold settings only (`folds`, no `folds.k`)
                       train_tokens=train_tokens_total,
                       train_tokens_per_second=train_tokens_total / train_seconds if train_seconds else 0.0,
                       seconds_total=time.perf_counter() - start)
        tracker.log_metrics(metrics)
        results.timeline = list(clock.spans)
        for path in [run_dir / "submission.json", run_dir / "scores.json", *tables.values(),
                     results.write_timeline(run_dir), run_dir / ".hydra" / "config.yaml"]:
            tracker.log_artifact(path)
        if cfg.report.plots:
            for path in write_run_plots(results, clock.spans, run_dir / "plots", cfg.report.render_tasks):
                tracker.log_artifact(path, str(path.parent.relative_to(run_dir)))
    results.timings = dict(clock.seconds)
    results.summary = metrics
    return results


def run_fold(f: int, fold: Sequence[Task], model: Any, codec: Any, cfg: Any, accelerator: Any,
             results: RunResults, clock: Timings, run_dir: Path, adapter_dtype: Any = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Train the (freshly reset) adapter on one fold, predict the fold's tasks, then save the adapter in
    `adapter_dtype` (None: not saved); the fold's table row."""
    from arcfold.engine.lora import save_adapter
    from arcfold.engine.train import train_fold

    progress = progress or Progress("off", len(fold), 1)
    with clock("train", fold=f):
        stats = train_fold(model, codec, fold, cfg.train, accelerator, progress=False, on_step=progress.train_step)
    results.losses[f] = list(stats.losses)
    start = time.perf_counter()
    with clock("inference", fold=f):
        for task in fold:
            results.fold_of[task.id] = f
            predict_one(model, codec, task, cfg.inference, results)
            progress.task_done(task.id)
    results.write_submission(run_dir / "submission.json")  # after every fold: nothing computed is lost
    if adapter_dtype is not None:
        try:  # after the predictions: a full disk costs the adapter, not the fold's answers
            save_adapter(model, run_dir / "adapters" / f"fold_{f}", adapter_dtype)
        except OSError as err:
            log.error("fold %d: adapter not saved: %s", f, err)
    row = {**vars(FoldRow(f, len(fold), stats.tokens, stats.steps, stats.seconds, time.perf_counter() - start,
                          stats.peak_memory_bytes / 2**20, stats.final_loss, stats.tokens_per_second)),
           **results.metrics(fold)}
    results.folds.append(row)
    return row


def log_adapter_disk(count: int, megabytes: float, run_dir: Path) -> None:
    """Say up front what save_adapters will write, and warn if the disk will not hold it."""
    if not count:
        return
    free_mb = shutil.disk_usage(next(p for p in [run_dir, *run_dir.parents] if p.exists())).free / 2**20
    log.log(logging.WARNING if megabytes > free_mb else logging.INFO,
            "save_adapters: %d adapters, about %.1f MB on disk (%.0f MB free)", count, megabytes, free_mb)


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


def predict_one(model: Any, codec: Any, task: Task, inference: Any, results: RunResults) -> None:
    """Predict every test input of one task into `results`; a failure costs this task only (placeholders)."""
    from arcfold.engine.predict import predict_task
    from arcfold.engine.scoring import answer_nll

    try:
        for pred in predict_task(model, codec, task, inference):
            results.predictions[(task.id, pred.test_index)] = pred
        if task.has_solutions:
            views = make_views(task, 1, inference.scoring.seed, inference.scoring.colours)
            for i in range(len(task.test)):
                results.nll[(task.id, i)] = answer_nll(model, codec, task, i, views, inference.max_len)
                if inference.base_nll:
                    with model.disable_adapter():
                        results.base_nll[(task.id, i)] = answer_nll(model, codec, task, i, views, inference.max_len)
    except Exception as err:  # one task's bad input or OOM must not lose the rest of the run
        results.failures[task.id] = f"{type(err).__name__}: {err}"
        log.error("task %s failed, placeholders submitted: %s", task.id, results.failures[task.id],
                  exc_info=not isinstance(err, ArcDataError))
