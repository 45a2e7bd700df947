"""Where workers live: this process (InProcess) or one spawned process per device (Processes). A pool starts
workers, hands each one job at a time and reports what they send as events.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Protocol, Sequence

from arcfold.run.ledger import FoldJob, Ledger, on_this_clock
from arcfold.run.progress import quiet_libraries
from arcfold.run.worker import FoldWorker

log = logging.getLogger(__name__)


Event = tuple[str, int, Any]  # (ready | report | done | error | failed | died, worker, payload)


class Pool(Protocol):
    """Workers on some substrate: started one per device slot, given one job at a time, reporting events."""

    def start(self, slot: int) -> tuple[int, int]: ...  # (worker id, pid or 0 if not known yet)
    def submit(self, worker: int, job: FoldJob) -> None: ...
    def events(self) -> list[Event]: ...  # blocks until at least one
    def close(self, wait: bool) -> None: ...  # wait: let idle workers exit; else (an error, a signal) stop them now


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
    quiet_libraries(bars=False)  # a worker process draws no bars
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
