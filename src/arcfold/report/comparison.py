"""A sweep's comparison from plain run records: configurations over seeds, paired intervals against a baseline,
the per-task solved matrix, the verdict, and the report (Markdown and self-contained HTML) with its plots. MLflow
stays outside (arcfold.cli.compare reads the runs); this module sees only RunRecords.

A configuration is the set of runs that agree on every swept param except the seeds (SEED_KEYS), so a sweep
`-m seed=1,2,3 lora.rank=8,16` has two configurations of three runs each. A sweep over a preset (PRESETS:
`-m variant=no_ttt,learn_rule`) names its configurations by the preset alone when that tells them apart: the
keys each preset sets are its own business, and eleven arms' worth of them make no readable table.

The leader is the configuration with the highest mean score, then the lowest mean answer NLL. It is called the
best only where that lead is clear: against every other configuration the paired interval of the score
difference excludes zero in its favour, or the score does not tell them apart and the answer NLL's interval
does (with at least MIN_TASKS paired tasks). Otherwise the verdict is "no clear winner".

The answer NLL is one mean everywhere: per test output (the run metric `answer_nll`). Its paired difference
weights each task by its test outputs, so the difference of two configurations' columns is the interval's mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from arcfold.report.document import markdown_table
from arcfold.report.stats import Interval, mean_sd, paired_bootstrap

# Params that are repeats of one configuration, not a configuration of their own (`seed` drives them all).
SEED_KEYS = ("seed", "split.seed", "train.seed", "inference.seed", "inference.scoring.seed", "lora.init_seed")
NOT_SETTINGS = ("run_dir", "outputs", "tracking.run_name", "repeats")  # differ per run, configure nothing
PRESETS = ("variant", "experiment")  # config groups that set many keys at once (logged as params when chosen)
# The table's columns: (metric, heading, digits); the first is the headline.
TABLE_METRICS = (
    ("score", "score", 3),
    ("oracle", "oracle", 3),
    ("selection_accuracy", "selection acc.", 3),
    ("answer_nll", "answer NLL", 4),
    ("answer_nll_base", "answer NLL, no TTT", 4),  # the base model alone (inference.base_nll=true; else no column)
    ("seconds_total", "seconds", 1),
)
MIN_TASKS = 10  # fewer paired tasks than this: the interval is shown but no better/worse verdict is given
# Per-task metrics compared against the baseline, and whether higher is better.
PAIRED_METRICS = {"score": True, "answer_nll": False}
# A per-task metric that is a mean over the task's test outputs, and the per-task count that weights it (the
# score is the leaderboard's per-task average: unweighted).
WEIGHTS = {"answer_nll": "answer_nll_outputs"}


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
    leader: int  # index of the configuration with the highest mean score, then the lowest mean answer NLL
    ranking: list[int]  # the configurations in that order, the leader first
    versus_leader: dict[str, list[Interval | None]]  # metric -> the leader minus each configuration (None: itself)
    best: int | None  # the leader where its lead is clear (see the module doc), else None: no clear winner

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


def by_preset(runs: Sequence[RunRecord], swept: list[str]) -> list[str]:
    """The swept keys that name the configurations: a swept preset alone where it tells them apart, else all."""
    for key in PRESETS:
        if key in swept and len(group(runs, [key])) == len(group(runs, swept)):
            return [key]
    return swept


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


def task_weights(runs: Sequence[RunRecord], metric: str, tasks: Sequence[str]) -> np.ndarray | None:
    """Each task's weight for a per-output metric: its test outputs with a value (the most any run has)."""
    key = WEIGHTS.get(metric)
    counts = [r.per_task[key] for r in runs if key and key in r.per_task]
    if not counts:
        return None
    return np.array([max((c.get(t, 0.0) for c in counts), default=0.0) for t in tasks], dtype=float)


def decides(iv: Interval | None, higher_is_better: bool) -> bool:
    """The interval says the first configuration is better: it excludes zero on the good side, over enough tasks."""
    return iv is not None and iv.n_tasks >= MIN_TASKS and iv.excludes_zero and (iv.mean > 0) == higher_is_better


