"""The built-in grid codec: exact round trips on every eval grid, labels on outputs only, strict decoding,
and demonstrations dropped (and logged) when a sequence is too long."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from arcfold.data import IGNORE, MAX_OUTPUT_TOKENS, ArcDataError, GridCodec, Pair, Task, make_views

CODEC = GridCodec.builtin()
IN, OUT, ROW, EOS = CODEC.ids["input"], CODEC.ids["output"], CODEC.ids["row"], CODEC.eos_id
DIGIT = [CODEC.ids[str(d)] for d in range(10)]


def expected_grid_ids(grid: np.ndarray) -> list[int]:
    """The format written out by hand: one digit token per cell, a row token after every row."""
    return [tok for row in grid.tolist() for tok in [DIGIT[c] for c in row] + [ROW]]


def test_every_eval_grid_round_trips_exactly(eval_grids: list[np.ndarray]) -> None:
    for grid in eval_grids:
        h, w = grid.shape
        ids = CODEC.encode_answer(grid)
        assert ids == expected_grid_ids(grid) + [EOS]
        assert len(ids) == h * (w + 1) + 1 <= MAX_OUTPUT_TOKENS
        back = CODEC.decode(ids)
        assert back is not None and back.dtype == np.int8 and np.array_equal(back, grid)


def label_segments(labels: list[int]) -> list[list[int]]:
    """The runs of labelled (not IGNORE) positions."""
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs


@pytest.mark.parametrize("mask_first_output", [False, True])
def test_train_labels_are_exactly_the_outputs_and_their_end_tokens(
    eval_tasks: list[Task], mask_first_output: bool
) -> None:
    for task in eval_tasks:
        view = make_views(task, n=1, seed=0)[3]
        demos = view.task(task).train
        enc = CODEC.encode_train(demos, mask_first_output=mask_first_output)
        assert enc is not None and enc.dropped == 0 and enc.demos == len(demos)
        # Rebuild the sequence from the demonstrations: the codec invents nothing and loses nothing.
        rebuilt = []
        for pair in demos:
            rebuilt += [IN] + expected_grid_ids(pair.input) + [OUT] + expected_grid_ids(pair.output) + [EOS]
        prefix = [CODEC.ids["bos"]]
        assert enc.ids == prefix + rebuilt and len(enc.labels) == len(enc.ids)
        # A label is either IGNORE or the very token at its position (the model shifts them itself).
        assert all(lab in (IGNORE, tok) for lab, tok in zip(enc.labels, enc.ids))
        learned = demos[1:] if mask_first_output and len(demos) > 1 else demos
        assert label_segments(enc.labels) == [expected_grid_ids(p.output) + [EOS] for p in learned]


def test_prompt_is_the_training_sequence_cut_before_the_answer(eval_tasks: list[Task]) -> None:
    for task in eval_tasks[:30]:
        for test in task.test:
            prompt = CODEC.encode_prompt(task.train, test.input)
            full = CODEC.encode_train(list(task.train) + [test])
            assert prompt.labels is None and prompt.dropped == 0
            assert full.ids == prompt.ids + CODEC.encode_answer(test.output)
            assert prompt.ids[-1] == OUT


GRID = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int8)
GOOD = expected_grid_ids(GRID) + [EOS]


@pytest.mark.parametrize(
    "name, ids",
    [
        ("no end token", GOOD[:-1]),
        ("nothing", []),
        ("only the end token", [EOS]),
        ("ragged rows", [DIGIT[1], DIGIT[2], ROW, DIGIT[3], ROW, EOS]),
        ("empty row", [ROW, DIGIT[1], ROW, EOS]),
        ("empty row in the middle", [DIGIT[1], ROW, ROW, DIGIT[1], ROW, EOS]),
        ("last row without its row token", [DIGIT[1], ROW, DIGIT[2], EOS]),
        ("input marker", [DIGIT[1], IN, ROW, EOS]),
        ("output marker", [OUT, DIGIT[1], ROW, EOS]),
        ("bos", [CODEC.ids["bos"], DIGIT[1], ROW, EOS]),
        ("unknown id", [DIGIT[1], 999, ROW, EOS]),
        ("31 rows", [DIGIT[1], ROW] * 31 + [EOS]),
        ("31 columns", [DIGIT[1]] * 31 + [ROW, EOS]),
    ],
)
def test_decode_rejects_malformed_outputs(name: str, ids: list[int]) -> None:
    assert CODEC.decode(ids) is None, name


def test_decode_accepts_the_largest_grid_and_stops_at_the_first_end_token() -> None:
    big = np.full((30, 30), 7, dtype=np.int8)
    assert np.array_equal(CODEC.decode(CODEC.encode_answer(big)), big)
    assert np.array_equal(CODEC.decode(np.array(GOOD + [DIGIT[9], IN, 12345])), GRID)  # after the end: ignored


def test_decode_inverts_encode_on_random_grids() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        grid = rng.integers(0, 10, size=tuple(rng.integers(1, 31, size=2)), dtype=np.int8)
        assert np.array_equal(CODEC.decode(CODEC.encode_answer(grid)), grid)


def long_task(eval_tasks: list[Task]) -> Task:
    return max(eval_tasks, key=lambda t: len(CODEC.encode_train(t.train).ids))


def test_over_long_training_drops_demos_until_it_fits_and_logs(eval_tasks: list[Task], caplog) -> None:
    task = long_task(eval_tasks)
    full = len(CODEC.encode_train(task.train).ids)
    max_len = full * 2 // 3
    with caplog.at_level(logging.INFO, logger="arcfold.data.codec"):
        enc = CODEC.encode_train(task.train, max_len=max_len)
    assert enc is not None and len(enc.ids) <= max_len
    assert enc.dropped >= 1 and enc.demos == len(task.train) - enc.dropped >= 2
    assert "dropped" in caplog.text
    assert CODEC.encode_train(task.train, max_len=10) is None  # even two demonstrations do not fit


def test_over_long_prompt_drops_demos_and_keeps_room_for_the_answer(eval_tasks: list[Task], caplog) -> None:
    task = long_task(eval_tasks)
    test = task.test[0].input
    full = len(CODEC.encode_prompt(task.train, test).ids)
    max_len = full // 2 + MAX_OUTPUT_TOKENS
    with caplog.at_level(logging.INFO, logger="arcfold.data.codec"):
        enc = CODEC.encode_prompt(task.train, test, max_len=max_len)
    assert len(enc.ids) + MAX_OUTPUT_TOKENS <= max_len and enc.dropped >= 1 and enc.demos >= 1
    assert "dropped" in caplog.text
    with pytest.raises(ArcDataError, match="max_len"):
        CODEC.encode_prompt(task.train, test, max_len=MAX_OUTPUT_TOKENS + 5)


def test_pair_tokens_counts_what_encoding_writes(eval_tasks: list[Task]) -> None:
    for task in eval_tasks[:20]:
        enc = CODEC.encode_train(task.train)
        assert len(enc.ids) == 1 + sum(CODEC.pair_tokens(p) for p in task.train)  # + bos
        assert CODEC.pair_tokens(Pair(task.test[0].input)) == 2 + task.test[0].input.size + len(task.test[0].input)


def test_builtin_vocabulary() -> None:
    assert CODEC.vocab_size == 16 and CODEC.pad_id != CODEC.eos_id
    assert sorted(CODEC.output_tokens) == sorted(DIGIT + [ROW, EOS])
    with pytest.raises(ArcDataError, match="codec"):
        GridCodec({**CODEC.ids, "7": CODEC.ids["8"]})
