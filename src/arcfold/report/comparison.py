"""A sweep's comparison from plain run records: configurations over seeds, paired intervals against a baseline,
the per-task solved matrix, and the Markdown report with its plots. MLflow stays outside (arcfold.cli.compare reads
the runs); this module sees only RunRecords.

A configuration is the set of runs that agree on every swept param except the seeds (SEED_KEYS), so a sweep
`-m seed=1,2,3 lora.rank=8,16` has two configurations of three runs each.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from arcfold.data.submission import write_json_atomic
from arcfold.report import plots
from arcfold.report.stats import Interval, mean_sd, paired_bootstrap

# Params that are repeats of one configuration, not a configuration of their own (`seed` drives them all).
SEED_KEYS = ("seed", "split.seed", "train.seed", "inference.seed", "inference.scoring.seed", "lora.init_seed")
NOT_SETTINGS = ("run_dir", "outputs", "tracking.run_name", "repeats")  # differ per run, configure nothing
# The table's columns: (metric, heading, digits); the first is the headline.
TABLE_METRICS = (
    ("score", "score", 3),
    ("oracle", "oracle", 3),
    ("selection_accuracy", "selection acc.", 3),
    ("answer_nll", "answer NLL", 4),
    ("answer_nll_base", "answer NLL, no TTT", 4),  # the base model alone (inference.base_nll=true; else -)
    ("seconds_total", "seconds", 1),
)
MIN_TASKS = 10  # fewer paired tasks than this: the interval is shown but no better/worse verdict is given
# Per-task metrics compared against the baseline, and whether higher is better.
PAIRED_METRICS = {"score": True, "answer_nll": False}


@dataclass
class RunRecord:
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    status: str = "FINISHED"
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> task id -> value

    @property
    def seed(self) -> str:
        return self.params.get("seed", "")


@dataclass
class Configuration:
    values: dict[str, str]  # the swept params' values (seeds excluded)
    runs: list[RunRecord]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    def metric(self, name: str) -> list[float]:
        return [r.metrics[name] for r in self.runs if name in r.metrics]

    def per_task_mean(self, metric: str, tasks: Sequence[str]) -> np.ndarray:
        """Each task's value averaged over this configuration's runs (NaN where no run has it)."""
        table = np.array([[r.per_task.get(metric, {}).get(t, math.nan) for t in tasks] for r in self.runs])
        with np.errstate(invalid="ignore"):
            counts = np.sum(~np.isnan(table), axis=0)
            return np.where(counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), math.nan)


@dataclass
class Comparison:
    configurations: list[Configuration]
    swept: list[str]  # the swept keys (seeds excluded) that tell configurations apart
    seeds: list[str]  # the seed keys that vary between runs
    baseline: int  # index into configurations
    tasks: list[str]
    intervals: dict[str, list[Interval | None]]  # metric -> per configuration (None for the baseline itself)
    level: float
    best: int  # index of the best configuration: highest mean score, then lowest mean answer NLL

    @property
    def runs(self) -> list[RunRecord]:
        return [r for c in self.configurations for r in c.runs]

    @property
    def repeat_key(self) -> str | None:
        """The param that tells a configuration's runs apart: `seed` (which drives the others), else the first."""
        return "seed" if "seed" in self.seeds else (self.seeds[0] if self.seeds else None)


