"""Where the time of a run goes: load, training, inference, scoring, logging, and the share outside the model.

Runs the default config (the `make run` job: tiny model, 8 small ARC-AGI-2 eval tasks) in-process with a real
MLflow store in a temporary folder, timing every forward pass of the model (hooks on its backbone and head) and every
backward pass (Accelerator.backward). Prints a table and the share of wall time spent outside model
forward/backward: the framework's own overhead.

    .venv/bin/python benchmarks/bench_run.py [hydra overrides...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_module

from arcfold import pipeline
from arcfold.checks import check
from arcfold.config import register
from arcfold.engine.model import load_model
from arcfold.run.tracker import NullTracker
from arcfold.run.worker import Engine
from arcfold.track.tracker import RunTracker, config_params


class ModelClock:
    """Accumulates seconds inside model.forward (outermost calls only) and inside backward passes."""

    def __init__(self) -> None:
        self.forward = 0.0
        self.backward = 0.0
        self._depth = 0
        self._start = 0.0

    def sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def pre(self, module, args, kwargs=None):
        if self._depth == 0:
            self.sync()
            self._start = time.perf_counter()
        self._depth += 1

    def post(self, module, args, output, kwargs=None):
        self._depth -= 1
        if self._depth == 0:
            self.sync()
            self.forward += time.perf_counter() - self._start


def main(overrides: list[str]) -> None:
    register()
    clock = ModelClock()

    # Time every forward of the model's backbone and of its head (engine.logits runs them apart; training,
    # generation and scoring all go through them).
    def timed_load(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        for part in (loaded.model.get_decoder(), loaded.model.get_output_embeddings()):
            part.register_forward_pre_hook(clock.pre)
            part.register_forward_hook(clock.post)
        return loaded

    original_backward = Accelerator.backward

    def timed_backward(self, loss, **kwargs):
        clock.sync()
        start = time.perf_counter()
        original_backward(self, loss, **kwargs)
        clock.sync()
        clock.backward += time.perf_counter() - start

    Accelerator.backward = timed_backward

    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"outputs={tmp}", *overrides])
        check(cfg)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        wall_start = time.perf_counter()
        tracker = (
            RunTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.outputs, run_name="bench_run")
            if cfg.tracking.enabled
            else NullTracker()
        )
        tracker.log_params(config_params(cfg))
        setup = time.perf_counter() - wall_start
        result = pipeline.run(cfg, run_dir, tracker, engine=Engine(load_model=timed_load))
        tracker.finish()
        wall = time.perf_counter() - wall_start

    phases = {"tracking setup": setup, **result.timings}
    print(
        f"\nbench_run: {len(result.tasks)} tasks, {len(result.folds)} folds, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, overrides {overrides or 'none'}\n"
    )
    print(f"{'phase':<18}{'seconds':>10}{'share':>9}")
    for name, sec in phases.items():
        print(f"{name:<18}{sec:>10.2f}{sec / wall:>9.1%}")
    print(f"{'total (wall)':<18}{wall:>10.2f}{1:>9.1%}")
    inside = clock.forward + clock.backward
    print(f"\n{'model forward':<18}{clock.forward:>10.2f}{clock.forward / wall:>9.1%}")
    print(f"{'model backward':<18}{clock.backward:>10.2f}{clock.backward / wall:>9.1%}")
    print(f"{'outside model':<18}{wall - inside:>10.2f}{(wall - inside) / wall:>9.1%}")
    print(f"\nratio wall / model forward+backward: {wall / inside:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
