"""One worker's share of a run: the base model loaded once, then fold after fold -- reset the adapter, train it on
the fold's tasks, predict them, save the adapter if asked -- each fold's outcome handed back as plain data.

The same FoldWorker runs in the pipeline's own process, in one worker process per device, or in a Ray actor
(arcfold.execute decides). It writes no run file but its folds' adapters: the parent alone writes the submission,
the tables and the tracker's records, from the outcomes.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcfold.data import ArcDataError, Task, make_views
from arcfold.data.codec import train_tokens
from arcfold.engine.candidates import TestPrediction
from arcfold.results import FoldRow, RunResults

log = logging.getLogger(__name__)


@dataclass
class FoldJob:
    """One fold as the queue hands it out."""

    fold: int
    tasks: list[Task]
    save_adapter: bool = False  # save_adapters chose this fold

    @property
    def cost(self) -> int:
        """Training tokens of one epoch: the queue hands out the costliest fold first."""
        return sum(train_tokens(t.train) for t in self.tasks)


@dataclass
class FoldOutcome:
    """What a fold produced, picklable: the parent merges it into the run's results."""

    fold: int
    predictions: dict[tuple[str, int], TestPrediction] = field(default_factory=dict)
    nll: dict[tuple[str, int], float] = field(default_factory=dict)
    base_nll: dict[tuple[str, int], float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # task id -> error
    row: dict[str, Any] | None = None  # the fold's folds.csv row; None when the fold failed
    seconds: dict[str, float] = field(default_factory=dict)  # train, inference, fold (all of it) in the worker


@dataclass
class WorkerInfo:
    device: str
    pid: int
    load_seconds: float  # the base model's load: once per worker
    trainable_parameters: int
    dtype_bytes: int  # the adapter's bytes per parameter when saved
    threads: int = 0  # torch's CPU threads in this worker


class FoldWorker:
    """The base model, loaded once on `device` (None: model.device), with a LoRA whose initial weights every
    fold starts from. `cfg` is the run's config as a plain mapping (it crosses process boundaries)."""

    def __init__(self, cfg: Any, run_dir: str | Path, device: str | None = None, progress: bool = True):
        import torch
        from omegaconf import OmegaConf

        # Looked up at call time, not import time: benchmarks and tests wrap these functions.
        from arcfold.engine import model as model_module
        from arcfold.engine.lora import AdapterReset, attach_lora, trainable_parameters
        from arcfold.engine.train import make_accelerator

        start = time.perf_counter()
        self.cfg = OmegaConf.create(cfg)
        if device is not None:
            self.cfg.model.device = device
        self.run_dir = Path(run_dir)
        self.progress = progress
        loaded = model_module.load_model(self.cfg.model, self.cfg.format.name,
                                         max_len={"train.max_len": self.cfg.train.max_len,
                                                  "inference.max_len": self.cfg.inference.max_len})
        self.codec, self.dtype = loaded.codec, loaded.dtype
        self.model = attach_lora(loaded.model, self.cfg.lora)
        self.fresh_adapter = AdapterReset(self.model)  # each fold starts from these weights; never a base reload
        self.accelerator = make_accelerator(self.cfg.train, loaded.device)
        # The model and the libraries live as long as the worker: freeze them out of the cyclic collector, so the
        # full collection after each fold (accelerate's free_memory) scans the fold's objects only (0.4 s -> ms).
        gc.collect()
        gc.freeze()
        self.info = WorkerInfo(str(loaded.device), os.getpid(), time.perf_counter() - start,
                               trainable_parameters(self.model), loaded.dtype.itemsize, torch.get_num_threads())

    def close(self) -> None:
        """Hand what the worker held back to the collector (a process that goes on after this worker)."""
        gc.unfreeze()

    def __call__(self, job: FoldJob) -> FoldOutcome:
        """Run one fold. An exception (out of memory, say) costs this fold only: its tasks are reported failed."""
        from arcfold.engine import train
        from arcfold.engine.lora import save_adapter

        f, tasks = job.fold, job.tasks
        start = time.perf_counter()
        self.fresh_adapter.reset(self.model)
        reset = time.perf_counter() - start
        results = RunResults(tasks, tasks, fold_of={t.id: f for t in tasks})  # the parent merges it into the run's
        try:
            stats = train.train_fold(self.model, self.codec, tasks, self.cfg.train, self.accelerator,
                                     progress=self.progress)
            trained = time.perf_counter()
            for task in tasks:
                predict_one(self.model, self.codec, task, self.cfg.inference, results)
        except Exception as err:
            log.error("fold %d failed, its tasks get placeholders: %s", f, err, exc_info=True)
            return FoldOutcome(f, failures={t.id: f"fold {f}: {type(err).__name__}: {err}" for t in tasks},
                               seconds={"fold": time.perf_counter() - start})
        inference = time.perf_counter() - trained
        if job.save_adapter:
            try:  # after the predictions: a full disk costs the adapter, not the fold's answers
                save_adapter(self.model, self.run_dir / "adapters" / f"fold_{f}", self.dtype)
            except OSError as err:
                log.error("fold %d: adapter not saved: %s", f, err)
        train_wall = trained - start - reset
        # Per-fold overhead: the adapter reset, and train_fold's time outside its optimiser loop (samples,
        # optimiser, schedule, accelerate's prepare and release).
        setup = train_wall - stats.seconds
        row = {**vars(FoldRow(f, len(tasks), stats.tokens, stats.steps, stats.seconds, inference,
                              stats.peak_memory_bytes / 2**20, stats.final_loss, stats.tokens_per_second)),
               "reset_seconds": reset, "setup_seconds": setup}
        return FoldOutcome(f, results.predictions, results.nll, results.base_nll, results.failures, row,
                           {"train": train_wall, "inference": inference, "fold": time.perf_counter() - start})


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


__all__ = ["FoldJob", "FoldOutcome", "FoldWorker", "WorkerInfo", "predict_one"]
