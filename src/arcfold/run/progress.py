"""Live progress of a run, its end-of-run summary table, and the libraries' chatter kept out of its log.

On a terminal (or report.progress=bars): a run bar (tasks predicted, elapsed and ETA, the current fold) over the
training bar of the fold (optimiser steps with the loss), log lines routed above the bars. Elsewhere (a log file,
a CI job, a sweep's job under a launcher): plain log lines, no carriage return: one summary line per fold (the
pipeline's, ending with `status()`), and at most one progress line per `every` seconds in between.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack
from typing import Any, Mapping

log = logging.getLogger("arcfold.progress")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def shows_bars(mode: str) -> bool:
    """report.progress: bars (live, redrawn) for `bars`, and for `auto` on a terminal; else plain lines or none."""
    return mode == "bars" or (mode == "auto" and sys.stderr.isatty())


def quiet_libraries(bars: bool) -> None:
    """Switch off, where each starts, what the libraries print that a run's log does not need: transformers'
    "Loading weights" bar (unless the run shows bars), peft's reading of transformers' deprecated
    `is_gradient_checkpointing` (a FutureWarning per model), bitsandbytes' note that its optional `kernels`
    package is missing. Once per process (a worker process too); MLflow's sampler is quieted by its tracker."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if bars:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers reads it when it is imported (workers too)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


class Progress:
    """progress(...) as a context manager; the pipeline calls fold(), train_step() and task_done()."""

    def __init__(self, mode: str, tasks: int, folds: int, every: float = 30.0):
        self.bars = shows_bars(mode)
        self.lines = mode != "off" and not self.bars
        self.tasks, self.folds, self.every = tasks, folds, every
        self.done, self.current, self.start = 0, 0, time.perf_counter()
        self._last_line = self.start
        self._stack = ExitStack()
        self._run_bar: Any = None
        self._train_bar: Any = None

    def __enter__(self) -> "Progress":
        if self.bars:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())  # log lines print above the bars, not through them
            self._run_bar = self._stack.enter_context(
                tqdm(total=self.tasks, unit="task", position=0, desc=f"fold 1/{self.folds}", dynamic_ncols=True)
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_train()
        self._stack.close()

    def eta(self) -> float:
        """Seconds left at the run's pace so far (tasks are predicted after their fold trains, so the pace
        includes training); NaN before the first task is done."""
        elapsed = time.perf_counter() - self.start
        return elapsed * (self.tasks - self.done) / self.done if self.done else math.nan

    def fold(self, f: int, n_tasks: int) -> None:
        """A fold starts: the run bar says so (lines: the fold's summary line, at its end, is enough)."""
        self.current = f
        self._close_train()
        if self._run_bar is not None:
            self._run_bar.set_description(f"fold {f + 1}/{self.folds}")

    def status(self) -> str:
        """Where the run is, for a fold's summary line: tasks predicted, elapsed, ETA."""
        elapsed = _duration(time.perf_counter() - self.start)
        return f"{self.done}/{self.tasks} tasks predicted, elapsed {elapsed}, ETA {_duration(self.eta())}"

    def train_step(self, step: int, total: int, loss: float) -> None:
        if self.bars:
            if self._train_bar is None:
                from tqdm.auto import tqdm

                self._train_bar = tqdm(
                    total=total,
                    unit="step",
                    position=1,
                    leave=False,
                    dynamic_ncols=True,
                    desc=f"train fold {self.current + 1}",
                )
            self._train_bar.update(1)
            self._train_bar.set_postfix(loss=f"{loss:.4f}")
        elif self.lines and self._due():
            log.info("fold %d/%d: training step %d/%d, loss %.4f", self.current + 1, self.folds, step, total, loss)

    def task_done(self, task_id: str, fold_done: bool = False) -> None:
        """A task predicted. fold_done: the last of its fold, whose summary line (the pipeline's) says it."""
        self.done += 1
        if self._run_bar is not None:
            self._close_train()
            self._run_bar.update(1)
        elif self.lines and fold_done:
            self._last_line = time.perf_counter()  # the fold's summary line is the next progress line
        elif self.lines and self._due():
            log.info("fold %d/%d: %s (last %s)", self.current + 1, self.folds, self.status(), task_id)

    def _due(self) -> bool:
        now = time.perf_counter()
        if now - self._last_line < self.every:
            return False
        self._last_line = now
        return True

    def _close_train(self) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None


def summary_table(metrics: Mapping[str, float], failures: int, run_dir: Any, link: str | None = None) -> str:
    """The end-of-run summary as plain text: scores, seconds per phase, failures, where the files and run are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="arcfold run", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()

    def value(key: str, digits: int = 3) -> str:
        v = metrics.get(key)
        return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    table.add_row("score", f"{value('score')} (pairs {value('score_pairs')})")
    table.add_row("oracle", f"{value('oracle')} (selection accuracy {value('selection_accuracy')})")
    table.add_row("answer NLL", value("answer_nll", 4))
    phases = [k for k in metrics if k.startswith("seconds_") and k != "seconds_total"]
    table.add_row(
        "seconds",
        f"{value('seconds_total', 1)} total: "
        + ", ".join(f"{k.removeprefix('seconds_')} {metrics[k]:.1f}" for k in phases),
    )
    if metrics.get("inference_tokens_per_second"):
        table.add_row(
            "inference",
            f"{metrics['inference_tokens_per_second']:.0f} tokens/s (generation {value('gen_seconds', 1)} s, "
            f"scoring {value('scoring_seconds', 1)} s, answer NLL {value('nll_seconds', 1)} s)",
        )
    table.add_row(
        "tasks", f"{int(metrics.get('tasks', 0))} in {int(metrics.get('n_folds', 0))} folds, {failures} failed"
    )
    table.add_row("files", str(run_dir))
    if link:
        table.add_row("MLflow", link)
    text = io.StringIO()
    Console(file=text, width=120, color_system=None).print(table)  # plain text: it goes to the log
    return "\n".join(line.rstrip() for line in text.getvalue().rstrip().splitlines())


__all__ = ["Progress", "quiet_libraries", "shows_bars", "summary_table"]
