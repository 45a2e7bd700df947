"""The fold queue: a run's workers, from `executor` and `devices`, handed folds as they come free, the costliest
first, with each outcome yielded as it lands (the caller alone writes files).

    devices=auto     every visible GPU, one worker each (whatever model.device names); on a CPU, with
                     model.device=cpu or with model.device_map set, this process alone
    devices=N        the first N GPUs; on a CPU, N worker processes that split the cores (devices=2: a thread each)
    devices=[0,2]    these GPUs (entries may also read cuda:N or cpu); a card twice only with
                     executor.share_devices=true (arcfold.orchestrate.devices)
    executor=ray     the same workers as Ray actors, one GPU each (arcfold.orchestrate.ray_actors)

Each worker loads the base model once and runs fold after fold (arcfold.run.worker). A worker that dies (killed,
out of host memory) costs only its current fold, which goes back to the queue once for another worker; a fresh
worker takes the dead one's device while folds remain. <run dir>/workers.csv says what each worker is doing (pid,
device, fold), rewritten at every change.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from arcfold.orchestrate.devices import resolve_devices, threads_per_worker
from arcfold.orchestrate.pools import InProcess, Pool, Processes
from arcfold.run.ledger import FoldJob, Ledger
from arcfold.run.progress import shows_bars
from arcfold.run.records import FoldReport
from arcfold.run.results import write_csv
from arcfold.run.worker import Engine, FoldWorker

log = logging.getLogger(__name__)


TRIES = 2  # a fold whose worker died is run once more; a second death records it as failed


@dataclass
class Ready:
    """A worker has loaded its model."""

    worker: int
    info: Any  # WorkerInfo


@dataclass
class Done:
    """A fold its worker finished, with the queue's view of it."""

    job: FoldJob
    report: FoldReport
    worker: int
    attempt: int  # 1, or 2 when a first worker died during it
    round_trip: float  # dispatch to report, on the run's clock


@dataclass
class Lost:
    """A fold whose worker died on every try."""

    job: FoldJob
    reason: str


@dataclass
class WorkerRow:
    """One line of workers.csv."""

    worker: int
    device: str
    pid: int = 0
    threads: int = 0
    state: str = "starting"  # starting | idle | fold N | finished | died (...)
    folds: int = 0
    startup_seconds: float = float("nan")  # the process's start and the model's load
    busy_seconds: float = 0.0
    idle_seconds: float = 0.0  # ready but without a fold (until the run's end or the worker's death)
    slot: int = field(default=0, repr=False)  # index into the device list
    started: float = field(default=0.0, repr=False)
    ready: float | None = field(default=None, repr=False)

    def table_row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("slot", "started", "ready")}


