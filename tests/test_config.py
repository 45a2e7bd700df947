"""Config composition: every group option composes into the typed schema, and the documented commands work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from arcfold.config import ConfigError, RunConfig, check, register

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["data", "model", "split", "lora", "train", "inference", "tracking", "experiment"]
# Options whose mandatory keys (???) must be given to compose a usable config.
REQUIRED = {("data", "kaggle"): ["data.challenges=c.json"], ("data", "dir"): ["data.path=tasks"],
            ("model", "hf"): ["model.path=/models/m"], ("experiment", "kaggle"): ["model.path=/models/m"]}

register()


def compose_with(overrides: list[str]):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options_on_disk():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_into_the_schema(group, option):
    cfg = compose_with([f"{group}={option}", *REQUIRED.get((group, option), [])])
    # Converting to the dataclass checks every key and type against the schema, mandatory keys included.
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, RunConfig)
    if group == "data":
        assert typed.data.name == option
    if group == "inference":
        assert typed.inference.strategy == option


def test_the_documented_single_run_overrides():
    cfg = compose_with(["folds=8", "lora.rank=32", "train.epochs=6"])
    assert cfg.folds == 8 and cfg.lora.rank == 32 and cfg.train.epochs == 6


def test_per_task_folds_and_strategies():
    assert compose_with(["folds=per_task"]).folds == "per_task"
    assert compose_with(["split=balanced"]).split.strategy == "balanced"


def test_data_selection_overrides():
    cfg = compose_with(["data=kaggle", "data.challenges=/k/c.json", "data.solutions=/k/s.json", "data.limit=null"])
    assert (cfg.data.name, cfg.data.challenges, cfg.data.solutions, cfg.data.limit) == \
        ("kaggle", "/k/c.json", "/k/s.json", None)
    assert list(compose_with(["data.task_ids=[a,b]"]).data.task_ids) == ["a", "b"]


def test_a_mistyped_key_or_value_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_with(["lora.rnak=32"])
    with pytest.raises(ConfigCompositionException, match="train.epochs"):
        compose_with(["train.epochs=many"])


def test_mandatory_paths_are_reported_missing_in_one_line():
    with pytest.raises(ConfigError, match="model.path") as err:
        check(compose_with(["model=hf"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.challenges"):
        check(compose_with(["data=kaggle"]))


def test_the_default_config_passes_the_check():
    check(compose_with([]))
    check(compose_with(["folds=per_task"]))
    check(compose_with(["inference=dfs", "inference.scoring.views=16", "inference.n=2"]))
    check(compose_with(["inference=dfs", "inference.scoring.views=16", "inference.scoring.views_from=fresh"]))


def test_the_cpu_demo_experiment_sizes_the_default_run_and_groups_mean_what_they_say():
    demo = compose_with([])
    assert (demo.model.kind, demo.data.limit, demo.data.order, demo.train.lr) == ("tiny", 8, "size", 3e-3)
    # The model option no longer sizes the run: a chosen train option keeps its own schedule under the demo.
    arc25 = compose_with(["model=tiny", "train=arc25"])
    assert (arc25.train.lr, arc25.train.epochs) == (2e-4, 10)
    assert compose_with(["train=default"]).train.lr == 1e-4
    # Without the preset: the schema's defaults, every task.
    real = compose_with(["experiment=none", "model=hf", "model.path=/models/m"])
    assert (real.data.limit, real.data.order, real.train.lr, real.model.kind) == (None, "id", 1e-4, "hf")
    # Command-line values still win over what the experiment sets.
    assert compose_with(["data.limit=null", "train.lr=0.01"]).data.limit is None
    assert compose_with(["train.lr=0.01"]).train.lr == 0.01


def test_the_kaggle_experiment_writes_the_submission_where_kaggle_reads_it():
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=kaggle", "model.path=/m"], return_hydra_config=True)
    assert (cfg.data.name, cfg.model.kind, cfg.tracking.enabled) == ("kaggle", "hf", False)
    assert cfg.data.challenges.startswith("/kaggle/input/") and cfg.data.limit is None and cfg.train.lr == 1e-4
    assert cfg.outputs == cfg.hydra.run.dir == "/kaggle/working"
