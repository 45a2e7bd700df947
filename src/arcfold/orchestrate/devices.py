"""Which devices a run's workers get (`devices`), and how many CPU threads each may take."""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

from arcfold.checks import refuse


def resolve_devices(spec: Any, model_device: str = "auto", device_map: str | None = None) -> list[str]:
    """The devices of a run's workers, one worker each, from `devices` (see the module docstring)."""
    if spec == "auto":
        if model_device != "auto" or device_map is not None:  # a chosen device, or one model over the GPUs
            return [model_device]
        return [f"cuda:{i}" for i in range(gpu_count())] or ["cpu"]
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        gpus = 0 if model_device == "cpu" else gpu_count()
        if not gpus:
            return ["cpu"] * spec
        if spec > gpus:
            raise refuse("devices", spec, f"at most the {gpus} visible GPUs")
        return [f"cuda:{i}" for i in range(spec)]
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec):
        names = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in spec]
        bad = [n for n in names if n != "cpu" and not re.fullmatch(r"cuda:\d+", n)]
        if bad:
            raise refuse("devices", list(spec), f"GPU indices, cuda:N or cpu ({bad[0]!r} is none)")
        gpus = gpu_count() if any(n != "cpu" for n in names) else 0
        missing = [n for n in names if n != "cpu" and int(n.split(":")[1]) >= gpus]
        if missing:
            raise refuse("devices", list(spec), f"the {gpus} visible GPUs ({missing[0]} is not one)")
        return names
    raise refuse("devices", spec, "auto, an integer >= 1 or a list of GPU indices (cuda:N, cpu)")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """Torch threads for each of `workers` on this machine: the cores (or $OMP_NUM_THREADS) split evenly.
    torch gives every process all cores by default, and processes that overcommit them crawl."""
    if threads:
        return threads
    budget = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    return max(1, budget // workers)
