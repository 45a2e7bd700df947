"""Teacher forcing (engine.teacher_forcing.answer_logps) on tiny random models and a real ARC-AGI-2 task: its three
ways of running (packed answers, copied prompt caches, every prompt + answer from scratch) give the same numbers,
which are those of generating the answer token by token; each is taken where it should be, and reuse does the
work it promises (prompts run once, answers packed within the budget, a search's cache read as it stands).

Which way ran is seen from outside: a forward hook on the model's backbone records every forward the engine makes
(engine.logits.hidden_states), with the attention mask handed in (packing's own; None: the model's causal mask).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from arcfold.data.augment import make_views
from arcfold.data.codec import GridCodec
from arcfold.data.tasks import Task
from arcfold.engine.prompt_cache import feed, prefill
from arcfold.engine.teacher_forcing import answer_logps, rows_answer_logps

MAX_LEN = 4096
# sdpa under a name the engine does not know: an attention kernel it cannot hand a mask (as flash kernels).
AttentionInterface.register("unknown_kernel", sdpa_attention_forward)
AttentionMaskInterface.register("unknown_kernel", sdpa_mask)


def tiny_llama(seed: int = 0, attention: str | None = None, vocab: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab or GridCodec.builtin().vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config).eval()


def tiny_mistral(sliding_window: int | None = 100) -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=GridCodec.builtin().vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            sliding_window=sliding_window,
            max_position_embeddings=MAX_LEN,
        )
    ).eval()


def perturbed(grid: np.ndarray) -> list[np.ndarray]:
    """The grid, one cell changed, its transpose, a recolouring: distinct candidates of different lengths."""
    cell = grid.copy()
    cell[0, 0] = (cell[0, 0] + 1) % 10
    recoloured = np.asarray([3, 0, 5, 1, 9, 2, 8, 7, 4, 6], dtype=np.int8)[grid]
    return [grid.copy(), cell, np.ascontiguousarray(grid.T), recoloured]


def view_prompts(codec: GridCodec, task: Task, count: int) -> tuple[list, list[list[int]]]:
    views = make_views(task, 1, seed=3)[:count]
    return views, [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views]


def stepwise_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """The reference: generate the answer token by token, a full forward pass (no cache) per step."""
    total = 0.0
    with torch.inference_mode():
        for t, token in enumerate(answer):
            logits = model(input_ids=torch.tensor([prompt + answer[:t]]), use_cache=False).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
    return total


def scratch(model: torch.nn.Module, prompts, answers, batch_size: int = 8) -> list[float]:
    """Every prompt + answer in full: the baseline the reuse paths must equal, flattened."""
    scores, _ = answer_logps(model, prompts, answers, batch_size, reuse_prompts=False)
    return [s for view_scores in scores for s in view_scores]


@dataclass
class Forwards:
    """The backbone forwards the engine made: input ids' shape and the attention mask handed in, per call."""

    calls: list[tuple[torch.Size, torch.Tensor | None]] = field(default_factory=list)

    @property
    def packed(self) -> list[torch.Size]:
        """Forwards of packed answers: the only ones the engine hands its own mask."""
        return [shape for shape, mask in self.calls if mask is not None]


@contextlib.contextmanager
def forwards(model: torch.nn.Module) -> Iterator[Forwards]:
    seen = Forwards()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = base.get_decoder().register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.calls.append((kwargs["input_ids"].shape, kwargs.get("attention_mask"))),
        with_kwargs=True,
    )
    try:
        yield seen
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------ the numbers


@pytest.mark.parametrize("reuse_prompts", [True, False])
def test_teacher_forced_equals_stepwise_generation(codec, task, reuse_prompts):
    model = tiny_llama()
    prompt = codec.encode_prompt(task.train, task.test[0].input).ids
    truth = task.test[0].output
    # Answers of three lengths in one batch (padding), one of them not a grid at all.
    answers = [codec.encode_answer(truth), codec.encode_answer(truth[:3]), [7, 9, 5, 2, 2, 11]]
    got, _ = answer_logps(model, [prompt], [answers], batch_size=2, reuse_prompts=reuse_prompts)
    for score, answer in zip(got[0], answers):
        assert score == pytest.approx(stepwise_logp(model, prompt, answer), abs=1e-4)