def _natural(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def swept_keys(runs: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """(settings that differ between runs, seed keys that differ), each sorted."""
    keys = sorted({k for r in runs for k in r.params} - set(NOT_SETTINGS))
    varying = [k for k in keys if len({r.params.get(k, "") for r in runs}) > 1]
    return [k for k in varying if k not in SEED_KEYS], [k for k in varying if k in SEED_KEYS]


def group(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[Configuration]:
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(tuple(r.params.get(k, "") for k in keys), []).append(r)
    ordered = sorted(groups, key=lambda values: [_natural(v) for v in values])
    return [
        Configuration(dict(zip(keys, values)), sorted(groups[values], key=lambda r: _natural(r.seed)))
        for values in ordered
    ]


def pick_baseline(configs: Sequence[Configuration], baseline: str | None) -> int:
    """`baseline`: a configuration's label or part of it ("lora.rank=8"), or a run id in it; None: the first."""
    if not baseline:
        return 0
    wanted = set(baseline.replace(",", " ").split())
    for i, c in enumerate(configs):
        pairs = {f"{k}={v}" for k, v in c.values.items()}
        if wanted <= pairs or baseline in {r.run_id for r in c.runs} or baseline == c.label:
            return i
    raise ValueError(
        f"baseline {baseline!r} matches no configuration; the configurations are: "
        + "; ".join(c.label for c in configs)
    )


def compare(
    runs: Sequence[RunRecord], baseline: str | None = None, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> Comparison:
    if not runs:
        raise ValueError("no runs to compare")
    swept, seeds = swept_keys(runs)
    configs = group(runs, swept)
    base = pick_baseline(configs, baseline)
    tasks = sorted({t for r in runs for per in r.per_task.values() for t in per})
    intervals: dict[str, list[Interval | None]] = {}
    for metric in PAIRED_METRICS:
        if not any(metric in r.per_task for r in runs):
            continue
        b = configs[base].per_task_mean(metric, tasks)
        intervals[metric] = [
            None if i == base else paired_bootstrap(c.per_task_mean(metric, tasks), b, n_boot, level, seed)
            for i, c in enumerate(configs)
        ]

    def rank(i: int) -> tuple[float, float]:
        score, nll = mean_sd(configs[i].metric("score"))[0], mean_sd(configs[i].metric("answer_nll"))[0]
        return (-score if math.isfinite(score) else math.inf, nll if math.isfinite(nll) else math.inf)

    best = min(range(len(configs)), key=rank)
    return Comparison(configs, swept, seeds, base, tasks, intervals, level, best)


# ----------------------------------------------------------------------------------------------- output


def _pm(values: Sequence[float], digits: int) -> str:
    mean, sd = mean_sd(values)
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {sd:.{digits}f}" if math.isfinite(sd) else "")


def _interval(iv: Interval | None, higher_is_better: bool, digits: int) -> str:
    if iv is None:
        return "baseline"
    if not math.isfinite(iv.mean):
        return "-"
    text = f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"
    if iv.n_tasks < MIN_TASKS:  # a bootstrap over a handful of tasks has too few distinct resamples to mean much
        text += f" (only {iv.n_tasks} tasks: no verdict)"
    elif iv.excludes_zero:
        text += " **better**" if (iv.mean > 0) == higher_is_better else " **worse**"
    return text


def table_rows(c: Comparison) -> list[dict[str, str]]:
    """The configurations table: swept values, runs, mean +- sd of each metric, paired intervals vs baseline."""
    rows = []
    for i, conf in enumerate(c.configurations):
        row = {k: conf.values[k] for k in c.swept} if c.swept else {"configuration": conf.label}
        row["runs"] = str(len(conf.runs))
        for metric, heading, digits in TABLE_METRICS:
            row[heading] = _pm(conf.metric(metric), digits)
        for metric, ivs in c.intervals.items():
            digits = 3 if metric == "score" else 4
            row[f"d {metric} vs baseline"] = _interval(ivs[i], PAIRED_METRICS[metric], digits)
        if i == c.best:
            row[next(iter(row))] += " (best)"
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in cols) + " |" for r in rows]
    return "\n".join(lines)


def run_label(c: Comparison, r: RunRecord) -> str:
    conf = next(conf for conf in c.configurations if r in conf.runs)
    seed = f"{c.repeat_key}={r.params[c.repeat_key]}" if c.repeat_key in r.params else ""
    return " ".join(x for x in (conf.label if c.swept else "", seed) if x) or r.name or r.run_id[:8]


def solved_matrix(c: Comparison) -> np.ndarray:
    """tasks x runs: each task's score per run (NaN where the run has none)."""
    return np.array([[r.per_task.get("score", {}).get(t, math.nan) for r in c.runs] for t in c.tasks]).reshape(
        len(c.tasks), len(c.runs)
    )


def write_report(
    c: Comparison, out: str | Path, title: str = "arcfold comparison", max_matrix_rows: int = 200
) -> dict[str, Path]:
    """report.md, compare.json (strict JSON), solved_matrix.csv and the PNG plots in `out`; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, labels = c.runs, [run_label(c, r) for r in c.runs]
    base = c.configurations[c.baseline]
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
                base.label,
                out / f"{metric}_differences.png",
            )

    best = c.configurations[c.best]
    failed = [r for r in runs if r.status != "FINISHED"]
    lines = [
        f"# {title}",
        "",
        f"{len(runs)} runs in {len(c.configurations)} configurations over {len(c.tasks)} tasks; "
        f"swept: {', '.join(c.swept) or 'nothing'}; repeats by {c.repeat_key or 'nothing (one run each)'}.",
        f"Baseline: **{base.label}**. Best (highest mean score, then lowest answer NLL): **{best.label}**.",
        f"Runs not FINISHED: {len(failed)}" + (f" ({', '.join(r.run_id[:8] for r in failed)})" if failed else ""),
        "",
        "## Configurations",
        "",
        "Mean +- sd over the runs of each configuration (sd over seeds: the noise a single run carries). "
        f"`d metric vs baseline`: the mean paired difference over tasks and its {c.level:.0%} bootstrap "
        "interval (tasks resampled, each task's values averaged over the configuration's runs); **better** / "
        f"**worse** where the interval excludes zero (given at least {MIN_TASKS} tasks). Lower answer NLL is "
        "better.",
        "",
        markdown_table(table_rows(c)),
        "",
    ]
    if any(k.endswith("_png") for k in files):
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for k, p in files.items() if k.endswith("_png")] + [""]
    if c.tasks and runs:
        lines += [
            "## Solved per task",
            "",
            "Each cell: the task's score in that run (1 = every test output solved by an attempt, "
            ". = none, blank = not predicted).",
            "",
        ]
        shown = c.tasks[:max_matrix_rows]
        rows = [
            {
                "task": t,
                **{
                    f"r{j + 1}": "" if math.isnan(v) else ("1" if v == 1 else "." if v == 0 else f"{v:.2f}")
                    for j, v in enumerate(matrix[i])
                },
            }
            for i, t in enumerate(shown)
        ]
        lines += [markdown_table(rows), ""]
        if len(c.tasks) > len(shown):
            lines.append(f"({len(c.tasks) - len(shown)} more tasks in solved_matrix.csv)")
        lines += [
            "Runs: " + "; ".join(f"r{j + 1} = {lab} ({r.run_id[:8]})" for j, (lab, r) in enumerate(zip(labels, runs))),
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))
    files["report"] = out / "report.md"
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
        "best": c.configurations[c.best].label,
        "configurations": [
            {
                "label": conf.label,
                "values": conf.values,
                "runs": [r.run_id for r in conf.runs],
                "metrics": {m: dict(zip(("mean", "sd"), mean_sd(conf.metric(m)))) for m, _, _ in TABLE_METRICS},
                "vs_baseline": {m: _interval_json(ivs[i]) for m, ivs in c.intervals.items()},
            }
            for i, conf in enumerate(c.configurations)
        ],
    }


__all__ = [
    "SEED_KEYS",
    "RunRecord",
    "Configuration",
    "Comparison",
    "compare",
    "swept_keys",
    "table_rows",
    "markdown_table",
    "write_report",
    "solved_matrix",
    "to_json",
]
