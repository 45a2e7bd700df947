"""The plain records a fold produces: each test input's outcome (InputRecord), how its training ended
(TrainingRecord), its folds.csv line (FoldRow) and the whole finished fold (FoldOutcome). Each is plain data with a
JSON round trip, so a worker process can hand it to the run's process, and the checkpoint can keep it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from arcfold.engine.candidates import Candidate, TestPrediction


@dataclass
class InputRecord:
    """One test input's outcome."""

    task: str
    index: int
    fold: int
    prediction: TestPrediction | None = None  # None: placeholders
    nll: float | None = None
    base_nll: float | None = None
    cut: str = ""  # budget cuts applied, e.g. "views,min_prob" or "views,min_prob,greedy,placeholders"
    error: str = ""  # the failure that cost this input its prediction (or its fold's adapter)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "prediction": prediction_to_json(self.prediction) if self.prediction else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputRecord:
        pred = d.get("prediction")
        return cls(**{**d, "prediction": prediction_from_json(pred) if pred else None})


@dataclass
class TrainingRecord:
    """How a fold's training ended: its stats, or why there is no trained adapter."""

    stats: dict[str, Any] | None  # FoldTrainStats as a dict (None: not trained)
    error: str = ""  # training failed (on_error=skip): the fold predicts with the base model, or not at all
    cut: str = ""  # the budget skipped or shortened training
    retried: str = ""  # the first try ran out of memory: what the second changed (its stats are the second's)


@dataclass(frozen=True)
class FoldRow:
    """One line of folds.csv: a fold's figures, built once, with keywords, when the fold lands (arcfold.pipeline);
    never changed after. `values()` is the line (its fields, then the fold's scores)."""

    fold: int
    tasks: int
    train_tokens: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    inference_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    final_loss: float = math.nan
    tokens_per_second: float = 0.0
    planned_steps: int = 0  # above steps when the budget stopped training early
    train_cut: str = ""  # the budget skipped or shortened training
    error: str = ""  # training failed (on_error=skip): the fold's tasks got the base model's answers or placeholders
    retried: str = ""  # training ran out of memory and was retried: the settings the retry changed
    projected_seconds: float = math.nan  # the run's projected total at the fold's start (nan: not measured yet)
    budget_cuts: str = ""  # what the budget cut in this fold, where and why
    # Per-fold overhead: the adapter reset, and training's time outside its optimiser loop (samples, optimiser,
    # schedule, accelerate's prepare and release); the queue adds its messaging (queue_seconds).
    reset_seconds: float = 0.0
    setup_seconds: float = 0.0
    worker_seconds: float = 0.0  # the fold's time in its worker
    worker: int = -1  # which worker ran it (-1: lost with its workers)
    attempt: int = 0  # 1, or 2 when a first worker died during it
    fold_seconds: float = 0.0  # dispatch to outcome, as the queue saw it
    queue_seconds: float = 0.0
    overhead_seconds: float = 0.0
    overhead_share: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # RunResults.metrics over the fold's tasks

    def values(self) -> dict[str, Any]:
        """The folds.csv line: every field, then the fold's scores."""
        line = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        return {**line, **self.metrics}

    @classmethod
    def landed(
        cls, report: FoldReport, worker: int, attempt: int, round_trip: float, metrics: dict[str, float]
    ) -> FoldRow:
        """The row of a fold its worker finished: the worker's report, the queue's view (which worker, which try,
        the round trip; the messaging is the round trip less the worker's own time) and the fold's scores."""
        stats = report.training.stats or {}
        queue = max(0.0, round_trip - report.worker_seconds)
        overhead = report.reset_seconds + report.setup_seconds + queue
        return cls(
            fold=report.fold,
            tasks=report.tasks,
            train_tokens=stats.get("tokens", 0),
            steps=stats.get("steps", 0),
            train_seconds=stats.get("seconds", 0.0),
            inference_seconds=report.inference_seconds,
            peak_memory_mb=stats.get("peak_memory_bytes", 0) / 2**20,
            final_loss=stats.get("final_loss", math.nan),
            tokens_per_second=stats.get("tokens_per_second", 0.0),
            planned_steps=stats.get("planned_steps", 0),
            train_cut=report.training.cut,
            error=report.training.error,
            retried=report.training.retried,
            projected_seconds=math.nan if report.projected_seconds is None else report.projected_seconds,
            budget_cuts=describe_cuts(report.events),
            reset_seconds=report.reset_seconds,
            setup_seconds=report.setup_seconds,
            worker_seconds=report.worker_seconds,
            worker=worker,
            attempt=attempt,
            fold_seconds=round_trip,
            queue_seconds=queue,
            overhead_seconds=overhead,
            overhead_share=overhead / round_trip if round_trip else 0.0,
            metrics=metrics,
        )

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> FoldRow:
        """A line read back (a checkpoint): the fields by name, every other column a score."""
        names = {f.name for f in fields(cls)} - {"metrics"}
        return cls(
            **{k: v for k, v in values.items() if k in names},
            metrics={k: v for k, v in values.items() if k not in names},
        )


