"""The run's time budget: project the run's time from token counts and measured throughput, and decide what
inference cuts when the projection passes the deadline.

Training time is proportional to training tokens: the first fold calibrates seconds per token, and each later
fold re-calibrates. Inference time is not predictable (a more confident model makes the DFS explore more), so it
is measured per test input, in seconds per prompt-token-view, separately at each degradation level.

Each fold gets a slice of the time left, in proportion to its share of the work left (what a fold leaves unused
passes to the later ones); training may use its projected share of the slice, inference the rest. When the
projection of a fold's remaining inputs passes the slice's end, inference steps one level down the configured
order (views, min_prob, greedy; at most one step per test input, so each step is measured before the next);
when the slice is spent, the fold's remaining inputs get placeholders. Every test input's own cap
(inference.max_seconds) is cut to at most twice its fair share of the time left, and never past the slice's
end, so the run stops by the deadline minus the margin.

Pure: no clock and no I/O; the pipeline passes the times in (time.perf_counter() seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from arcfold.data.augment import view_count
from arcfold.data.codec import train_tokens
from arcfold.data.tasks import Task

log = logging.getLogger(__name__)


def total_seconds(budget: Any) -> float | None:
    """budget.hours + budget.seconds, or None when neither is set (no deadline)."""
    if budget.hours is None and budget.seconds is None:
        return None
    return (budget.hours or 0.0) * 3600.0 + (budget.seconds or 0.0)


AUTO_MARGIN = (0.1, 60.0)  # budget.margin_seconds=null: this share of the budget, at most this many seconds


def margin_seconds(budget: Any) -> float:
    """How long before the deadline the final submission is on disk: budget.margin_seconds, or (null) 10% of the
    budget and at most 60 s, so a short budget (budget.seconds=40: 4 s) is not all margin."""
    if budget.margin_seconds is not None:
        return float(budget.margin_seconds)
    share, most = AUTO_MARGIN
    return min(most, share * (total_seconds(budget) or 0.0))


def train_units(tasks: Sequence[Task], epochs: int) -> float:
    """Training tokens a fold will give: 8 D8 views per epoch of each task's demonstrations."""
    return float(sum(train_tokens(t.train) for t in tasks) * view_count(max(1, epochs)))


def input_units(task: Task, index: int, views: int) -> float:
    """Work of one test input: its prompt's tokens (demonstrations and the test input) in every view."""
    grid = task.test[index].input
    return float((train_tokens(task.train) + grid.shape[0] * (grid.shape[1] + 1)) * views)


def degraded(step: Step, budget: Any, inference: Any, views: int) -> tuple[dict[str, Any], int]:
    """The inference settings (dotted keys) a step changes, and the generation views it keeps."""
    settings: dict[str, Any] = {}
    if step.max_seconds is not None:
        settings["max_seconds"] = min(inference.max_seconds, step.max_seconds)
    if "views" in step.cuts:
        views = min(views, budget.views)
    if "min_prob" in step.cuts:
        settings["min_prob"] = max(inference.min_prob, budget.min_prob)
    if "greedy" in step.cuts:
        settings.update({"strategy": "greedy", "scoring.views": 0})  # scoring would cost more than greedy itself
    return settings, views


@dataclass
class FoldWork:
    """What a fold still has to do: training tokens (0 once trained) and its unfinished inputs' units."""

    train: float
    inputs: float


@dataclass
class FoldPlan:
    end: float | None  # when this fold's slice ends (None: no deadline)
    train_seconds: float | None  # the most its training may take (None: no cap)
    projected_total: float | None  # the run's projected seconds from its start (None: nothing measured yet)


@dataclass
class Step:
    """How to predict the next test input."""

    level: int  # how many of the configured cuts apply
    cuts: tuple[str, ...]
    max_seconds: float | None  # a cap from the deadline (None: the configured one alone)

    @property
    def placeholders(self) -> bool:
        return "placeholders" in self.cuts


