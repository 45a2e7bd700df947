"""The winners' recipes as one word each (issue 19): experiment=architects24, nvarc25 and arc25 compose, number by
number, to the anchors' recipes of ../shared/docs/arc-ttt-reference.md section 4b, written out below from the
reference (not read from the YAML); each refuses a missing model.path in one line; and each runs end to end on a CPU
on a small random model saved here, with its own prompt format and vocabulary shrink."""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from arcfold import pipeline
from arcfold.checks import ConfigError, check
from arcfold.config import register

register()
CONF = Path(__file__).resolve().parents[1] / "conf"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Section 4b's numbers in arcfold's keys ("epochs" = augmented copies of the 8 D8 views; views = 8 x inference.n).
COMMON = {
    "model.kind": "hf",  # the base model is the user's: model.path
    "lora.dropout": 0.0,
    "lora.use_rslora": True,
    "lora.target_modules": PROJECTIONS,  # "all attention + MLP projections" / "all projections"
    "train.scheduler": "cosine",
    "inference.strategy": "dfs",
    "data.limit": None,  # every task of the source
    "data.order": "id",
}
RECIPES: dict[str, dict[str, Any]] = {
    "architects24": {  # da-fr/arc-prize-2024, training code and notebook
        "data.name": "arc_agi_1_eval",
        "model.quantization": "4bit",  # the 8B in 4-bit
        "model.dtype": "auto",
        "model.shrink_vocab": True,  # ~64 tokens
        "format.name": "architects",
        "folds": 2,  # one LoRA per T4
        "lora.rank": 64,
        "lora.alpha": 16,
        "lora.train_embeddings": True,  # embeddings + LM head in full
        "train.embedding_lr": 1e-5,
        "train.optimizer": "adamw_8bit",
        "train.lr": 1e-4,
        "train.weight_decay": 0.01,
        "train.epochs": 6,  # 48 augmented repeats, 1 epoch
        "train.batch_size": 2,
        "train.grad_accum": 2,
        "train.warmup_steps": 100,  # section 4: warmup 100 steps (of their 400)
        "train.warmup_ratio": 0.0,
        "train.warmup_max_share": 0.25,  # 100 / 400
        "train.max_len": 4224,
        "inference.min_prob": 0.17,
        "inference.n": 1,  # 8 views
        "inference.scoring.views": 8,
        "inference.scoring.aggregate": "sum_logp",
        "budget.hours": 12.0,  # 2x T4, 12 h
        "budget.seconds": None,
    },
    "nvarc25": {  # 1ytic/NVARC, its Kaggle worker
        "data.name": "arc_agi_2_eval",
        "model.quantization": "none",  # bf16, no 4-bit
        "model.dtype": "bfloat16",
        "model.shrink_vocab": True,  # 16 tokens
        "format.name": "chat",
        "folds": "per_task",
        "lora.rank": 256,
        "lora.alpha": 32,
        "lora.train_embeddings": True,  # trained in the LoRA's modules
        "train.embedding_lr": None,  # the LoRA's lr
        "train.optimizer": "adamw",
        "train.lr": 5e-5,
        "train.weight_decay": 0.0,
        "train.epochs": 16,  # 8 D8 x 16 colour permutations = 128 samples
        "train.batch_size": 1,
        "train.grad_accum": 1,
        "train.warmup_steps": 0,  # not given: arcfold's warmup_ratio 0.1
        "train.warmup_ratio": 0.1,
        "train.warmup_max_share": 0.25,
        "train.max_len": 8192,
        "inference.min_prob": 0.2,  # max_score = -log(0.2)
        "inference.n": 2,  # 16 views
        "inference.max_seconds": 540.0,  # per DFS
        "inference.scoring.views": 8,  # mean NLL under 8 fixed views
        "inference.scoring.aggregate": "nvarc",
        "budget.hours": None,
        "budget.seconds": 42600.0,  # 12 h - 600 s
    },
    "arc25": {  # the ARC25 logs' best, per task
        "data.name": "arc_agi_2_eval",
        "model.quantization": "4bit",  # the ARChitects' 8B in 4-bit
        "model.dtype": "auto",
        "model.shrink_vocab": True,  # the ARChitects' format and model
        "format.name": "architects",
        "folds": "per_task",
        "lora.rank": 16,
        "lora.alpha": 16,  # not given: the ARChitects' (arcfold's default)
        "lora.train_embeddings": True,  # as ARChitects
        "train.embedding_lr": 1e-5,  # as ARChitects
        "train.optimizer": "adamw",  # not given
        "train.lr": 2e-4,
        "train.weight_decay": 0.0,
        "train.epochs": 10,
        "train.batch_size": 1,
        "train.grad_accum": 1,
        "train.warmup_steps": 0,
        "train.warmup_ratio": 0.1,
        "train.warmup_max_share": 0.25,
        "train.max_len": 8192,
        "inference.min_prob": 0.17,  # not given: the ARChitects' notebook value
        "inference.n": 1,  # 8 views
        "inference.scoring.views": 8,  # as ARChitects
        "inference.scoring.aggregate": "sum_logp",
        "budget.hours": 12.0,  # 4x L4, 12 h
        "budget.seconds": None,
    },
}
PRESETS = list(RECIPES)


