"""Training one fold's LoRA: all augmented copies of the fold's tasks in ONE optimiser pass (reference section 3).

Each sample is a whole task view whose labels mark only output-grid tokens and their end token; the objective is
the causal LM loss over those tokens, with the head applied at labelled positions only (engine.logits: no
sequence x vocabulary tensor). Batches group samples of similar length, so little compute goes to padding.
Mixed precision, gradient accumulation and the fp16 scaler come from accelerate; the schedule from transformers.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence, cast

import accelerate
import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from arcfold.checks import ConfigError
from arcfold.config import TrainConfig
from arcfold.data.augment import ColourMode, epoch_plan
from arcfold.data.codec import IGNORE, Encoded, GridCodec
from arcfold.data.tasks import Task
from arcfold.engine.logits import base_model, causal_lm_loss, hidden_states
from arcfold.engine.lora import is_embedding_parameter

log = logging.getLogger(__name__)


@dataclass
class FoldTrainStats:
    steps: int
    samples: int
    tokens: int  # total tokens of all training sequences (padding excluded)
    padded_tokens: int  # tokens the batches processed, padding included
    seconds: float
    tokens_per_second: float
    final_loss: float
    losses: list[float] = field(default_factory=list)  # mean micro-batch loss per optimiser step
    peak_memory_bytes: int = 0  # cuda max_memory_allocated, else the process's max RSS
    dropped_demos: int = 0
    skipped_samples: int = 0  # too long even after dropping demonstrations
    planned_steps: int = 0  # more than steps when max_seconds stopped training early


def build_samples(codec: GridCodec, tasks: Sequence[Task], cfg: TrainConfig) -> tuple[list[Encoded], int]:
    """The fold's training sequences (8 * epochs augmented views per task) and how many were skipped."""
    samples: list[Encoded] = []
    skipped = 0
    augment = cfg.augment  # which augmentations TTT trains on; off, a view keeps the task's own
    colours = cast(ColourMode, cfg.colours if augment.colours else "none")
    plan = epoch_plan(tasks, cfg.epochs, cfg.seed, colours, cfg.shuffle_demos and augment.demo_order, augment.d8)
    for task, view in plan:
        enc = codec.encode_train(view.pairs(task.train), cfg.max_len, cfg.mask_first_output)
        # A sequence with no labelled token would give a NaN loss: treat it like one that does not fit.
        if enc is None or enc.labels is None or all(label == IGNORE for label in enc.labels):
            skipped += 1
            continue
        samples.append(enc)
    if skipped:
        log.warning(
            "skipped %d of %d training samples (too long for max_len=%d)", skipped, skipped + len(samples), cfg.max_len
        )
    return samples, skipped


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, window: int = 64) -> list[list[int]]:
    """Sample indices in batches of similar length, in a random order (as transformers' LengthGroupedSampler).

    A seeded shuffle, then each window of `window` batches' worth of samples is sorted by length and cut into
    batches, and the batches are shuffled: randomness comes from the shuffle, padding only from neighbours in a
    sorted window."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(count: int, batch_size: int, seed: int) -> list[list[int]]:
    """Sample indices in random batches, regardless of length (train.group_by_length=false)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


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
    if mixed == "auto":
        # bf16 autocast where the hardware has it; fp16 needs loss scaling and is opt-in only.
        mixed = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    # device_placement=False: the model already sits where load_model put it, and batches follow the model.
    return accelerate.Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed,
        device_placement=False,
        gradient_accumulation_steps=cfg.grad_accum,
    )


def use_checkpointing(setting: Any, kind: str) -> bool:
    """train.gradient_checkpointing: true or false as set; auto: on for a Hugging Face model (model.kind=hf: a real
    model's activations at 8k tokens outgrow a card), off for the tiny model (nothing to save, only time to lose)."""
    return kind == "hf" if setting == "auto" else bool(setting)


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Gradient checkpointing on (non-reentrant: each layer recomputed in the backward pass) or off."""
    base = base_model(model)
    # transformers 5.2x says "activation" where earlier releases (5.17 included) say "gradient"; the old names warn
    word = "activation" if hasattr(type(base), "activation_checkpointing_enable") else "gradient"
    current = bool(getattr(base, f"is_{word}_checkpointing", False))
    if on and not current:
        getattr(base, f"{word}_checkpointing_enable")(**{f"{word}_checkpointing_kwargs": {"use_reentrant": False}})
    elif not on and current:
        getattr(base, f"{word}_checkpointing_disable")()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """The fold's warmup: train.warmup_ratio of its steps, or train.warmup_steps (> 0) capped at
    train.warmup_max_share of them. A recipe states its warmup in steps for its own schedule (the ARChitects' 100 of
    400 steps, a quarter); a fold of k=8 (~120 steps) or one task (~a few dozen) would spend most or all of its
    schedule warming up, so the cap keeps the recipe's shape and the log says when it applies."""
    if cfg.warmup_steps <= 0:
        return math.ceil(cfg.warmup_ratio * steps)
    cap = math.ceil(cfg.warmup_max_share * steps)
    if cfg.warmup_steps > cap:
        log.info(
            "warmup capped at %d of the fold's %d steps (train.warmup_steps=%d, train.warmup_max_share=%g)",
            cap,
            steps,
            cfg.warmup_steps,
            cfg.warmup_max_share,
        )
        return cap
    return cfg.warmup_steps


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer over the trainable parameters, in two groups when embedding rows train too
    (lora.train_embeddings): the LoRA's at train.lr, the embeddings' and head's at train.embedding_lr (None: lr).
    adamw_8bit and paged_adamw_8bit are bitsandbytes' (8-bit states; they step on a CPU too)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    embedding = [p for name, p in named if is_embedding_parameter(name)]
    groups: list[dict[str, Any]] = [{"params": [p for name, p in named if not is_embedding_parameter(name)]}]
    if embedding:
        groups.append({"params": embedding, "lr": cfg.embedding_lr or cfg.lr})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"{cfg.optimizer} needs bitsandbytes (pip install bitsandbytes)", key="train.optimizer"
        ) from None
    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cast(torch.optim.Optimizer, kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay))


