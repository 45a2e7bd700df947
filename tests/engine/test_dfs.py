"""The thresholded DFS against brute force: every sequence over the output tokens, scored by full forward passes.

The tiny model is random but shaped so that the search has something to find: a sharp lm_head, strong
attention (a context-dependent model, so a stale KV cache changes the numbers), and an end-token bias through
a reserved residual dimension, so several short completions clear each threshold.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arcfold.data.codec import GridCodec
from arcfold.engine.dfs import dfs

CODEC = GridCodec.builtin()
EOS = CODEC.eos_id
MAX_NEW = 4
# A short prompt in the codec's format: input marker, a 2x2 grid, output marker.
PROMPT = [CODEC.ids["bos"], CODEC.ids["input"], 6, 7, CODEC.ids["row"], 8, 6, CODEC.ids["row"], CODEC.ids["output"]]


def peaky_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=CODEC.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            initializer_range=0.3,
        )
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        # Residual dimension 0 holds a constant: no layer writes to it, and only eos reads it in the lm_head.
        model.model.embed_tokens.weight[:, 0] = 40.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        model.lm_head.weight[:, 0] = 0
        model.lm_head.weight[EOS, 0] = 1.0
    return model.eval()


def score(model: torch.nn.Module, prompt: list[int], seqs: list[list[int]]) -> list[float]:
    """Teacher-forced log p of each sequence after the prompt: one full forward pass per batch, no cache."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([prompt + s + [EOS] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        logps = torch.log_softmax(model(input_ids=ids).logits.float(), -1).double()
    n = len(prompt)
    per_token = logps[:, n - 1 : -1].gather(-1, ids[:, n:, None])[..., 0]
    lengths = torch.tensor([len(s) for s in seqs])
    return (per_token * (torch.arange(width)[None] < lengths[:, None])).sum(-1).tolist()


BODY = [t for t in CODEC.output_tokens if t != EOS]


def brute_force(model: torch.nn.Module, prompt: list[int], max_new: int) -> dict[tuple[int, ...], float]:
    """log p of every sequence of output tokens ending in eos, up to max_new tokens."""
    seqs = [list(mid) + [EOS] for k in range(max_new) for mid in itertools.product(BODY, repeat=k)]
    return {tuple(s): lp for s, lp in zip(seqs, score(model, prompt, seqs))}


@pytest.fixture(scope="module", params=[0, 1, 4])
def setup(request):
    model = peaky_model(request.param)
    return model, brute_force(model, PROMPT, MAX_NEW)


def above(table: dict[tuple[int, ...], float], p: float) -> dict[tuple[int, ...], float]:
    return {s: lp for s, lp in table.items() if lp >= math.log(p)}


def assert_same(found, expected: dict[tuple[int, ...], float]) -> None:
    got = {tuple(c.ids): c.logp for c in found}
    assert len(got) == len(found), "duplicate completions"
    assert set(got) == set(expected)
    for seq, lp in expected.items():
        assert got[seq] == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.03, 0.01])
def test_dfs_equals_brute_force_with_and_without_guess(setup, p):
    model, table = setup
    expected = above(table, p)
    plain, plain_stats = dfs(model, PROMPT, CODEC, p, MAX_NEW)
    assert_same(plain, expected)
    assert [c.logp for c in plain] == sorted((c.logp for c in plain), reverse=True)

    # A right guess: the longest completion in the set (its prefixes are all explored anyway).
    right = list(max(expected, key=lambda s: (len(s), expected[s]))) if expected else []
    with_right, right_stats = dfs(model, PROMPT, CODEC, p, MAX_NEW, guess=right)
    assert_same(with_right, expected)
    if right:
        # Each non-final node along the guess is read off the one prefill instead of its own forward pass.
        assert plain_stats.forward_passes - right_stats.forward_passes == len(right) - 1

    # Wrong guesses: an unlikely sequence, one without eos, and one longer than max_new_tokens.
    worst = list(min(table, key=table.get))
    for wrong in (worst, [CODEC.ids["3"]] * 2, [CODEC.ids["1"]] * (MAX_NEW + 3) + [EOS]):
        found, _ = dfs(model, PROMPT, CODEC, p, MAX_NEW, guess=wrong)
        assert_same(found, expected)


def test_the_setup_has_something_to_find(setup):
    """Guard against a vacuous comparison: several completions, some of them deeper than one token."""
    _, table = setup
    deep = [s for s in above(table, 0.01) if len(s) >= 3]
    assert len(above(table, 0.01)) >= 3 and deep


