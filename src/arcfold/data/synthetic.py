"""Generated ARC tasks: families of simple, verifiable transformations on random grids (numpy only).

A tiny model trained from scratch can learn these; each has instances among the real ARC-AGI-1 tasks, which
`fit` finds by running the family's rule over a task's pairs. The families, in the order a model picks them up:

  identity    the output is the input: the format itself (shapes, row ends, end token)
  colour_map  a fixed recolouring (a function on colours) read off the demonstrations: in-context lookup
  geometry    one of the 7 non-identity flips and turns (D8): attention to a mirrored position
  upscale     each cell becomes a k x k block (k = 2, 3): the first family a tiny model learns (issue probe)
  tile        the grid repeated 1x2, 2x1 or 2x2: copying with a period
  crop        the bounding box of the one object on a background of 0: finding where the content is

Sides stay small (3..7 by default; upscale and tile inputs 2..4, crop canvases up to 8; with a larger `high`,
upscale and tile outputs and crop canvases grow to it) so a sequence of 3-5
demonstrations and 1-2 tests is a few hundred tokens: a CPU trains on tens of thousands of them per hour. Every
task is drawn from its own generator (seed, index), so a task never depends on how many others were drawn.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from arcfold.data.errors import ArcDataError
from arcfold.data.ids import check_ids
from arcfold.data.tasks import Pair, Task, same_grid

Grid = np.ndarray
Rng = np.random.Generator

# The 7 non-identity elements of D8 as grid functions, by name.
GEOMETRY: dict[str, Callable[[Grid], Grid]] = {
    "rot90": lambda g: np.rot90(g, 1),
    "rot180": lambda g: np.rot90(g, 2),
    "rot270": lambda g: np.rot90(g, 3),
    "flip_lr": lambda g: g[:, ::-1],
    "flip_ud": lambda g: g[::-1, :],
    "transpose": lambda g: g.T,
    "antitranspose": lambda g: np.rot90(g, 2).T,
}
TILES = ((1, 2), (2, 1), (2, 2))
UPSCALES = (2, 3)


@dataclass(frozen=True)
class Rule:
    """One task's transformation: a name for reports (e.g. "geometry:rot90") and the function."""

    name: str
    apply: Callable[[Grid], Grid]


@dataclass(frozen=True)
class Family:
    name: str
    # Draws a task's rule and returns a function that draws one valid input grid for it.
    draw: Callable[[Rng, int, int], tuple[Rule, Callable[[Rng], Grid]]]
    # The rule that maps every given pair's input to its output, if this family has one (real-task matching).
    fit: Callable[[Sequence[Pair]], Rule | None]


def random_grid(rng: Rng, rows: int, cols: int, colours: Sequence[int], density: float) -> Grid:
    """A background of 0 with each cell, with probability `density`, one of `colours`."""
    cells = rng.choice(np.asarray(colours, dtype=np.int8), size=(rows, cols))
    return np.where(rng.random((rows, cols)) < density, cells, 0).astype(np.int8)


def _palette(rng: Rng, low: int = 1, high: int = 4) -> list[int]:
    return [int(c) for c in rng.choice(np.arange(1, 10), size=int(rng.integers(low, high + 1)), replace=False)]


def _sides(rng: Rng, low: int, high: int) -> tuple[int, int]:
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def _plain_inputs(low: int, high: int) -> Callable[[Rng], Grid]:
    def draw(rng: Rng) -> Grid:
        return random_grid(rng, *_sides(rng, low, high), _palette(rng), float(rng.uniform(0.3, 0.8)))

    return draw


# ---------------------------------------------------------------------------------------------- the families


def _identity(rng: Rng, low: int, high: int) -> tuple[Rule, Callable[[Rng], Grid]]:
    return Rule("identity", lambda g: g.copy()), _plain_inputs(low, high)


def _fit_identity(pairs: Sequence[Pair]) -> Rule | None:
    return Rule("identity", lambda g: g.copy()) if all(same_grid(p.input, p.output) for p in pairs) else None


def _colour_rule(table: dict[int, int]) -> Rule:
    lookup = np.arange(10, dtype=np.int8)
    for src, dst in table.items():
        lookup[src] = dst
    changed = ",".join(f"{s}>{d}" for s, d in sorted(table.items()) if s != d)
    return Rule(f"colour_map:{changed}", lambda g: lookup[g])


