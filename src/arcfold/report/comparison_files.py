"""A comparison's files: report.md (its plots as images beside it), report.html (one self-contained file, plots
embedded, which the MLflow UI renders), compare.json (strict JSON), solved_matrix.csv and the PNG plots.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from arcfold.data.submission import write_json_atomic
from arcfold.report import plots
from arcfold.report.comparison import (
    MIN_TASKS,
    TABLE_METRICS,
    Comparison,
    RunRecord,
    table_rows,
    verdict,
)
from arcfold.report.document import Block, Heading, Image, Paragraph, Table, to_html, to_markdown
from arcfold.report.stats import Interval, mean_sd


def run_label(c: Comparison, r: RunRecord) -> str:
    conf = next(conf for conf in c.configurations if r in conf.runs)
    seed = f"{c.repeat_key}={r.params[c.repeat_key]}" if c.repeat_key in r.params else ""
    return " ".join(x for x in (conf.label if c.swept else "", seed) if x) or r.name or r.run_id[:8]


def solved_matrix(c: Comparison) -> np.ndarray:
    """tasks x runs: each task's score per run (NaN where the run has none)."""
    return np.array([[r.per_task.get("score", {}).get(t, math.nan) for r in c.runs] for t in c.tasks]).reshape(
        len(c.tasks), len(c.runs)
    )


def write_plots(c: Comparison, out: Path) -> dict[str, Path]:
    """The solved matrix (PNG and CSV), each metric per configuration, the differences against the baseline."""
    runs, labels = c.runs, [run_label(c, r) for r in c.runs]
    files: dict[str, Path] = {}
    matrix = solved_matrix(c)
    if c.tasks and runs:
        files["solved_matrix_png"] = plots.solved_matrix(matrix, c.tasks, labels, out / "solved_matrix.png")
        with open(out / "solved_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", *[r.run_id for r in runs]])
            writer.writerows([t, *("" if math.isnan(v) else f"{v:g}" for v in row)] for t, row in zip(c.tasks, matrix))
        files["solved_matrix_csv"] = out / "solved_matrix.csv"
    conf_labels = [conf.label for conf in c.configurations]
    for metric in ("score", "answer_nll"):
        if any(conf.metric(metric) for conf in c.configurations):
            files[f"{metric}_png"] = plots.per_config(
                conf_labels,
                [conf.metric(metric) for conf in c.configurations],
                metric,
                out / f"{metric}_per_configuration.png",
            )
    for metric, ivs in c.intervals.items():
        if len(c.configurations) > 1:
            others = [i for i in range(len(ivs)) if i != c.baseline]
            files[f"d_{metric}_png"] = plots.differences(
                [conf_labels[i] for i in others],
                [ivs[i] for i in others],
                metric,
                c.configurations[c.baseline].label,
                out / f"{metric}_differences.png",
            )
    return files


def report_blocks(c: Comparison, title: str, files: Mapping[str, Path], max_matrix_rows: int = 200) -> list[Block]:
    """The report's content: summary, the verdict, the configurations table, the plots, the solved matrix."""
    runs, labels = c.runs, [run_label(c, r) for r in c.runs]
    failed = [r for r in runs if r.status != "FINISHED"]
    blocks: list[Block] = [
        Heading(title, 1),
        Paragraph(
            f"{len(runs)} runs in {len(c.configurations)} configurations over {len(c.tasks)} tasks; "
            f"swept: {', '.join(c.swept) or 'nothing'}; repeats by {c.repeat_key or 'nothing (one run each)'}. "
            f"Baseline: **{c.configurations[c.baseline].label}**. "
            f"Runs not FINISHED: {len(failed)}" + (f" ({', '.join(r.run_id[:8] for r in failed)})" if failed else "")
        ),
        Paragraph(f"**{verdict(c)[0].upper() + verdict(c)[1:]}**"),
        Heading("Configurations"),
        Paragraph(
            "Mean +- sd over the runs of each configuration (sd over seeds: the noise a single run carries). "
            f"`d metric vs baseline`: the mean paired difference over tasks and its {c.level:.0%} bootstrap "
            "interval (tasks resampled, each task's values averaged over the configuration's runs; the answer NLL "
            "is a mean per test output in the column and in the difference); **better** / **worse** where the "
            f"interval excludes zero (given at least {MIN_TASKS} tasks). Lower answer NLL is better."
        ),
        Table(table_rows(c)),
    ]
    pngs = [p for k, p in files.items() if k.endswith("_png")]
    if pngs:
        blocks += [Heading("Plots"), *(Image(p, p.stem.replace("_", " ")) for p in pngs)]
    if c.tasks and runs:
        matrix, shown = solved_matrix(c), c.tasks[:max_matrix_rows]
        blocks += [
            Heading("Solved per task"),
            Paragraph(
                "Each cell: the task's score in that run (1 = every test output solved by an attempt, "
                ". = none, blank = not predicted)."
            ),
            Table(
                [
                    {
                        "task": t,
                        **{
                            f"r{j + 1}": "" if math.isnan(v) else ("1" if v == 1 else "." if v == 0 else f"{v:.2f}")
                            for j, v in enumerate(matrix[i])
                        },
                    }
                    for i, t in enumerate(shown)
                ]
            ),
        ]
        if len(c.tasks) > len(shown):
            blocks.append(Paragraph(f"({len(c.tasks) - len(shown)} more tasks in solved_matrix.csv)"))
        named = [f"r{j + 1} = {lab} ({r.run_id[:8]})" for j, (lab, r) in enumerate(zip(labels, runs))]
        blocks.append(Paragraph("Runs: " + "; ".join(named)))
    return blocks


def write_report(c: Comparison, out: str | Path, title: str = "arcfold comparison") -> dict[str, Path]:
    """report.md (plots as images beside it), report.html (one file, plots embedded), compare.json (strict JSON),
    solved_matrix.csv and the PNG plots in `out`; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_plots(c, out)
    blocks = report_blocks(c, title, files)
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks, title))
    files["report"], files["html"] = out / "report.md", out / "report.html"
    files["json"] = write_json_atomic(out / "compare.json", to_json(c))
    return files


def _interval_json(iv: Interval | None) -> dict[str, Any] | None:
    return None if iv is None else {**vars(iv), "excludes_zero": iv.excludes_zero}


def to_json(c: Comparison) -> dict[str, Any]:
    return {
        "swept": c.swept,
        "seeds": c.seeds,
        "level": c.level,
        "tasks": c.tasks,
        "baseline": c.configurations[c.baseline].label,
        "leader": c.configurations[c.leader].label,
        "best": None if c.best is None else c.configurations[c.best].label,  # null: no clear winner
        "verdict": verdict(c),
        "configurations": [
            {
                "label": conf.label,
                "values": conf.values,
                "runs": [r.run_id for r in conf.runs],
                "metrics": {m: dict(zip(("mean", "sd"), mean_sd(conf.metric(m)))) for m, _, _ in TABLE_METRICS},
                "vs_baseline": {m: _interval_json(ivs[i]) for m, ivs in c.intervals.items()},
                "leader_minus_this": {m: _interval_json(ivs[i]) for m, ivs in c.versus_leader.items()},
            }
            for i, conf in enumerate(c.configurations)
        ],
    }


__all__ = ["report_blocks", "run_label", "solved_matrix", "to_json", "write_plots", "write_report"]
