"""Checkpoints and resume: a run's results land in <run dir>/checkpoint/ as they are made, so `resume=<run dir>`
finishes a killed run with the same files an uninterrupted one would have written.

    checkpoint/folds.json                       the fold assignment (task ids per fold); a resume must match it
    checkpoint/made_with.json                   the settings and the tasks' digests it was made with; likewise
    checkpoint/fold_<f>.json                    a finished fold: its FoldOutcome (table row, every input's record)
    checkpoint/fold_<f>/training.json           the fold in progress: its training record ...
    checkpoint/fold_<f>/adapter/                ... and its trained adapter, so a resume predicts without retraining
    checkpoint/fold_<f>/inputs/<task>.<i>.json  the fold's finished test inputs (named by arcfold.data.ids.task_path)

Every file is written atomically (a temporary file, then a rename): a kill leaves each one whole or absent. A fold's
outcome is plain data (InputRecord / FoldOutcome, JSON round trip), so a worker process can hand it to a parent
that alone writes files.

A resume trusts nothing it reads (the run dir may come from someone else): a link inside the run dir, a checkpoint
file that does not parse, that names a task, fold or test input this run does not have, a grid that is not one, an
adapter that is not whole safetensors, or a checkpoint made with other settings or other tasks is refused in one
line (ArcDataError, field `resume`) naming the file and what differs, before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

from arcfold.data.errors import ArcDataError, shown
from arcfold.data.ids import check_ids, task_path
from arcfold.data.jsonfile import read_json
from arcfold.data.submission import write_json_atomic
from arcfold.data.tasks import Task, parse_grid
from arcfold.engine.modelfiles import check_safetensors
from arcfold.run.records import FoldOutcome, InputRecord, TrainingRecord, plain

log = logging.getLogger(__name__)

RESUMABLE = ("resume", "budget", "on_error", "tracking", "devices", "executor")  # what a resumed session may set anew
REMOVED = ("run_dir",)  # keys of configs saved before they were dropped from the schema: a resume ignores them
UNSAFE = ("model.trust_remote_code", "model.allow_pickle")  # a resume takes these from its command line only
FOLD_FILE = re.compile(r"fold_(\d{1,6})\.json")
T = TypeVar("T")


def refused(path: Path, problem: str) -> ArcDataError:
    return ArcDataError(problem, file=str(path), field="resume")


def _read(path: Path) -> Any:
    """A checkpoint file's JSON; one that cannot be read or does not parse is refused, naming it."""
    try:
        return read_json(path)
    except ArcDataError as err:
        raise refused(path, err.problem) from None


def _parse(path: Path, build: Callable[..., T], *args: Any) -> T:
    """build(*args), or a refusal naming the file when what it read is not what arcfold writes there."""
    try:
        return build(*args)
    except ArcDataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as err:
        raise refused(
            path, f"not a checkpoint file arcfold wrote ({type(err).__name__}: {shown(str(err), 80)})"
        ) from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _typed(obj: Any, names: Sequence[str]) -> bool:
    """The dataclass's fields named hold values of their annotated kind: a number (or null: JSON has no NaN) for
    int and float, text for str."""
    kinds = {f.name: str(f.type) for f in fields(obj)}
    return all(
        (v is None or _number(v)) if kinds[n][:3] in ("int", "flo") else isinstance(v, str)
        for n, v in ((n, getattr(obj, n)) for n in names)
    )


def settings(cfg: Any) -> dict[str, Any]:
    """The settings a resume may not change, flat ("lora.rank": 8; interpolations as written), for made_with.json."""
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif f"{prefix}{key}".split(".")[0] not in RESUMABLE:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg), "")
    return flat


