"""Memory that adapts: gradient checkpointing decided from model.kind (train.gradient_checkpointing=auto), and a
fold whose training runs out of memory (torch.OutOfMemoryError, injected through the Engine the pipeline hands its
worker) retried once with checkpointing on and a smaller micro-batch at the same effective batch, before it counts
as failed; the retry logged and in folds.csv."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from hydra import compose, initialize_config_module
from tokenizers import Tokenizer, models

from arcfold import pipeline
from arcfold.config import register
from arcfold.engine.logits import base_model
from arcfold.engine.train import train_fold, use_checkpointing
from arcfold.run.failures import memory_retry
from arcfold.run.worker import Engine

register()
SMALL = [  # seconds per run: two small generated tasks, the random tiny model, inference cut short
    "experiment=smoke",
    "data=synthetic",
    "data.count=2",
    "data.sides=[3,4]",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "folds=2",
    "train.epochs=1",
    "inference.max_len=384",
    "inference.max_seconds=1",
    "tracking=off",
    "report.plots=false",
]


def config(tmp_path, *extra):
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        return compose("config", overrides=[f"outputs={tmp_path}", *SMALL, *extra])


class OutOfMemoryOnce:
    """engine.train_fold that raises torch.OutOfMemoryError on the calls in `fail` (1-based) and records the
    settings of every call and whether the model checkpoints while it trains."""

    def __init__(self, fail=(1,)):
        self.fail, self.calls = set(fail), []

    def __call__(self, model, codec, tasks, cfg, accelerator, **kwargs):
        call = SimpleNamespace(
            checkpointing=cfg.gradient_checkpointing,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            accumulation=accelerator.gradient_accumulation_steps,
            max_seconds=kwargs.get("max_seconds"),
        )
        self.calls.append(call)
        if len(self.calls) in self.fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        stats = train_fold(model, codec, tasks, cfg, accelerator, **kwargs)
        call.steps, call.samples = stats.steps, stats.samples
        call.model_checkpointed = _checkpointing(model)
        return stats


def _checkpointing(model) -> bool:
    base = base_model(model)
    return any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def folds_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "folds.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(batch_size=1, grad_accum=1, gradient_checkpointing=False), dict(gradient_checkpointing=True)),
        (dict(batch_size=1, grad_accum=4, gradient_checkpointing=True), {}),  # nothing left to shrink
        (
            dict(batch_size=4, grad_accum=2, gradient_checkpointing=False),
            dict(gradient_checkpointing=True, batch_size=2, grad_accum=4),
        ),
        (dict(batch_size=6, grad_accum=1, gradient_checkpointing=True), dict(batch_size=3, grad_accum=2)),
        (dict(batch_size=5, grad_accum=1, gradient_checkpointing=True), dict(batch_size=1, grad_accum=5)),
    ],
)
def test_the_retry_keeps_the_effective_batch(settings, expected):
    retry = memory_retry(SimpleNamespace(**settings))
    assert retry == expected
    if "batch_size" in retry:
        assert retry["batch_size"] * retry["grad_accum"] == settings["batch_size"] * settings["grad_accum"]


@pytest.mark.parametrize(
    "setting, kind, on", [("auto", "hf", True), ("auto", "tiny", False), (False, "hf", False), (True, "tiny", True)]
)
def test_gradient_checkpointing_auto_is_on_for_a_hugging_face_model(setting, kind, on):
    assert use_checkpointing(setting, kind) is on


def test_a_fold_out_of_memory_is_retried_once_with_checkpointing_and_half_the_micro_batch(tmp_path, caplog):
    engine_fold = OutOfMemoryOnce(fail=(1,))
    cfg = config(tmp_path, "train.batch_size=2", "on_error=fail")
    with caplog.at_level(logging.INFO, logger="arcfold"):
        result = pipeline.run(cfg, tmp_path, engine=Engine(train_fold=engine_fold))

    first, retry, second_fold = engine_fold.calls
    assert (first.checkpointing, first.batch_size, first.grad_accum, first.accumulation) == (False, 2, 1, 1)
    assert (retry.checkpointing, retry.batch_size, retry.grad_accum, retry.accumulation) == (True, 1, 2, 2)
    assert retry.model_checkpointed and retry.steps == first_steps(retry.samples, 2)  # same optimiser steps
    # the next fold starts from the configured settings again (its model no longer checkpoints)
    assert (second_fold.checkpointing, second_fold.batch_size, second_fold.accumulation) == (False, 2, 1)
    assert not second_fold.model_checkpointed

    retried = "train.gradient_checkpointing=True, train.batch_size=1, train.grad_accum=2"
    assert [r.retried for r in result.folds] == [retried, ""] and not result.failures
    assert [row["retried"] for row in folds_csv(tmp_path)] == [retried, ""]
    assert any("ran out of memory" in r.message and retried in r.message for r in caplog.records)
    assert all(r.error == "" for r in result.folds) and result.folds[0].steps > 0


def first_steps(samples: int, effective_batch: int) -> int:
    return -(-samples // effective_batch)


@pytest.mark.slow
def test_a_fold_out_of_memory_twice_counts_as_failed(tmp_path):
    engine_fold = OutOfMemoryOnce(fail=(1, 2))
    cfg = config(tmp_path, "on_error=skip", "train_fallback=true")
    result = pipeline.run(cfg, tmp_path, engine=Engine(train_fold=engine_fold))
    assert len(engine_fold.calls) == 3  # fold 0: the try and the one retry; fold 1: trained
    row = result.folds[0]
    assert "OutOfMemoryError" in row.error and "after an out-of-memory retry" in row.error
    assert row.retried == "train.gradient_checkpointing=True" and row.steps == 0
    assert folds_csv(tmp_path)[0]["retried"] == row.retried
    assert result.folds[1].error == "" and result.folds[1].steps > 0

    with pytest.raises(torch.OutOfMemoryError):  # on_error=fail: the second failure stops the run
        cfg = config(tmp_path / "fail", "on_error=fail")
        pipeline.run(cfg, tmp_path / "fail", engine=Engine(train_fold=OutOfMemoryOnce((1, 2))))


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A tiny saved Llama (hidden 64: bitsandbytes' blocks) with a BPE tokenizer of the plain format's symbols."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "<s>", "</s>", "I", "O", "\n", *"0123456789"])}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=8192,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.slow  # a whole run of the 4-bit path (about 25 s on 2 busy cores)
def test_a_4bit_hugging_face_run_checkpoints_by_default_and_retries_with_a_smaller_batch(tmp_path, hf_dir, caplog):
    pytest.importorskip("bitsandbytes")
    engine_fold = OutOfMemoryOnce(fail=(1,))
    cfg = config(
        tmp_path / "run",
        "model=hf",
        f"model.path={hf_dir}",
        "model.device=cpu",
        "model.dtype=bfloat16",
        "model.quantization=4bit",
        "train.batch_size=2",
        "folds=1",
    )
    with caplog.at_level(logging.INFO, logger="arcfold"):
        result = pipeline.run(cfg, tmp_path / "run", engine=Engine(train_fold=engine_fold))
    first, retry = engine_fold.calls
    assert first.checkpointing is True  # auto, model.kind=hf
    assert any("gradient checkpointing on (train.gradient_checkpointing=auto" in r.message for r in caplog.records)
    assert (retry.checkpointing, retry.batch_size, retry.grad_accum, retry.accumulation) == (True, 1, 2, 2)
    assert retry.model_checkpointed and result.folds[0].retried == "train.batch_size=1, train.grad_accum=2"
    assert not result.failures and result.folds[0].steps == first_steps(retry.samples, 2)
