"""What a run accumulates: predictions per test input, per-fold figures, and the tables and metrics made of them.

The pipeline adds each test input's record as it is made (and rewrites submission.json), and each fold's row
as the fold finishes, so a crash or a time-out keeps every prediction already made (the rest are valid
placeholders); the same records, read back from the checkpoint, rebuild a resumed run's results.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from arcfold.data import Task, build_submission, write_submission
from arcfold.data.submission import Score, grid_equal, score_submission, write_json_atomic
from arcfold.engine.candidates import TestPrediction
from arcfold.run.records import FoldOutcome, FoldRow, InputRecord

# Per-fold figures summarised per run as fold_<key>_mean and fold_<key>_min.
FOLD_SUMMARY = ("final_loss", "train_seconds", "inference_seconds", "peak_memory_mb", "score", "oracle", "answer_nll")


def _per_second(tokens: float, seconds: float) -> float:
    """Tokens through the model per second of generation, scoring and NLL (0 when nothing ran)."""
    return tokens / seconds if seconds > 0 else 0.0


@dataclass
class RunResults:
    tasks: Sequence[Task]  # the tasks this run predicts (scored)
    submission_tasks: Sequence[Task]  # every task of the source: submission.json covers them all
    predictions: dict[tuple[str, int], TestPrediction] = field(default_factory=dict)
    fold_of: dict[str, int] = field(default_factory=dict)
    nll: dict[tuple[str, int], float] = field(default_factory=dict)
    base_nll: dict[tuple[str, int], float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # task id -> error (placeholders or base-model answers)
    cuts: dict[tuple[str, int], str] = field(default_factory=dict)  # test input -> the budget's cuts for it
    events: list[dict[str, Any]] = field(default_factory=list)  # the budget's cuts: where, what, why
    recorded: set[tuple[str, int]] = field(default_factory=set)  # test inputs done (predicted, failed or cut)
    folds: list[FoldRow] = field(default_factory=list)  # one per finished fold
    losses: dict[int, list[float]] = field(default_factory=dict)  # fold -> training loss per optimiser step
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per phase, set at the end
    timeline: list[dict[str, Any]] = field(default_factory=list)  # phase spans (pipeline.Timings), set at the end
    summary: dict[str, float] = field(default_factory=dict)  # the run's metrics, set at the end

    @property
    def has_solutions(self) -> bool:
        return all(t.has_solutions for t in self.tasks)

    def attempts(self, ranking: str | None = None) -> dict[str, dict[int, list[np.ndarray]]]:
        """task id -> test index -> the two attempts (from a named ranking, or the run's choice)."""
        out: dict[str, dict[int, list[np.ndarray]]] = {}
        for (task_id, i), pred in self.predictions.items():
            if ranking is None:
                grids = pred.attempts
            else:
                order = pred.rankings.get(ranking, [])
                grids = [pred.candidates[j].grid for j in order[:2]]
            out.setdefault(task_id, {})[i] = grids
        return out

    def add_input(self, rec: InputRecord) -> None:
        key = (rec.task, rec.index)
        self.recorded.add(key)
        self.fold_of[rec.task] = rec.fold
        if rec.prediction is not None:
            self.predictions[key] = rec.prediction
        if rec.nll is not None:
            self.nll[key] = rec.nll
        if rec.base_nll is not None:
            self.base_nll[key] = rec.base_nll
        if rec.cut:
            self.cuts[key] = rec.cut
        if rec.error:
            self.failures.setdefault(rec.task, rec.error)

    def add_fold(self, outcome: FoldOutcome) -> None:
        for rec in outcome.inputs:
            self.add_input(rec)
        self.folds.append(outcome.row)
        self.events += [e for e in outcome.events if e not in self.events]

    def write_submission(self, path: Path) -> Path:
        return write_submission(path, self.submission_tasks, self.attempts())

    def score(self, ranking: str | None = None, tasks: Sequence[Task] | None = None) -> Score:
        tasks = self.tasks if tasks is None else tasks
        return score_submission(build_submission(tasks, self.attempts(ranking)), tasks)

    def covered(self, task: Task, i: int) -> bool:
        """Oracle: is the true output among the candidates at all?"""
        pred = self.predictions.get((task.id, i))
        return pred is not None and any(grid_equal(c.grid, task.test[i].output) for c in pred.candidates)

    # ------------------------------------------------------------------------------------------- metrics

    def metrics(self, tasks: Sequence[Task] | None = None) -> dict[str, float]:
        """The run's figures over `tasks` (default: all of them; a fold's tasks for per-fold figures).

        oracle = the score if we always picked right among the candidates (generation's ceiling);
        selection_accuracy = solved / covered test outputs (how well ranking uses what generation found)."""
        tasks = self.tasks if tasks is None else tasks
        keys = [(t.id, i) for t in tasks for i in range(len(t.test))]
        preds = [self.predictions[k] for k in keys if k in self.predictions]
        stat = lambda name: float(sum(p.stats.get(name, 0.0) for p in preds))  # noqa: E731
        m: dict[str, float] = {
            "tasks": len(tasks),
            "test_inputs": len(keys),
            "failed_tasks": sum(t.id in self.failures for t in tasks),
            "mean_candidates": float(np.mean([len(p.candidates) for p in preds])) if preds else 0.0,
            "forward_tokens": stat("forward_tokens"),
            "gen_seconds": stat("gen_seconds"),
            "scoring_seconds": stat("scoring_seconds"),
            "nll_seconds": stat("nll_seconds"),
            "inference_tokens_per_second": _per_second(
                sum(map(stat, ("forward_tokens", "scoring_tokens", "nll_tokens"))),
                sum(map(stat, ("gen_seconds", "scoring_seconds", "nll_seconds"))),
            ),
            "timed_out_inputs": stat("timed_out"),
            "invalid_completions": stat("n_invalid"),
            "dropped_demos": stat("dropped_demos"),
            "budget_cut_inputs": sum(k in self.cuts for k in keys),
            "budget_placeholder_inputs": sum(self.cuts.get(k, "").endswith("placeholders") for k in keys),
        }
        nll = [self.nll[k] for k in keys if k in self.nll]
        base_nll = [self.base_nll[k] for k in keys if k in self.base_nll]
        if nll:
            m["answer_nll"] = float(np.mean(nll))
        if base_nll:
            m["answer_nll_base"] = float(np.mean(base_nll))
        if not tasks or not all(t.has_solutions for t in tasks):
            return m
        s = self.score(tasks=tasks)
        oracle = [np.mean([self.covered(t, i) for i in range(len(t.test))]) for t in tasks]
        covered = sum(self.covered(t, i) for t in tasks for i in range(len(t.test)))
        m.update(
            score=s.score_tasks,
            score_pairs=s.score_pairs,
            solved=s.solved,
            solved_pairs=s.solved_pairs,
            oracle=float(np.mean(oracle)),
            covered_pairs=covered,
            selection_accuracy=(s.solved_pairs / covered) if covered else math.nan,
        )
        for name in sorted({r for p in preds for r in p.rankings}):
            m[f"score_{name}"] = self.score(name, tasks).score_tasks
        return m

    def fold_summary(self) -> dict[str, float]:
        """Mean and min over folds of the per-fold figures worth comparing runs by (the fold_* series in MLflow
        show only the last fold's value in tables)."""
        out: dict[str, float] = {}
        for key in FOLD_SUMMARY:
            lines = [r.values() for r in self.folds]
            values = [float(v[key]) for v in lines if key in v and math.isfinite(float(v[key]))]
            if values:
                out[f"fold_{key}_mean"], out[f"fold_{key}_min"] = float(np.mean(values)), min(values)
        return out

    # ------------------------------------------------------------------------------------------- tables

    def task_rows(self) -> list[dict[str, Any]]:
        rows = []
        for task in self.tasks:
            for i, pair in enumerate(task.test):
                pred = self.predictions.get((task.id, i))
                shapes = [f"{g.shape[0]}x{g.shape[1]}" for g in pred.attempts] if pred else []
                row: dict[str, Any] = {
                    "task": task.id,
                    "fold": self.fold_of.get(task.id, -1),
                    "test_index": i,
                    "solved": (
                        any(grid_equal(g, pair.output) for g in pred.attempts)
                        if pred and pair.output is not None
                        else None
                    ),
                    "covered": self.covered(task, i) if pair.output is not None else None,
                    "attempt_1_shape": shapes[0] if shapes else "",
                    "attempt_2_shape": shapes[1] if len(shapes) > 1 else "",
                    "true_shape": f"{pair.output.shape[0]}x{pair.output.shape[1]}" if pair.output is not None else "",
                    "candidates": len(pred.candidates) if pred else 0,
                    "answer_nll": self.nll.get((task.id, i), math.nan),
                    "answer_nll_base": self.base_nll.get((task.id, i), math.nan),
                    "cut": self.cuts.get((task.id, i), ""),
                    "error": self.failures.get(task.id, ""),
                }
                if pred:
                    row.update({f"stat_{k}": v for k, v in sorted(pred.stats.items())})
                rows.append(row)
        return rows

    def write_tables(self, run_dir: Path) -> dict[str, Path]:
        paths = {
            "tasks": write_csv(run_dir / "tasks.csv", self.task_rows()),
            "folds": write_csv(run_dir / "folds.csv", [r.values() for r in sorted(self.folds, key=lambda r: r.fold)]),
        }
        return paths

    def write_timeline(self, run_dir: Path) -> Path:
        return write_csv(run_dir / "timeline.csv", self.timeline)

    def write_scores(self, run_dir: Path) -> Path | None:
        if not self.has_solutions:
            return None
        doc = {"metrics": self.metrics(), "score": self.score().to_dict()}
        return write_json_atomic(run_dir / "scores.json", doc)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Written beside the target and renamed over it: a kill mid-write leaves the previous table whole."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
