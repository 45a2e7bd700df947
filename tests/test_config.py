"""Config composition: every group option composes into the typed schema, and the documented commands work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import arcfold
from arcfold.checks import ConfigError, check
from arcfold.config import RunConfig, register

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "data",
    "model",
    "format",
    "split",
    "lora",
    "train",
    "inference",
    "tracking",
    "experiment",
    "executor",
    "variant",
]
# Options whose mandatory keys (???) must be given to compose a usable config.
REQUIRED = {
    ("data", "kaggle"): ["data.challenges=c.json"],
    ("data", "dir"): ["data.path=tasks"],
    ("model", "hf"): ["model.path=/models/m"],
    ("experiment", "kaggle"): ["model.path=/models/m"],
}

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
    if group == "format":
        assert typed.format.name == option


def test_the_documented_single_run_overrides():
    cfg = compose_with(["folds=8", "lora.rank=32", "train.epochs=6"])
    assert cfg.folds == 8 and cfg.lora.rank == 32 and cfg.train.epochs == 6


def test_per_task_folds_and_strategies():
    assert compose_with(["folds=per_task"]).folds == "per_task"
    assert compose_with(["split=balanced"]).split.strategy == "balanced"


def test_data_selection_overrides():
    cfg = compose_with(["data=kaggle", "data.challenges=/k/c.json", "data.solutions=/k/s.json", "data.limit=null"])
    assert (cfg.data.name, cfg.data.challenges, cfg.data.solutions, cfg.data.limit) == (
        "kaggle",
        "/k/c.json",
        "/k/s.json",
        None,
    )
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


@pytest.mark.parametrize(
    "override,field", [("format.name=xml", "format.name"), ("format=architects", "format"), ("format=chat", "format")]
)
def test_a_bad_prompt_format_is_refused_in_one_line(override, field):
    # The default model is tiny, whose built-in vocabulary can write only the plain format.
    with pytest.raises(ConfigError) as err:
        check(compose_with(override.split()))
    assert err.value.key == "format.name" and "\n" not in str(err.value)


@pytest.fixture
def model_dir(tmp_path) -> str:
    """A folder the path check accepts as a model directory (the check reads no weights)."""
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_the_default_config_passes_the_check(model_dir):
    check(compose_with([]))
    check(compose_with(["folds=per_task"]))
    assert compose_with([]).format.name == "plain"
    for fmt in ("architects", "chat"):
        check(compose_with(["model=hf", f"model.path={model_dir}", f"format={fmt}"]))
    check(compose_with(["inference=dfs", "inference.scoring.views=16", "inference.n=2"]))
    check(compose_with(["inference=dfs", "inference.scoring.views=16", "inference.scoring.views_from=fresh"]))


def test_the_defaults_list_is_the_cpu_demo_and_groups_mean_what_they_say():
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        demo_hydra = compose("config", return_hydra_config=True).hydra
    choices = demo_hydra.runtime.choices
    assert (choices.data, choices.model, choices.train, choices.inference) == ("synthetic", "shipped", "shipped", "dfs")
    assert choices.experiment is None and choices.variant is None  # a plain run is the defaults list alone
    demo = compose_with([])
    assert (demo.model.kind, demo.data.name, demo.data.count, demo.train.lr, demo.train.epochs) == (
        "tiny",
        "synthetic",
        8,
        1e-4,
        4,
    )
    assert (demo.folds, demo.data.sides, demo.data.limit, demo.data.order) == ("per_task", [3, 6], 8, "size")
    assert Path(demo.model.path) == Path(arcfold.__file__).parent / "shipped"  # the shipped model, wherever installed
    # The real data is one override away: the demo's sizing keeps it to the 8 smallest tasks.
    real_data = compose_with(["data=arc_agi_2_eval"])
    assert (real_data.data.name, real_data.data.limit, real_data.data.order) == ("arc_agi_2_eval", 8, "size")
    smoke = compose_with(["experiment=smoke"])  # the random tiny model: the plumbing check the tests run on
    assert (smoke.model.kind, smoke.model.path, smoke.data.name, smoke.train.lr) == (
        "tiny",
        None,
        "arc_agi_2_eval",
        3e-3,
    )
    assert (smoke.folds, smoke.inference.strategy, smoke.data.limit, smoke.data.order) == (2, "greedy", 8, "size")
    # A chosen train option keeps its own schedule, under the defaults and under an experiment.
    arc25 = compose_with(["model=tiny", "train=arc25"])
    assert (arc25.train.lr, arc25.train.epochs) == (2e-4, 10)
    assert compose_with(["experiment=smoke", "train=arc25"]).train.lr == 2e-4
    assert compose_with(["train=default"]).train.lr == 1e-4
    # A real model on every task: the groups and values the demo picked, each set back by name.
    real = compose_with(["model=hf", "model.path=/models/m", "train=default", "data=arc_agi_2_eval", "data.limit=null"])
    assert (real.data.limit, real.train.lr, real.train.epochs, real.model.kind) == (None, 1e-4, 1, "hf")
    # Command-line values still win over what an experiment sets.
    assert compose_with(["experiment=smoke", "data.limit=null", "folds=4"]).data.limit is None
    assert compose_with(["experiment=smoke", "train.lr=0.01"]).train.lr == 0.01
    assert compose_with(["train.lr=0.01"]).train.lr == 0.01


def test_the_other_experiments_undo_the_demo_sizing():
    testbed = compose_with(["experiment=testbed"])
    assert (testbed.data.count, testbed.data.seed, testbed.data.limit, testbed.data.order) == (48, 2000, None, "id")
    pretrain = compose_with(["experiment=pretrain"])
    assert (pretrain.data.count, pretrain.data.limit, pretrain.data.order, pretrain.train.epochs) == (
        9600,
        None,
        "id",
        1,
    )
    kaggle = compose_with(["experiment=kaggle", "model.path=/m"])
    assert (kaggle.folds, kaggle.inference.strategy, kaggle.train.epochs, kaggle.data.limit) == (2, "greedy", 1, None)


def test_the_real_model_keys_compose_and_pass_the_check(model_dir):
    cfg = compose_with(
        [
            "model=hf",
            f"model.path={model_dir}",
            "model.quantization=4bit",
            "model.device_map=auto",
            "model.shrink_vocab=true",
            "model.shrink_vocab_save=/tmp/small",
            "save_adapters=last",
        ]
    )
    check(cfg)
    typed = OmegaConf.to_object(cfg)
    assert (
        typed.model.quantization,
        typed.model.device_map,
        typed.model.shrink_vocab,
        typed.model.shrink_vocab_save,
        typed.save_adapters,
    ) == ("4bit", "auto", True, "/tmp/small", "last")
    # A device map as a mapping travels as a quoted string (an unquoted one is a Hydra dict, not this key's type).
    assert compose_with(['model.device_map="{model: 0, lm_head: 1}"']).model.device_map == "{model: 0, lm_head: 1}"
    defaults = compose_with([])
    assert (
        defaults.model.quantization,
        defaults.model.device_map,
        defaults.model.shrink_vocab,
        defaults.save_adapters,
    ) == ("none", None, False, "none")


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.quantization=2bit", "model.quantization"),
        ("save_adapters=true", "save_adapters"),
        ("save_adapters=every", "save_adapters"),
        ("model.shrink_vocab_save=/tmp/x", "model.shrink_vocab_save"),
    ],
)
def test_bad_real_model_settings_name_their_field(override, field, model_dir):
    with pytest.raises(ConfigError, match=field) as err:
        check(compose_with(["model=hf", f"model.path={model_dir}", override]))
    assert err.value.key == field and "\n" not in str(err.value)


def test_the_kaggle_experiment_writes_the_submission_where_kaggle_reads_it():
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=kaggle", "model.path=/m"], return_hydra_config=True)
    assert (cfg.data.name, cfg.model.kind, cfg.tracking.enabled) == ("kaggle", "hf", False)
    assert cfg.data.challenges.startswith("/kaggle/input/") and cfg.data.limit is None and cfg.train.lr == 1e-4
    assert cfg.outputs == cfg.hydra.run.dir == "/kaggle/working"


SEEDS = ("split.seed", "train.seed", "lora.init_seed", "inference.seed")


@pytest.mark.parametrize("group", ["split=balanced", "train=arc25", "train=architects", "lora=architects"])
def test_the_seed_drives_every_component_seed_whatever_the_options(group):
    cfg = compose_with(["seed=7", group])
    assert [OmegaConf.select(cfg, k) for k in SEEDS] == [7] * 4
    assert cfg.inference.scoring.seed == 8  # fresh scoring views differ from the generation views
    assert cfg.model.init_seed == 0  # the tiny base model stays the same model
    default = compose_with([group])
    assert [OmegaConf.select(default, k) for k in SEEDS] == [0] * 4 and default.inference.scoring.seed == 1


def test_a_component_seed_set_on_the_command_line_wins_over_seed():
    cfg = compose_with(["seed=7", "split.seed=3"])
    assert cfg.split.seed == 3 and cfg.train.seed == 7


def test_repeats_becomes_a_seed_sweep():
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose("config", overrides=["repeats=3"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.seed == "range(0,3)"
