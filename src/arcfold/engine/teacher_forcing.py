"""Teacher forcing: the summed log-probability of each candidate answer after its prompt.

One entry point, `answer_logps`: answers[v][i] is scored after prompts[v], the log p of every answer token under the
model's full softmax (engine.logits), summed in float64. It runs one of three ways, which give the same numbers:

- Prompt reuse (the default): every prompt runs at most once and its answers are scored from its KV cache; a prompt
  whose cache is handed in (`kept`: the DFS leaves one per generation view, engine.predict) does not run at all.
  Where the model's attention takes a custom mask over full attention (sdpa, eager), a prompt's answers are packed
  side by side in one row after it ("tree attention": the mask keeps them apart, `_packed`); else each (prompt,
  answer) row runs on its own copy of the prompt's cache (`_copied`: flash kernels take no mask, and a
  sliding-window cache past its window cannot be cropped back to the prompt).
- `reuse_prompts=False`: every prompt + answer runs in full, in right-padded batches of similar length
  (`_from_scratch`). For prompts with one answer each (the true output's NLL, engine.scoring), where nothing is
  shared and one forward per batch beats two; and the baseline the benchmarks measure reuse against.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from transformers import DynamicCache

from arcfold.engine.generate import eval_mode, model_device
from arcfold.engine.logits import base_model, hidden_states, token_logps

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.cache_utils import CacheLayerMixin

_PAD = 0  # filler id after a short answer: causal attention keeps it from touching the real tokens
_PACKABLE_ATTENTION = ("sdpa", "eager")  # they take a prepared 4D mask as is (flash kernels take none)

Scores = list[list[float]]  # scores[v][i]: summed log p of answers[v][i]


def answer_logps(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int = 8,
    kept: Mapping[int, DynamicCache] | None = None,
    *,
    reuse_prompts: bool = True,
) -> tuple[Scores, int]:
    """Sum of log p (full softmax, float64 sum) of each answers[v][i]'s tokens after prompts[v], and the tokens
    pushed through the model (padding included).

    `kept[v]`, where given, is a KV cache holding exactly prompts[v]: that prompt does not run again, and the
    cache is read, never changed. `reuse_prompts=False` runs every prompt + answer in full (module docstring).
    The model runs in eval mode under torch.inference_mode; its train/eval mode comes back after."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but answers for {len(answers)}")
    if not all(prompts) or not all(a for view_answers in answers for a in view_answers):
        raise ValueError("every prompt and every answer needs at least one token")
    if kept and not reuse_prompts:
        raise ValueError("kept prompt caches are only read when prompts are reused")
    with eval_mode(model):
        if not reuse_prompts:
            flat = [(prompt, a) for prompt, view_answers in zip(prompts, answers) for a in view_answers]
            flat_scores, tokens = _from_scratch(model, flat, batch_size)
            rows = iter(flat_scores)
            return [[next(rows) for _ in view_answers] for view_answers in answers], tokens
        if _packing_supported(model):
            return _packed(model, prompts, answers, batch_size, kept)
        return _copied(model, prompts, answers, batch_size, kept)


# ------------------------------------------------------------------------------------------ shared plumbing


def _block_sums(
    model: torch.nn.Module, hidden: torch.Tensor, blocks: torch.Tensor, targets: torch.Tensor, count: int
) -> list[float]:
    """Summed log p per answer: blocks[r, q] names the answer (0..count-1) whose token targets[r, q] position q of
    row r predicts, -1 where nothing is read. The head runs at the read positions only (engine.logits)."""
    real = blocks >= 0
    logps = token_logps(model, hidden[real], targets[real])
    return torch.zeros(count, dtype=torch.float64, device=hidden.device).index_add_(0, blocks[real], logps).tolist()


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [_PAD] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


T = TypeVar("T")