def digest(task: Task) -> str:
    """A task's fingerprint: its grids, solutions included."""
    text = json.dumps(task.to_json(with_solutions=True), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(before: dict[str, Any], now: dict[str, Any]) -> tuple[str, str] | None:
    """The first key both have with other values, and "(and N more)" if more differ; None when none does."""
    differ = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    if not differ:
        return None
    return differ[0], f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""


class Checkpoint:
    """The checkpoint folder of one run dir. A fresh run refuses a dir that already holds one (resume it); a
    resume refuses one it cannot trust (see the module's text). `config`: the run's config (made_with.json)."""

    def __init__(self, run_dir: str | Path, folds: Sequence[Sequence[Task]], resume: bool, config: Any = None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoint"
        self.folds = [list(fold) for fold in folds]
        self.tasks = {t.id: (f, t) for f, fold in enumerate(self.folds) for t in fold}
        assignment = [[t.id for t in fold] for fold in self.folds]
        made = {
            "settings": settings(config) if config is not None else {},
            "tasks": {task_id: digest(task) for task_id, (_, task) in self.tasks.items()},
        }
        path = self.dir / "folds.json"
        if path.exists() and not resume:
            raise ArcDataError(
                "holds a run already; finish it with resume=<run dir>, or run in a new dir",
                file=str(self.run_dir),
                field="resume",
            )
        if resume:
            no_links(self.run_dir)
        if path.exists():
            self.check_folds(path, assignment)
            self.check_made_with(self.dir / "made_with.json", made)
        elif resume:
            log.warning("resume: %s has no checkpoint yet, the run starts from the beginning", self.run_dir)
        write_json_atomic(path, assignment)
        write_json_atomic(self.dir / "made_with.json", made)

    def check_folds(self, path: Path, assignment: list[list[str]]) -> None:
        before = _read(path)
        if not isinstance(before, list) or not all(isinstance(f, list) for f in before):
            raise refused(path, "not a fold assignment (a list of lists of task ids)")
        check_ids([i for fold in before for i in fold], file=str(path), field="resume")
        unknown = [i for fold in before for i in fold if i not in self.tasks]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise refused(path, f"names task {unknown[0]}{more}, which this run's data does not have")
        if before != assignment:
            f = next((f for f, (a, b) in enumerate(zip(before, assignment)) if a != b), len(before))
            raise refused(
                path,
                f"the run's folds differ from this config's (from fold {f} on): the data or the split changed "
                "since it started",
            )

    def check_made_with(self, path: Path, now: dict[str, dict[str, Any]]) -> None:
        if not path.exists():  # a run from before arcfold wrote it: its folds.json is all there is to compare
            log.warning("resume: %s has no made_with.json: its settings and tasks are not compared", self.dir)
            return
        before = _read(path)
        if not isinstance(before, dict) or not all(isinstance(before.get(k), dict) for k in ("settings", "tasks")):
            raise refused(path, "not the record of a checkpoint's settings and tasks")
        setting = differences(before["settings"], now["settings"]) if now["settings"] else None
        if setting:
            (k, more), was, now_is = setting, before["settings"][setting[0]], now["settings"][setting[0]]
            raise refused(path, f"made with another config: {k} was {shown(was)}, is {shown(now_is)}{more}")
        task = differences(before["tasks"], now["tasks"])
        if task:
            raise refused(path, f"made with other data: task {task[0]}{task[1]} has other grids than this run's")

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
        for path in sorted(self.dir.glob("fold_*.json")):
            match = FOLD_FILE.fullmatch(path.name)
            if not match or int(match[1]) >= len(self.folds):
                raise refused(path, f"not a fold of this run's {len(self.folds)} (fold_0.json ...)")
            found[int(match[1])] = _parse(path, self.outcome, path, _read(path), int(match[1]))
        return found

    def outcome(self, path: Path, raw: Any, f: int) -> FoldOutcome:
        """Fold f's outcome read back: its own fold, a row of numbers and text, the budget's events, and records
        of its test inputs."""
        outcome = FoldOutcome.from_json({**raw, "inputs": [grids_checked(r, path) for r in raw["inputs"]]})
        if outcome.fold != f or outcome.row.fold != f:
            raise refused(path, f"holds fold {shown(outcome.fold)}, not fold {f}")
        if not _typed(outcome.row, [n.name for n in fields(outcome.row) if n.name != "metrics"]) or not all(
            v is None or _number(v) for v in outcome.row.metrics.values()
        ):
            raise refused(path, "its row holds values that are not numbers or text where they should be")
        if not all(isinstance(e, dict) and {"fold", "at", "cut", "why"} <= e.keys() for e in outcome.events):
            raise refused(path, "its events are not the budget's records")
        for i, rec in enumerate(outcome.inputs):
            self.record(path, rec, f, f"inputs[{i}]")
        return outcome

    def inputs(self, f: int) -> list[InputRecord]:
        """Fold f's test inputs finished by an earlier session (the fold itself unfinished)."""
        records = []
        for path in sorted((self.fold_dir(f) / "inputs").glob("*.json")):
            raw = grids_checked(_read(path), path)
            rec = self.record(path, _parse(path, InputRecord.from_json, raw), f, "record")
            if task_path(path.parent, rec.task, f".{rec.index}.json") != path:
                raise refused(path, f"holds test input {rec.task}.{rec.index}, not the one its name says")
            records.append(rec)
        return records

    def record(self, path: Path, rec: InputRecord, f: int, where: str) -> InputRecord:
        """A record read back names a test input of fold f, and its prediction is that input's."""
        fold, task = self.tasks.get(rec.task, (None, None)) if isinstance(rec.task, str) else (None, None)
        if task is None or fold != f or rec.fold != f:
            raise refused(
                path,
                f"{where} names task {shown(rec.task)} in fold {shown(rec.fold)}: not a task of this run's fold {f}",
            )
        if (
            not _number(rec.index)
            or not 0 <= rec.index < len(task.test)
            or not _typed(rec, ["nll", "base_nll", "cut", "error"])
        ):
            raise refused(path, f"{where}: not a record of one of task {rec.task}'s test inputs")
        pred = rec.prediction
        if pred is not None and (
            (pred.task_id, pred.test_index) != (rec.task, rec.index)
            or not isinstance(pred.rankings, dict)
            or not all(
                isinstance(r, list) and all(isinstance(j, int) and 0 <= j < len(pred.candidates) for j in r)
                for r in pred.rankings.values()
            )
        ):
            raise refused(path, f"{where}: its prediction is not one of task {rec.task}'s test input {rec.index}")
        return rec

    def training(self, f: int) -> TrainingRecord | None:
        path = self.fold_dir(f) / "training.json"
        if not path.exists():
            return None
        record = _parse(path, lambda raw: TrainingRecord(**raw), _read(path))
        stats = record.stats
        if not _typed(record, ["error", "cut"]) or not (
            stats is None
            or isinstance(stats, dict)
            and all(_number(v) or isinstance(v, list) and all(map(_number, v)) for v in stats.values())
        ):
            raise refused(path, "not a training record")
        if stats is not None:  # its adapter is what a worker loads: whole safetensors, or refused here
            check_safetensors(self.adapter_dir(f) / "adapter_model.safetensors", field="resume")
        return record

    def save_training(self, f: int, record: TrainingRecord) -> None:
        """After the adapter (if any) is saved to adapter_dir(f): the record's presence means both are whole."""
        write_json_atomic(self.fold_dir(f) / "training.json", {k: plain(v) for k, v in asdict(record).items()})

    def save_input(self, record: InputRecord) -> None:
        inputs = self.fold_dir(record.fold) / "inputs"
        write_json_atomic(task_path(inputs, record.task, f".{record.index}.json"), record.to_json())

    def save_fold(self, outcome: FoldOutcome) -> None:
        """The fold's record, then its in-progress folder (adapter included) goes."""
        write_json_atomic(self.dir / f"fold_{outcome.fold}.json", outcome.to_json())
        shutil.rmtree(self.fold_dir(outcome.fold), ignore_errors=True)


def grids_checked(raw: Any, path: Path) -> Any:
    """A record's JSON whose prediction grids (attempts, candidates) are each a valid ARC grid, else refused."""
    pred = raw.get("prediction") if isinstance(raw, dict) else None
    if isinstance(pred, dict):
        try:
            grids = [(f"attempts[{i}]", g) for i, g in enumerate(pred["attempts"])]
            grids += [(f"candidates[{i}].grid", c["grid"]) for i, c in enumerate(pred["candidates"])]
        except (KeyError, TypeError) as err:
            raise refused(path, f"not a checkpoint file arcfold wrote (prediction: {type(err).__name__})") from None
        for field, grid in grids:
            try:
                parse_grid(grid, file=str(path), task=None, field=f"prediction.{field}")
            except ArcDataError as err:
                raise refused(path, f"{err.field}: {err.problem}") from None
    return raw


def no_links(run_dir: Path) -> None:
    """A run dir to resume holds no symbolic link: one would take what is written there elsewhere."""
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                raise refused(Path(root, name), "a link inside the run dir to resume: arcfold writes only into the run")


def resumed_config(cfg: Any, overrides: Sequence[str]) -> Any:
    """The config of the run in cfg.resume (its .hydra/config.yaml), with this command line's budget.*,
    on_error and tracking.* applied: a new session may have another deadline. Any other override that
    would change the run is refused; repeating the run's own value is fine. A key since dropped from the schema
    (REMOVED) is ignored; a switch that loads untrusted code or pickles (UNSAFE) is taken from the command line
    only, never from the run dir's file."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from arcfold.checks import ConfigError
    from arcfold.config import RunConfig

    path = Path(cfg.resume) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{cfg.resume} is not a run dir (no .hydra/config.yaml)", key="resume")
    try:
        loaded = OmegaConf.load(path)
        for key in REMOVED:
            if isinstance(loaded, DictConfig) and key in loaded:
                loaded.pop(key)
        saved = OmegaConf.merge(OmegaConf.structured(RunConfig), loaded)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as err:
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
    for key in UNSAFE:
        if OmegaConf.select(saved, key) is True and OmegaConf.select(cfg, key) is not True:
            raise ConfigError(
                f"the run's config ({path}) sets {key}=true, which a resume takes from its command line only: add "
                f"{key}=true if you trust that run dir and its model",
                key=key,
            )
    return saved
