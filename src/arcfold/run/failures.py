"""Failures that are seen: the on_error policy, an out-of-memory retry's settings, freeing memory after an error,
signals, and how a run ends.

on_error=auto skips for data=kaggle and fails elsewhere. A submission must land whatever happens (a crashed or
timed-out one scores nothing, a placeholder answer only loses that task); an experiment must not: a fold that
quietly became placeholders reads as a bad config, so there the first error stops the run, loudly. A skipped
failure is recorded per task (tasks.csv `error`, folds.csv `error`, metric `failed_tasks`), and the MLflow run
of a run with failures ends FAILED with the tag arcfold.outcome=completed_with_failures, never FINISHED.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def skips(cfg: Any) -> bool:
    """Whether a failure costs only its task or fold (True) or stops the run (False)."""
    return cfg.on_error == "skip" or (cfg.on_error == "auto" and cfg.data.name == "kaggle")


def describe(err: BaseException) -> str:
    """One line for the tables: the error's type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (an accelerator's allocator ran out), recognised without importing torch."""
    return any(c.__name__ == "OutOfMemoryError" for c in type(err).__mro__)


def memory_retry(train: Any) -> dict[str, Any]:
    """The training settings a fold retries with after running out of memory: gradient checkpointing on, and the
    micro-batch cut to its largest divisor at most half of it, grad_accum raised so that the effective batch
    (batch_size x grad_accum) stays. Empty when neither can change (checkpointing on, a micro-batch of 1)."""
    batch, settings = train.batch_size, dict[str, Any]()
    if train.gradient_checkpointing is not True:
        settings["gradient_checkpointing"] = True
    smaller = max((d for d in range(1, batch // 2 + 1) if batch % d == 0), default=batch)
    if smaller < batch:
        settings.update(batch_size=smaller, grad_accum=train.grad_accum * (batch // smaller))
    return settings


def free_memory() -> None:
    """After an error (out of memory above all): collect the failed step's objects, then return the device's
    cached blocks, so the next fold starts with the memory a fresh one would have."""
    gc.collect()
    torch = sys.modules.get("torch")  # never imported here just for this: config-only paths stay torch-free
    if torch is not None:
        torch.cuda.empty_cache()  # a no-op unless CUDA was initialised


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (writing what exists), then exit with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread; a second signal is ignored, so the files the
    first one leads to are written whole (SIGKILL still ends the process at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        log.warning("%s received: writing what exists, then stopping", signal.Signals(signum).name)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def outcome(failed_tasks: int) -> tuple[str, dict[str, str]]:
    """The MLflow status and tags of a run that ran to its end."""
    if failed_tasks:
        return "FAILED", {"arcfold.outcome": "completed_with_failures", "arcfold.failed_tasks": str(failed_tasks)}
    return "FINISHED", {"arcfold.outcome": "complete", "arcfold.failed_tasks": "0"}