def _chunks(order: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


# ------------------------------------------------------------------------------------------ from scratch


def _from_scratch(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int
) -> tuple[list[float], int]:
    """Sum log p of each answer after its prompt, every prompt + answer run in full (right-padded batches).

    Returns the scores and the tokens pushed through the model. Right padding needs no attention mask: a
    causal model never lets a real position see the filler that follows it."""
    device = model_device(model)
    scores = [0.0] * len(pairs)
    tokens = 0
    # Similar lengths together: less padding.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for batch in _chunks(order, batch_size):
        # The last answer token is only a target, never an input.
        seqs = [pairs[i][0] + pairs[i][1][:-1] for i in batch]
        ids = _padded(seqs, device)
        first = min(len(pairs[i][0]) for i in batch) - 1  # earliest position that predicts an answer token
        hidden = hidden_states(model, ids, None, ids.shape[1] - first)
        offset = ids.shape[1] - hidden.shape[1]  # hidden states cover positions offset..end
        tokens += ids.numel()
        # Answer tokens of row r are predicted at positions len(prompt)-1 ... len(prompt)+len(answer)-2.
        blocks = torch.full(hidden.shape[:2], -1, dtype=torch.long)
        targets = torch.full(hidden.shape[:2], _PAD, dtype=torch.long)
        for r, i in enumerate(batch):
            prompt, answer = pairs[i]
            start = len(prompt) - 1 - offset
            blocks[r, start : start + len(answer)] = r
            targets[r, start : start + len(answer)] = torch.tensor(answer)
        sums = _block_sums(model, hidden, blocks.to(device), targets.to(device), len(batch))
        for i, score in zip(batch, sums):
            scores[i] = score
    return scores, tokens


# ------------------------------------------------------------------------------------------ prompt reuse


def _packing_supported(model: torch.nn.Module) -> bool:
    """Whether `_packed` is exact for this model (a PeftModel is judged by its base model).

    It needs an attention that takes a prepared 4D mask as is (sdpa, eager; not flash kernels, which take no
    mask) and full attention in every layer: a sliding window would need the window inside the custom mask,
    and a sliding-window cache past its window cannot be cropped back to the prompt."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in _PACKABLE_ATTENTION:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    layer_types = getattr(text, "layer_types", None)
    return not layer_types or all(kind == "full_attention" for kind in layer_types)


def _prompt_groups(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int,
    kept: Mapping[int, DynamicCache] | None,
) -> Iterator[tuple[list[int], DynamicCache, int]]:
    """Views with answers to score, grouped by prompt length (the 4 D8 views that keep a grid's shape, and the 4
    that transpose it), batch_size at a time, with one KV cache per group (row r: view group[r]).

    The cache holds each prompt but its LAST token: every answer is fed after that token (see `_answer_inputs`),
    so the logits for an answer's first token come out of the answer's own forward, and an answer of any
    length, one token included, is handled the same way. A kept cache is cut to that length (stacking copies
    it, so the kept one stays as it was); the other prompts run here, a group at a time, with no padding.
    Yields (view indices, their cache, the tokens this pushed through the model)."""
    kept = kept or {}
    for v, cache in kept.items():  # before any work
        if cache.get_seq_length() != len(prompts[v]):
            raise ValueError(
                f"kept cache of view {v} holds {cache.get_seq_length()} tokens, its prompt {len(prompts[v])}"
            )
    device = model_device(model)
    same_length: dict[tuple[bool, int], list[int]] = {}
    for v, prompt in enumerate(prompts):
        if answers[v]:
            same_length.setdefault((v in kept, len(prompt)), []).append(v)
    for (is_kept, length), views in same_length.items():
        for group in _chunks(views, batch_size):
            if is_kept:
                yield group, _stacked([kept[v] for v in group], length - 1), 0
                continue
            cache = DynamicCache()
            if length > 1:
                hidden_states(model, torch.tensor([prompts[v][:-1] for v in group], device=device), cache, 1)
            yield group, cache, len(group) * (length - 1)


def _stacked(caches: Sequence[DynamicCache], length: int) -> DynamicCache:
    """One cache whose row r is caches[r] (batch 1 each) cut to its first `length` tokens (a new tensor: the
    callers' caches are left as they were)."""
    out = DynamicCache()
    for layer in range(len(caches[0].layers)):
        # Attention layers holding a prompt: keys and values are set (transformers types them Optional).
        rows = [cast("CacheLayerMixin", c.layers[layer]) for c in caches]
        keys = torch.cat([cast(torch.Tensor, r.keys)[..., :length, :] for r in rows])
        values = torch.cat([cast(torch.Tensor, r.values)[..., :length, :] for r in rows])
        out.update(keys, values, layer)
    return out


def _answer_inputs(prompt: Sequence[int], answer: Sequence[int]) -> list[int]:
    """What the model reads to score `answer` over a cache of prompt[:-1]: the prompt's last token, then every
    answer token but the last (position t predicts answer[t])."""
    return [prompt[-1], *answer[:-1]]


# ------------------------------------------------------------------------------------------ packed answers


def _pack(lengths: dict[int, int], cap: int) -> list[list[int]]:
    """First-fit decreasing: the keys of `lengths` in packs whose lengths sum to at most `cap` (an item longer
    than `cap` gets a pack of its own)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for item in sorted(lengths, key=lambda i: -lengths[i]):
        for p, free in enumerate(room):
            if lengths[item] <= free:
                packs[p].append(item)
                room[p] -= lengths[item]
                break
        else:
            packs.append([item])
            room.append(cap - lengths[item])
    return packs


def _pack_cap(base: PreTrainedModel, rows: int, batch_size: int, prompt_len: int, longest: int) -> int:
    """Packed tokens per row: see `_packed`. Without a known vocabulary and hidden size, the logits of a
    from-scratch batch's answers are the bound."""
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    vocab, hidden = getattr(config, "vocab_size", None), getattr(config, "hidden_size", None)
    per_forward = batch_size * longest  # tokens whose logits a from-scratch batch keeps
    if vocab and hidden:
        per_forward = max(per_forward, batch_size * (prompt_len + longest) * hidden // vocab)
    return max(longest, min(prompt_len // 2, per_forward // rows))


def _packed_mask(blocks: torch.Tensor, prompt_len: int, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """The (rows, 1, Q, prompt_len + Q) attention mask of packed answers after a shared prompt.

    blocks[r, q] numbers the answer that packed position q of row r belongs to (-1: padding). Every query sees
    the whole prompt; inside the packed part a query sees the earlier positions of its own answer only, so
    answers never see each other; padding sees only the prompt (no query is left with nothing to attend to,
    which would give NaN). Boolean (True = attend) for sdpa; additive (0 / dtype min) in `additive_dtype` for
    eager, which adds the mask to the attention scores."""
    rows, width = blocks.shape
    pos = torch.arange(width, device=blocks.device)
    packed = (
        (blocks[:, :, None] == blocks[:, None, :])
        & (blocks[:, None, :] >= 0)
        & (pos[None, None, :] <= pos[None, :, None])
    )
    mask = torch.cat([packed.new_ones(rows, width, prompt_len), packed], dim=-1)[:, None]
    if additive_dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(additive_dtype).min
    )


def _packed(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int,
    kept: Mapping[int, DynamicCache] | None,
) -> tuple[Scores, int]:
    """Prompt reuse by packing ("tree attention"): no cache copies.

    Each group of views (`_prompt_groups`) has one cache row per view. Each row then takes several of its
    view's answers (`_answer_inputs`) one after another: position ids restart after the cached prefix for every
    answer and `_packed_mask` keeps each answer causal within itself and blind to the others. The forward
    appends the packed tokens to the group's cache; `crop` takes them off again before the next pack.

    The budget (`_pack_cap`): one packed forward's tokens (rows x packed tokens; their attention and, before
    the head ran in chunks, their logits) stay within the larger of what a from-scratch batch holds anyway: its
    answers' logits (batch_size x longest answer x vocabulary) or one layer's hidden states (batch_size x (prompt +
    longest) x hidden size). And a row packs at most max(longest answer, prompt / 2) tokens: the dense mask
    computes a packed x packed block of which only the answers' own causal triangles are used, so this keeps
    that waste under half the useful packed x prompt work (on bench_inference.py's candidates, a whole-prompt
    cap took 1.4x as long at 8 candidates). A 150k-vocabulary model thus packs about batch_size answers
    per forward; a small-vocabulary one (the tiny model, an ARC-only embedding) half a prompt per row."""
    device = model_device(model)
    base = base_model(model)
    embed = cast(torch.nn.Embedding, base.get_input_embeddings())  # the model's own (peft forwards the call)
    additive = None if base.config._attn_implementation == "sdpa" else embed.weight.dtype
    scores = [[0.0] * len(a) for a in answers]
    tokens = 0
    for group, cache, prompt_tokens in _prompt_groups(model, prompts, answers, batch_size, kept):
        tokens += prompt_tokens
        prefix = len(prompts[group[0]]) - 1  # tokens in the cache
        inputs = [{i: len(a) for i, a in enumerate(answers[v])} for v in group]
        longest = max(n for lengths in inputs for n in lengths.values())
        cap = _pack_cap(base, len(group), batch_size, prefix + 1, longest)
        packs = [_pack(lengths, cap) for lengths in inputs]
        for k in range(max(map(len, packs))):
            row_packs = [view_packs[k] if k < len(view_packs) else [] for view_packs in packs]
            width = max(sum(inputs[r][i] for i in pack) for r, pack in enumerate(row_packs))
            ids = torch.full((len(group), width), _PAD, dtype=torch.long)
            targets = torch.full((len(group), width), _PAD, dtype=torch.long)
            positions = torch.full((len(group), width), prefix, dtype=torch.long)
            blocks = torch.full((len(group), width), -1, dtype=torch.long)
            owners: list[tuple[int, int]] = []  # block b is answers[v][i]
            for r, (v, pack) in enumerate(zip(group, row_packs)):
                start = 0
                for i in pack:
                    answer, n = answers[v][i], inputs[r][i]
                    ids[r, start : start + n] = torch.tensor(_answer_inputs(prompts[v], answer))
                    targets[r, start : start + n] = torch.tensor(answer)
                    positions[r, start : start + n] = torch.arange(prefix, prefix + n)
                    blocks[r, start : start + n] = len(owners)
                    owners.append((v, i))
                    start += n
            ids, targets, positions, blocks = (t.to(device) for t in (ids, targets, positions, blocks))
            mask = _packed_mask(blocks, prefix, additive)
            hidden = hidden_states(model, ids, cache, width, attention_mask=mask, position_ids=positions)
            cache.crop(-width)  # back to the prompt for the next pack
            tokens += ids.numel()
            for (v, i), lp in zip(owners, _block_sums(model, hidden, blocks, targets, len(owners))):
                scores[v][i] = lp
    return scores, tokens


# ------------------------------------------------------------------------------------------ copied caches


def _copied(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    batch_size: int,
    kept: Mapping[int, DynamicCache] | None,
) -> tuple[Scores, int]:
    """Prompt reuse for any cache: each (view, answer) row on its own copy of the prompt's cache.

    For each group of views (`_prompt_groups`), (view, answer) rows run in batches, longest answers first, each
    on its own copy of the group's cache with the right view per row (`batch_select_indices`); the group's last
    batch takes the cache itself. Why a copy: a forward appends to the cache it is given, and a `crop` back to
    the prompt is not possible for every cache (a sliding-window layer past its window refuses it). The deep
    copy costs one pass over the group's cache, small next to the forward it feeds, and it is exact for any
    cache."""
    device = model_device(model)
    scores = [[0.0] * len(a) for a in answers]
    tokens = 0
    for group, cache, prompt_tokens in _prompt_groups(model, prompts, answers, batch_size, kept):
        tokens += prompt_tokens
        rows = [(r, v, i) for r, v in enumerate(group) for i in range(len(answers[v]))]
        rows.sort(key=lambda row: -len(answers[row[1]][row[2]]))
        batches = list(_chunks(rows, batch_size))
        for n, batch in enumerate(batches):
            # Right padding after each row's answer: causal attention keeps it from the real tokens.
            ids = _padded([_answer_inputs(prompts[v], answers[v][i]) for _, v, i in batch], device)
            view_cache = cache if n == len(batches) - 1 else copy.deepcopy(cache)  # the last may spend it
            view_cache.batch_select_indices(torch.tensor([r for r, _, _ in batch], device=device))
            hidden = hidden_states(model, ids, view_cache, ids.shape[1])
            tokens += ids.numel()
            lengths = torch.tensor([len(answers[v][i]) for _, v, i in batch], device=device)
            read = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]
            blocks = torch.where(read, torch.arange(len(batch), device=device)[:, None], -1)
            targets = _padded([answers[v][i] for _, v, i in batch], device)
            for (_, v, i), score in zip(batch, _block_sums(model, hidden, blocks, targets, len(batch))):
                scores[v][i] = score
    return scores, tokens


__all__ = ["answer_logps"]