@dataclass(frozen=True)
class FoldReport:
    """What a worker hands back for a fold: how its training ended, every test input's record, the budget's cuts
    in it, and the worker's own times (the run builds the fold's FoldRow from it)."""

    fold: int
    tasks: int
    training: TrainingRecord
    inference_seconds: float
    projected_seconds: float | None  # the run's projected total at the fold's start (None: not measured yet)
    reset_seconds: float  # the adapter reset
    setup_seconds: float  # training's time outside its optimiser loop
    worker_seconds: float
    inputs: list[InputRecord]
    events: list[dict[str, Any]]


@dataclass
class FoldOutcome:
    """A finished fold: its folds.csv row, every test input's record and the budget's cuts in it."""

    fold: int
    row: FoldRow
    inputs: list[InputRecord]
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "row": {k: plain(v) for k, v in self.row.values().items()},
            "inputs": [r.to_json() for r in self.inputs],
            "events": self.events,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FoldOutcome:
        return cls(
            d["fold"],
            FoldRow.from_values(d["row"]),
            [InputRecord.from_json(r) for r in d["inputs"]],
            d.get("events", []),
        )


def plain(v: Any) -> Any:
    """numpy scalars as Python numbers, for JSON."""
    return v.item() if isinstance(v, np.generic) else v


def prediction_to_json(p: TestPrediction) -> dict[str, Any]:
    return {
        "task_id": p.task_id,
        "test_index": p.test_index,
        "candidates": [{"grid": c.grid.tolist(), "gen_logps": c.gen_logps, "scores": c.scores} for c in p.candidates],
        "attempts": [np.asarray(g).tolist() for g in p.attempts],
        "rankings": p.rankings,
        "stats": {k: plain(v) for k, v in p.stats.items()},
    }


def prediction_from_json(d: dict[str, Any]) -> TestPrediction:
    return TestPrediction(
        d["task_id"],
        d["test_index"],
        [Candidate(_grid(c["grid"]), _by_view(c["gen_logps"]), _by_view(c["scores"])) for c in d["candidates"]],
        [_grid(g) for g in d["attempts"]],
        d["rankings"],
        d["stats"],
    )


def _grid(g: list[list[int]]) -> np.ndarray:
    return np.asarray(g, dtype=np.int8)  # the dtype candidates.merge stores


def _by_view(m: dict[str, float]) -> dict[int, float]:
    return {int(k): float(v) for k, v in m.items()}  # JSON object keys are strings


def describe_cuts(events: Sequence[dict[str, Any]]) -> str:
    """The budget's cuts (Planner.events) in one line: where, what, why."""
    return "; ".join(f"{e['at']}: {e['cut']} ({e['why']})" for e in events)
