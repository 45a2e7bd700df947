"""Checkpoints and resume: a run's results land in <run dir>/checkpoint/ as they are made, so `resume=<run dir>`
finishes a killed run with the same files an uninterrupted one would have written.

    checkpoint/folds.json                       the fold assignment (task ids per fold); a resume must match it
    checkpoint/fold_<f>.json                    a finished fold: its FoldOutcome (table row, every input's record)
    checkpoint/fold_<f>/training.json           the fold in progress: its training record ...
    checkpoint/fold_<f>/adapter/                ... and its trained adapter, so a resume predicts without retraining
    checkpoint/fold_<f>/inputs/<task>.<i>.json  the fold's finished test inputs

Every file is written atomically (a temporary file, then a rename): a kill leaves each one whole or absent. A fold's
outcome is plain data (InputRecord / FoldOutcome, JSON round trip), so a worker process can hand it to a parent
that alone writes files.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from arcfold.data.errors import ArcDataError
from arcfold.data.submission import write_json_atomic
from arcfold.data.tasks import Task
from arcfold.run.records import FoldOutcome, InputRecord, TrainingRecord, plain

log = logging.getLogger(__name__)

RESUMABLE = ("resume", "budget", "on_error", "tracking", "devices", "executor")  # what a resumed session may set anew


def _read(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


class Checkpoint:
    """The checkpoint folder of one run dir. A fresh run refuses a dir that already holds one (resume it)."""

    def __init__(self, run_dir: str | Path, folds: Sequence[Sequence[Task]], resume: bool):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoint"
        assignment = [[t.id for t in fold] for fold in folds]
        path = self.dir / "folds.json"
        if path.exists() and not resume:
            raise ArcDataError(
                "holds a run already; finish it with resume=<run dir>, or run in a new dir",
                file=str(self.run_dir),
                field="resume",
            )
        if path.exists() and _read(path) != assignment:
            raise ArcDataError(
                "the run's folds (checkpoint/folds.json) differ from this config's: the data or the "
                "split changed since it started",
                file=str(self.run_dir),
                field="resume",
            )
        if resume and not path.exists():
            log.warning("resume: %s has no checkpoint yet, the run starts from the beginning", self.run_dir)
        write_json_atomic(path, assignment)

    def fold_dir(self, f: int) -> Path:
        return self.dir / f"fold_{f}"

    def adapter_dir(self, f: int) -> Path:
        return self.fold_dir(f) / "adapter"

    def restore(self, results: Any, n_folds: int) -> set[int]:
        """Put what earlier sessions finished into `results` (a RunResults); return the finished folds."""
        finished = self.finished()
        for f in sorted(finished):
            results.add_fold(finished[f])
            shutil.rmtree(self.fold_dir(f), ignore_errors=True)  # left when a kill came between the two steps
        for f in range(n_folds):
            if f not in finished:
                for rec in self.inputs(f):
                    results.add_input(rec)
        return set(finished)

    def finished(self) -> dict[int, FoldOutcome]:
        """Folds finished by an earlier session."""
        found = {}
        for path in self.dir.glob("fold_*.json"):
            outcome = FoldOutcome.from_json(_read(path))
            found[outcome.fold] = outcome
        return found

    def inputs(self, f: int) -> list[InputRecord]:
        """Fold f's test inputs finished by an earlier session (the fold itself unfinished)."""
        return [InputRecord.from_json(_read(p)) for p in sorted((self.fold_dir(f) / "inputs").glob("*.json"))]

    def training(self, f: int) -> TrainingRecord | None:
        path = self.fold_dir(f) / "training.json"
        return TrainingRecord(**_read(path)) if path.exists() else None

    def save_training(self, f: int, record: TrainingRecord) -> None:
        """After the adapter (if any) is saved to adapter_dir(f): the record's presence means both are whole."""
        write_json_atomic(self.fold_dir(f) / "training.json", {k: plain(v) for k, v in asdict(record).items()})

    def save_input(self, record: InputRecord) -> None:
        write_json_atomic(
            self.fold_dir(record.fold) / "inputs" / f"{record.task}.{record.index}.json", record.to_json()
        )

    def save_fold(self, outcome: FoldOutcome) -> None:
        """The fold's record, then its in-progress folder (adapter included) goes."""
        write_json_atomic(self.dir / f"fold_{outcome.fold}.json", outcome.to_json())
        shutil.rmtree(self.fold_dir(outcome.fold), ignore_errors=True)


def resumed_config(cfg: Any, overrides: Sequence[str]) -> Any:
    """The config of the run in cfg.resume (its .hydra/config.yaml), with this command line's budget.*,
    on_error and tracking.* applied: a new session may have another deadline. Any other override that
    would change the run is refused; repeating the run's own value is fine."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from arcfold.checks import ConfigError
    from arcfold.config import RunConfig

    path = Path(cfg.resume) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{cfg.resume} is not a run dir (no .hydra/config.yaml)", key="resume")
    try:
        saved = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    except (OmegaConfBaseException, OSError) as err:
        raise ArcDataError(
            f"cannot read the run's config: {err}".splitlines()[0], file=str(path), field="resume"
        ) from None
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] in RESUMABLE:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
        elif OmegaConf.select(cfg, key) != OmegaConf.select(saved, key):
            raise ConfigError(
                f"{override!r} would change the run being resumed (its config: {path}); only "
                f"{', '.join(RESUMABLE[1:])} may change",
                key=key,
            )
    return saved
