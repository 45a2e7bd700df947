"""Where folds run: in this process, in one worker process per device, or in Ray actors -- one queue for all.

    devices=auto     every visible GPU, one worker each; on a CPU (or with model.device_map set) this process alone
    devices=N        the first N GPUs; on a CPU, N worker processes that split the cores (devices=2: a thread each)
    devices=[0,2]    these GPUs (entries may also read cuda:N or cpu)
    executor=ray     the same workers as Ray actors, one GPU each (arcfold.execute_ray)

Each worker loads the base model once and runs fold after fold (arcfold.worker). The queue hands the folds out
as workers come free, the costliest first (training tokens), and yields each outcome as it lands: the caller
alone writes files. A worker that dies (killed, out of host memory) costs only its current fold, which goes
back to the queue once for another worker; a fresh worker takes the dead one's device while folds remain.
<run dir>/workers.csv says what each worker is doing (pid, device, fold), rewritten at every change.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import re
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from arcfold.checkpoint import FoldOutcome
from arcfold.config import refuse
from arcfold.results import write_csv
from arcfold.worker import FoldJob, FoldWorker, Ledger, on_this_clock

log = logging.getLogger(__name__)

TRIES = 2  # a fold whose worker died is run once more; a second death records it as failed


@dataclass
class Ready:
    """A worker has loaded its model."""

    worker: int
    info: Any  # WorkerInfo


@dataclass
class Done:
    job: FoldJob
    outcome: FoldOutcome


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


Event = tuple[str, int, Any]  # (ready | report | done | error | failed | died, worker, payload)


class Pool(Protocol):
    """Workers on some substrate: started one per device slot, given one job at a time, reporting events."""

    def start(self, slot: int) -> tuple[int, int]: ...  # (worker id, pid or 0 if not known yet)
    def submit(self, worker: int, job: FoldJob) -> None: ...
    def events(self) -> list[Event]: ...  # blocks until at least one
    def close(self, wait: bool) -> None: ...  # wait: let idle workers exit; else (an error, a signal) stop them now


# --------------------------------------------------------------------------------------------- devices


def resolve_devices(spec: Any, model_device: str = "auto", device_map: str | None = None) -> list[str]:
    """The devices of a run's workers, one worker each, from `devices` (see the module docstring)."""
    if spec == "auto":
        if model_device != "auto" or device_map is not None:  # a chosen device, or one model over the GPUs
            return [model_device]
        return [f"cuda:{i}" for i in range(gpu_count())] or ["cpu"]
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        gpus = 0 if model_device == "cpu" else gpu_count()
        if not gpus:
            return ["cpu"] * spec
        if spec > gpus:
            raise refuse("devices", spec, f"at most the {gpus} visible GPUs")
        return [f"cuda:{i}" for i in range(spec)]
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec):
        names = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in spec]
        bad = [n for n in names if n != "cpu" and not re.fullmatch(r"cuda:\d+", n)]
        if bad:
            raise refuse("devices", list(spec), f"GPU indices, cuda:N or cpu ({bad[0]!r} is none)")
        gpus = gpu_count() if any(n != "cpu" for n in names) else 0
        missing = [n for n in names if n != "cpu" and int(n.split(":")[1]) >= gpus]
        if missing:
            raise refuse("devices", list(spec), f"the {gpus} visible GPUs ({missing[0]} is not one)")
        return names
    raise refuse("devices", spec, "auto, an integer >= 1 or a list of GPU indices (cuda:N, cpu)")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """Torch threads for each of `workers` on this machine: the cores (or $OMP_NUM_THREADS) split evenly.
    torch gives every process all cores by default, and processes that overcommit them crawl."""
    if threads:
        return threads
    budget = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    return max(1, budget // workers)


# --------------------------------------------------------------------------------------------- the queue


class Executor:
    """A run's workers, from `executor` and `devices`; a context manager (leaving it stops the workers). What the
    folds report as they go is applied to `ledger`, the run's (see arcfold.worker)."""

    def __init__(self, cfg: Any, run_dir: str | Path, ledger: Ledger):
        from omegaconf import OmegaConf

        self.ledger = ledger
        self.status = Path(run_dir) / "workers.csv"
        self.workers: dict[int, WorkerRow] = {}
        plain = OmegaConf.to_container(cfg, resolve=True)  # crosses process boundaries; no resolver needed there
        worker = functools.partial(FoldWorker, plain, str(run_dir), progress=False)
        if cfg.executor.name == "ray":
            from arcfold.execute_ray import RayActors

            self.pool: Pool = RayActors(cfg.executor, cfg.devices, worker)
            self.devices = self.pool.devices
            return
        self.devices = resolve_devices(cfg.devices, cfg.model.device, cfg.model.device_map)
        if len(self.devices) == 1:  # a worker process would only add its start-up
            device = self.devices[0]
            self.pool = InProcess(
                functools.partial(
                    FoldWorker, plain, str(run_dir), device=None if device == cfg.model.device else device
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
                    pool.submit(w, job)
                    running[w] = (job, time.perf_counter())
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
                    yield Done(job, account(payload, w, now - sent, tries[job.fold] + 1))
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


def account(outcome: FoldOutcome, worker: int, round_trip: float, attempt: int) -> FoldOutcome:
    """Add the queue's view to a fold's row: which worker, which try, and the per-fold overhead (adapter reset,
    training set-up, and the messaging: the round trip less the worker's own time)."""
    row = outcome.row
    queue = max(0.0, round_trip - row.get("worker_seconds", round_trip))
    overhead = row.get("reset_seconds", 0.0) + row.get("setup_seconds", 0.0) + queue
    row.update(
        worker=worker,
        attempt=attempt,
        fold_seconds=round_trip,
        queue_seconds=queue,
        overhead_seconds=overhead,
        overhead_share=overhead / round_trip if round_trip else 0.0,
    )
    return outcome


# --------------------------------------------------------------------------------------------- pools


class InProcess:
    """The one worker is this process: the model loads when started, a fold runs when its event is asked for
    (so the caller has merged every earlier fold before the next one starts)."""

    def __init__(self, factory: Callable[[], FoldWorker], ledger: Ledger, threads: int | None = None):
        self.factory, self.ledger, self.threads = factory, ledger, threads
        self.worker: FoldWorker | None = None
        self.job: FoldJob | None = None
        self.previous_threads = 0

    def start(self, slot: int) -> tuple[int, int]:
        if self.threads:  # executor.threads; else torch's default (every core) stays
            import torch

            self.previous_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        self.worker = self.factory()
        return 0, os.getpid()

    def submit(self, worker: int, job: FoldJob) -> None:
        self.job = job

    def events(self) -> list[Event]:
        assert self.worker is not None
        if self.job is None:
            return [("ready", 0, self.worker.info)]
        job, self.job = self.job, None
        return [("done", 0, self.worker(job, self.ledger))]

    def close(self, wait: bool) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.previous_threads:  # the process goes on (a sweep's next job under the basic launcher)
            import torch

            torch.set_num_threads(self.previous_threads)


class Processes:
    """One spawned process per worker: a fresh interpreter whose device is fixed before CUDA initialises."""

    def __init__(self, devices: Sequence[str], factory: Callable[..., FoldWorker], threads: int):
        self.devices, self.factory, self.threads = list(devices), factory, threads
        self.context = multiprocessing.get_context("spawn")  # fork would copy a parent's CUDA or thread state
        self.live: dict[int, tuple[Any, Connection]] = {}
        self.ready: set[int] = set()
        self.count = 0

    def start(self, slot: int) -> tuple[int, int]:
        ours, theirs = self.context.Pipe()
        worker, self.count = self.count, self.count + 1
        process = self.context.Process(
            target=serve,
            args=(theirs, self.devices[slot], self.threads, self.factory),
            name=f"arcfold-worker-{worker}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self.live[worker] = (process, ours)
        return worker, process.pid or 0

    def submit(self, worker: int, job: FoldJob) -> None:
        self.live[worker][1].send(job)

    def events(self) -> list[Event]:
        by_handle = {h: w for w, (p, c) in self.live.items() for h in (c, p.sentinel)}
        found: list[Event] = []
        for handle in wait(list(by_handle)):
            w = by_handle[handle]
            if w not in self.live:
                continue
            process, conn = self.live[w]
            ended = handle is process.sentinel
            try:
                while conn.poll():  # what a worker sent just before it ended still counts
                    kind, payload = conn.recv()
                    found.append((kind, w, payload))
                    if kind == "ready":
                        self.ready.add(w)
            except (EOFError, OSError):  # its end of the pipe closed: it is exiting
                ended = True
            if ended:
                process.join()
                del self.live[w]
                conn.close()
                if not any(kind == "failed" for kind, v, _ in found if v == w):
                    found.append(("died", w, exit_reason(process.exitcode)))
        return found

    def close(self, wait: bool) -> None:
        for _, conn in self.live.values():
            try:
                conn.send(None)  # exit: an idle worker does at once
            except OSError:
                pass
        deadline = time.monotonic() + (10 if wait else 0)
        for w, (process, conn) in self.live.items():
            if w in self.ready:
                process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():  # still loading, or busy (the run stops on an error or a signal): stop it now
                process.kill()
                process.join()
            conn.close()
        self.live.clear()


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def serve(conn: Connection, device: str, threads: int, factory: Callable[..., FoldWorker]) -> None:
    """A worker process: fix its device and threads, load the model once, run the folds the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    label = device
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if device.startswith("cuda"):  # CUDA reads this when it initialises: this process sees one GPU, as cuda:0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = int(device.split(":")[1])
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        device = "cuda:0"
    torch = sys.modules.get("torch")  # else it reads OMP_NUM_THREADS when the worker imports it
    if torch is not None:  # imported already, by the parent's main module re-imported here
        torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.INFO, format=f"[worker {os.getpid()} {label}] %(levelname)s %(name)s: %(message)s"
    )
    try:
        worker = factory(device=device)
    except Exception as err:
        conn.send(("failed", picklable(err)))
        return
    conn.send(("ready", worker.info))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        ledger = Ledger(job.planner, send=lambda name, args: conn.send(("report", (name, args))))
        try:
            conn.send(("done", worker(on_this_clock(job), ledger)))
        except Exception as err:  # on_error=fail: the parent stops the run
            log.error("fold %d failed: %s", job.fold, err, exc_info=True)
            conn.send(("error", picklable(err)))


def picklable(err: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


__all__ = ["Done", "Executor", "Lost", "Ready", "WorkerRow", "resolve_devices", "threads_per_worker"]
