"""`python -m arcfold.cli.compare TARGET... [--baseline B] [--out DIR]`: an honest comparison of runs from MLflow.

TARGET is a sweep directory (its mlflow_parent.json names the store and the parent run), a parent run id (its
child runs), one or more run ids, or an MLflow filter (`"params.lora.rank = '8'"`, searched in --experiment).
The runs are grouped into configurations (the swept params, seeds aside); the report gives each configuration's
mean +- sd over seeds, the paired bootstrap interval of its difference to the baseline over tasks, and the
per-task solved matrix, as report.md, report.html (self-contained), compare.json and PNG plots in --out. A
configuration is "best" only where its paired interval against every other excludes zero; otherwise the verdict
is "no clear winner". With a parent run, the files are logged to it, and it carries the sweep's summary: a
description with the verdict and links, the leading configuration's params and rounded means, the counts.

    python -m arcfold.cli.compare outputs/sweeps/2026-11-27_10-00-00
    python -m arcfold.cli.compare 3f2a... --baseline lora.rank=8 --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

from arcfold.report.comparison import markdown_table, table_rows, verdict
from arcfold.track.runs import Source, printed_links, resolve, summarise


def default_out(source: Source) -> Path:
    if source.sweep_dir is not None:
        return source.sweep_dir / "compare"
    name = source.parent_id or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs") / "compare" / name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m arcfold.cli.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="+", help="a sweep dir, a parent run id, run ids, or an MLflow filter")
    p.add_argument(
        "--baseline",
        help="the configuration to compare against, e.g. 'lora.rank=8' (default: the first), or one of its run ids",
    )
    p.add_argument(
        "--out",
        help="where report.md, report.html, compare.json and the plots go (default: <sweep dir>/compare, "
        "else outputs/compare/<parent id or time>)",
    )
    p.add_argument(
        "--tracking-uri",
        help="the MLflow store (default: the sweep's, else $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
    )
    p.add_argument("--experiment", default="arcfold", help="where a filter searches (default: arcfold)")
    p.add_argument("--level", type=float, default=0.95, help="the intervals' confidence level (default 0.95)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument(
        "--ui-url",
        help="the MLflow UI's address for the printed link (default: the tracking URI if "
        "it is http(s), else http://127.0.0.1:5000 as `make ui` serves it)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    source = resolve(args.target, args.tracking_uri, args.experiment)
    if not source.run_ids:
        print(f"arcfold.cli.compare: no runs match {' '.join(args.target)!r} in {source.uri}", file=sys.stderr)
        return 2
    try:
        comparison, files, links = summarise(
            source, args.out or default_out(source), args.baseline, args.level, args.n_boot, args.ui_url
        )
    except ValueError as err:  # e.g. a baseline that matches no configuration
        print(f"arcfold.cli.compare: {err}", file=sys.stderr)
        return 2
    if comparison is None:
        print("arcfold.cli.compare: none of the runs logged params (all refused before starting)", file=sys.stderr)
        return 2
    print(markdown_table(table_rows(comparison)))
    print(f"\n{verdict(comparison)}\n")
    print(printed_links(files, links))
    return 0


if __name__ == "__main__":
    sys.exit(main())
