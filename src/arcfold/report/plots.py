"""PNG plots of a run and of a sweep (matplotlib's Agg canvas: no display, no pyplot state shared between calls).

Run: training loss per fold, a timeline of phases per fold and device, tasks drawn in the ARC palette with their
two attempts and the true output. Sweep: the per-task solved matrix, a metric per configuration with every seed
shown, and the paired differences against the baseline with their intervals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# The ARC palette (0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey, 6 magenta, 7 orange, 8 sky, 9 maroon).
ARC_COLOURS = (
    "#000000",
    "#0074D9",
    "#FF4136",
    "#2ECC40",
    "#FFDC00",
    "#AAAAAA",
    "#F012BE",
    "#FF851B",
    "#7FDBFF",
    "#870C25",
)
PHASE_COLOURS = {
    "load": "#7f7f7f",
    "train": "#1f77b4",
    "inference": "#ff7f0e",
    "predict": "#ff7f0e",
    "scoring": "#2ca02c",
    "score": "#2ca02c",
    "logging": "#9467bd",
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def loss_per_fold(losses: Mapping[int, Sequence[float]], path: str | Path) -> Path:
    """One line per fold: the training loss at each optimiser step."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    window = 1
    for i, (fold, values) in enumerate(sorted(losses.items())):
        if not len(values):
            continue
        steps, colour = np.arange(1, len(values) + 1), f"C{i % 10}"
        # Per-step losses of small batches are noisy: the raw values faint, a running mean drawn over them.
        window = max(1, len(values) // 10)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps, values, color=colour, alpha=0.3 if window > 1 else 1.0, linewidth=0.8)
        ax.plot(steps[window - 1 :], smooth, color=colour, linewidth=2, label=f"fold {fold}")
    title = "Training loss per fold" + (f" (bold: running mean over {window} steps)" if window > 1 else "")
    ax.set(xlabel="optimiser step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    if any(len(v) for v in losses.values()):
        ax.legend(fontsize="small", ncols=max(1, math.ceil(len(losses) / 12)))
    return _save(fig, path)


def learning_curve(curve: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Pretraining: the training loss and the held-out NLL (left axis) and the held-out greedy solves (right)."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    steps = [row["step"] for row in curve]
    ax.plot(steps, [row["train_loss"] for row in curve], "o-", color="C0", label="training loss (mean since last)")
    ax.plot(steps, [row["heldout_nll"] for row in curve], "s-", color="C1", label="held-out NLL (test outputs)")
    ax.set(xlabel="optimiser step", ylabel="NLL per output token", title="Pretraining")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(steps, [100 * row["heldout_solved"] for row in curve], "^-", color="C2", label="held-out greedy solves")
    right.set(ylabel="held-out tasks solved by greedy (%)", ylim=(0, 100))
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="center right")
    return _save(fig, path)


def phase_timeline(spans: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A bar per span (phase, fold, device, start, end: seconds from the run's start), one row per device and fold."""
    lanes = sorted({(str(s.get("device", "")), -1 if s.get("fold") is None else int(s["fold"])) for s in spans})
    row = {lane: i for i, lane in enumerate(lanes)}
    fig = _figure(9, 1.2 + 0.35 * max(1, len(lanes)))
    ax = fig.add_subplot()
    seen: set[str] = set()
    for s in spans:
        lane = (str(s.get("device", "")), -1 if s.get("fold") is None else int(s["fold"]))
        phase = str(s["phase"])
        ax.barh(
            row[lane],
            float(s["end"]) - float(s["start"]),
            left=float(s["start"]),
            height=0.7,
            color=PHASE_COLOURS.get(phase, "#bcbd22"),
            label=None if phase in seen else phase,
        )
        seen.add(phase)
    ax.set_yticks(range(len(lanes)), [f"{d} run" if f < 0 else f"{d} fold {f}" for d, f in lanes])
    ax.invert_yaxis()
    ax.set(xlabel="seconds since the run started", title="Phases per fold and device")
    ax.grid(axis="x", alpha=0.3)
    if seen:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars stay visible
    return _save(fig, path)


def solved_matrix(values: np.ndarray, tasks: Sequence[str], runs: Sequence[str], path: str | Path) -> Path:
    """Tasks x runs, each cell the task's score in that run (fraction of its test outputs solved; grey: none)."""
    from matplotlib.colors import LinearSegmentedColormap

    values = np.asarray(values, dtype=float)
    fig = _figure(min(4 + 0.45 * len(runs), 20), min(max(3.0, 1.5 + 0.18 * len(tasks)), 40))
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("solved", ["#f4f4f4", "#2ca02c"]).with_extremes(bad="#9a9a9a")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(runs)), runs, rotation=60, ha="right", fontsize="x-small")
    ax.set_yticks(range(len(tasks)), tasks, fontsize="x-small" if len(tasks) < 80 else 4)
    ax.set_xticks(np.arange(-0.5, len(runs)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    solved = np.nansum(values, axis=0)
    ax.set_title(
        f"Solved per task and run (tasks solved per run: {', '.join(f'{s:g}' for s in solved)})", fontsize="small"
    )
    fig.colorbar(image, ax=ax, label="task score", shrink=0.6)
    return _save(fig, path)


def _draw_grid(ax: Any, grid: np.ndarray | None, title: str) -> None:
    from matplotlib.colors import ListedColormap

    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])
    if grid is None:
        ax.text(
            0.5, 0.5, "no attempt\n(a placeholder\nwas submitted)", ha="center", va="center", transform=ax.transAxes
        )
        return
    grid = np.asarray(grid)
    ax.imshow(grid, cmap=ListedColormap(ARC_COLOURS), vmin=0, vmax=9, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, grid.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, grid.shape[0]), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel(f"{grid.shape[0]}x{grid.shape[1]}", fontsize="x-small")


def task_rendering(
    task_id: str,
    test_input: np.ndarray,
    attempts: Sequence[np.ndarray | None],
    truth: np.ndarray | None,
    path: str | Path,
) -> Path:
    """The test input, both attempts and the true output side by side, in the ARC palette; the title says
    whether an attempt is right."""
    two = list(attempts)[:2] + [None] * (2 - len(attempts[:2]))
    panels = [("test input", test_input), ("attempt 1", two[0]), ("attempt 2", two[1]), ("true output", truth)]
    solved = truth is not None and any(g is not None and np.array_equal(np.asarray(g), truth) for g in two)
    fig = _figure(10, 3.2)
    fig.suptitle(f"task {task_id}: {'solved' if solved else 'not solved'}", fontsize="medium")
    for ax, (title, grid) in zip(fig.subplots(1, 4), panels):
        right = (
            truth is not None
            and grid is not None
            and title.startswith("attempt")
            and np.array_equal(np.asarray(grid), np.asarray(truth))
        )
        _draw_grid(ax, grid, f"{title} (right)" if right else title)
    return _save(fig, path)


def per_config(labels: Sequence[str], values: Sequence[Sequence[float]], metric: str, path: str | Path) -> Path:
    """Each configuration's runs as dots (one per seed) with their mean and sd: the seed noise in plain sight."""
    fig = _figure(min(3 + 1.1 * len(labels), 16), 4.2)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # horizontal jitter only, so equal values stay visible
    for i, vals in enumerate(values):
        v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], dtype=float)
        if v.size == 0:
            continue
        ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=28, alpha=0.75, color="#1f77b4", zorder=3)
        sd = v.std(ddof=1) if v.size > 1 else 0.0
        ax.errorbar(
            i + 0.25,
            v.mean(),
            yerr=sd,
            fmt="D",
            color="#d62728",
            capsize=4,
            zorder=4,
            label="mean +- sd" if i == 0 else None,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize="small")
    ax.set(ylabel=metric, title=f"{metric} per configuration (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def differences(labels: Sequence[str], intervals: Sequence[Any], metric: str, baseline: str, path: str | Path) -> Path:
    """Forest plot: each configuration's mean paired difference to the baseline and its bootstrap interval."""
    fig = _figure(8, 1.5 + 0.5 * max(1, len(labels)))
    ax = fig.add_subplot()
    for i, iv in enumerate(intervals):
        if iv is None or not math.isfinite(iv.mean):
            continue
        colour = "#d62728" if iv.excludes_zero else "#1f77b4"
        ax.errorbar(iv.mean, i, xerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", color=colour, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.invert_yaxis()
    level = next((iv.level for iv in intervals if iv is not None), 0.95)
    ax.set(
        xlabel=f"{metric} difference to {baseline} (paired over tasks)",
        title=f"{metric}: {level:.0%} bootstrap intervals (red: excludes 0)",
    )
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


__all__ = [
    "ARC_COLOURS",
    "loss_per_fold",
    "phase_timeline",
    "solved_matrix",
    "task_rendering",
    "per_config",
    "differences",
]
