"""Prompts prefilled once into one batched KV cache, and tokens fed on top of them under a tree mask.

The batched DFS (engine.dfs), candidate scoring and the true output's NLL (engine.predict, engine.teacher_forcing)
share this layout. Row r of the cache holds prompt r, left-padded to the longest prompt (`PromptRows.width`
columns); whatever is fed afterwards is appended after the prompts, for all rows at once. A token fed later sees
its row's prompt and exactly the later columns its caller names (its ancestors in the search tree, or the earlier
tokens of its own answer) and takes position len(prompt) + depth. So several branches, or several answers, share
one row and one copy of the prompt, and a column nobody names again (a pruned branch, a padding slot) is never
read: `compact` drops such columns, `crop_to_prompts` drops everything after the prompts.

It needs an attention that takes a prepared 4D mask over full attention in every layer: `tree_attention_supported`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from transformers import DynamicCache

from arcfold.engine.generate import model_device
from arcfold.engine.logits import base_model, hidden_states

if TYPE_CHECKING:
    from transformers.cache_utils import CacheLayerMixin

_PACKABLE_ATTENTION = ("sdpa", "eager")  # they take a prepared 4D mask as is (flash kernels take none)


def tree_attention_supported(model: torch.nn.Module) -> bool:
    """Whether a custom 4D mask is exact for this model (a PeftModel is judged by its base model): an attention
    that takes the mask as is (sdpa, eager; not flash kernels) and full attention in every layer (a sliding
    window would need the window inside the mask, and its cache cannot hold columns out of order)."""
    config = getattr(base_model(model), "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in _PACKABLE_ATTENTION:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    layer_types = getattr(text, "layer_types", None)
    return not layer_types or all(kind == "full_attention" for kind in layer_types)


def _layers(cache: DynamicCache) -> list[CacheLayerMixin]:
    return cast("list[CacheLayerMixin]", cache.layers)


@dataclass
class PromptRows:
    """A KV cache whose row r holds prompts[r] at columns width - lengths[r] .. width - 1 (left padding before)."""

    cache: DynamicCache
    lengths: list[int]
    width: int
    last: torch.Tensor  # (rows, hidden): the final hidden state at each prompt's last token

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def columns(self) -> int:
        return self.cache.get_seq_length()

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in _layers(self.cache)
            for t in (layer.keys, layer.values)
            if t is not None
        )

    def crop_to_prompts(self) -> None:
        extra = self.columns() - self.width
        if extra:
            self.cache.crop(-extra)

    def select(self, rows: list[int]) -> None:
        """Keep these rows only, in this order."""
        index = torch.tensor(rows, device=self.last.device)
        self.cache.batch_select_indices(index)
        self.lengths = [self.lengths[r] for r in rows]
        self.last = self.last[index]

    def compact(self, keep: list[list[int]]) -> list[dict[int, int]]:
        """Keep the prompts and, per row, only the later columns listed in keep[r] (offsets after `width`, in
        order); rows with fewer are padded with a copy of their prompt's last column, which nobody names. Returns
        each row's map from old offset to new offset."""
        longest = max((len(k) for k in keep), default=0)
        device = self.last.device
        index = torch.empty((self.rows, self.width + longest), dtype=torch.long)
        index[:, : self.width] = torch.arange(self.width)
        index[:, self.width :] = self.width - 1
        for r, columns in enumerate(keep):
            index[r, self.width : self.width + len(columns)] = torch.tensor(columns, dtype=torch.long) + self.width
        index = index.to(device)
        for layer in _layers(self.cache):
            for name in ("keys", "values"):
                tensor = cast(torch.Tensor, getattr(layer, name))
                picked = index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
                setattr(layer, name, tensor.gather(2, picked))
        return [{old: new for new, old in enumerate(columns)} for columns in keep]


def prefill(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[PromptRows, int]:
    """Run the prompts once, together (left padding, masked, positions from 0 in every row); the rows and the
    tokens pushed through the model."""
    device = model_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[r, width - len(prompt) :] = 1
    cache = DynamicCache()
    if bool(mask.all()):  # no padding: the plain causal path
        hidden = hidden_states(model, ids.to(device), cache, 1)
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = hidden_states(model, ids.to(device), cache, 1, mask.to(device), positions.to(device))
    return PromptRows(cache, [len(p) for p in prompts], width, hidden[:, -1]), ids.numel()


def feed(
    model: torch.nn.Module, rows: PromptRows, ids: torch.Tensor, depths: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """Append ids (rows, Q) to the cache: slot q of row r takes position lengths[r] + depths[r, q], sees row r's
    prompt and the columns after the prompts where visible[r, q] (rows, Q, extra + Q: the `extra` columns already
    there, then the Q being fed) is True. Returns the final hidden states (rows, Q, hidden)."""
    device = rows.last.device
    lengths = torch.tensor(rows.lengths, dtype=torch.long)
    positions = lengths[:, None] + depths
    prompt = torch.arange(rows.width)[None, :] >= (rows.width - lengths)[:, None]  # (rows, width)
    mask = torch.cat([prompt[:, None, :].expand(-1, ids.shape[1], -1), visible], dim=-1)[:, None]
    base = base_model(model)
    if base.config._attn_implementation != "sdpa":  # eager adds the mask to the attention scores
        dtype = cast(torch.nn.Embedding, base.get_input_embeddings()).weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return hidden_states(
        model,
        ids.to(device),
        rows.cache,
        ids.shape[1],
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
    )


__all__ = ["PromptRows", "feed", "prefill", "tree_attention_supported"]
