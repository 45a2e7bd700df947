"""Inputs stay inside their run (issue 22): hostile task ids and files, given to `python -m arcfold` as a user
would, are refused in one line with exit code 2 and no traceback, and no file appears outside the run directory.

Each case gets its own folder (the parent of everything the run may touch: its inputs, its cwd, its outputs); the
test lists that folder before and after the run, and every new path must be the run directory, inside it, or one
of the folders above it (outputs/runs). Ids are refused when the data loads, before any model; model files when
the model loads. Tracking is off; the model is the tiny one, built or loaded on the CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import arcfold
from arcfold.data.codec import GridCodec

pytestmark = pytest.mark.slow  # every case runs python -m arcfold

TASK = {
    "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
    "test": [{"input": [[1, 0], [0, 1]], "output": [[0, 1], [1, 0]]}],
}
GOOD = "00576224"
TINY = [
    "experiment=smoke",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.device=cpu",
    "train.epochs=1",
    "inference=greedy",
    "folds=1",
]
RULE = "breaks the id rule"


class Payload:
    """Unpickled, this creates PWNED in the case's folder: a file outside the run, which the listing catches."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def kaggle(d: Path, tasks: dict, solutions: dict | None = None) -> list[str]:
    args = [*TINY, "data=kaggle", f"data.challenges={write(d / 'in' / 'c.json', tasks)}"]
    if solutions is not None:
        args.append(f"data.solutions={write(d / 'in' / 's.json', solutions)}")
    return args


def tiny_model_dir(d: Path, **config) -> Path:
    """A model folder as stage=pretrain saves one (config.json of a tiny Llama with the built-in vocabulary)."""
    vocab = GridCodec.builtin("plain").vocab_size
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=32)
    base.update(num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=8192)
    write(d / "in" / "model" / "config.json", {**base, **config})
    return d / "in" / "model"


def model_case(d: Path, files: Callable[[Path], None], **config) -> list[str]:
    path = tiny_model_dir(d, **config)
    files(path)
    return [*kaggle(d, {GOOD: TASK}), "model=tiny", f"model.path={path}"]


def truncated_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8  # 8 of its 16 bytes


def run_dir_to_resume(d: Path, checkpoint: dict[str, object], model: str = "") -> list[str]:
    """A run dir (its saved config, its checkpoint files) as someone else may hand it over: resume=DIR."""
    challenges = write(d / "in" / "c.json", {GOOD: TASK})
    run = d / "out" / "runs" / "shared"
    write(
        run / ".hydra" / "config.yaml",
        f"folds: 1\noutputs: {d / 'out'}\ndata:\n  name: kaggle\n  challenges: {challenges}\n"
        "model:\n  hidden_size: 32\n  num_layers: 1\n  num_heads: 2\n  intermediate_size: 64\n  device: cpu\n"
        f"{model}train:\n  epochs: 1\ntracking:\n  enabled: false\n",
    )
    for name, value in checkpoint.items():
        write(run / "checkpoint" / name, value)
    return [f"resume={run}"]


def task_folder(d: Path) -> Path:
    """A folder of task files, one named with a newline (the id is the file name)."""
    write(d / "in" / "tasks" / f"{GOOD}.json", TASK)
    return write(d / "in" / "tasks" / "bad\nname.json", TASK).parent


def record(task: str) -> dict:
    return {"task": task, "index": 0, "fold": 0, "prediction": None, "nll": None, "base_nll": None}


