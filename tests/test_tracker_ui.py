"""What a person sees of a run in MLflow: metric names (headline plain, the rest under prefixes), zero-only failure
and budget series left out, the run description, links in the classic view, artifacts beside the database."""

from __future__ import annotations

from pathlib import Path

import pytest

from arcfold.data.submission import write_json_atomic
from arcfold.track.links import artifact_file, artifact_link, run_link
from arcfold.track.names import mlflow_name
from arcfold.track.tracker import RunTracker, artifact_location, describe_run


def test_the_headline_keeps_plain_names_and_the_rest_goes_under_a_prefix():
    plain = ("score", "oracle", "answer_nll", "seconds_total", "selection_accuracy", "failed_tasks", "train_loss")
    assert [mlflow_name(k) for k in plain] == list(plain)
    assert mlflow_name("fold_score") == "fold/score" and mlflow_name("fold_score_mean") == "fold/score_mean"
    assert mlflow_name("seconds_train") == "sys/seconds_train" and mlflow_name("workers") == "sys/workers"
    assert mlflow_name("fold_overhead_share") == "sys/fold_overhead_share"  # a run figure, not a fold series
    assert mlflow_name("budget_cuts") == "budget/cuts" and mlflow_name("budget_seconds") == "budget/seconds"
    assert mlflow_name("score_votes") == "detail/score_votes" and mlflow_name("tasks") == "detail/tasks"
    assert mlflow_name("heldout_nll") == "heldout_nll"  # a name it does not know (stage=pretrain's) stays


@pytest.mark.slow
def test_artifacts_go_beside_the_database_the_uri_names_unless_configured(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    assert artifact_location(f"sqlite:///{db}", "arcfold") == (db.parent / "mlartifacts" / "arcfold").as_uri()
    assert artifact_location(f"sqlite:///{db}", "e", str(tmp_path / "a")) == (tmp_path / "a").as_uri()
    assert artifact_location(f"sqlite:///{db}", "e", "s3://bucket/x") == "s3://bucket/x"
    assert artifact_location("http://host:5000", "e") is None  # the server's own artifact store

    tracker = RunTracker(f"sqlite:///{db}", "arcfold", tmp_path / "outputs")
    table = tmp_path / "tasks.csv"
    table.write_text("task\n")
    tracker.log_artifact(table)
    assert (db.parent / "mlartifacts" / "arcfold" / tracker.run_id / "artifacts" / "tasks.csv").exists()
    assert not (tmp_path / "outputs" / "mlartifacts").exists()


@pytest.mark.slow
def test_zero_only_failure_and_budget_series_are_not_logged_and_the_headline_comes_first(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "arcfold", tmp_path)
    for step, failed in enumerate([0, 2, 0]):  # a fold series: from its first non-zero value on
        tracker.log_metrics({"fold_failed_tasks": failed, "fold_score": 0.5, "fold_budget_cut_inputs": 0}, step=step)
    run_level = {"tasks": 8, "solved": 5, "score_pairs": 2 / 3, "n_folds": 3, "seconds_total": 14.94, "oracle": 0.625}
    run_level |= {"score": 0.625, "answer_nll": 0.353661, "failed_tasks": 0, "budget_cuts": 0, "seconds_load": 0.5}
    tracker.log_metrics(run_level)
    tracker.finish()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    metrics = run.data.metrics
    assert {"failed_tasks", "budget/cuts", "fold/budget_cut_inputs"}.isdisjoint(metrics)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "fold/failed_tasks")] == [1, 2]
    assert metrics["fold/failed_tasks"] == 0 and metrics["sys/seconds_load"] == 0.5
    run_keys = [k for k in metrics if not k.startswith("fold/")]
    assert run_keys[:4] == ["score", "oracle", "answer_nll", "seconds_total"]  # first logged, first listed
    note = run.data.tags["mlflow.note.content"]  # the run description, leading its page
    assert note == (
        "**score 0.625** (5 of 8 tasks; per test output 0.667) · **oracle** 0.625 · **answer NLL** 0.3537 · "
        "**14.9 s** in 3 folds"
    )


def test_the_description_says_what_a_run_without_solutions_has_and_failures():
    assert describe_run({}) is None and describe_run({"heldout_nll": 1.0}) is None
    note = describe_run({"tasks": 4, "answer_nll": 1.5, "seconds_total": 3.0, "failed_tasks": 2})
    assert note is not None and note.startswith("no solutions, not scored (4 tasks) · **answer NLL** 1.5000")
    assert note.endswith("2 tasks failed: see the error column of tasks.csv.")


def test_every_link_opens_the_classic_view():
    uri = "sqlite:////tmp/mlflow.db"
    assert run_link(uri, "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert artifact_link("http://h:5000", "1", "abc", "compare/report.html") == (
        "http://h:5000/#/experiments/1/runs/abc/artifacts/compare/report.html?workflowType=machine_learning"
    )
    assert artifact_file(uri, "abc", "compare/a b.png", "http://ui:1/") == (
        "http://ui:1/get-artifact?path=compare%2Fa%20b.png&run_uuid=abc"
    )


def test_json_files_get_the_mode_of_any_other_new_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_json_atomic(tmp_path / "doc.json", {"a": float("nan")})
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # 0644 under the usual umask, not 0600
    assert written.read_text() == '{"a": null}'


@pytest.mark.slow
@pytest.mark.parametrize("name", ["failed_tasks", "fold_timed_out_inputs", "adapters_disk_mb"])
def test_a_waiting_series_appears_once_it_is_not_zero(tmp_path, name):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "arcfold", tmp_path)
    tracker.log_metrics({name: 0})
    assert mlflow_name(name) not in MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics
    tracker.log_metrics({name: 3})
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics[mlflow_name(name)] == 3
    assert Path(tmp_path / "mlflow.db").exists()
