"""Which devices a run's workers get (`devices`), and how many CPU threads each may take.

    devices=auto     every visible CUDA device, one worker each, whatever model.device names (cuda, cuda:1, auto);
                     no GPU, model.device=cpu, or model.device_map set (one model over the GPUs): this process alone
    devices=N        the first N GPUs; with no GPU (or model.device=cpu), N worker processes that split the cores
    devices=[0,2]    these GPUs (entries may also read cuda:N or cpu)
    devices=[0,0,1,1] with executor.share_devices=true: two workers on each card (each its own copy of the model),
                     a way to keep a card busy while one worker's DFS waits on the host; refused without it

A single card (devices=[2]) runs in this process, made the current CUDA device before the model loads (the fold
worker's Engine.select_device), so bitsandbytes and accelerate place the model on it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Sequence

from arcfold.checks import refuse


def resolve_devices(
    spec: Any, model_device: str = "auto", device_map: str | None = None, share: bool = False
) -> list[str]:
    """The devices of a run's workers, one worker each, from `devices` (see the module docstring). `share`
    (executor.share_devices) lets a card appear more than once in a list."""
    if spec == "auto":
        if device_map is not None:  # one model spread over the GPUs: one worker, placed by the device map
            return [model_device]
        gpus = 0 if model_device == "cpu" else gpu_count()
        if gpus:
            return [f"cuda:{i}" for i in range(gpus)]
        return ["cpu"] if model_device in ("auto", "cpu") else [model_device]  # cuda without one: load refuses
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
        twice = [n for n, count in Counter(names).items() if n != "cpu" and count > 1]
        if twice and not share:
            raise refuse(
                "devices",
                list(spec),
                f"each GPU once ({twice[0]} is listed {names.count(twice[0])} times); set executor.share_devices=true "
                "for several workers on one card",
            )
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
