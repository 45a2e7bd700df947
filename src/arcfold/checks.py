"""The config checked before anything loads: every choice, range, path and budget rule, refused in one line
(ConfigError: `config: KEY: got VALUE; allowed: WHAT`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from arcfold.config import CHOICES, DEGRADE_STEPS
from arcfold.data.augment import view_count


class ConfigError(ValueError):
    """A config value the run cannot use. str(err) is one line: `config: KEY: what is wrong (what is allowed)`."""

    def __init__(self, problem: str, *, key: str | None = None):
        self.problem, self.key = problem, key
        super().__init__(" ".join(f"config: {key + ': ' if key else ''}{problem}".split()))


def refuse(key: str, value: Any, allowed: str) -> ConfigError:
    """The one message shape of a bad value: the key, the value given, and what is allowed."""
    return ConfigError(f"got {value!r}; allowed: {allowed}", key=key)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Range rules: key -> (test of the value, what is allowed). Checked in order, before anything loads.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.limit": (lambda v: v is None or (_int(v) and v >= 1), "null (every task) or an integer >= 1"),
    "data.count": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "data.sides": (lambda v: len(v) == 2 and 2 <= v[0] <= v[1] <= 30, "[min, max] with 2 <= min <= max <= 30"),
    "data.seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "pretrain.eval_every": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "pretrain.eval_count": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "pretrain.eval_seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "pretrain.minutes": (lambda v: v is None or (_num(v) and v > 0), "null or a number of minutes > 0"),
    "model.hidden_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "model.num_layers": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "model.num_heads": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "model.intermediate_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "model.max_position_embeddings": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "lora.rank": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "lora.alpha": (lambda v: _num(v) and v > 0, "a number > 0"),
    "lora.dropout": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lora.target_modules": (lambda v: len(v) >= 1, "at least one module name"),
    "train.epochs": (lambda v: _int(v) and v >= 0, "an integer >= 0 (0: no training)"),
    "train.lr": (lambda v: _num(v) and v > 0, "a number > 0"),
    "train.warmup_ratio": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "train.warmup_steps": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "train.warmup_max_share": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "train.embedding_lr": (lambda v: v is None or (_num(v) and v > 0), "null (train.lr) or a number > 0"),
    "train.batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "train.grad_accum": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "train.weight_decay": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "train.max_grad_norm": (lambda v: _num(v) and v >= 0, "a number >= 0 (0: no clipping)"),
    "train.max_len": (lambda v: _int(v) and v >= 16, "an integer >= 16"),
    "train.gradient_checkpointing": (
        lambda v: v == "auto" or isinstance(v, bool),
        "auto (on for model.kind=hf, off for the tiny model), true or false",
    ),
    "inference.n": (lambda v: _int(v) and v >= 1, "an integer >= 1 (8 * n views)"),
    "inference.min_prob": (lambda v: _num(v) and 0 < v <= 1, "a probability in (0, 1]"),
    "inference.temperature": (lambda v: _num(v) and v > 0, "a number > 0"),
    "inference.samples": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "inference.max_seconds": (lambda v: _num(v) and v > 0, "a number of seconds > 0"),
    "inference.max_candidates": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "inference.max_len": (lambda v: _int(v) and v >= 16, "an integer >= 16"),
    "inference.batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "inference.scoring.views": (lambda v: _int(v) and v >= 0, "an integer >= 0 (0: rank by votes)"),
    "inference.scoring.cache_mb": (lambda v: _num(v) and v >= 0, "a number of MB >= 0"),
    "devices": (
        lambda v: (
            v == "auto" or (_int(v) and v >= 1) or (isinstance(v, Sequence) and not isinstance(v, str) and len(v) >= 1)
        ),
        "auto, an integer >= 1 or a list of GPU indices (cuda:N, cpu)",
    ),
    "executor.threads": (lambda v: v is None or (_int(v) and v >= 1), "null (the cores split) or an integer >= 1"),
    "repeats": (lambda v: _int(v) and v >= 1, "an integer >= 1 (with -m: seeds 0..repeats-1)"),
    "report.progress_every": (lambda v: _num(v) and v >= 0, "a number of seconds >= 0"),
    "report.render_tasks": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "tracking.system_metrics_interval": (lambda v: _num(v) and v > 0, "a number of seconds > 0"),
}


def check(cfg: Any) -> None:
    """Refuse, in one line (ConfigError), a config the run cannot use: a missing or unreadable path, a value out of
    range, an unknown choice, keys that contradict each other. Runs before any data or model is loaded."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    # Paths an option needs (a schema default of None cannot be overridden by "???" in YAML, so check here).
    needs = {
        "data.challenges": cfg.data.name == "kaggle",
        "data.path": cfg.data.name == "dir",
        "model.path": cfg.model.kind == "hf",
    }
    missing += [key for key, needed in needs.items() if needed and not OmegaConf.select(cfg, key)]
    if missing:
        raise ConfigError(f"no value given (set it on the command line, e.g. {missing[0]}=...)", key=missing[0])
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise refuse(key, value, " | ".join(choices))
    for key, (ok, allowed) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise refuse(key, value, allowed)
    _check_folds(cfg)
    _check_paths(cfg)
    if cfg.data.name == "synthetic":
        from arcfold.data.synthetic import FAMILIES  # here, not at the top: config stays a leaf module

        unknown = [f for f in cfg.data.families if f not in FAMILIES]
        if unknown or not cfg.data.families:
            raise refuse("data.families", list(cfg.data.families), "a non-empty list of " + " | ".join(FAMILIES))
    scoring = cfg.inference.scoring
    if scoring.views_from == "generation" and scoring.views > view_count(cfg.inference.n):
        raise refuse(
            "inference.scoring.views",
            scoring.views,
            f"at most the {view_count(cfg.inference.n)} generation views (8 * inference.n); raise inference.n "
            "or set inference.scoring.views_from=fresh",
        )
    if cfg.model.kind == "tiny" and not cfg.model.path and cfg.model.hidden_size % cfg.model.num_heads:
        raise refuse(
            "model.num_heads", cfg.model.num_heads, f"a divisor of model.hidden_size ({cfg.model.hidden_size})"
        )
    if cfg.model.kind == "tiny" and cfg.format.name != "plain":
        raise refuse(
            "format.name",
            cfg.format.name,
            "plain with model.kind=tiny (its built-in vocabulary has no "
            "letters; use model=hf with a tokenizer for architects or chat)",
        )
    if cfg.train.optimizer != "adamw" and not installed("bitsandbytes"):
        raise refuse(
            "train.optimizer", cfg.train.optimizer, "adamw, or install bitsandbytes (pip install bitsandbytes)"
        )
    if cfg.lora.train_embeddings and cfg.train.loss_kernel == "liger":
        raise refuse("train.loss_kernel", "liger", "torch with lora.train_embeddings=true (liger fuses a plain head)")
    if cfg.inference.strategy == "dfs" and cfg.model.attn_implementation == "flash_attention_2":
        # The batched DFS feeds its branches under a tree mask, which flash kernels do not take (engine.dfs).
        raise refuse("model.attn_implementation", "flash_attention_2", "sdpa or eager with inference.strategy=dfs")
    if cfg.model.shrink_vocab_save and not cfg.model.shrink_vocab:
        raise refuse("model.shrink_vocab_save", cfg.model.shrink_vocab_save, "null unless model.shrink_vocab=true")
    check_budget(cfg.budget)


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (bitsandbytes' import takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (import blocked)
        return False


def _check_folds(cfg: Any) -> None:
    folds = cfg.folds
    if not (folds == "per_task" or (_int(folds) and folds >= 1)):
        raise refuse("folds", folds, "an integer >= 1 or per_task")
    # The task count is known here only where the config bounds it; make_folds checks the loaded tasks too.
    bounds = [n for n in (len(cfg.data.task_ids), cfg.data.limit) if n]
    if _int(folds) and bounds and folds > min(bounds):
        raise refuse("folds", folds, f"at most the {min(bounds)} tasks data.limit / data.task_ids select, or per_task")


# What a path key must name, by kind.
PATH_KINDS = {
    "file": "a readable JSON file",
    "dir": "a readable folder of task JSONs",
    "model": "a readable Hugging Face model folder (with config.json)",
}


def _check_paths(cfg: Any) -> None:
    """The files and folders the config names exist and can be read (the model's before it is loaded)."""
    data, model = cfg.data, cfg.model
    paths = []
    if data.name == "kaggle":
        paths += [("data.challenges", data.challenges, "file"), ("data.solutions", data.solutions, "file")]
    if data.name == "dir":
        paths.append(("data.path", data.path, "dir"))
    if model.kind == "hf" or model.path:  # tiny: a pretrained one
        paths.append(("model.path", model.path, "model"))
    for key, path, kind in paths:
        if path is None:  # optional (data.solutions); the mandatory ones were reported missing above
            continue
        given = Path(path).expanduser()
        target = given / "config.json" if kind == "model" else given
        if not ((target.is_dir() if kind == "dir" else target.is_file()) and os.access(target, os.R_OK)):
            raise refuse(key, path, PATH_KINDS[kind] + ("" if given.exists() else "; no such path"))


def check_budget(budget: Any) -> None:
    for key in ("hours", "seconds"):
        value = getattr(budget, key)
        if value is not None and not value > 0:
            raise refuse(f"budget.{key}", value, "a positive number (leave it unset for no deadline)")
    steps = list(budget.degrade)
    unknown = [s for s in steps if s not in DEGRADE_STEPS]
    if unknown or len(set(steps)) != len(steps) or steps[-1:] != ["placeholders"]:
        raise refuse("budget.degrade", steps, f"distinct steps of {', '.join(DEGRADE_STEPS)}, ending with placeholders")
    total = (budget.hours or 0) * 3600 + (budget.seconds or 0)
    margin = budget.margin_seconds  # None: 10% of the budget, at most 60 s (run.budget.margin_seconds)
    if margin is not None and not 0 <= margin < (total or float("inf")):
        raise refuse("budget.margin_seconds", margin, f"null (auto) or >= 0 and below the budget ({total:g} s)")
    if budget.views < 1:
        raise refuse("budget.views", budget.views, "an integer >= 1")
    if not 0 < budget.min_prob <= 1:
        raise refuse("budget.min_prob", budget.min_prob, "a probability in (0, 1]")