def _colour_map(rng: Rng, low: int, high: int) -> tuple[Rule, Callable[[Rng], Grid]]:
    palette = [0] + _palette(rng, 2, 4)
    while True:  # a function on the task's colours that changes at least one of them
        table = {c: int(rng.choice(10)) for c in palette}
        if any(s != d for s, d in table.items()):
            break
    colours = palette[1:]

    def draw(rng: Rng) -> Grid:
        return random_grid(rng, *_sides(rng, low, high), colours, float(rng.uniform(0.5, 0.9)))

    return _colour_rule(table), draw


def _fit_colour_map(pairs: Sequence[Pair]) -> Rule | None:
    table: dict[int, int] = {}
    for p in pairs:
        if p.output is None or p.input.shape != p.output.shape:
            return None
        for src, dst in zip(p.input.ravel().tolist(), p.output.ravel().tolist()):
            if table.setdefault(src, dst) != dst:
                return None
    return _colour_rule(table) if any(s != d for s, d in table.items()) else None


def _geometry(rng: Rng, low: int, high: int) -> tuple[Rule, Callable[[Rng], Grid]]:
    name = str(rng.choice(sorted(GEOMETRY)))
    return Rule(f"geometry:{name}", GEOMETRY[name]), _plain_inputs(low, high)


def _fit_geometry(pairs: Sequence[Pair]) -> Rule | None:
    for name, fn in GEOMETRY.items():
        if all(same_grid(fn(p.input), p.output) for p in pairs) and not all(
            same_grid(p.input, p.output) for p in pairs
        ):
            return Rule(f"geometry:{name}", fn)
    return None


def _upscale_rule(k: int) -> Rule:
    return Rule(f"upscale:{k}", lambda g: np.kron(g, np.ones((k, k), dtype=np.int8)))