@pytest.mark.parametrize("guess", [False, True])
def test_exploration_order_does_not_matter(setup, guess):
    """Least-likely-first walks the tree in another order and crops the cache at other points: same answer."""
    model, table = setup
    p = 0.01
    expected = above(table, p)
    g = list(max(expected, key=len)) if guess else None
    found, stats = dfs(model, PROMPT, CODEC, p, MAX_NEW, guess=g, explore="unlikely")
    assert_same(found, expected)


def test_cost_is_the_prefill_plus_one_pass_per_surviving_off_guess_prefix(setup):
    """Exactly the prefixes with probability >= p get expanded, and those along the guess cost nothing."""
    model, table = setup
    prefixes = [list(mid) for k in range(1, MAX_NEW) for mid in itertools.product(BODY, repeat=k)]
    prefix_logp = dict(zip(map(tuple, prefixes), score(model, PROMPT, prefixes)))
    for p in (0.1, 0.02):
        guess = max(above(table, p), key=len)
        off_guess = [s for s, lp in prefix_logp.items() if lp >= math.log(p) and s != guess[: len(s)]]
        _, stats = dfs(model, PROMPT, CODEC, p, MAX_NEW, guess=list(guess))
        assert stats.forward_passes == 1 + len(off_guess)
        _, stats = dfs(model, PROMPT, CODEC, p, MAX_NEW)
        assert stats.forward_passes == 1 + len(off_guess) + len(guess) - 1


def test_the_threshold_is_inclusive_up_to_a_tiny_tolerance(setup):
    """A completion exactly at min_prob is kept (float noise must not drop it); one clearly below is not."""
    model, table = setup
    deep = max((s for s in above(table, 0.01) if len(s) >= 2), key=table.get)
    at = math.exp(table[deep])
    found, _ = dfs(model, PROMPT, CODEC, at, MAX_NEW)
    assert deep in {tuple(c.ids) for c in found}
    found, _ = dfs(model, PROMPT, CODEC, at * math.exp(1e-4), MAX_NEW)
    assert deep not in {tuple(c.ids) for c in found}


def test_caps_stop_the_search_early(setup):
    model, table = setup
    found, stats = dfs(model, PROMPT, CODEC, 0.01, MAX_NEW, max_candidates=1)
    assert len(found) == 1 and stats.capped and not stats.timed_out
    found, stats = dfs(model, PROMPT, CODEC, 0.01, MAX_NEW, max_seconds=0.0)
    assert found == [] and stats.timed_out
    full, stats = dfs(model, PROMPT, CODEC, 0.01, MAX_NEW)
    assert not stats.capped and not stats.timed_out and stats.seconds > 0


def test_dfs_on_a_peft_model():
    """Through a LoRA wrapper (non-zero init so it changes the model), still exact."""
    peft = pytest.importorskip("peft")
    model = peaky_model(0)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.train()  # dfs must switch to eval itself and give the mode back
    expected = above(brute_force(lora.eval(), PROMPT, MAX_NEW), 0.02)
    lora.train()
    found, _ = dfs(lora, PROMPT, CODEC, 0.02, MAX_NEW, guess=list(max(expected, key=len)))
    assert_same(found, expected)
    assert lora.training


def test_bad_threshold():
    with pytest.raises(ValueError):
        dfs(peaky_model(0), PROMPT, CODEC, 0.0, MAX_NEW)


@pytest.mark.parametrize("guess,explore", [(False, "likely"), (True, "likely"), (True, "unlikely")])
def test_the_cache_it_is_given_ends_holding_exactly_the_prompt(setup, guess, explore):
    """What scoring reuses (engine.predict): after the search, the cache's keys and values are those of a fresh
    pass over the prompt alone, whatever path the search walked last."""
    from transformers import DynamicCache

    model, table = setup
    g = list(max(above(table, 0.01), key=len)) if guess else None
    cache = DynamicCache()
    found, _ = dfs(model, PROMPT, CODEC, 0.01, MAX_NEW, guess=g, explore=explore, cache=cache)
    assert_same(found, above(table, 0.01))
    fresh = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([PROMPT]), past_key_values=fresh, use_cache=True)
    assert cache.get_seq_length() == len(PROMPT)
    for kept, ref in zip(cache.layers, fresh.layers):
        assert torch.allclose(kept.keys, ref.keys, atol=1e-5) and torch.allclose(kept.values, ref.values, atol=1e-5)
    with pytest.raises(ValueError, match="empty cache"):
        dfs(model, PROMPT, CODEC, 0.01, MAX_NEW, cache=cache)