def train_fold(
    peft_model: torch.nn.Module,
    codec: GridCodec,
    tasks: Sequence[Task],
    cfg: TrainConfig,
    accelerator: accelerate.Accelerator | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> FoldTrainStats:
    """Train the adapter on one fold's tasks; a new optimiser and schedule each call, the model left in eval mode.

    max_seconds (a run's time budget) stops training after the optimiser step that passes it; the adapter keeps
    what it learnt so far. progress: a tqdm bar of its own; on_step(step, steps, loss) after each optimiser step
    (a caller's display)."""
    samples, skipped = build_samples(codec, tasks, cfg)
    dropped = sum(s.dropped for s in samples)
    tokens = sum(len(s.ids) for s in samples)
    if not samples:
        log.warning("fold of %d tasks has no training sample; adapter left untouched", len(tasks))
        return FoldTrainStats(0, 0, 0, 0, 0.0, 0.0, math.nan, [], 0, dropped, skipped)
    device = next(peft_model.parameters()).device
    accelerator = accelerator or make_accelerator(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    lengths = [len(s.ids) for s in samples]
    batches = (
        length_grouped_batches(lengths, cfg.batch_size, cfg.seed)
        if cfg.group_by_length
        else random_batches(len(samples), cfg.batch_size, cfg.seed)
    )
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    steps = math.ceil(len(batches) / cfg.grad_accum)
    warmup = warmup_steps(cfg, steps)
    # Recompute each layer in the backward pass (activations of one layer at a time): true, or off. The run resolves
    # auto from model.kind first (use_checkpointing); a caller that passes auto here gets the tiny model's off.
    set_checkpointing(peft_model, cfg.gradient_checkpointing is True)
    # Fork the RNG so seeding dropout here leaves the caller's random stream alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        # A list is a map-style dataset (torch's docs); its stubs ask for a Dataset subclass.
        loader: DataLoader[Encoded] = DataLoader(
            samples,  # type: ignore[arg-type]
            batch_sampler=batches,
            collate_fn=partial(collate, pad_id=codec.pad_id),
        )
        optimizer = make_optimizer(peft_model, cfg)
        scheduler = transformers.get_scheduler(
            cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps
        )
        model, optimizer, loader, scheduler = accelerator.prepare(peft_model, optimizer, loader, scheduler)
        try:
            losses, seconds = _loop(
                accelerator,
                model,
                optimizer,
                loader,
                scheduler,
                device,
                steps,
                cfg.max_grad_norm,
                cfg.loss_kernel,
                progress,
                max_seconds,
                on_step,
            )
        finally:
            _release(accelerator, peft_model)
            peft_model.eval()
    # The tokens of the batches trained on: fewer than `tokens` when max_seconds stopped training early.
    trained = sum(lengths[i] for b in batches[: len(losses) * cfg.grad_accum] for i in b)
    if len(losses) != steps and max_seconds is None:  # accelerate syncs at the loader's end: a logic error
        log.warning("expected %d optimiser steps, made %d", steps, len(losses))
    return FoldTrainStats(
        steps=len(losses),
        samples=len(samples),
        tokens=tokens,
        padded_tokens=padded,
        seconds=seconds,
        tokens_per_second=trained / seconds if seconds > 0 else 0.0,
        final_loss=losses[-1] if losses else math.nan,
        losses=losses,
        peak_memory_bytes=_peak_memory(device),
        dropped_demos=dropped,
        skipped_samples=skipped,
        planned_steps=steps,
    )


def _loop(
    accelerator: accelerate.Accelerator,
    model: torch.nn.Module,
    optimizer,
    loader,
    scheduler,
    device: torch.device,
    steps: int,
    max_grad_norm: float,
    kernel: str,
    progress: bool,
    max_seconds: float | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[list[float], float]:
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # micro-batch losses of the current optimiser step
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, leave=False)
    model.train()
    start = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with accelerator.accumulate(model):
            with accelerator.autocast():  # the backbone runs directly, outside prepare()'s wrapped forward
                hidden = hidden_states(model, batch["input_ids"], None, None, batch["attention_mask"])
                loss = causal_lm_loss(model, hidden, batch["labels"], kernel)
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
            if on_step is not None:
                on_step(len(losses), steps, losses[-1])
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                break
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


__all__ = [
    "FoldTrainStats",
    "build_samples",
    "collate",
    "length_grouped_batches",
    "make_accelerator",
    "make_optimizer",
    "random_batches",
    "set_checkpointing",
    "train_fold",
    "use_checkpointing",
    "warmup_steps",
]
