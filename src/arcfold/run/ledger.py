"""A fold as the queue hands it out (FoldJob), and where it reports as it goes (Ledger): in the run's process the
run's own results, checkpoint, submission and planner; in a worker process, a copy of the planner whose every change
is also sent to the parent, which applies it to the run's ledger. So the parent alone writes the submission, the
checkpoint, the tables and the tracker's records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from arcfold.data import Task
from arcfold.data.codec import train_tokens
from arcfold.run.budget import FoldPlan, Planner, Step
from arcfold.run.checkpoint import Checkpoint
from arcfold.run.records import InputRecord, TrainingRecord
from arcfold.run.results import RunResults


@dataclass
class FoldJob:
    """One fold as the queue hands it out; `begin` fills in what the run knows when the fold starts."""

    fold: int
    tasks: list[Task]
    save_adapter: bool = False  # save_adapters chose this fold
    plan: FoldPlan | None = None  # the budget's slice for this fold
    planner: Planner | None = None  # the run's planner (a worker process gets a copy)
    training: TrainingRecord | None = None  # an earlier session trained this fold already
    finished: list[InputRecord] = field(default_factory=list)  # test inputs an earlier session finished
    adapter_dir: str = ""  # the checkpoint's adapter folder of this fold
    sent: float = 0.0  # the parent's clock at dispatch: a worker on another machine shifts the plan by its offset

    @property
    def cost(self) -> int:
        """Training tokens of one epoch: the queue hands out the costliest fold first."""
        return sum(train_tokens(t.train) for t in self.tasks)

    def begin(self, planner: Planner, store: Checkpoint) -> FoldJob:
        self.sent = time.perf_counter()
        self.plan, self.planner = planner.start_fold(self.fold, self.sent), planner
        self.training, self.finished = store.training(self.fold), store.inputs(self.fold)
        self.adapter_dir = str(store.adapter_dir(self.fold))
        return self


class Ledger:
    """Where a fold reports as it goes. The run's ledger (store and results given) applies every report; a
    worker's (`send` given) applies the planner's part to its copy and sends each report on to the run's."""

    def __init__(
        self,
        planner: Planner | None,
        store: Checkpoint | None = None,
        results: RunResults | None = None,
        send: Callable[[str, tuple], None] | None = None,
        on_input: Callable[[InputRecord], None] | None = None,
        on_span: Callable[[int, str, str, float], None] | None = None,
    ):
        self.planner, self.store, self.results, self.send = planner, store, results, send
        self.on_input = on_input  # the run's progress: called for each test input that lands
        self.on_span = on_span  # the run's timeline: (fold, phase, device, seconds) as each phase of a fold ends

    def report(self, name: str, *args: Any) -> None:
        self.apply(name, args)
        if self.send is not None:
            self.send(name, args)

    def apply(self, name: str, args: tuple) -> None:
        """One report: planner measurements and cuts, a training record, a test input's record, a phase's span."""
        if name == "input" and self.results is not None and self.store is not None:
            (rec,) = args
            self.results.add_input(rec)
            self.store.save_input(rec)
            self.results.write_submission(self.store.run_dir / "submission.json")
            if self.on_input is not None:
                self.on_input(rec)
        elif name == "training" and self.store is not None:
            self.store.save_training(*args)
            f, record = args
            if self.results is not None and record.stats is not None:  # the loss curve of the run's plots
                self.results.losses[f] = list(record.stats.get("losses", []))
        elif name == "events" and self.planner is not None:  # cuts a worker's copy decided (idempotent)
            events, level = args
            self.planner.events += [e for e in events if e not in self.planner.events]
            self.planner.level = max(self.planner.level, level)
        elif name == "span" and self.on_span is not None:
            self.on_span(*args)
        elif name in ("observe_train", "skip_train", "observe_input", "record") and self.planner is not None:
            getattr(self.planner, name)(*args)

    def next_input(self, f: int, plan: FoldPlan, units: float, where: str) -> Step:
        assert self.planner is not None
        before = len(self.planner.events)
        step = self.planner.next_input(f, plan, units, time.perf_counter(), where)
        if self.send is not None and len(self.planner.events) > before:
            self.send("events", (self.planner.events[before:], self.planner.level))
        return step


def on_this_clock(job: FoldJob) -> FoldJob:
    """A job that came from another process, perhaps another machine: its budget's times moved onto this
    process's clock (time.perf_counter's origin differs between machines)."""
    offset = time.perf_counter() - job.sent
    if job.planner is not None:
        job.planner.start += offset
        if job.planner.write_by is not None:
            job.planner.write_by += offset
    if job.plan is not None and job.plan.end is not None:
        job.plan.end += offset
    return job
