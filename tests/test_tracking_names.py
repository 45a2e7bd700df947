"""A sweep's swept keys and its jobs' run names (swept values only), from Hydra's own override parser."""

from __future__ import annotations

from arcfold.track.sweep import job_name, swept_keys


def test_swept_keys_are_those_with_more_than_one_value_the_command_line_winning():
    params = ["seed=range(0,3)"]  # hydra.sweeper.params from repeats=3
    assert swept_keys(params + ["lora.rank=4,8", "data.limit=2", "folds=1"]) == ["seed", "lora.rank"]
    assert swept_keys(["seed=range(0,1)", "lora.rank=4,8"]) == ["lora.rank"]  # repeats=1: one seed
    assert swept_keys(["seed=range(0,3)", "seed=5"]) == []  # an explicit seed replaces the repeats
    assert swept_keys(["seed=range(0,1)", "+extra=1,2", "train.lr=choice(0.1,0.2)"]) == ["extra", "train.lr"]


def test_a_job_is_named_by_its_swept_values_configuration_first():
    job = ["seed=2", "lora.rank=8", "data.limit=2", "outputs=/somewhere/long", "folds=1"]
    assert job_name(job, ["seed", "lora.rank"]) == "lora.rank=8 seed=2"
    assert job_name(job, []) == "default"
