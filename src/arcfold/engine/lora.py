"""LoRA through peft, and a fresh adapter per fold without reloading the base model.

The reference's per-task TTT trains hundreds of adapters in one process; reloading the base for each costs
~20 s per task. Instead the initial adapter weights are snapshotted once and copied back before every fold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import peft
import torch

from arcfold.config import LoraConfig
from arcfold.data.errors import ArcDataError

# Layer types peft can put a LoRA on; used only to list the candidates in an error message.
_LORA_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


def _module_names(model: torch.nn.Module) -> set[str]:
    """Last name segments of the layers a LoRA could target (e.g. q_proj, down_proj)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if name and (isinstance(m, _LORA_TYPES) or type(m).__name__ == "Conv1D")
    }  # Conv1D: GPT-2 style


def trained_rows(model_cfg: Any, token_ids: Sequence[int]) -> list[int] | None:
    """The embedding and head rows lora.train_embeddings trains: None (every row) when the vocabulary is the
    format's own (model.shrink_vocab, or the tiny model's built-in one), else the format's tokens (`token_ids`, the
    codec's): the other rows of a 150k vocabulary are never read or written by the grid format."""
    return None if model_cfg.kind == "tiny" or model_cfg.shrink_vocab else sorted(token_ids)


def _embedding_layers(model: torch.nn.Module, rows: list[int]) -> dict[str, list[int]]:
    """peft's trainable_token_indices: the input embedding's and the LM head's module names, each with `rows` (a
    head tied to the embedding is tied by peft, one delta for both)."""
    names = {id(m): name for name, m in model.named_modules()}
    layers = {names[id(model.get_input_embeddings())]: rows}  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is not None:
        layers[names[id(head)]] = rows
    return layers


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, rows: Sequence[int] | None = None) -> peft.PeftModel:
    """Wrap the base model with a LoRA adapter (in place: the base layers become the adapter's base_layer).

    With cfg.train_embeddings, the input embedding's and the LM head's rows `rows` (None: all; trained_rows picks
    them) train too, as peft's trainable tokens: a delta per row, a parameter of the adapter like the LoRA's, so
    AdapterReset, save_adapter and load_adapter_weights treat it as they treat those."""
    targets = list(cfg.target_modules)
    if targets != ["all-linear"]:  # peft's own shorthand for every linear layer but the output head
        existing = _module_names(model)
        missing = [t for t in targets if t not in existing]
        if missing:
            raise ArcDataError(
                f"target modules {missing} not in {type(model).__name__} (asked {targets}; "
                f"the model has {sorted(existing)})",
                field="lora.target_modules",
            )
    tokens = None
    if cfg.train_embeddings:
        every = range(model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
        tokens = _embedding_layers(model, list(every if rows is None else rows))
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
        trainable_token_indices=tokens,
    )
    device = next(model.parameters()).device
    # The A matrices are drawn from torch's RNG: seed them, without moving the caller's RNG stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.init_seed)
        return peft.get_peft_model(model, config)


class AdapterReset:
    """Snapshot of the adapter's initial weights, copied back in place to start each fold afresh."""

    def __init__(self, peft_model: peft.PeftModel):
        # The trainable parameters are exactly the adapter's (peft freezes the base). CPU copies keep GPU free.
        self._initial = {
            name: p.detach().to("cpu", copy=True) for name, p in peft_model.named_parameters() if p.requires_grad
        }
        if not self._initial:
            raise ValueError("the model has no trainable (adapter) parameters to snapshot")

    def reset(self, peft_model: peft.PeftModel) -> None:
        params = dict(peft_model.named_parameters())
        missing = set(self._initial) - set(params)
        if missing:
            raise ValueError(f"adapter parameters vanished since the snapshot: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, value in self._initial.items():
                params[name].copy_(value)  # in place: same tensors, so nothing that holds them goes stale
                params[name].grad = None


def save_adapter(peft_model: peft.PeftModel, directory: str | Path, dtype: torch.dtype) -> Path:
    """Save the adapter in peft's format, its tensors in `dtype` (the model's: a QLoRA trains them in fp32)."""
    directory = Path(directory)
    state = {name: p.detach().to(dtype) for name, p in peft_model.named_parameters() if p.requires_grad}
    # state is the whole adapter (trained embedding rows included): peft adds no embedding layer of its own, even
    # where it sees a shrunk vocabulary as a resized one
    peft_model.save_pretrained(str(directory), state_dict=state, save_embedding_layers=False)
    return directory


def load_adapter_weights(peft_model: peft.PeftModel, directory: str | Path) -> None:
    """Load weights that save_adapter wrote into the model's adapter, in place (the base stays loaded)."""
    weights = peft.utils.load_peft_weights(str(directory), device=str(next(peft_model.parameters()).device))
    peft.set_peft_model_state_dict(peft_model, weights)


def trainable_parameters(peft_model: torch.nn.Module) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def is_embedding_parameter(name: str) -> bool:
    """Whether a trainable parameter is a trained embedding or head row (lora.train_embeddings), not the LoRA's."""
    return "trainable_tokens_delta" in name


__all__ = [
    "AdapterReset",
    "attach_lora",
    "is_embedding_parameter",
    "load_adapter_weights",
    "save_adapter",
    "trainable_parameters",
    "trained_rows",
]
