"""Folds across workers on a CPU: a 4-fold run with 1 worker against 2 workers, the per-fold overhead at one fold
per task, and each worker's idle time.

Every run is a whole `python -m arcfold` process (start-up, imports and model loads included), tiny model, DFS
inference, no tracking. "1 worker" is devices=1: the folds run in the arcfold process itself, once with torch's
default threads (every core: what a run gets by default) and once with cores / 2 threads (the threads each of
the two workers gets); "2 workers" is devices=2: two worker processes of cores / 2 threads each. The machine's
load average is printed before and after: other processes on the cores skew every number, and a busy machine
hits the every-core run hardest (its threads wait on each other while other processes hold the cores).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_workers.py [--epochs 24] [--tasks 8] [--per-task-epochs 8]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["tracking=off", "save_adapters=none", "inference=dfs", "data.order=size", "split=balanced"]


def arcfold(out: Path, *overrides: str) -> tuple[float, Path]:
    """Wall seconds of one run, and its run dir."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default: every core
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "arcfold", f"outputs={out}", *COMMON, *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"arcfold failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return wall, next((out / "runs").iterdir())


def table(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def overhead_lines(run_dir: Path) -> list[str]:
    """Per fold: adapter reset, training set-up (samples, optimiser, schedule, prepare/release), queue messaging."""
    folds = table(run_dir / "folds.csv")
    lines = []
    for name in ("reset_seconds", "setup_seconds", "queue_seconds", "overhead_seconds", "fold_seconds"):
        values = [float(r[name]) for r in folds]
        lines.append(f"  {name:<18}{statistics.median(values) * 1000:>10.1f}{max(values) * 1000:>10.1f}")
    share = sum(float(r["overhead_seconds"]) for r in folds) / sum(float(r["fold_seconds"]) for r in folds)
    return [
        f"  {'(milliseconds)':<18}{'median':>10}{'max':>10}",
        *lines,
        f"  overhead share of fold time: {share:.2%} over {len(folds)} folds "
        f"(max per fold {max(float(r['overhead_share']) for r in folds):.2%})",
    ]


def worker_lines(run_dir: Path) -> list[str]:
    rows = table(run_dir / "workers.csv")
    out = [
        f"  {'worker':<8}{'device':<8}{'threads':>8}{'folds':>7}{'startup s':>11}{'busy s':>9}{'idle s':>9}"
        f"{'idle share':>12}"
    ]
    for r in rows:
        busy, idle = float(r["busy_seconds"]), float(r["idle_seconds"])
        out.append(
            f"  {r['worker']:<8}{r['device']:<8}{r['threads']:>8}{r['folds']:>7}"
            f"{float(r['startup_seconds']):>11.1f}{busy:>9.1f}{idle:>9.1f}{idle / (busy + idle):>12.1%}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8, help="the smallest N ARC-AGI-2 eval tasks")
    parser.add_argument("--epochs", type=int, default=24, help="train.epochs of the 4-fold runs")
    parser.add_argument("--per-task-epochs", type=int, default=8, help="train.epochs of the one-fold-per-task run")
    args = parser.parse_args()
    four = [f"data.limit={args.tasks}", "folds=4", f"train.epochs={args.epochs}"]
    per_task = [f"data.limit={args.tasks}", "folds=per_task", f"train.epochs={args.per_task_epochs}", "devices=2"]
    print(f"bench_workers: {load()} before")
    with tempfile.TemporaryDirectory() as tmp:
        half = max(1, len(os.sched_getaffinity(0)) // 2)
        one_wall, _ = arcfold(Path(tmp) / "one", *four, "devices=1")
        half_wall, _ = arcfold(Path(tmp) / "half", *four, "devices=1", f"executor.threads={half}")
        two_wall, two_dir = arcfold(Path(tmp) / "two", *four, "devices=2")
        task_wall, task_dir = arcfold(Path(tmp) / "per_task", *per_task)
        print(f"bench_workers: {load()} after\n")
        print(f"4 folds of {args.tasks} tasks, train.epochs={args.epochs} (whole `python -m arcfold` runs):")
        print(f"  1 worker  (devices=1, every core)        {one_wall:>8.1f} s")
        print(f"  1 worker  (devices=1, {half} thread(s))        {half_wall:>8.1f} s")
        print(
            f"  2 workers (devices=2, {half} thread(s) each)   {two_wall:>8.1f} s   ratio {two_wall / one_wall:.2f}x "
            f"and {two_wall / half_wall:.2f}x (target <= 0.65x)\n"
        )
        print("idle time per worker, 4-fold run with 2 workers (idle: loaded but without a fold):")
        print("\n".join(worker_lines(two_dir)) + "\n")
        print(
            f"per-fold overhead, one fold per task ({args.tasks} folds, train.epochs={args.per_task_epochs}, "
            f"devices=2, {task_wall:.1f} s):"
        )
        print("\n".join(overhead_lines(task_dir)))
        print("  idle time per worker:")
        print("\n".join("  " + line for line in worker_lines(task_dir)))
    print(
        f"\ncommand: PYTHONPATH=src {Path(sys.executable).name} benchmarks/bench_workers.py --tasks {args.tasks} "
        f"--epochs {args.epochs} --per-task-epochs {args.per_task_epochs}"
    )


if __name__ == "__main__":
    main()