def _upscale(rng: Rng, low: int, high: int) -> tuple[Rule, Callable[[Rng], Grid]]:
    k = int(rng.choice(UPSCALES))
    return _upscale_rule(k), _plain_inputs(2, max(2, min(high, max(9, high) // k)))  # outputs up to max(9, high)


def _fit_upscale(pairs: Sequence[Pair]) -> Rule | None:
    for k in range(2, 6):
        rule = _upscale_rule(k)
        if all(same_grid(rule.apply(p.input), p.output) for p in pairs):
            return rule
    return None


def _tile_rule(reps: tuple[int, int]) -> Rule:
    return Rule(f"tile:{reps[0]}x{reps[1]}", lambda g: np.tile(g, reps))


def _tile(rng: Rng, low: int, high: int) -> tuple[Rule, Callable[[Rng], Grid]]:
    reps = TILES[int(rng.integers(len(TILES)))]
    return _tile_rule(reps), _plain_inputs(2, max(2, min(high, max(4, high // 2))))  # 2x2 tiles up to max(8, high)


def _fit_tile(pairs: Sequence[Pair]) -> Rule | None:
    for reps in [(r, c) for r in range(1, 5) for c in range(1, 5) if r * c > 1]:
        rule = _tile_rule(reps)
        if all(same_grid(rule.apply(p.input), p.output) for p in pairs):
            return rule
    return None


def _bounding_box(g: Grid) -> Grid:
    rows, cols = np.nonzero(g)
    if rows.size == 0:
        return g.copy()
    return g[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].copy()


def _crop(rng: Rng, low: int, high: int) -> tuple[Rule, Callable[[Rng], Grid]]:
    def draw(rng: Rng) -> Grid:
        rows, cols = _sides(rng, max(low, 5), max(high, 8))
        h, w = int(rng.integers(2, min(4, rows - 1) + 1)), int(rng.integers(2, min(4, cols - 1) + 1))
        while True:  # an object whose bounding box is its whole extent
            shape = random_grid(rng, h, w, _palette(rng, 1, 3), float(rng.uniform(0.5, 0.9)))
            if _bounding_box(shape).shape == (h, w):
                break
        grid = np.zeros((rows, cols), dtype=np.int8)
        r, c = int(rng.integers(rows - h + 1)), int(rng.integers(cols - w + 1))
        grid[r : r + h, c : c + w] = shape
        return grid

    return Rule("crop", _bounding_box), draw


def _fit_crop(pairs: Sequence[Pair]) -> Rule | None:
    rule = Rule("crop", _bounding_box)
    ok = all(same_grid(rule.apply(p.input), p.output) for p in pairs)
    return rule if ok and not all(same_grid(p.input, p.output) for p in pairs) else None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("identity", _identity, _fit_identity),
        Family("colour_map", _colour_map, _fit_colour_map),
        Family("geometry", _geometry, _fit_geometry),
        Family("upscale", _upscale, _fit_upscale),
        Family("tile", _tile, _fit_tile),
        Family("crop", _crop, _fit_crop),
    )
}


# ------------------------------------------------------------------------------------------------ tasks


def check_spec(families: Sequence[str], count: int, sides: Sequence[int], seed: int = 0) -> None:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ArcDataError(f"unknown families {unknown}; choose from {' | '.join(FAMILIES)}", field="data.families")
    if count < 1:
        raise ArcDataError(f"count must be >= 1, got {count}", field="data.count")
    if len(sides) != 2 or not 2 <= sides[0] <= sides[1] <= 30:
        raise ArcDataError(
            f"sides must be [min, max] with 2 <= min <= max <= 30, got {list(sides)}", field="data.sides"
        )
    if seed < 0:  # numpy's seed sequences take non-negative integers only
        raise ArcDataError(f"seed must be >= 0, got {seed}", field="data.seed")


def generate_task(family: str, seed: int, index: int, sides: Sequence[int] = (3, 7)) -> tuple[Task, Rule]:
    """Task `index` of `seed`: 3-5 demonstrations and 1-2 tests of one rule, on distinct inputs whose outputs
    differ from them wherever the rule allows (so copying the input never solves a non-identity task)."""
    for attempt in range(100):  # a degenerate draw (too few distinct inputs) moves to the next stream
        drawn = _draw_task(family, np.random.default_rng([seed, index, list(FAMILIES).index(family), attempt]), sides)
        if drawn is not None:
            train, test, rule = drawn
            return Task(f"{family}-{seed}-{index:05d}", train, test), rule
    raise ArcDataError(f"cannot draw distinct inputs for {family} at sides {list(sides)}", field="data.sides")


def _draw_task(family: str, rng: Rng, sides: Sequence[int]) -> tuple[tuple[Pair, ...], tuple[Pair, ...], Rule] | None:
    rule, draw = FAMILIES[family].draw(rng, sides[0], sides[1])
    n_demos, n_tests = int(rng.integers(3, 6)), int(rng.integers(1, 3))
    pairs: list[Pair] = []
    seen: set[bytes] = set()
    for _ in range(200 * (n_demos + n_tests)):
        grid = draw(rng)
        out = np.ascontiguousarray(rule.apply(grid), dtype=np.int8)
        key = grid.tobytes() + bytes(grid.shape)
        if key in seen or (family != "identity" and same_grid(grid, out)):
            continue
        seen.add(key)
        pairs.append(Pair(grid, out))
        if len(pairs) == n_demos + n_tests:
            break
    train, test = tuple(pairs[:n_demos]), tuple(pairs[n_demos:])
    if family == "colour_map":  # every colour a test shows was shown mapped in a demonstration
        shown = set(np.unique(np.concatenate([p.input.ravel() for p in train])).tolist())
        test = tuple(p for p in test if set(np.unique(p.input).tolist()) <= shown)
    return (train, test, rule) if len(train) >= 3 and test else None


def generate(families: Sequence[str], count: int, seed: int, sides: Sequence[int] = (3, 7)) -> list[Task]:
    """`count` tasks, the families taken in turn (equal shares), task i from its own stream (seed, i)."""
    check_spec(families, count, sides, seed)
    tasks = [generate_task(families[i % len(families)], seed, i, sides)[0] for i in range(count)]
    check_ids((t.id for t in tasks), file="data=synthetic")  # the rule every loader checks the ids it reads by
    return tasks


def fit(task: Task) -> Rule | None:
    """The first family rule that maps every pair of the task (demonstrations and solved tests), or None."""
    pairs = [p for p in task.train + task.test if p.output is not None]
    for family in FAMILIES.values():
        rule = family.fit(pairs)
        if rule is not None:
            return rule
    return None


def write_kaggle(tasks: Sequence[Task], directory: str | Path, name: str = "synthetic") -> tuple[Path, Path]:
    """The tasks as a Kaggle challenges file and its solutions file (loadable with data=kaggle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    challenges, solutions = directory / f"{name}_challenges.json", directory / f"{name}_solutions.json"
    challenges.write_text(json.dumps({t.id: t.to_json() for t in tasks}))
    solutions.write_text(json.dumps({t.id: [p.output.tolist() for p in t.test if p.output is not None] for t in tasks}))
    return challenges, solutions


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m arcfold.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for <name>_challenges.json and <name>_solutions.json")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", type=int, nargs=2, default=[3, 7])
    parser.add_argument("--name", default="synthetic")
    args = parser.parse_args(argv)
    try:
        tasks = generate(args.families, args.count, args.seed, args.sides)
    except ArcDataError as err:  # one line and exit 2, as the other command lines: the message names the field
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for path in write_kaggle(tasks, args.out, args.name):
        print(path)


if __name__ == "__main__":
    main()
