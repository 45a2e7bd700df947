"""The thresholded search against brute force: every sequence over the output tokens, scored by full forward passes.

The batched search (engine.dfs) must return exactly the completions above the threshold, with their log-probs
within 1e-5, for several prompts of different lengths at once (left padding), at every batch size; so must the
one-row reference (one_row_dfs.py, the search it replaced), with or without a guess, in either walking order.

The tiny model is random but shaped so that the search has something to find: a sharp lm_head, strong
attention (a context-dependent model, so a row that sees the wrong columns, or the wrong positions, changes the
numbers), and an end-token bias through a reserved residual dimension, so several short completions clear each
threshold.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from one_row_dfs import one_row_dfs
from transformers import LlamaConfig, LlamaForCausalLM

from arcfold.data.codec import GridCodec
from arcfold.engine.dfs import Searched, dfs
from arcfold.engine.generate import Completion
from arcfold.engine.prompt_cache import feed, prefill

CODEC = GridCodec.builtin()
EOS = CODEC.eos_id
MAX_NEW = 4
# A short prompt in the codec's format: input marker, a 2x2 grid, output marker.
PROMPT = [CODEC.ids["bos"], CODEC.ids["input"], 6, 7, CODEC.ids["row"], 8, 6, CODEC.ids["row"], CODEC.ids["output"]]
# Two more of other lengths: searched together with PROMPT they are left-padded to its width.
OTHERS = [
    [CODEC.ids["bos"], CODEC.ids["input"], 9, CODEC.ids["row"], CODEC.ids["output"]],
    [CODEC.ids["bos"], CODEC.ids["input"], 7, 7, 7, CODEC.ids["row"], 5, 5, 8, CODEC.ids["row"], CODEC.ids["output"]],
]
PROMPTS = [PROMPT, *OTHERS]


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
    return model, [brute_force(model, prompt, MAX_NEW) for prompt in PROMPTS]


def above(table: dict[tuple[int, ...], float], p: float) -> dict[tuple[int, ...], float]:
    return {s: lp for s, lp in table.items() if lp >= math.log(p)}


def assert_same(found: list[Completion], expected: dict[tuple[int, ...], float]) -> None:
    got = {tuple(c.ids): c.logp for c in found}
    assert len(got) == len(found), "duplicate completions"
    assert set(got) == set(expected)
    for seq, lp in expected.items():
        assert got[seq] == pytest.approx(lp, abs=1e-5)
    assert [c.logp for c in found] == sorted((c.logp for c in found), reverse=True)


@pytest.mark.parametrize("p", [0.1, 0.03, 0.01])
@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
def test_the_batched_search_equals_brute_force_at_every_batch_size(setup, p, batch_size):
    model, tables = setup
    searched = dfs(model, PROMPTS, CODEC, p, MAX_NEW, batch_size=batch_size)
    for found, table in zip(searched.completions, tables):
        assert_same(found, above(table, p))


def test_the_setup_has_something_to_find(setup):
    """Guard against a vacuous comparison: several completions, some of them deeper than one token."""
    _, tables = setup
    for table in tables:
        deep = [s for s in above(table, 0.01) if len(s) >= 3]
        assert len(above(table, 0.01)) >= 3 and deep


@pytest.mark.parametrize("p", [0.1, 0.01])
def test_the_one_row_reference_equals_brute_force(setup, p):
    """The reference the real-prompt comparisons lean on: with and without a guess, either walking order."""
    model, tables = setup
    expected = above(tables[0], p)
    right = list(max(expected, key=lambda s: (len(s), expected[s]))) if expected else []
    worst = list(min(tables[0], key=tables[0].get))
    for guess in (None, right, worst, [CODEC.ids["1"]] * (MAX_NEW + 3) + [EOS]):
        for explore in ("likely", "unlikely"):
            found, _ = one_row_dfs(model, PROMPT, CODEC, p, MAX_NEW, guess=guess, explore=explore)
            assert_same(found, expected)


def test_one_forward_per_depth_serves_every_surviving_branch(setup):
    """A search costs one prefill per cache and one forward per depth, and feeds exactly the prefixes (of every
    prompt) whose probability clears the threshold and that leave room for an end token."""
    model, _ = setup
    prefixes = [list(mid) for k in range(1, MAX_NEW) for mid in itertools.product(BODY, repeat=k)]
    for p in (0.1, 0.02):
        surviving = []
        for prompt in PROMPTS:
            logps = score(model, prompt, prefixes)
            surviving += [s for s, lp in zip(prefixes, logps) if lp >= math.log(p)]
        searched = dfs(model, PROMPTS, CODEC, p, MAX_NEW, batch_size=8)
        assert searched.branches_fed == len(surviving)
        assert searched.stats.forward_passes == 1 + max(map(len, surviving), default=0)


def test_the_threshold_is_inclusive_up_to_a_tiny_tolerance(setup):
    """A completion exactly at min_prob is kept (float noise must not drop it); one clearly below is not. Both
    searches settle it on the same canonical number, at every batch size."""
    model, tables = setup
    deep = max((s for s in above(tables[0], 0.01) if len(s) >= 2), key=tables[0].get)
    at = math.exp(tables[0][deep])
    for batch_size in (1, 2, 64):
        assert deep in {tuple(c.ids) for c in dfs(model, PROMPTS, CODEC, at, MAX_NEW, batch_size).completions[0]}
        below = dfs(model, PROMPTS, CODEC, at * math.exp(1e-4), MAX_NEW, batch_size).completions[0]
        assert deep not in {tuple(c.ids) for c in below}
    assert deep in {tuple(c.ids) for c in one_row_dfs(model, PROMPT, CODEC, at, MAX_NEW)[0]}


def test_caps_stop_the_search_early(setup):
    model, tables = setup
    capped = dfs(model, PROMPTS, CODEC, 0.01, MAX_NEW, max_candidates=1)
    full = dfs(model, PROMPTS, CODEC, 0.01, MAX_NEW)
    assert capped.stats.capped and not capped.stats.timed_out
    assert [found[:1] for found in full.completions] == capped.completions  # each prompt's best
    stopped = dfs(model, PROMPTS, CODEC, 0.01, MAX_NEW, max_seconds=0.0)
    assert stopped.completions == [[], [], []] and stopped.stats.timed_out
    assert not full.stats.capped and not full.stats.timed_out and full.stats.seconds > 0


def test_dfs_on_a_peft_model():
    """Through a LoRA wrapper (non-zero init so it changes the model), still exact."""
    peft = pytest.importorskip("peft")
    model = peaky_model(0)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.train()  # dfs must switch to eval itself and give the mode back
    expected = [above(brute_force(lora.eval(), prompt, MAX_NEW), 0.02) for prompt in PROMPTS]
    lora.train()
    searched = dfs(lora, PROMPTS, CODEC, 0.02, MAX_NEW, batch_size=2)
    for found, table in zip(searched.completions, expected):
        assert_same(found, table)
    assert lora.training


def test_what_the_search_refuses():
    with pytest.raises(ValueError, match="min_prob"):
        dfs(peaky_model(0), [PROMPT], CODEC, 0.0, MAX_NEW)
    flash_like = peaky_model(0)
    flash_like.config._attn_implementation = "flash_attention_2"  # a kernel that takes no mask
    with pytest.raises(ValueError, match="tree mask"):
        dfs(flash_like, [PROMPT], CODEC, 0.1, MAX_NEW)


def test_kept_caches_hold_exactly_their_prompts_within_the_budget(setup):
    """What scoring reuses (engine.predict): after the search, the kept rows' keys and values and last hidden
    states are those of a fresh pass over the prompts alone, whatever the search fed after them; a budget too
    small for a cache keeps none of it."""
    model, tables = setup
    searched = dfs(model, PROMPTS, CODEC, 0.01, MAX_NEW, batch_size=2, keep=[0, 2], keep_bytes=1e9)
    assert sorted(searched.kept) == [0, 2] and searched.kept_bytes > 0
    for i, (rows, row) in searched.kept.items():
        with torch.inference_mode():
            fresh, _ = prefill(model, [PROMPTS[i]])
        assert rows.columns() == rows.width and rows.lengths[row] == len(PROMPTS[i])
        assert torch.allclose(rows.last[row], fresh.last[0], atol=1e-5)
        for held, ref in zip(rows.cache.layers, fresh.cache.layers):
            span = slice(rows.width - len(PROMPTS[i]), rows.width)
            assert torch.allclose(held.keys[row, :, span], ref.keys[0], atol=1e-5)
            assert torch.allclose(held.values[row, :, span], ref.values[0], atol=1e-5)
    assert isinstance(searched, Searched)
    none = dfs(model, PROMPTS, CODEC, 0.01, MAX_NEW, batch_size=2, keep=[0, 2], keep_bytes=1.0)
    assert none.kept == {} and none.kept_bytes == 0


def test_eager_attention_finds_the_same(setup):
    """eager takes the tree mask as an additive one: the same completions as brute force (sdpa takes it boolean)."""
    model, tables = setup
    model.set_attn_implementation("eager")
    try:
        searched = dfs(model, PROMPTS, CODEC, 0.01, MAX_NEW, batch_size=2)
    finally:
        model.set_attn_implementation("sdpa")
    for found, table in zip(searched.completions, tables):
        assert_same(found, above(table, 0.01))


def test_compacting_the_cache_changes_nothing_a_later_token_sees(setup):
    """Dropping the columns nobody reads (engine.prompt_cache.compact): a token fed after it, seeing the columns
    kept, gets the hidden state it gets without the compaction."""
    model, _ = setup
    tokens = torch.tensor([[5, 6, 7, 8]] * len(PROMPTS))
    depths = torch.tensor([[0, 0, 1, 1]] * len(PROMPTS))
    # Two branches per row: columns 0 and 2 (5, 7) and columns 1 and 3 (6, 8).
    branch = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    after = torch.tensor([[9]] * len(PROMPTS))
    with torch.inference_mode():
        results = []
        for compact in (False, True):
            rows, _ = prefill(model, PROMPTS)
            feed(model, rows, tokens, depths, branch[None].repeat(len(PROMPTS), 1, 1))
            sees = [1, 3]  # the second branch's columns
            if compact:
                moves = rows.compact([sees] * len(PROMPTS))
                sees = [moves[0][c] for c in sees]
            visible = torch.zeros(len(PROMPTS), 1, rows.columns() - rows.width + 1, dtype=torch.bool)
            visible[:, 0, sees + [-1]] = True
            results.append(feed(model, rows, after, torch.full((len(PROMPTS), 1), 2), visible))
            assert rows.columns() == rows.width + (3 if compact else 5)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
