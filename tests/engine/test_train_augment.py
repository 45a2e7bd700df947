"""train.augment: each switch changes what TTT trains on, and only in its own way.

For generated tasks of every family, the training sequences build_samples makes (the tokens the model is trained
on) are compared with the encodings of the task under each kind of transform alone."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from arcfold.config import AugmentConfig, TrainConfig
from arcfold.data import GridCodec, Task, Transform
from arcfold.data.synthetic import FAMILIES, generate
from arcfold.engine.train import build_samples

CFG = TrainConfig(epochs=2, seed=3)
TASKS = generate(list(FAMILIES), 24, seed=11)  # 4 tasks of each family, 3-5 demonstrations each


def trained_on(codec: GridCodec, task: Task, d8: bool, colours: bool, demo_order: bool) -> list[tuple[int, ...]]:
    cfg = dataclasses.replace(CFG, augment=AugmentConfig(d8=d8, colours=colours, demo_order=demo_order))
    samples, skipped = build_samples(codec, [task], cfg)
    assert skipped == 0 and len(samples) == 8 * CFG.epochs  # the same steps, whatever is switched off
    return [tuple(s.ids) for s in samples]


def encode(codec: GridCodec, task: Task, view: Transform) -> tuple[int, ...]:
    enc = codec.encode_train(view.pairs(task.train), CFG.max_len, CFG.mask_first_output)
    assert enc is not None
    return tuple(enc.ids)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_with_every_switch_off_ttt_trains_on_the_task_itself(codec: GridCodec, task: Task) -> None:
    assert set(trained_on(codec, task, False, False, False)) == {encode(codec, task, Transform())}


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_d8_alone_trains_on_each_of_the_eight_symmetries(codec: GridCodec, task: Task) -> None:
    symmetries = {encode(codec, task, Transform(d8)) for d8 in range(8)}
    assert set(trained_on(codec, task, True, False, False)) == symmetries
    assert len(symmetries) > 1


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_demo_order_alone_trains_on_reorderings_of_the_demonstrations(codec: GridCodec, task: Task) -> None:
    orders = {encode(codec, task, Transform(demo_order=p)) for p in itertools.permutations(range(len(task.train)))}
    seen = set(trained_on(codec, task, False, False, True))
    assert seen <= orders and len(seen) > 1


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_colours_alone_trains_on_recolourings_of_the_task(codec: GridCodec, task: Task) -> None:
    base = np.array(encode(codec, task, Transform()))
    colour_ids = np.array([codec.encode_grid(np.array([[c]], dtype=np.int8))[0] for c in range(10)])
    seen = trained_on(codec, task, False, True, False)
    for ids in map(np.array, seen):
        # Token by token: the same structure, colour tokens moved by one permutation of the colours.
        assert ids.shape == base.shape
        is_colour = np.isin(base, colour_ids)
        assert (ids[~is_colour] == base[~is_colour]).all() and np.isin(ids[is_colour], colour_ids).all()
        mapping = {int(a): int(b) for a, b in zip(base[is_colour], ids[is_colour])}
        assert all(mapping[int(a)] == int(b) for a, b in zip(base[is_colour], ids[is_colour]))
        assert len(set(mapping.values())) == len(mapping)
    assert len(set(seen)) > 1