@pytest.mark.parametrize("regime", ["small vocabulary", "large vocabulary"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_scores_equal_scratch(codec, task, attention, regime):
    """Packed answers (one row per view, a custom mask keeping them apart) score like from scratch: both mask
    forms (sdpa takes a boolean mask, eager adds a float one), answers of 1 to ~50 tokens, a view with a
    prompt length of its own, and one or two packs per group (a small vocabulary packs half a prompt per row)
    or many (a large one packs what a from-scratch batch's logits would hold: batch_size 2, the longest answer)."""
    large = regime == "large vocabulary"
    model = tiny_llama(attention=attention, vocab=4096 if large else None)
    batch_size = 2 if large else 8
    views, prompts = view_prompts(codec, task, 5)
    lengths = sorted(map(len, prompts))
    assert lengths.count(lengths[0]) > 1 and len(set(lengths)) == 2  # a group of several views, and another
    answers = [
        [codec.encode_answer(view.grid(g)) for g in perturbed(task.test[0].output)] + [[5], [7, 3], [4, 12, 9]]
        for view in views
    ]
    answers[1] = answers[1][::-1]  # views of one group with their answers in another order
    answers[2] = [[11], [3, 3]]  # a view with short answers only: rows of a pack round with different widths
    with forwards(model) as seen:
        packed, packed_tokens = answer_logps(model, prompts, answers, batch_size)
    groups = sum(math.ceil(lengths.count(n) / batch_size) for n in set(lengths))
    longest = max(len(a) for view_answers in answers for a in view_answers) - 1  # a block: all but the last token
    widest = max(width for _, width in seen.packed)
    if large:
        assert len(seen.packed) >= 3 * groups and widest <= 2 * longest  # several packs per group
    else:
        assert groups <= len(seen.packed) <= 2 * groups and widest > longest  # several answers in a pack
    flat = scratch(model, prompts, answers)
    assert [s for view_scores in packed for s in view_scores] == pytest.approx(flat, abs=1e-4)
    assert all(math.isfinite(s) and s < 0 for s in flat)
    _, scratch_tokens = answer_logps(model, prompts, answers, batch_size, reuse_prompts=False)
    assert packed_tokens.tokens < scratch_tokens.tokens / 2


def test_the_pack_budget():
    """A row packs up to half its prompt with a small vocabulary; with a large one, what a from-scratch batch's
    answer logits would hold (batch_size x longest answer), shared among the group's rows; an answer longer than
    either still gets a pack of its own."""
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 4, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1] * 4]  # 40 tokens each
    fives = [[k + 1, 7, 8, 9, 10] for k in range(8)]  # eight answers of 5 tokens

    def packs(vocab: int | None, batch_size: int, answers, views: int = 1) -> list[int]:
        model = tiny_llama(vocab=vocab)
        with forwards(model) as seen:
            scores, _ = answer_logps(model, prompts[:views], [answers] * views, batch_size)
        assert [s for row in scores for s in row] == pytest.approx(scratch(model, prompts[:views], [answers] * views))
        return [width for _, width in seen.packed]

    # An answer's first token is read off the prompt's last hidden state: 4 of a 5-token answer's tokens are fed.
    assert packs(None, 2, fives) == [20, 12]  # half the 40-token prompt: 5 answers per pack
    assert packs(150_000, 2, fives) == [8, 8, 8, 8]  # batch_size 2 x 4 tokens
    assert packs(150_000, 4, fives) == [16, 16]
    assert packs(150_000, 4, fives, views=2) == [8] * 4  # two rows share the budget
    assert packs(None, 8, [list(range(1, 16)) * 2, [5, 6], [7]]) == [29, 1]  # 29 > half the prompt: alone


