"""The LM head, applied only where log-probabilities are read.

A causal LM's forward applies its output head at every position: sequence x vocabulary logits, 4.7 GB in fp32 for
8k tokens and a 152k vocabulary, plus fp32 copies in the loss. Every reader here (the training loss, candidate
scoring, the true-output NLL, the DFS and greedy/sampling steps) needs a handful of positions at most, so the
engine runs the model's backbone (`hidden_states`), picks the positions it reads, and applies the head to those
alone, in chunks of at most CHUNK_BYTES of fp32 logits, log-softmax in fp32 per chunk.

`hidden_states` is the only place the engine runs a model; everything downstream of the backbone is here, and so is
every log-probability the engine reads (`picked_logps`, `token_logps`, `column_logps`, `causal_lm_loss`).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from arcfold.checks import ConfigError
from arcfold.config import LOSS_KERNELS
from arcfold.data.codec import IGNORE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_BYTES = 1 << 28  # fp32 logits per head chunk: 256 MiB, about 440 positions of a 152k vocabulary


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a PeftModel (whose forward only has **kwargs)."""
    get_base_model = getattr(model, "get_base_model", None)
    return cast("PreTrainedModel", get_base_model() if get_base_model is not None else model)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone: embeddings, layers and final norm, no head (LoRA layers included: peft injects in place)."""
    return base_model(model).get_decoder()


@functools.lru_cache(maxsize=None)
def _params_of(forward: Callable[..., Any]) -> frozenset[str]:
    # Cached per class's forward: inspect.signature on every decoding step would be measurable overhead.
    return frozenset(inspect.signature(forward).parameters)


def hidden_states(
    model: torch.nn.Module,
    ids: torch.Tensor,
    cache: Any | None,
    keep: int | None = 1,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `ids` (batch, new) on top of `cache` (extended in place; None: nothing cached) through the backbone;
    the final hidden states of the last `keep` positions (None: all), (batch, keep, hidden)."""
    decoder = _decoder(model)
    params = _params_of(type(decoder).forward)
    kwargs: dict[str, Any] = {"use_cache": cache is not None}
    if cache is not None:
        kwargs["past_key_values" if "past_key_values" in params else "cache"] = cache
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden = decoder(input_ids=ids, **kwargs).last_hidden_state
    return hidden if keep is None else hidden[:, -keep:]


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of these hidden states, in fp32; callers keep `hidden` small (one position per row, or a chunk)."""
    base = base_model(model)
    logits = base.get_output_embeddings()(hidden).float()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3 squash their logits
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_rows(model: torch.nn.Module) -> int:
    vocab = base_model(model).get_output_embeddings().weight.shape[0]
    return max(1, CHUNK_BYTES // (4 * vocab))


def picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under the full softmax of logits[i], for fp32 logits (N, V) and targets (N,): a gather and
    a logsumexp, never a whole log-softmax; float64 (N,)."""
    return (logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).double()


def token_logps(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under the full softmax at hidden[i], for hidden (N, H) and targets (N,); float64 (N,)."""
    out = torch.empty(len(targets), dtype=torch.float64, device=hidden.device)
    step = _chunk_rows(model)
    for start in range(0, len(targets), step):
        logits = head_logits(model, hidden[start : start + step])
        out[start : start + step] = picked_logps(logits, targets[start : start + step])
    return out


def column_logps(model: torch.nn.Module, hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """log p of each token in `columns` under the full softmax at each row of hidden (N, H); float64 (N, K)."""
    out = torch.empty((hidden.shape[0], len(columns)), dtype=torch.float64, device=hidden.device)
    step = _chunk_rows(model)
    for start in range(0, hidden.shape[0], step):
        logits = head_logits(model, hidden[start : start + step])
        out[start : start + step] = logits.index_select(-1, columns) - torch.logsumexp(logits, -1, keepdim=True)
    return out


def _summed_nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_logits(model, hidden), targets, reduction="sum")


def causal_lm_loss(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, kernel: str = "torch"
) -> torch.Tensor:
    """Mean NLL of every labelled token (labels != IGNORE; position t predicts labels[t + 1]), as transformers'
    causal LM loss, from the backbone's hidden states (batch, T, H).

    The head runs on labelled positions only, a chunk at a time, and each chunk is recomputed in the backward
    pass (activation checkpointing) rather than kept: the logits in memory never exceed one chunk.
    kernel="liger": Liger's fused linear cross-entropy (CUDA, optional package) on the same positions."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked, targets = hidden[:, :-1][mask], targets[mask]
    count = len(targets)
    if kernel == "liger":
        return _liger_loss(model, picked, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    step = _chunk_rows(model)
    for start in range(0, count, step):
        chunk, chunk_targets = picked[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_nll, model, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _summed_nll(model, chunk, chunk_targets)
    return total / max(count, 1)


def _liger_loss(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise ConfigError(
            "liger-kernel is not installed (pip install 'arcfold[gpu]')", key="train.loss_kernel"
        ) from None
    if hidden.device.type != "cuda":
        raise ConfigError(
            f"the liger kernel runs on CUDA only, the model is on {hidden.device}", key="train.loss_kernel"
        )
    base = base_model(model)
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):  # a LoRA on the head is not a plain weight to fuse
        raise ConfigError(
            f"the liger kernel needs a plain linear head, got {type(head).__name__}", key="train.loss_kernel"
        )
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    loss = LigerFusedLinearCrossEntropyLoss(softcap=getattr(config, "final_logit_softcapping", None))
    return loss(head.weight, hidden, targets, head.bias)


__all__ = [
    "CHUNK_BYTES",
    "LOSS_KERNELS",
    "base_model",
    "causal_lm_loss",
    "column_logps",
    "head_logits",
    "hidden_states",
    "picked_logps",
    "token_logps",
]