class Executor:
    """A run's workers, from `executor` and `devices`; a context manager (leaving it stops the workers). What the
    folds report as they go is applied to `ledger`, the run's (see arcfold.run.ledger)."""

    def __init__(self, cfg: Any, run_dir: str | Path, ledger: Ledger, engine: Engine):
        from omegaconf import OmegaConf

        self.ledger = ledger
        self.status = Path(run_dir) / "workers.csv"
        self.workers: dict[int, WorkerRow] = {}
        plain = OmegaConf.to_container(cfg, resolve=True)  # crosses process boundaries; no resolver needed there
        worker = functools.partial(FoldWorker, plain, str(run_dir), engine, progress=False)
        if cfg.executor.name == "ray":
            from arcfold.orchestrate.ray_actors import RayActors

            self.pool: Pool = RayActors(cfg.executor, cfg.devices, worker)
            self.devices = self.pool.devices
            return
        self.devices = resolve_devices(
            cfg.devices, cfg.model.device, cfg.model.device_map, share=cfg.executor.share_devices
        )
        if len(self.devices) == 1:  # a worker process would only add its start-up
            device = self.devices[0]
            self.pool = InProcess(
                functools.partial(
                    FoldWorker,
                    plain,
                    str(run_dir),
                    engine,
                    device=None if device == cfg.model.device else device,
                    progress=shows_bars(cfg.report.progress),  # the training bar: live only where bars are
                ),
                ledger,
                cfg.executor.threads,
            )
        else:
            self.pool = Processes(self.devices, worker, threads_per_worker(len(self.devices), cfg.executor.threads))

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, error: Any, *rest: Any) -> None:
        self.pool.close(wait=error is None)

    def run(
        self, jobs: Sequence[FoldJob], begin: Callable[[FoldJob], FoldJob] = lambda job: job
    ) -> Iterator[Ready | Done | Lost]:
        """Every job, to whichever worker is free, the costliest first (`begin` completes it as it is handed
        out); events as they happen."""
        pool = self.pool
        # The costliest first, so that no long fold starts last while the other workers idle; one worker's
        # total time does not depend on the order, and it keeps the folds' own.
        pending = deque(sorted(jobs, key=lambda j: j.cost, reverse=True) if len(self.devices) > 1 else jobs)
        tries: Counter[int] = Counter()
        running: dict[int, tuple[FoldJob, float]] = {}

        def start(slot: int) -> None:
            started = time.perf_counter()
            worker, pid = pool.start(slot)
            self.workers[worker] = WorkerRow(worker, self.devices[slot], pid, slot=slot, started=started)

        def dispatch() -> None:  # before the caller sees an event: a worker never waits on the caller's writing
            for w, row in self.workers.items():
                if row.state == "idle" and pending:
                    job = begin(pending.popleft())
                    running[w] = (job, time.perf_counter())  # before the send: the round trip covers the worker's time
                    pool.submit(w, job)
                    row.state = f"fold {job.fold}"
            self.write_status()

        for slot in range(len(self.devices)):
            start(slot)
        while pending or running:
            dispatch()
            if not running and not any(r.state == "starting" for r in self.workers.values()):
                raise RuntimeError(
                    f"every worker died before loading its model; {len(pending)} folds not run (see {self.status})"
                )
            for kind, w, payload in pool.events():
                row, now = self.workers[w], time.perf_counter()
                if kind in ("failed", "error"):  # the model did not load (every worker would fail alike), or a
                    raise payload  # fold failed under on_error=fail: the run stops
                if kind == "report":  # a test input landed, a training ended, the budget measured or cut
                    self.ledger.apply(*payload)
                elif kind == "ready":
                    row.ready, row.state, row.pid, row.threads = now, "idle", payload.pid, payload.threads
                    row.startup_seconds = now - row.started
                    dispatch()
                    yield Ready(w, payload)
                elif kind == "done":
                    job, sent = running.pop(w)
                    row.busy_seconds += now - sent
                    row.folds += 1
                    row.state = "idle"
                    dispatch()
                    yield Done(job, payload, w, tries[job.fold] + 1, now - sent)
                elif kind == "died":
                    row.state = f"died ({payload})"
                    row.idle_seconds = idle(row, now)
                    lost, sent = running.pop(w, (None, now))
                    row.busy_seconds += now - sent
                    if lost is not None:
                        job = lost
                        tries[job.fold] += 1
                        log.error(
                            "worker %d (%s, pid %d) died during fold %d: %s", w, row.device, row.pid, job.fold, payload
                        )
                        if tries[job.fold] < TRIES:
                            pending.appendleft(job)
                        else:
                            yield Lost(job, f"its worker died {TRIES} times (last: {payload})")
                    if row.ready is not None and pending:
                        start(row.slot)  # the device is free again: a fresh worker loads the model there
                    dispatch()
        now = time.perf_counter()
        for row in self.workers.values():
            if not row.state.startswith("died"):
                row.state, row.idle_seconds = "finished", idle(row, now)
        self.write_status()

    def write_status(self) -> None:
        """workers.csv, replaced whole (it is read while the run goes on)."""
        rows = [r.table_row() for r in self.workers.values()]
        os.replace(write_csv(self.status.with_name(f".{self.status.name}.tmp"), rows), self.status)


def idle(row: WorkerRow, now: float) -> float:
    return 0.0 if row.ready is None else max(0.0, now - row.ready - row.busy_seconds)