def test_packed_mask_keeps_answers_apart(codec):
    """The mask handed to a packed forward: every query sees the whole prompt; inside the pack it sees the earlier
    positions of its own answer only; padding sees only the prompt. Boolean for sdpa, additive (0 / dtype min)
    in the model's dtype for eager."""
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]]
    answers = [[[5, 6, 7], [8, 9]], [[10]]]  # one row packs two answers (2 + 1 tokens fed), the other nothing to feed
    masks = {}
    for attention, dtype in (("sdpa", torch.float32), ("eager", torch.bfloat16)):
        model = tiny_llama(attention=attention).to(dtype)
        with forwards(model) as seen:
            answer_logps(model, prompts, answers)
        ((shape, mask),) = [(shape, mask) for shape, mask in seen.calls if mask is not None]
        assert shape == (2, 3) and mask.shape == (2, 1, 3, 12 + 3)
        masks[attention] = mask
    mask, additive = masks["sdpa"], masks["eager"]
    assert mask.dtype == torch.bool and mask[..., :12].all()  # the whole prompt, for every query
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0, :, 12:], expected)
    assert not mask[1, 0, :, 12:].any()  # a one-token answer feeds nothing: padding that sees only the prompt
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, mask) and (additive[~mask] == torch.finfo(torch.bfloat16).min).all()


# ------------------------------------------------------------------------------------------ which way runs


def test_the_way_prompt_reuse_takes(codec, task):
    """Packing where the attention takes a custom mask over full attention (a PeftModel judged by its base);
    a cache copy per answer for sliding windows (a sliding-window cache past its window cannot be cropped back to
    the prompt), for attention kernels the engine cannot hand a mask, and for a model with a sliding layer. The
    same numbers as from scratch every way."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    sliding_layer = tiny_llama()
    sliding_layer.config.layer_types = ["full_attention", "sliding_attention"]
    models = {
        "sdpa": (tiny_llama(attention="sdpa"), True),
        "eager": (tiny_llama(attention="eager"), True),
        "peft": (peft_model, True),
        "mistral, no window": (tiny_mistral(sliding_window=None), True),
        "mistral, window": (tiny_mistral(), False),
        "unknown kernel": (tiny_llama(attention="unknown_kernel"), False),
        "a sliding layer": (sliding_layer, False),
    }
    _, prompts = view_prompts(codec, task, 3)
    assert min(map(len, prompts)) > 100  # past the window
    answers = [[codec.encode_answer(g) for g in perturbed(task.test[0].output)] for _ in prompts]
    for name, (model, packs) in models.items():
        with forwards(model) as seen:
            scores, _ = answer_logps(model, prompts, answers, batch_size=3)
        assert bool(seen.packed) == packs, name
        assert [s for row in scores for s in row] == pytest.approx(scratch(model, prompts, answers), abs=1e-4), name


def test_answers_scored_on_a_cache_the_dfs_holds(codec, task):
    """rows_answer_logps on prompts prefilled together (two lengths: left padding) with search leftovers after
    them (columns no answer may see) scores exactly as running each prompt + answer from scratch, and leaves the
    cache as it was."""
    model = tiny_llama()
    views, prompts = view_prompts(codec, task, 6)
    assert len({len(p) for p in prompts}) == 2
    answers = [[codec.encode_answer(view.grid(g)) for g in perturbed(task.test[0].output)] + [[5]] for view in views]
    with torch.inference_mode():
        rows, _ = prefill(model, prompts)
        leftovers = torch.tensor([[7, 8, 9]] * len(prompts))
        feed(
            model,
            rows,
            leftovers,
            torch.arange(3)[None].repeat(len(prompts), 1),
            torch.ones(len(prompts), 3, 3).tril().bool(),
        )
        before = [(layer.keys.clone(), layer.values.clone()) for layer in rows.cache.layers]
        reused, cost = rows_answer_logps(model, rows, answers, 3)
    assert [s for va in reused for s in va] == pytest.approx(scratch(model, prompts, answers), abs=1e-4)
    assert cost.passes >= 1 and rows.columns() == rows.width + 3
    for layer, (keys, values) in zip(rows.cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_what_answer_logps_refuses():
    model = tiny_llama()
    with pytest.raises(ValueError, match="at least one token"):
        answer_logps(model, [[1, 2]], [[[3], []]])
    with pytest.raises(ValueError, match="at least one token"):
        answer_logps(model, [[]], [[[3]]])
    with pytest.raises(ValueError, match="answers for 2"):
        answer_logps(model, [[1, 2]], [[[3]], [[4]]])
    assert answer_logps(model, [[1, 2], [3]], [[], [[4]]])[0][0] == []  # a prompt without answers: nothing to do