def compose_preset(name: str, *overrides: str):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def mismatches(cfg: Any, table: dict[str, Any]) -> list[str]:
    """The keys whose composed value is not the table's (exact: 1e-4 is not 1.0001e-4)."""
    wrong = []
    for key, want in table.items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        if got != want or type(got) is not type(want):
            wrong.append(f"{key}: preset {got!r}, reference {want!r}")
    return wrong


def leaves(node: Any, prefix: str = "") -> set[str]:
    """The dotted keys a YAML file sets (its defaults list aside)."""
    if not isinstance(node, dict):
        return {prefix[:-1]}
    return {key for k, v in node.items() if k != "defaults" for key in leaves(v, f"{prefix}{k}.")}


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_is_its_anchors_recipe_number_by_number(name):
    cfg = compose_preset(name)
    assert mismatches(cfg, {**COMMON, **RECIPES[name]}) == []
    assert cfg.model.path is None  # the base model stays the user's


@pytest.mark.parametrize("name", PRESETS)
def test_every_value_a_preset_sets_is_in_its_table(name):
    """A number the preset (or the train / lora option it picks) sets but the table lacks would go unchecked."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))
    assert isinstance(preset, dict)
    keys = leaves(preset)
    for entry in preset["defaults"]:
        (group, option), *_ = entry.items()
        group = group.removeprefix("override /")
        if group in ("train", "lora"):
            option_file = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
            keys |= {f"{group}.{k}" for k in leaves(option_file)}
    assert keys - set(COMMON) - set(RECIPES[name]) == set()


def changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 1.0
    if isinstance(value, list):
        return value[:-1]
    if value is None:
        return 1
    return 3 if value == "per_task" else f"{value}x"


@pytest.mark.parametrize("name", PRESETS)
def test_changing_any_one_number_of_a_preset_fails_the_comparison(name):
    table = {**COMMON, **RECIPES[name]}
    composed = compose_preset(name)
    for key, value in table.items():
        cfg = copy.deepcopy(composed)
        OmegaConf.update(cfg, key, changed(value), merge=False)
        assert [m.split(":")[0] for m in mismatches(cfg, table)] == [key]
    cfg = copy.deepcopy(composed)
    cfg.train.lr = RECIPES[name]["train.lr"] * (1 + 1e-9)  # close is not the same number
    assert [m.split(":")[0] for m in mismatches(cfg, table)] == ["train.lr"]


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_without_a_model_path_is_refused_in_one_line(name):
    with pytest.raises(ConfigError) as err:
        check(compose_preset(name))
    assert str(err.value) == "config: model.path: no value given (set it on the command line, e.g. model.path=...)"


def test_an_8bit_optimiser_without_bitsandbytes_is_refused_in_one_line(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = compose_preset("architects24", f"model.path={model}")
    check(cfg)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert str(err.value) == (
        "config: train.optimizer: got 'adamw_8bit'; allowed: adamw, or install bitsandbytes (pip install bitsandbytes)"
    )
    cfg.train.optimizer = "adamw"
    check(cfg)


FILLERS = ("!", "?", "filler")  # tokens no format writes: the vocabulary shrink drops them
EXTRA_ROWS = 8  # embedding rows past the tokenizer, as real models pad their vocabularies


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, format_tokenizer) -> Path:
    """A random Llama of a small shape (hidden 64: bitsandbytes' 4-bit blocks) with the two-format tokenizer of
    tests/conftest.py (and fillers), saved."""
    directory = tmp_path_factory.mktemp("recipe_model")
    tokenizer = format_tokenizer(FILLERS)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + EXTRA_ROWS,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=8192,  # the presets' max_len
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SMALL = [  # the run made small, the recipe kept: two generated tasks, one epoch, one set of 8 views
    "data=synthetic",
    "data.count=2",
    "data.limit=2",
    "data.sides=[3,4]",
    "train.epochs=1",
    "inference.n=1",
    "inference.max_seconds=20",
    "model.device=cpu",
    "tracking=off",
    "report.plots=false",
    "report.progress=off",
]


@pytest.mark.slow  # a whole run on a CPU each (about 6-7 s on 2 busy cores; two of them 4-bit)
@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_runs_end_to_end_on_a_cpu(name, model_dir, tmp_path, caplog):
    pytest.importorskip("bitsandbytes")
    cfg = compose_preset(name, f"model.path={model_dir}", f"outputs={tmp_path}", *SMALL)
    check(cfg)
    recipe = RECIPES[name]
    made_small = {o.split("=")[0] for o in SMALL} | {"data.name"}  # data=synthetic
    assert mismatches(cfg, {k: v for k, v in recipe.items() if k not in made_small}) == []  # the rest of the recipe
    with caplog.at_level(logging.INFO, logger="arcfold"):
        result = pipeline.run(cfg, tmp_path / "run")
    messages = [r.getMessage() for r in caplog.records]
    # The preset's vocabulary shrink and format: the model reads only the format's and the special tokens.
    rows = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert any(m.startswith(f"vocabulary shrunk {rows} -> ") for m in messages), messages
    assert len(result.folds) == 2 and not result.failures
    for fold in result.folds:
        assert fold.steps > 0 and math.isfinite(fold.final_loss)
    if name == "architects24":  # 100 warmup steps in a 4-step fold: capped at a quarter
        assert any(m.startswith("warmup capped at 1 of the fold's") for m in messages), messages
    submission = json.loads((tmp_path / "run" / "submission.json").read_text())
    assert sorted(submission) == sorted(t.id for t in result.tasks)
