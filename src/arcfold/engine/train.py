"""Training one fold's LoRA: all augmented copies of the fold's tasks in ONE optimiser pass (reference section 3).

Each sample is a whole task view whose labels mark only output-grid tokens and their end token; the model's
own causal LM loss (it shifts labels internally) is the objective. Mixed precision, gradient accumulation and
the fp16 scaler come from accelerate; the schedule from transformers.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import accelerate
import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from arcfold.config import TrainConfig
from arcfold.data.augment import epoch_plan
from arcfold.data.codec import IGNORE, Encoded, GridCodec
from arcfold.data.errors import ArcDataError
from arcfold.data.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class FoldTrainStats:
    steps: int
    samples: int
    tokens: int  # total tokens of all training sequences (padding excluded)
    seconds: float
    tokens_per_second: float
    final_loss: float
    losses: list[float] = field(default_factory=list)  # mean micro-batch loss per optimiser step
    peak_memory_bytes: int = 0  # cuda max_memory_allocated, else the process's max RSS
    dropped_demos: int = 0
    skipped_samples: int = 0  # too long even after dropping demonstrations


def build_samples(codec: GridCodec, tasks: Sequence[Task], cfg: TrainConfig) -> tuple[list[Encoded], int]:
    """The fold's training sequences (8 * epochs augmented views per task) and how many were skipped."""
    samples: list[Encoded] = []
    skipped = 0
    for task, view in epoch_plan(tasks, cfg.epochs, cfg.seed, cfg.colours, cfg.shuffle_demos):
        enc = codec.encode_train(view.pairs(task.train), cfg.max_len, cfg.mask_first_output)
        # A sequence with no labelled token would give a NaN loss: treat it like one that does not fit.
        if enc is None or all(label == IGNORE for label in enc.labels):
            skipped += 1
            continue
        samples.append(enc)
    if skipped:
        log.warning("skipped %d of %d training samples (too long for max_len=%d)", skipped,
                    skipped + len(samples), cfg.max_len)
    return samples, skipped


def collate(samples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    width = max(len(s.ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.ids)
        input_ids[row, :n] = torch.tensor(s.ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(s.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_accelerator(cfg: TrainConfig, device: torch.device) -> accelerate.Accelerator:
    """One Accelerator per run. Note accelerate's state is process-wide: its mixed precision cannot change later."""
    mixed = cfg.mixed_precision
    if mixed not in ("auto", "no", "bf16", "fp16"):
        raise ArcDataError(f"unknown mixed precision {mixed!r}; use auto, no, bf16 or fp16",
                           field="train.mixed_precision")
    if mixed == "auto":
        # bf16 autocast where the hardware has it; fp16 needs loss scaling and is opt-in only.
        mixed = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    # device_placement=False: the model already sits where load_model put it, and batches follow the model.
    return accelerate.Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, device_placement=False,
                                  gradient_accumulation_steps=cfg.grad_accum)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def train_fold(peft_model: torch.nn.Module, codec: GridCodec, tasks: Sequence[Task], cfg: TrainConfig,
               accelerator: accelerate.Accelerator | None = None, progress: bool = True) -> FoldTrainStats:
    """Train the adapter on one fold's tasks; a new optimiser and schedule each call, the model left in eval mode."""
    samples, skipped = build_samples(codec, tasks, cfg)
    dropped = sum(s.dropped for s in samples)
    tokens = sum(len(s.ids) for s in samples)
    if not samples:
        log.warning("fold of %d tasks has no training sample; adapter left untouched", len(tasks))
        return FoldTrainStats(0, 0, 0, 0.0, 0.0, math.nan, [], 0, dropped, skipped)
    device = next(peft_model.parameters()).device
    accelerator = accelerator or make_accelerator(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps = math.ceil(len(samples) / (cfg.batch_size * cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * steps)
    # Fork the RNG so seeding shuffling and dropout here leaves the caller's random stream alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        loader = DataLoader(samples, batch_size=cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(cfg.seed),
                            collate_fn=partial(collate, pad_id=codec.pad_id))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = transformers.get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup,
                                               num_training_steps=steps)
        model, optimizer, loader, scheduler = accelerator.prepare(peft_model, optimizer, loader, scheduler)
        try:
            losses, seconds = _loop(accelerator, model, optimizer, loader, scheduler, device, steps,
                                    cfg.max_grad_norm, progress)
        finally:
            _release(accelerator, peft_model)
            peft_model.eval()
    if len(losses) != steps:  # accelerate syncs at the end of the loader, so this would be a logic error
        log.warning("expected %d optimiser steps, made %d", steps, len(losses))
    return FoldTrainStats(
        steps=len(losses), samples=len(samples), tokens=tokens, seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        final_loss=losses[-1] if losses else math.nan, losses=losses, peak_memory_bytes=_peak_memory(device),
        dropped_demos=dropped, skipped_samples=skipped)


def _loop(accelerator: accelerate.Accelerator, model: torch.nn.Module, optimizer, loader, scheduler,
          device: torch.device, steps: int, max_grad_norm: float, progress: bool) -> tuple[list[float], float]:
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # micro-batch losses of the current optimiser step
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, leave=False)
    model.train()
    start = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            pending.append(loss.detach())
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            # Inside accumulate() these are no-ops until the accumulation boundary.
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            losses.append(torch.stack(pending).float().mean().item())  # one host sync per optimiser step
            pending.clear()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    bar.close()
    return losses, seconds


def _release(accelerator: accelerate.Accelerator, peft_model: torch.nn.Module) -> None:
    """Undo what prepare() did to the model and drop the accelerator's references to this fold's objects.

    prepare() wraps model.forward in autocast and marks the model as prepared, so a second fold's prepare()
    would skip it; unwrapping and clearing the mark lets every fold (and inference in between) see the plain
    model. free_memory() drops the accelerator's list entries, which would otherwise keep every fold's
    optimiser state alive."""
    accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False)
    peft_model.__dict__.pop("_is_accelerate_prepared", None)
    accelerator.free_memory()


__all__ = ["FoldTrainStats", "build_samples", "collate", "make_accelerator", "train_fold"]
