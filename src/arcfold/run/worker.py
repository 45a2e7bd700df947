"""One worker's share of a run: the base model loaded once, then fold after fold -- reset (or restore) the adapter,
train it on the fold's tasks within the budget, predict their unfinished test inputs, save the adapter if asked.

The same FoldWorker runs in the pipeline's own process, in one worker process per device, or in a Ray actor
(arcfold.orchestrate decides). Everything a fold reports as it goes -- each test input's record, the training
record, the budget's measurements -- goes through its Ledger: in the pipeline's process the run's own (results,
checkpoint, submission, planner); in a worker, a copy of the planner whose every change is also sent to the
parent, which applies it to the run's ledger. So the parent alone writes the submission, the checkpoint, the
tables and the tracker's records; a worker writes only adapters (into the checkpoint and adapters/).
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from arcfold.data import ArcDataError, Task, make_views
from arcfold.data.augment import view_count
from arcfold.engine.candidates import with_base_answers
from arcfold.engine.lora import (
    AdapterReset,
    attach_lora,
    load_adapter_weights,
    save_adapter,
    trainable_parameters,
    trained_rows,
)
from arcfold.engine.model import load_model, select_device
from arcfold.engine.predict import predict_task
from arcfold.engine.scoring import answer_nll
from arcfold.engine.train import make_accelerator, train_fold, use_checkpointing
from arcfold.run.budget import FoldPlan, Step, degraded, input_units
from arcfold.run.failures import describe, free_memory, memory_retry, out_of_memory, skips
from arcfold.run.ledger import FoldJob, Ledger
from arcfold.run.records import FoldReport, InputRecord, TrainingRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    """The engine's functions a fold worker calls (arcfold.engine's, unless others are handed in): a benchmark that
    times them or a test that injects a fault passes its own instead of patching modules."""

    select_device: Callable[[str], None] = select_device  # before load_model: a named card becomes the current one
    load_model: Callable[..., Any] = load_model
    train_fold: Callable[..., Any] = train_fold
    predict_task: Callable[..., Any] = predict_task
    answer_nll: Callable[..., float] = answer_nll


ENGINE = Engine()  # arcfold.engine's own functions: what every run uses


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

    def __init__(self, cfg: Any, run_dir: str | Path, engine: Engine, device: str | None = None, progress: bool = True):
        start = time.perf_counter()
        self.cfg = OmegaConf.create(cfg)
        if device is not None:
            self.cfg.model.device = device
        self.run_dir, self.engine, self.progress = Path(run_dir), engine, progress
        engine.select_device(self.cfg.model.device)
        loaded = engine.load_model(
            self.cfg.model,
            self.cfg.format.name,
            max_len={"train.max_len": self.cfg.train.max_len, "inference.max_len": self.cfg.inference.max_len},
        )
        self.codec, self.dtype = loaded.codec, loaded.dtype
        # lora.train_embeddings: every row of a vocabulary that is the format's own, else the format's tokens' rows
        rows = trained_rows(self.cfg.model, loaded.codec.token_ids)
        self.model = attach_lora(loaded.model, self.cfg.lora, rows)
        self.fresh_adapter = AdapterReset(self.model)  # each fold starts from these weights; never a base reload
        self.accelerator = make_accelerator(self.cfg.train, loaded.device)
        self.retried = ""  # what the current fold's out-of-memory retry changed (see fit)
        # train.gradient_checkpointing=auto is decided here, once: on for a Hugging Face model, off for the tiny one.
        setting = self.cfg.train.gradient_checkpointing
        self.cfg.train.gradient_checkpointing = use_checkpointing(setting, self.cfg.model.kind)
        log.info(
            "gradient checkpointing %s (train.gradient_checkpointing=%s, model.kind=%s)",
            "on" if self.cfg.train.gradient_checkpointing else "off",
            setting,
            self.cfg.model.kind,
        )
        # The model and the libraries live as long as the worker: freeze them out of the cyclic collector, so the
        # full collection after each fold (accelerate's free_memory) scans the fold's objects only (0.4 s -> ms).
        gc.collect()
        gc.freeze()
        self.info = WorkerInfo(
            str(loaded.device),
            os.getpid(),
            time.perf_counter() - start,
            trainable_parameters(self.model),
            loaded.dtype.itemsize,
            torch.get_num_threads(),
        )

    def close(self) -> None:
        """Hand what the worker held back to the collector (a process that goes on after this worker)."""
        gc.unfreeze()

    def __call__(self, job: FoldJob, ledger: Ledger) -> FoldReport:
        """Train (or restore) the fold's adapter, predict its unfinished test inputs; the fold's report. A failure
        stops the run, or under on_error=skip costs only its task or its fold's adapter (recorded)."""
        start = time.perf_counter()
        f, fold, plan = job.fold, job.tasks, job.plan or FoldPlan(None, None, None)
        self.fresh_adapter.reset(self.model)
        reset = time.perf_counter() - start
        training, setup = self.train(job, ledger, plan)
        ledger.report("span", f, "train", self.info.device, time.perf_counter() - start - reset)
        # A failed training (skipped) leaves the base model, or placeholders without train_fallback.
        inherited = (
            f"{training.error} ({'base model answers' if self.cfg.train_fallback else 'placeholders'})"
            if training.error
            else ""
        )
        records = list(job.finished)  # finished by an earlier session
        predicted = time.perf_counter()
        # An adapter that took no step (train.epochs=0, a failed or skipped training) is the base model already.
        hedge = self.cfg.inference.base_attempt and bool(training.stats and training.stats["steps"])
        for task in fold:
            self.predict_one(f, task, ledger, plan, inherited, records, hedge)
        inference = time.perf_counter() - predicted
        ledger.report("span", f, "inference", self.info.device, inference)
        if job.save_adapter and training.stats is not None:
            try:  # after the predictions: a full disk costs the adapter, not the fold's answers
                save_adapter(self.model, self.run_dir / "adapters" / f"fold_{f}", self.dtype)
            except OSError as err:
                log.error("fold %d: adapter not saved: %s", f, err)
        return FoldReport(
            fold=f,
            tasks=len(fold),
            training=training,
            inference_seconds=inference,
            projected_seconds=plan.projected_total,
            reset_seconds=reset,
            setup_seconds=setup,
            worker_seconds=time.perf_counter() - start,
            inputs=records,
            events=[e for e in ledger.planner.events if e["fold"] == f] if ledger.planner else [],
        )

    def train(self, job: FoldJob, ledger: Ledger, plan: FoldPlan) -> tuple[TrainingRecord, float]:
        """The fold's adapter: restored from the checkpoint, trained (within the budget's cap), or, when training
        fails under on_error=skip or the budget leaves it no time, the base model (the reset adapter); and the
        seconds training spent outside its optimiser loop."""
        f, fold, setup = job.fold, job.tasks, 0.0
        if job.training is not None:  # trained by an earlier session
            if job.training.stats is not None:
                load_adapter_weights(self.model, job.adapter_dir)
            log.info("fold %d: adapter from an earlier session", f)
            ledger.report("training", f, job.training)
            return job.training, setup
        if plan.train_seconds is not None and plan.train_seconds <= 0:
            ledger.report("skip_train", f)
            ledger.report("record", f, f"fold {f} training", "train", "no time left in the fold's slice: base model")
            record = TrainingRecord(None, cut="skipped: no time left")
        else:
            log.info("fold %d: training on %d tasks", f, len(fold))
            start = time.perf_counter()
            try:
                stats = self.fit(f, fold, plan.train_seconds)
            except Exception as err:  # out of memory twice, say: under on_error=skip it costs this fold's adapter
                if not skips(self.cfg):
                    raise
                after = f" (after an out-of-memory retry with {self.retried})" if self.retried else ""
                record = TrainingRecord(None, error=f"fold {f} training: {describe(err)}{after}", retried=self.retried)
                log.error(
                    "%s; its tasks get %s\n%s",
                    record.error,
                    "the base model's answers" if self.cfg.train_fallback else "placeholders",
                    traceback.format_exc(),
                )
            else:
                setup = time.perf_counter() - start - stats.seconds
                record = TrainingRecord(vars(stats), retried=self.retried)
                ledger.report(
                    "observe_train",
                    f,
                    stats.steps / stats.planned_steps if stats.planned_steps else 1.0,
                    time.perf_counter() - start,
                )
                if stats.steps < stats.planned_steps:
                    record.cut = f"stopped after {stats.steps} of {stats.planned_steps} steps"
                    ledger.report(
                        "record",
                        f,
                        f"fold {f} training",
                        "train",
                        f"{record.cut}: the fold's training share ({plan.train_seconds:.1f} s) is spent",
                    )
        if record.stats is None:
            self.fresh_adapter.reset(self.model)  # the initial adapter adds nothing: the base model's answers
            # What the failed step held (an OOM's activations) goes before inference. Its traceback was logged as
            # text, not exc_info: a handler that keeps records (pytest's, a MemoryHandler) would pin those frames.
            free_memory()
        elif job.adapter_dir:  # in fp32, whatever the model's dtype: a resume must reload exactly what was trained
            save_adapter(self.model, job.adapter_dir, torch.float32)
        ledger.report("training", f, record)
        return record, setup

    def fit(self, f: int, tasks: list[Task], max_seconds: float | None) -> Any:
        """The fold's training (engine.train_fold). One that runs out of memory (torch.OutOfMemoryError) is retried
        once, from the fresh adapter, with gradient checkpointing on and a smaller micro-batch at the same effective
        batch (run.failures.memory_retry), in the time its share has left; self.retried says what changed."""
        start, self.retried = time.perf_counter(), ""
        try:
            return self.train_with(tasks, self.cfg.train, max_seconds)
        except Exception as err:
            settings = memory_retry(self.cfg.train) if out_of_memory(err) else {}
            if not settings:
                raise
            first = describe(err)
        # Past the except block, the failed step's frames (and the tensors they hold) are gone: free them for good.
        free_memory()
        self.retried = ", ".join(f"train.{key}={value}" for key, value in settings.items())
        log.warning("fold %d ran out of memory (%s); retrying once with %s", f, first, self.retried)
        self.fresh_adapter.reset(self.model)
        train = copy.deepcopy(self.cfg.train)
        for key, value in settings.items():
            setattr(train, key, value)
        left = None if max_seconds is None else max(0.0, max_seconds - (time.perf_counter() - start))
        return self.train_with(tasks, train, left)

    def train_with(self, tasks: list[Task], train: Any, max_seconds: float | None) -> Any:
        """engine.train_fold with these training settings (the accelerator's accumulation follows grad_accum)."""
        accumulation = self.accelerator.gradient_accumulation_steps
        self.accelerator.gradient_accumulation_steps = train.grad_accum
        try:
            return self.engine.train_fold(
                self.model, self.codec, tasks, train, self.accelerator, progress=self.progress, max_seconds=max_seconds
            )
        finally:
            self.accelerator.gradient_accumulation_steps = accumulation

    def predict_one(
        self,
        f: int,
        task: Task,
        ledger: Ledger,
        plan: FoldPlan,
        inherited: str,
        records: list[InputRecord],
        hedge: bool,
    ) -> None:
        """Predict the task's unfinished test inputs; each is reported (checkpointed and submitted) as it lands.
        hedge: the base model's answers alternate with the trained adapter's (inference.base_attempt).

        A failure (under on_error=skip) costs this task's remaining inputs only: they get placeholders."""
        finished = {r.index for r in records if r.task == task.id}
        error = ""
        for i in range(len(task.test)):
            if i in finished:
                continue
            full_views = view_count(self.cfg.inference.n)
            units = input_units(task, i, full_views)
            step = (
                ledger.next_input(f, plan, units, f"task {task.id} test {i}")
                if ledger.planner is not None
                else Step(0, (), None)
            )
            rec = InputRecord(task.id, i, f, cut=",".join(step.cuts), error=error or inherited)
            start = time.perf_counter()
            failed = False
            if not (error or step.placeholders or (inherited and not self.cfg.train_fallback)):
                try:
                    rec.prediction, rec.nll, rec.base_nll = self.predict_input(task, i, step, full_views, hedge)
                except Exception as err:  # one input's bad data or OOM: under on_error=skip, it costs this task
                    if not skips(self.cfg):
                        raise
                    error = rec.error = f"test {i}: {describe(err)}"
                    failed = True
                    log.error(
                        "task %s %s; placeholders submitted%s",
                        task.id,
                        error,
                        "" if isinstance(err, ArcDataError) else "\n" + traceback.format_exc(),
                    )
            if failed:
                free_memory()
            ledger.report("observe_input", f, step, units, time.perf_counter() - start)
            records.append(rec)
            ledger.report("input", rec)

    def predict_input(
        self, task: Task, i: int, step: Step, full_views: int, hedge: bool
    ) -> tuple[Any, float | None, float | None]:
        """Test input i's prediction under the budget's step (hedged: with the base model's answers alternated in),
        and the true output's NLL (with and without TTT)."""
        inference = self.cfg.inference
        settings, n_views = degraded(step, self.cfg.budget, inference, full_views)
        if settings:
            inference = copy.deepcopy(inference)
            for key, value in settings.items():
                *parents, name = key.split(".")
                setattr(functools.reduce(getattr, parents, inference), name, value)
        views = make_views(task, inference.n, inference.seed, inference.colours, inference.shuffle_demos)
        # The NLL under the first 8 generation views, whatever the budget cut: the DFS's prompt caches serve both.
        nll_views = views[: view_count(1)] if task.has_solutions else []
        pred = self.engine.predict_task(
            self.model, self.codec, task, inference, views=views[:n_views], indices=[i], nll_views=nll_views
        )[0]
        base_nll = None
        if hedge or (nll_views and inference.base_nll):  # the base model alone: other keys and values, own prompts
            with self.model.disable_adapter():
                if hedge:  # the answer without TTT, in views of its own colours (a no-TTT run's by default)
                    base_views = make_views(
                        task, inference.n, inference.seed, inference.base_colours, inference.shuffle_demos
                    )
                    base = self.engine.predict_task(
                        self.model, self.codec, task, inference, views=base_views[:n_views], indices=[i]
                    )[0]
                    pred = with_base_answers(pred, base)
                if nll_views and inference.base_nll:
                    base_nll = self.engine.answer_nll(self.model, self.codec, task, i, nll_views, inference.max_len)
        return pred, pred.answer_nll, base_nll