@dataclass
class Planner:
    budget: Any  # BudgetConfig
    work: list[FoldWork]  # per fold, what is left (a finished fold: zeros)
    start: float  # the run's start
    full_views: int  # generation views per test input before any cut
    workers: int = 1  # folds running at once (arcfold.orchestrate): the work left is shared among them
    level: int = 0
    train_seconds: float = 0.0  # measured so far ...
    train_done: float = 0.0  # ... and the units they covered
    infer: dict[int, list[float]] = field(default_factory=dict)  # level -> [seconds, units] measured
    events: list[dict[str, Any]] = field(default_factory=list)  # what was cut and why, for the tables and MLflow

    def __post_init__(self) -> None:
        total = total_seconds(self.budget)
        self.write_by = None if total is None else self.start + total - margin_seconds(self.budget)
        self.steps = tuple(self.budget.degrade)
        self.last_cut = len(self.steps) - 1  # the level before placeholders

    # ------------------------------------------------------------------------------------- rates

    def train_rate(self) -> float | None:
        return self.train_seconds / self.train_done if self.train_done > 0 else None

    def infer_rate(self, level: int) -> float | None:
        """Seconds per unit at `level`: measured there, else at the nearest measured level with fewer cuts,
        scaled down by the views cut if that lies in between (the other cuts' gains are unknown until measured)."""
        for known in range(level, -1, -1):
            if known in self.infer:
                seconds, units = self.infer[known]
                rate = seconds / units
                if "views" in self.steps[known:level]:
                    rate *= min(self.budget.views, self.full_views) / self.full_views
                return rate
        return None

    def seconds(self, w: FoldWork) -> float | None:
        """Projected seconds of a fold's remaining work at the current level (None before any measurement)."""
        t, i = self.train_rate(), self.infer_rate(self.level)
        if (w.train and t is None) or (w.inputs and i is None):
            return None
        return (t or 0.0) * w.train + (i or 0.0) * w.inputs

    def projection(self, now: float) -> float | None:
        """The run's projected total seconds: elapsed plus every fold's remaining work."""
        parts = [self.seconds(w) for w in self.work]
        return None if None in parts else now - self.start + sum(p for p in parts if p is not None) / self.workers

    # ------------------------------------------------------------------------------------- decisions

    def start_fold(self, f: int, now: float) -> FoldPlan:
        projected = self.projection(now)
        if projected is not None:  # a line per fold only where there is a deadline to hold it against
            log.log(
                logging.DEBUG if self.write_by is None else logging.INFO,
                "budget: the run is projected to take %.0f s in all%s",
                projected,
                "" if self.write_by is None else f" ({self.write_by - self.start:.0f} s allowed)",
            )
        if self.write_by is None:
            return FoldPlan(None, None, projected)
        left = max(0.0, self.write_by - now)
        # Fold f first, then every other fold's remaining work (finished ones have none; workers take folds in
        # any order).
        rest = [self.work[f], *self.work[:f], *self.work[f + 1 :]]
        projected_need = [self.seconds(w) for w in rest]
        need = (
            [p for p in projected_need if p is not None]
            if None not in projected_need
            else [w.train + w.inputs for w in rest]
        )  # not calibrated yet: token counts stand in
        share = min(1.0, self.workers * need[0] / sum(need)) if sum(need) > 0 else 1.0
        end = now + left * share
        w, t, i = self.work[f], self.train_rate(), self.infer_rate(self.level)
        train_share = 0.5 if t is None or i is None else t * w.train / max(t * w.train + i * w.inputs, 1e-9)
        train_seconds = (end - now) * train_share if w.train else 0.0
        if projected is not None and projected > self.write_by - self.start:
            log.warning(
                "budget: projected %.0f s for the run, %.0f s allowed (budget minus margin); fold %d "
                "gets %.0f s, %.0f s of it for training",
                projected,
                self.write_by - self.start,
                f,
                end - now,
                train_seconds,
            )
        return FoldPlan(end, train_seconds, projected)

    def next_input(self, f: int, plan: FoldPlan, units: float, now: float, where: str) -> Step:
        """The step for fold f's next test input of `units` (`where` names it in the log). Its time cap is twice
        its fair share of the fold's time left: one slow input must not leave the others placeholders."""
        if plan.end is None:
            return Step(0, (), None)
        left = plan.end - now
        if left <= 0:
            if not any(e["fold"] == f and e["cut"] == "placeholders" for e in self.events):
                self.record(f, where, "placeholders", f"fold {f}'s {plan.end - self.start:.1f} s slice is spent")
            return Step(len(self.steps), self.steps, 0.0)
        rate, units_left = self.infer_rate(self.level), self.work[f].inputs
        if rate is not None and self.level < self.last_cut and rate * units_left > left:
            self.level += 1
            self.record(
                f,
                where,
                self.steps[self.level - 1],
                f"projected {rate * units_left:.1f} s for fold {f}'s remaining inputs, {left:.1f} s left",
            )
        share = left * units / units_left if units_left > 0 else left
        return Step(self.level, self.steps[: self.level], min(left, 2 * share))

    def observe_train(self, f: int, done: float, seconds: float) -> None:
        """Fold f trained `done` (a fraction: less when cut short) of its tokens in `seconds`."""
        self.train_done += self.work[f].train * done
        self.train_seconds += seconds
        self.work[f].train = 0.0

    def skip_train(self, f: int) -> None:
        self.work[f].train = 0.0

    def observe_input(self, f: int, step: Step, units: float, seconds: float) -> None:
        self.work[f].inputs = max(0.0, self.work[f].inputs - units)
        if not step.placeholders:
            measured = self.infer.setdefault(step.level, [0.0, 0.0])
            measured[0] += seconds
            measured[1] += units

    def record(self, fold: int, where: str, cut: str, why: str) -> None:
        """A cut, logged and kept for the tables and MLflow."""
        self.events.append({"fold": fold, "at": where, "cut": cut, "why": why})
        if cut == "train":
            log.warning("budget: %s: %s", where, why)
        else:
            log.warning("budget: from %s on, %s: %s", where, DESCRIBE[cut], why)


DESCRIBE = {
    "views": "fewer generation views (budget.views)",
    "min_prob": "DFS min_prob raised (budget.min_prob)",
    "greedy": "greedy decoding, no augmentation scoring",
    "placeholders": "placeholders",
}
