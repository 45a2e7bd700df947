"""Folds on Ray actors: the same FoldWorker as a local worker process, one actor per GPU, each keeping its base
model across folds, fed by arcfold.orchestrate.executor's queue.

    python -m arcfold executor=ray executor.address=auto devices=64 folds=per_task   # a running cluster
    python -m arcfold executor=ray devices=2                                         # a local Ray instance

executor.address unset starts a local Ray instance for the run and stops it afterwards; `auto` joins the cluster
that `ray start` set up on this machine; `ray://host:10001` connects as a Ray client. Every node needs arcfold
installed (`pip install 'arcfold[ray]'`) and the model at the same path. Ray is an optional dependency.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from arcfold.checks import ConfigError, refuse
from arcfold.orchestrate.devices import gpu_count, threads_per_worker
from arcfold.orchestrate.pools import Event
from arcfold.run.ledger import FoldJob, Ledger, on_this_clock
from arcfold.run.progress import quiet_libraries
from arcfold.run.records import FoldReport
from arcfold.run.worker import FoldWorker, WorkerInfo

log = logging.getLogger(__name__)


class FoldActor:
    """One Ray actor: a FoldWorker on the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES), or on the CPU."""

    def __init__(self, factory: Callable[..., FoldWorker], threads: int):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        quiet_libraries(bars=False)  # an actor draws no bars
        self.factory = factory
        self.worker: FoldWorker | None = None

    def load(self) -> WorkerInfo:
        import ray

        self.worker = self.factory(device="cuda:0" if ray.get_gpu_ids() else "cpu")
        return self.worker.info

    def run(self, job: FoldJob) -> tuple[list[tuple[str, tuple]], FoldReport]:
        """The fold's report, and its reports (test inputs, budget measurements) for the run's ledger: an
        actor hands them back with the fold's report, so an actor killed mid-fold leaves none of them."""
        assert self.worker is not None
        reports: list[tuple[str, tuple]] = []
        outcome = self.worker(on_this_clock(job), Ledger(job.planner, send=lambda *report: reports.append(report)))
        return reports, outcome


class RayActors:
    """The Pool of arcfold.orchestrate.pools on Ray: `devices` actors (auto: one per GPU of the cluster, else one)."""

    def __init__(self, executor: Any, devices: Any, factory: Callable[..., FoldWorker]):
        try:
            import ray
        except ImportError:
            raise ConfigError("executor=ray needs Ray: pip install 'arcfold[ray]'", key="executor.name") from None
        if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)):
            raise refuse("devices", devices, "auto or a number of actors (under executor=ray, Ray places them)")
        self.ray, self.owns = ray, not ray.is_initialized()
        if self.owns and executor.address:
            ray.init(address=executor.address)
        elif self.owns:  # a local instance sized for this run: no dashboard, the cores split among the actors
            n = devices if devices != "auto" else gpu_count() or 1
            ray.init(num_cpus=n * threads_per_worker(n, executor.threads), include_dashboard=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = devices if devices != "auto" else gpus or 1
        if gpus and n > gpus:
            raise refuse("devices", n, f"at most the Ray cluster's {gpus} GPUs (one per actor)")
        self.threads = executor.threads or max(1, int(resources.get("CPU", 1)) // n)
        self.actor = ray.remote(FoldActor).options(num_cpus=self.threads, num_gpus=1 if gpus else 0, max_restarts=0)
        self.devices = ["ray:gpu" if gpus else "ray:cpu"] * n
        self.factory = factory
        self.actors: dict[int, Any] = {}
        self.refs: dict[Any, tuple[str, int]] = {}  # a pending call -> (what it reports, worker)

    def start(self, slot: int) -> tuple[int, int]:
        worker = len(self.actors)
        self.actors[worker] = self.actor.remote(self.factory, self.threads)
        self.refs[self.actors[worker].load.remote()] = ("ready", worker)
        return worker, 0

    def submit(self, worker: int, job: FoldJob) -> None:
        self.refs[self.actors[worker].run.remote(job)] = ("done", worker)

    def events(self) -> list[Event]:
        from ray.exceptions import RayActorError, RayTaskError

        self.ray.wait(list(self.refs), num_returns=1)
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        found: list[Event] = []
        for ref in ready:
            kind, worker = self.refs.pop(ref)
            try:
                value = self.ray.get(ref)
            except RayTaskError as err:  # raised in the actor: the model did not load, or on_error=fail
                found.append(("failed", worker, getattr(err, "cause", None) or err))
                continue
            except RayActorError as err:  # the actor's process is gone
                found.append(("died", worker, str(err).strip().splitlines()[0][:300]))
                continue
            if kind == "done":
                reports, value = value
                found += [("report", worker, report) for report in reports]
            found.append((kind, worker, value))
        return found

    def close(self, wait: bool) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        if self.owns:
            self.ray.shutdown()


__all__ = ["FoldActor", "RayActors"]