def compare(
    runs: Sequence[RunRecord], baseline: str | None = None, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> Comparison:
    if not runs:
        raise ValueError("no runs to compare")
    swept, seeds = swept_keys(runs)
    swept = by_preset(runs, swept)
    configs = group(runs, swept)
    base = pick_baseline(configs, baseline)
    tasks = sorted({t for r in runs for metric in PAIRED_METRICS for t in r.per_task.get(metric, {})})

    def rank(i: int) -> tuple[float, float]:
        score, nll = mean_sd(configs[i].metric("score"))[0], mean_sd(configs[i].metric("answer_nll"))[0]
        return (-score if math.isfinite(score) else math.inf, nll if math.isfinite(nll) else math.inf)

    ranking = sorted(range(len(configs)), key=rank)
    leader = ranking[0]
    intervals: dict[str, list[Interval | None]] = {}
    versus: dict[str, list[Interval | None]] = {}
    for metric in PAIRED_METRICS:
        if not any(metric in r.per_task for r in runs):
            continue
        means = [c.per_task_mean(metric, tasks) for c in configs]
        weights = task_weights(runs, metric, tasks)
        intervals[metric] = [
            None if i == base else paired_bootstrap(means[i], means[base], n_boot, level, seed, weights)
            for i in range(len(configs))
        ]
        versus[metric] = [
            None if i == leader else paired_bootstrap(means[leader], means[i], n_boot, level, seed, weights)
            for i in range(len(configs))
        ]

    def clear_lead(i: int) -> bool:
        score, nll = versus.get("score", [None] * len(configs))[i], versus.get("answer_nll", [None] * len(configs))[i]
        return decides(score, True) or (not decides(score, False) and decides(nll, False))

    clear = all(clear_lead(i) for i in range(len(configs)) if i != leader)
    best = leader if clear else None
    return Comparison(configs, swept, seeds, base, tasks, intervals, level, leader, ranking, versus, best)


# ----------------------------------------------------------------------------------------------- output


def _pm(values: Sequence[float], digits: int) -> str:
    mean, sd = mean_sd(values)
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {sd:.{digits}f}" if math.isfinite(sd) else "")


def _digits(metric: str) -> int:
    return 3 if metric == "score" else 4


def interval_text(iv: Interval | None, higher_is_better: bool, digits: int) -> str:
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
    """The configurations table: swept values, runs, mean +- sd of each metric, paired intervals vs baseline. A
    metric no configuration has (answer NLL without TTT unless inference.base_nll) gets no column."""
    rows = []
    shown = [(m, h, d) for m, h, d in TABLE_METRICS if any(conf.metric(m) for conf in c.configurations)]
    for i, conf in enumerate(c.configurations):
        row = {k: conf.values[k] for k in c.swept} if c.swept else {"configuration": conf.label}
        row["runs"] = str(len(conf.runs))
        for metric, heading, digits in shown:
            row[heading] = _pm(conf.metric(metric), digits)
        for metric, ivs in c.intervals.items():
            row[f"d {metric} vs baseline"] = interval_text(ivs[i], PAIRED_METRICS[metric], _digits(metric))
        if i == c.best and len(c.configurations) > 1:
            row[next(iter(row))] += " (best)"
        rows.append(row)
    return rows


def headline(conf: Configuration) -> str:
    """A configuration's mean +- sd score over its runs, rounded for reading."""
    n = len(conf.metric("score"))
    return f"score {_pm(conf.metric('score'), 3)}" + (f" over {n} runs" if n > 1 else "")


def _plain(iv: Interval, digits: int) -> str:
    return f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def verdict(c: Comparison) -> str:
    """One line: the best configuration and the interval that makes it so, or why there is no clear winner."""
    lead, n = c.configurations[c.leader], len(c.configurations)
    if n == 1:
        return f"one configuration: {lead.label}, {headline(lead)}"
    score, nll = (c.versus_leader.get(m, [None] * n) for m in ("score", "answer_nll"))
    others = c.ranking[1:]  # the runner-up first
    undecided = [i for i in others if not (decides(score[i], True) or decides(nll[i], False))]
    other = others[0] if c.best is not None or not undecided else undecided[0]
    pairs = (("score", score[other]), ("answer_nll", nll[other]))
    shown = [(m, iv) for m, iv in pairs if iv is not None and math.isfinite(iv.mean)]
    tasks = max((iv.n_tasks for _, iv in shown), default=0)
    against = f"against {c.configurations[other].label}: " + (
        ", ".join(f"d {m} {_plain(iv, _digits(m))}" for m, iv in shown) or "no per-task results"
    )
    over = f"{c.level:.0%} paired intervals over {tasks} tasks"
    if c.best is not None:
        return f"best: {lead.label}, {headline(lead)}; {against} ({over})"
    why = f"too few for a verdict, which needs {MIN_TASKS}" if tasks < MIN_TASKS else "none excludes zero its way"
    return f"no clear winner: {lead.label} leads with {headline(lead)}, but {against} ({over}: {why})"


__all__ = [
    "SEED_KEYS",
    "RunRecord",
    "Configuration",
    "Comparison",
    "compare",
    "swept_keys",
    "by_preset",
    "table_rows",
    "markdown_table",
    "verdict",
]
