"""Run metrics on hand-built predictions: score, oracle coverage, selection accuracy, per-ranking scores."""

from __future__ import annotations

import numpy as np
import pytest

from arcfold.data import Pair, Task, validate_submission
from arcfold.engine.candidates import Candidate
from arcfold.engine.candidates import TestPrediction as Prediction  # not a pytest class
from arcfold.run.records import FoldRow
from arcfold.run.results import RunResults

A, B, C, D = (np.full((2, 2), c, dtype=np.int8) for c in (1, 2, 3, 4))


def task(tid: str, outputs: list[np.ndarray]) -> Task:
    return Task(tid, (Pair(A, B),), tuple(Pair(A, o) for o in outputs))


def prediction(tid: str, i: int, grids: list[np.ndarray], rankings: dict[str, list[int]]) -> Prediction:
    cands = [Candidate(g, {0: -1.0}) for g in grids]
    order = rankings["votes"]
    return Prediction(tid, i, cands, [cands[j].grid for j in order[:2]], rankings, {"forward_tokens": 10.0})


@pytest.fixture
def results() -> RunResults:
    # t1: output 0 solved (B in the top two), output 1 covered but ranked third (D), so not solved.
    # t2: output 0 not covered at all. t3: no prediction (a failed task).
    t1, t2, t3 = task("t1", [B, D]), task("t2", [C]), task("t3", [A])
    r = RunResults([t1, t2, t3], [t1, t2, t3])
    r.predictions[("t1", 0)] = prediction("t1", 0, [B, A], {"votes": [0, 1], "sum_logp": [1, 0]})
    r.predictions[("t1", 1)] = prediction("t1", 1, [A, B, D], {"votes": [0, 1, 2], "sum_logp": [2, 0, 1]})
    r.predictions[("t2", 0)] = prediction("t2", 0, [A], {"votes": [0], "sum_logp": [0]})
    r.fold_of.update(t1=0, t2=1, t3=1)
    r.failures["t3"] = "RuntimeError: boom"
    return r


def test_run_metrics_separate_generation_from_selection(results):
    m = results.metrics()
    assert m["score"] == pytest.approx((1 / 2 + 0 + 0) / 3)  # fractional credit over ALL tasks
    assert m["score_pairs"] == pytest.approx(1 / 4)
    assert m["oracle"] == pytest.approx((2 / 2 + 0 + 0) / 3)
    assert m["covered_pairs"] == 2
    assert m["selection_accuracy"] == pytest.approx(1 / 2)
    assert m["failed_tasks"] == 1 and m["forward_tokens"] == 30.0
    # sum_logp's top two: t1/0 -> [A, B] (B solves it), t1/1 -> [D, A] (D solves it): t1 fully solved.
    assert m["score_sum_logp"] == pytest.approx((2 / 2) / 3)
    assert m["score_votes"] == pytest.approx(m["score"])


def test_fold_metrics_use_only_the_folds_tasks(results):
    fold0 = results.metrics([t for t in results.tasks if results.fold_of[t.id] == 0])
    fold1 = results.metrics([t for t in results.tasks if results.fold_of[t.id] == 1])
    assert fold0["tasks"] == 1 and fold0["score"] == pytest.approx(1 / 2) and fold0["oracle"] == 1.0
    assert fold1["tasks"] == 2 and fold1["score"] == 0.0 and fold1["failed_tasks"] == 1


def test_the_submission_covers_every_task_with_placeholders(results, tmp_path):
    path = results.write_submission(tmp_path / "submission.json")
    import json

    sub = json.loads(path.read_text())
    validate_submission(sub, results.submission_tasks)
    assert sub["t3"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}]
    assert sub["t1"][0]["attempt_1"] == B.tolist()


def test_tables_have_one_row_per_test_input(results, tmp_path):
    results.folds.append(FoldRow(fold=0, tasks=1))
    paths = results.write_tables(tmp_path)
    import csv

    rows = list(csv.DictReader(open(paths["tasks"])))
    assert [(r["task"], r["test_index"]) for r in rows] == [("t1", "0"), ("t1", "1"), ("t2", "0"), ("t3", "0")]
    assert [r["solved"] for r in rows] == ["True", "False", "False", ""]  # t3 has no prediction
    assert rows[3]["error"] == "RuntimeError: boom" and rows[3]["candidates"] == "0"
    assert rows[1]["covered"] == "True" and rows[2]["covered"] == "False"


def test_fold_summary_is_the_mean_and_min_over_folds_skipping_nan(results):
    results.folds = [
        FoldRow(fold=0, tasks=1, final_loss=2.0, metrics={"score": 0.5}),
        FoldRow(fold=1, tasks=1, final_loss=np.nan, metrics={"score": 0.25}),
        FoldRow(fold=2, tasks=1, final_loss=1.0, metrics={"score": 1.0}),
    ]
    s = results.fold_summary()
    assert s["fold_score_mean"] == pytest.approx(1.75 / 3) and s["fold_score_min"] == 0.25
    assert s["fold_final_loss_mean"] == 1.5 and s["fold_final_loss_min"] == 1.0
    assert "fold_oracle_mean" not in s  # no fold has it
