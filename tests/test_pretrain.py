"""stage=pretrain end to end: `python -m arcfold stage=pretrain` on a few dozen generated tasks leaves a model
directory (weights, card, learning curve, summary) and an MLflow run; model.kind=tiny model.path loads it back
with the same weights; the curve's "greedy solves" is what greedy decoding solves; a synthetic run writes its
tasks as Kaggle files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import arcfold as arcfold_pkg
from arcfold.checks import ConfigError, check
from arcfold.config import ModelConfig, TrainConfig, register
from arcfold.data import ArcDataError, Task, load_kaggle, validate_submission
from arcfold.data.synthetic import generate
from arcfold.data.tasks import same_grid
from arcfold.engine.generate import greedy
from arcfold.engine.model import load_model
from arcfold.engine.train import train_fold
from arcfold.pretrain import heldout_scores

register()
FAMILIES = ["identity", "colour_map", "geometry", "upscale", "tile", "crop"]
SIDES = [3, 5]
# 40 tasks x 8 views / batch 8 = 40 steps of a 2-layer width-32 model: about 3 s of training on one thread.
PRETRAIN = [
    "experiment=pretrain",  # stage=pretrain, data=synthetic, model=tiny (random init), train.epochs=1
    "pretrain.minutes=null",
    "data.count=40",
    "data.seed=0",
    "data.sides=[3,5]",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.device=cpu",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "pretrain.eval_every=15",  # 0, 15, 30 while training, and 40: the last step is evaluated after it
    "pretrain.eval_count=6",
    "pretrain.eval_seed=1",
    "tracking.system_metrics=false",
]


@dataclass
class Pretrained:
    out: Path  # the model directory
    root: Path  # outputs=: runs/ and mlflow.db
    proc: subprocess.CompletedProcess

    def curve(self) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(self.out / "curve.csv"))]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """One pretraining through the real entry point (as tests/test_run.py runs the app), into a temporary MLflow
    store; pretrain.out left unset, so the model lands in <run dir>/model."""
    root = tmp_path_factory.mktemp("pretrain")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(arcfold_pkg.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "arcfold", *PRETRAIN, f"outputs={root / 'outputs'}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (root / "outputs" / "runs").iterdir()
    return Pretrained(run_dir / "model", root / "outputs", proc)


@pytest.mark.slow
def test_pretraining_leaves_weights_card_curve_and_summary_and_the_held_out_nll_falls(pretrained):
    out = pretrained.out
    assert {"config.json", "model.safetensors", "README.md", "curve.csv", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    curve = pretrained.curve()
    assert [int(r["step"]) for r in curve] == [0, 15, 30, 40]  # 40 tasks x 8 views / batch 8 = 40 steps
    assert math.isnan(curve[0]["train_loss"]) and all(r["train_loss"] > 0 for r in curve[1:])
    first, last = curve[0], curve[-1]
    # From about uniform over the 16 tokens at init to well below it after 40 steps.
    assert first["heldout_nll"] > math.log(16) - 0.2
    assert last["heldout_nll"] < math.log(16) - 0.25 and last["heldout_nll"] < first["heldout_nll"] - 0.3
    assert {f"heldout_solved/{f}" for f in FAMILIES} <= set(last)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_steps"] == summary["pretrain_planned_steps"] == 40
    assert summary["pretrain_samples"] == 40 * 8
    assert {k: v for k, v in summary.items() if k.startswith("heldout")} == pytest.approx(
        {k: v for k, v in last.items() if k.startswith("heldout")}
    )
    card = (out / "README.md").read_text()
    assert "python -m arcfold " + " ".join(PRETRAIN) in card  # the command that made it
    assert "40 generated tasks" in card and "seed 0" in card and f"sides {SIDES}" in card
    assert f"| 40 | {last['minutes']:.1f} | {last['train_loss']:.3f} | {last['heldout_nll']:.3f} |" in card


@pytest.mark.slow
def test_the_pretraining_is_an_mlflow_run_with_the_learning_curve(pretrained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pretrained.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("arcfold")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["stage"] == "pretrain" and run.data.params["data.count"] == "40"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "heldout_nll"))
    curve = pretrained.curve()
    assert [step for step, _ in history] == [int(r["step"]) for r in curve]
    assert [value for _, value in history] == pytest.approx([r["heldout_nll"] for r in curve])
    assert run.data.metrics["pretrain_steps"] == 40 and run.data.metrics["heldout_nll"] == curve[-1]["heldout_nll"]
    assert {"README.md", "curve.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_model_path_loads_the_saved_weights_in_their_own_shape(pretrained):
    # The default shape (hidden 64, ...) is ignored: a pretrained directory brings its own.
    loaded = load_model(ModelConfig(kind="tiny", path=str(pretrained.out), device="cpu"))
    assert loaded.model.config.hidden_size == 32 and loaded.model.config.num_hidden_layers == 2
    assert loaded.codec.vocab_size == 16 and loaded.tokenizer is None
    reference = transformers.AutoModelForCausalLM.from_pretrained(pretrained.out, local_files_only=True)
    task = generate(FAMILIES, 1, seed=9, sides=SIDES)[0]
    ids = torch.tensor([loaded.codec.encode_prompt(task.train, task.test[0].input).ids])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference.eval()(ids).logits)
    # ... and they are the trained weights: the held-out scores of the curve's last row, recomputed.
    held_out = generate(FAMILIES, 6, seed=1, sides=SIDES)
    last = {k: v for k, v in pretrained.curve()[-1].items() if k.startswith("heldout")}
    assert heldout_scores(loaded.model, loaded.codec, held_out) == pytest.approx(last, rel=1e-5)


def test_heldout_solved_is_exactly_what_greedy_decoding_solves():
    """Train a tiny model on 3 copy tasks of 2x2 grids until it solves some held-out ones, then compare, task by
    task, the teacher-forced "solved" with greedy decoding's exact match, also once the model ranks a token that
    no grid contains (pad) first where the answer ends: greedy may only pick grid tokens."""
    torch.set_num_threads(1)
    loaded = load_model(
        ModelConfig(kind="tiny", device="cpu", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    )
    model, codec = loaded.model, loaded.codec
    model.requires_grad_(True)
    corpus = [Task(t.id, t.train + t.test, ()) for t in generate(["identity"], 3, seed=0, sides=[2, 2])]
    schedule = TrainConfig(
        epochs=20, lr=3e-3, scheduler="constant_with_warmup", warmup_steps=2, batch_size=8, mixed_precision="no"
    )
    train_fold(model, codec, corpus, schedule, progress=False)
    held_out = generate(["identity"], 20, seed=1, sides=[2, 2])

    def greedy_solves() -> list[float]:
        solved = []
        for task in held_out:
            answer = task.test[0].output
            assert answer is not None
            prompt = codec.encode_prompt(task.train, task.test[0].input).ids
            ((completion,),), _ = greedy(model, [prompt], codec, max_new_tokens=len(codec.encode_answer(answer)))
            solved.append(float(same_grid(codec.decode(completion.ids), answer)))
        return solved

    def teacher_forced() -> list[float]:
        return [heldout_scores(model, codec, [task])["heldout_solved"] for task in held_out]

    expected = greedy_solves()
    assert 0 < sum(expected) < len(expected)  # some solved, some not: the comparison can tell them apart
    assert teacher_forced() == expected
    with torch.no_grad():  # pad never enters an unpadded prompt, so only the output logits change
        head = model.get_output_embeddings().weight
        head[codec.pad_id] = 3 * head[codec.eos_id]
    assert greedy_solves() == expected
    assert teacher_forced() == expected


def test_a_model_path_that_is_not_a_pretrained_tiny_model_is_refused_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArcDataError) as err:
        load_model(ModelConfig(kind="tiny", path=str(empty), device="cpu"))
    assert str(empty) in str(err.value) and "config.json" in str(err.value)

    hf = tmp_path / "hf"  # a causal LM with a tokenizer's vocabulary, not the 16 built-in tokens
    transformers.LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        hf
    )
    with pytest.raises(ArcDataError) as err:
        load_model(ModelConfig(kind="tiny", path=str(hf), device="cpu"))
    message = str(err.value)
    assert str(hf) in message and "vocab_size 32" in message and "\n" not in message

    from hydra import compose, initialize_config_module

    with initialize_config_module("arcfold.conf", version_base="1.3"):  # and before anything loads
        cfg = compose("config", overrides=[f"model.path={empty}"])
    with pytest.raises(ConfigError) as refused:
        check(cfg)
    assert refused.value.key == "model.path" and str(empty) in str(refused.value)


@pytest.mark.slow
def test_a_synthetic_run_writes_its_tasks_as_kaggle_files_that_read_back_equal(tmp_path):
    from hydra import compose, initialize_config_module

    from arcfold import pipeline

    overrides = [
        f"outputs={tmp_path}",
        "data=synthetic",
        "data.count=2",
        "data.seed=3",
        "data.sides=[3,4]",
        "train.epochs=0",
        "folds=1",
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.intermediate_size=64",
        "inference.max_seconds=0.5",
        "report.plots=false",
        "tracking=off",
        "save_adapters=none",
    ]
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    check(cfg)
    pipeline.run(cfg, tmp_path)
    tasks = generate(FAMILIES, 2, seed=3, sides=[3, 4])
    written = load_kaggle(
        tmp_path / "data" / "synthetic_challenges.json", tmp_path / "data" / "synthetic_solutions.json"
    )
    assert written == tasks
    validate_submission(json.loads((tmp_path / "submission.json").read_text()), tasks)