# name -> (how to set up the case's folder and the arguments, what the one error line must say)
CASES: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    "traversal": (lambda d: kaggle(d, {GOOD: TASK, "../../../pwned_task": TASK}), ["c.json", "'../../../pwned", RULE]),
    "absolute_path": (lambda d: kaggle(d, {str(d / "abs_escape"): TASK}), ["c.json", "task id '/", RULE]),
    "forward_slash": (lambda d: kaggle(d, {"sub/task": TASK}), ["'sub/task'", RULE]),
    "backslash": (lambda d: kaggle(d, {"sub\\..\\..\\task": TASK}), ["'sub\\\\..", RULE]),
    "nul": (lambda d: kaggle(d, {"ab\x00cd": TASK}), ["'ab\\x00cd'", RULE]),
    "control_characters": (lambda d: kaggle(d, {"a\x1b[31m\nb\r": TASK}), ["'a\\x1b[31m\\nb\\r'", RULE]),
    "empty": (lambda d: kaggle(d, {"": TASK}), ["c.json", "empty task id"]),
    "very_long": (lambda d: kaggle(d, {"y" * 300: TASK}), ["300 characters, more than 64", "yyy..."]),
    "dot_dot": (lambda d: kaggle(d, {"..": TASK}), ["'..'", RULE]),
    "case_duplicates": (
        lambda d: kaggle(d, {"abcd1234": TASK, "ABCD1234": TASK}),
        ["'abcd1234' and 'ABCD1234' differ only in case"],
    ),
    "solutions_file": (
        lambda d: kaggle(d, {GOOD: TASK}, {GOOD: [[[0, 1], [1, 0]]], "../../sol_escape": [[[1]]]}),
        ["s.json", "'../../sol_escape'", RULE],
    ),
    "task_folder": (lambda d: [*TINY, "data=dir", f"data.path={task_folder(d)}"], ["tasks: id:", "'bad\\nname'", RULE]),
    "task_ids": (
        lambda d: [*kaggle(d, {GOOD: TASK}), "data.task_ids=['../../x']"],
        ["data.task_ids", "'../../x'", RULE],
    ),
    "checkpoint_garbled": (
        lambda d: run_dir_to_resume(d, {"folds.json": '[["00576224"'}),
        ["folds.json: resume: not valid JSON"],
    ),
    "checkpoint_unknown_task": (
        lambda d: run_dir_to_resume(d, {"folds.json": [["zzzz9999"]]}),
        ["folds.json: resume:", "names task zzzz9999, which this run's data does not have"],
    ),
    "checkpoint_input_traversal": (
        lambda d: run_dir_to_resume(
            d, {"folds.json": [[GOOD]], f"fold_0/inputs/{GOOD}.0.json": record("../../../pwned")}
        ),
        [f"{GOOD}.0.json: resume:", "names task '../../../pwned'"],
    ),
    "checkpoint_other_config": (
        lambda d: run_dir_to_resume(
            d, {"folds.json": [[GOOD]], "made_with.json": {"settings": {"lora.rank": 999}, "tasks": {}}}
        ),
        ["made_with.json: resume: made with another config: lora.rank was 999, is 16"],
    ),
    "saved_config_trusts_remote_code": (
        lambda d: run_dir_to_resume(d, {}, model="  trust_remote_code: true\n"),
        ["config: model.trust_remote_code:", "sets model.trust_remote_code=true", "command line only"],
    ),
    "pickle_only_model": (
        lambda d: model_case(d, lambda m: write(m / "pytorch_model.bin", pickle.dumps({"w": Payload(d / "PWNED")}))),
        ["pytorch_model.bin: model.allow_pickle:", "model.allow_pickle=true"],
    ),
    "custom_code_model": (
        lambda d: model_case(
            d,
            lambda m: write(m / "custom.py", f"open({str(d / 'PWNED')!r}, 'w')\n"),
            model_type="arcfold_custom",
            auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"},
        ),
        ["model.path", "custom code"],
    ),
    "truncated_weights": (
        lambda d: model_case(d, lambda m: write(m / "model.safetensors", truncated_safetensors())),
        ["model.safetensors: model.path: not a whole safetensors file", "cut short"],
    ),
}


def listing(folder: Path) -> set[Path]:
    return {Path(root, name) for root, dirs, files in os.walk(folder) for name in dirs + files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, set[Path], subprocess.CompletedProcess]]:
    """Every case at once, a few processes at a time (they wait mostly on imports): name -> (its folder, the
    folder's listing before the run, the finished process)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(arcfold.__file__).parents[1])}
    for key in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    pending = list(CASES.items())
    started: dict[str, tuple[Path, set[Path], subprocess.Popen]] = {}
    done: dict[str, tuple[Path, set[Path], subprocess.CompletedProcess]] = {}
    while pending or started:
        while pending and len(started) < 4:
            name, (setup, _) = pending.pop(0)
            folder = tmp_path_factory.mktemp(name)
            args = setup(folder)
            command = [sys.executable, "-m", "arcfold", f"outputs={folder / 'out'}", "tracking=off", *args]
            before = listing(folder)
            proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            started[name] = folder, before, proc
        for name, (folder, before, proc) in list(started.items()):
            if proc.poll() is not None:
                out, err = proc.communicate()
                text = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
                done[name] = folder, before, text
                del started[name]
        time.sleep(0.2)
    return done


def test_the_table_holds_at_least_twelve_hostile_cases():
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_input_is_refused_in_one_line_with_exit_2_and_nothing_lands_outside_the_run(runs, name):
    folder, before, proc = runs[name]
    assert proc.returncode == 2, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("arcfold: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip("\n").endswith(errors[0]), proc.stderr[-3000:]
    assert errors[0].isprintable() and len(errors[0]) < 500
    for part in CASES[name][1]:
        assert part in errors[0], errors[0]
    runs_dir = folder / "out" / "runs"
    (run,) = runs_dir.iterdir()  # one run dir: the fresh run's, or the one resumed
    allowed = {folder / "out", runs_dir, run}
    new = sorted(p for p in listing(folder) - before if p not in allowed and run not in p.parents)
    assert not new, new
