"""`python -m arcfold.cli.compare` on real MLflow stores: a temporary SQLite file and a local tracking server."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from arcfold.cli import compare
from arcfold.track.tracker import RunTracker

TASKS = [f"task{i:02d}" for i in range(24)]


def log_sweep(uri: str, outputs: Path) -> tuple[str, dict[str, dict[str, list[bool]]]]:
    """A parent run and 2 configurations x 3 seeds of child runs, logged as the app logs them (params, metrics,
    a tasks.csv artifact); rank 16 solves more tasks than rank 4. Returns the parent id and, per child run id,
    which of each task's two test outputs it solved."""
    parent = RunTracker(uri, "arcfold", outputs, run_name="sweep test", tags={"arcfold.role": "sweep"})
    rng = np.random.default_rng(1)
    ids = {}
    for rank, p in ((4, 0.15), (16, 0.7)):
        for seed in (0, 1, 2):
            run = RunTracker(
                uri, "arcfold", outputs, run_name=f"lora.rank={rank} seed={seed}", parent_run_id=parent.run_id
            )
            run.log_params({"lora.rank": rank, "seed": seed, "train.seed": seed, "folds": 2, "data.limit": 24})
            solved = {t: [bool(rng.random() < p), bool(rng.random() < p)] for t in TASKS}
            table = outputs / f"tables_{rank}_{seed}" / "tasks.csv"
            table.parent.mkdir(parents=True)
            with open(table, "w", newline="") as f:
                w = csv.DictWriter(f, ["task", "test_index", "solved", "answer_nll"])
                w.writeheader()
                for t in TASKS:
                    for i, s in enumerate(solved[t]):
                        w.writerow({"task": t, "test_index": i, "solved": s, "answer_nll": 2.0 - p + 0.1 * i})
            score = float(np.mean([np.mean(v) for v in solved.values()]))
            run.log_metrics(
                {
                    "score": score,
                    "oracle": min(1.0, score + 0.1),
                    "answer_nll": 2.05 - p,
                    "seconds_total": 30.0,
                    "failed_tasks": 0,
                }
            )
            run.log_artifact(table)
            run.finish("FINISHED")
            ids[run.run_id] = solved
    return parent.run_id, ids


def check_compare(uri: str, parent_id: str, solved: dict[str, dict[str, list[bool]]], out: Path, capsys) -> None:
    child_ids = list(solved)
    code = compare.main([parent_id, "--tracking-uri", uri, "--out", str(out), "--n-boot", "1000"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| lora.rank | runs | score |" in printed and "16 (best)" in printed and "**better**" in printed
    assert "\nbest: lora.rank=16, score " in printed  # the verdict, with the interval that makes it
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"  # a server's own UI, else `make ui`'s
    assert f"{base}/#/experiments/" in printed and "viewStateShareKey=" + parent_id in printed
    report_link = f"/runs/{parent_id}/artifacts/compare/report.html?workflowType=machine_learning"
    assert f"MLflow report: {base}/#/experiments/" in printed and report_link in printed
    files = ("report.md", "report.html", "compare.json", "solved_matrix.png", "solved_matrix.csv")
    for name in (*files, "score_differences.png"):
        assert (out / name).stat().st_size > 500, name
    modes = {oct((out / name).stat().st_mode & 0o777) for name in files}
    assert len(modes) == 1, modes  # compare.json like the rest (0644 under the usual umask), not 0600
    doc = json.loads((out / "compare.json").read_text())
    assert doc["best"] == "lora.rank=16" and sorted(doc["tasks"]) == TASKS
    assert sorted(r for conf in doc["configurations"] for r in conf["runs"]) == sorted(child_ids)
    with open(out / "solved_matrix.csv") as f:  # each cell: the fraction of the task's two outputs solved
        matrix = {row["task"]: row for row in csv.DictReader(f)}
    assert {(t, r): float(matrix[t][r]) for t in TASKS for r in child_ids} == {
        (t, r): sum(solved[r][t]) / 2 for t in TASKS for r in child_ids
    }

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    m = parent.data.metrics
    assert m["sweep/jobs"] == 6 and m["sweep/configurations"] == 2
    assert "sweep/failed_jobs" not in m and "failed_tasks" not in m  # zero: not logged
    best = [client.get_run(i).data.metrics["score"] for i in child_ids[3:]]
    assert m["score"] == pytest.approx(np.mean(best), abs=5e-5) and m["score"] == round(m["score"], 4)
    tags = parent.data.tags
    assert parent.data.params["lora.rank"] == "16" and tags["best_configuration"] == "lora.rank=16"
    note = tags["mlflow.note.content"]  # the parent's description: what it is, the verdict, the links
    assert note.startswith("**Best**: lora.rank=16, score ") and "are lora.rank=16's means over its runs" in note
    assert f"[Comparison report]({base}/#/experiments/" in note and report_link in tags["arcfold.report_link"]
    logged = {a.path for a in client.list_artifacts(parent_id, "compare")}
    assert {"compare/report.md", "compare/report.html", "compare/score_per_configuration.png"} <= logged
    md = Path(client.download_artifacts(parent_id, "compare/report.md", str(out.parent / "logged")))
    # MLflow's Markdown view shows only http(s) images: the logged report.md points at the UI's artifact URL
    assert f"({base}/get-artifact?path=compare%2Fscore_per_configuration.png&run_uuid={parent_id})" in md.read_text()
    exp = client.get_experiment(parent.info.experiment_id)
    state = json.loads(exp.tags[f"mlflow.sharedViewState.{parent_id}"])
    assert state["selectedColumns"][:2] == ["params.`lora.rank`", "metrics.`score`"]  # no seed: it would average
    assert state["columnOrder"] == state["selectedColumns"] and parent_id in state["searchFilter"]
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "lora.rank"}]


@pytest.mark.slow
def test_compare_reads_a_sweep_from_a_sqlite_store_and_summarises_it_on_the_parent(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id, solved = log_sweep(uri, tmp_path)
    check_compare(uri, parent_id, solved, tmp_path / "report", capsys)
    child_ids = list(solved)

    # The same runs by id list and by filter: the same configurations, no parent to log to.
    assert compare.main([",".join(child_ids), "--tracking-uri", uri, "--out", str(tmp_path / "ids")]) == 0
    assert compare.main(["params.`lora.rank` = '16'", "--tracking-uri", uri, "--out", str(tmp_path / "f")]) == 0
    doc = json.loads((tmp_path / "f" / "compare.json").read_text())
    assert doc["swept"] == [] and sorted(doc["configurations"][0]["runs"]) == sorted(child_ids[3:])
    assert compare.main([parent_id, "--tracking-uri", uri, "--baseline", "lora.rank=3"]) == 2
    assert "matches no configuration" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server_artifacts"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        else:
            pytest.fail("the tracking server did not come up: " + (tmp_path / "server.log").read_text()[-2000:])
        yield url
    finally:
        os.killpg(proc.pid, 15)  # the server and the worker it started, nothing else
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_compare_reads_a_sweep_from_a_tracking_server(tmp_path, tracking_server, capsys):
    parent_id, solved = log_sweep(tracking_server, tmp_path)
    check_compare(tracking_server, parent_id, solved, tmp_path / "report", capsys)
