"""Greedy and sampled generation against plain forward passes, and predict_task end to end on a real task.

Two kinds of tiny Llama models: a random one (context-dependent, for exactness against uncached forwards),
and a bigram one whose weights spell out the next-token table, so its answer in every view is known exactly
and the candidates predict_task reports in the original frame can be checked grid by grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arcfold.config import InferenceConfig, ScoringConfig
from arcfold.data.augment import make_views
from arcfold.data.codec import GridCodec
from arcfold.engine.candidates import AGGREGATES
from arcfold.engine.generate import greedy, sample
from arcfold.engine.predict import answer_budget, predict_task
from arcfold.engine.prompt_cache import prefill

CODEC = GridCodec.builtin()
IDS = CODEC.ids
EOS, ROW, OUT = IDS["eos"], IDS["row"], IDS["output"]


def random_model(seed: int = 0, eos_bias: float = 0.0) -> LlamaForCausalLM:
    """Random weights, sharp enough to matter; eos_bias > 0 makes the end token likely at every step (through
    residual dimension 0, which holds a constant that no layer writes and only eos reads)."""
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
        if eos_bias:
            model.model.embed_tokens.weight[:, 0] = 40.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0] = 0
                layer.mlp.down_proj.weight[0] = 0
            model.lm_head.weight[:, 0] = 0
            model.lm_head.weight[EOS, 0] = eos_bias
    return model.eval()


def bigram_model(table: dict[int, dict[int, float]], context: float = 0.0) -> LlamaForCausalLM:
    """A Llama whose next-token logits depend only on the current token: logits[next] = table[cur][next].

    Attention and MLP write nothing to the residual stream (zero output projections); the embedding is the
    identity, so the final RMSNorm yields sqrt(hidden) * one-hot and the lm_head column is the table row.
    context > 0 lets attention write a little (random output projection of that scale): the same table up to a
    small context-dependent shift, so a wrong or stale prompt cache shows in the numbers."""
    v = CODEC.vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=v, hidden_size=v, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8)
    )
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        model.model.layers[0].self_attn.o_proj.weight.normal_(0, context)
        model.model.layers[0].mlp.down_proj.weight.zero_()
        head = torch.zeros(v, v)
        for cur, row in table.items():
            for nxt, logit in row.items():
                head[nxt, cur] = logit / v**0.5
        model.lm_head.weight.copy_(head)
    return model.eval()


def teacher_forced(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logps = torch.log_softmax(logits, -1).double()
    return float(sum(logps[len(prompt) - 1 + j, t] for j, t in enumerate(answer)))


def argmax_chain(model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    """Greedy over the output tokens by full forward passes from scratch: no cache, no padding."""
    allowed = torch.tensor(CODEC.output_tokens)
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < max_new and (not out or out[-1] != EOS):
            logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1]
            out.append(int(allowed[logits[allowed].argmax()]))
    return out


PROMPTS = [
    [IDS["bos"], IDS["input"], 6, 7, ROW, OUT],
    [IDS["input"], 9, 9, 9, ROW, 8, 7, 6, ROW, IDS["output"], 6, ROW, EOS, IDS["input"], 7, ROW, OUT],
    [IDS["input"], 15, ROW, OUT],
]


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_is_the_uncached_argmax_chain(seed):
    model = random_model(seed)
    # Batch size 2 over 3 prompts of different lengths: left padding, and a batch of one.
    out, stats = greedy(model, PROMPTS, CODEC, max_new_tokens=12, batch_size=2)
    assert len(out) == 3 and all(len(c) == 1 for c in out)
    for prompt, (completion,) in zip(PROMPTS, out):
        assert completion.ids == argmax_chain(model, prompt, 12)
        assert completion.logp == pytest.approx(teacher_forced(model, prompt, completion.ids), abs=1e-4)
    assert stats.forward_tokens > 0 and stats.forward_passes > 0


def test_greedy_stops_rows_at_eos():
    # Prompt 0 answers "3 row eos"; prompt 1 ends in a 7, which never leads to eos within the budget.
    model = bigram_model({OUT: {IDS["3"]: 5.0}, IDS["3"]: {ROW: 5.0}, ROW: {EOS: 5.0}, IDS["7"]: {IDS["7"]: 5.0}})
    prompts = [[IDS["input"], IDS["1"], ROW, OUT], [IDS["input"], IDS["7"]]]
    out, stats = greedy(model, prompts, CODEC, max_new_tokens=6, batch_size=8)
    assert out[0][0].ids == [IDS["3"], ROW, EOS]
    assert out[1][0].ids == [IDS["7"]] * 6
    assert CODEC.decode(out[0][0].ids).tolist() == [[3]] and CODEC.decode(out[1][0].ids) is None
    # Finished rows leave the batch: 2 prompts of 4 + 2 rows x 2 steps + 1 row x 3 steps.
    assert stats.forward_tokens == 2 * 4 + 2 * 2 + 3


def test_greedy_on_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        random_model(0),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    out, _ = greedy(model, PROMPTS[:2], CODEC, max_new_tokens=8, batch_size=2)
    for prompt, (completion,) in zip(PROMPTS, out):
        assert completion.ids == argmax_chain(model, prompt, 8)
        assert completion.logp == pytest.approx(teacher_forced(model, prompt, completion.ids), abs=1e-4)


def test_sample_is_seeded_restricted_and_scored_under_the_full_softmax():
    model = random_model(0)
    first, _ = sample(model, PROMPTS, CODEC, max_new_tokens=6, n=3, temperature=1.5, seed=7, batch_size=4)
    again, _ = sample(model, PROMPTS, CODEC, max_new_tokens=6, n=3, temperature=1.5, seed=7, batch_size=4)
    other, _ = sample(model, PROMPTS, CODEC, max_new_tokens=6, n=3, temperature=1.5, seed=8, batch_size=4)
    assert [[c.ids for c in row] for row in first] == [[c.ids for c in row] for row in again]
    assert [[c.ids for c in row] for row in first] != [[c.ids for c in row] for row in other]
    allowed = set(CODEC.output_tokens)
    for prompt, row in zip(PROMPTS, first):
        assert len(row) == 3
        for completion in row:
            assert set(completion.ids) <= allowed
            assert completion.logp == pytest.approx(teacher_forced(model, prompt, completion.ids), abs=1e-4)


# ------------------------------------------------------------------------------------------ predict_task


# In every view the model answers "3 5 row eos" (p = 0.46 * 0.78^3) or "7 5 row eos" (about half that):
# the 1x2 grid [[3, 5]] or [[7, 5]] in the view's frame, whatever the prompt.
TWO_ANSWERS = {
    OUT: {IDS["3"]: 3.0, IDS["7"]: 2.3},
    IDS["3"]: {IDS["5"]: 4.0},
    IDS["7"]: {IDS["5"]: 4.0},
    IDS["5"]: {ROW: 4.0},
    ROW: {EOS: 4.0},
}


def expected_votes(views, answers) -> dict[bytes, tuple[tuple[int, ...], set[int]]]:
    """Original-frame grid -> the views that generate it, built from the views' inverse transforms."""
    out: dict[bytes, tuple[tuple[int, ...], set[int]]] = {}
    for v, view in enumerate(views):
        for answer in answers:
            grid = view.invert(np.asarray(answer, dtype=np.int8))
            out.setdefault(grid.tobytes() + bytes(grid.shape), (grid.shape, set()))[1].add(v)
    return out


def got_votes(pred) -> dict[bytes, tuple[tuple[int, ...], set[int]]]:
    return {c.grid.tobytes() + bytes(c.grid.shape): (c.grid.shape, set(c.gen_logps)) for c in pred.candidates}


def check_stats(pred, n_views):
    s = pred.stats
    for key in (
        "seconds",
        "gen_seconds",
        "scoring_seconds",
        "forward_tokens",
        "n_views",
        "n_completions",
        "n_invalid",
        "prompt_tokens",
        "dropped_demos",
        "timed_out",
    ):
        assert key in s and np.isfinite(s[key]), key
    assert s["n_views"] == n_views and s["timed_out"] == 0.0
    assert s["seconds"] >= s["gen_seconds"] > 0 and s["forward_tokens"] > s["prompt_tokens"] > 0


def bigram_logp(table: dict[int, dict[int, float]], prev: int, answer: list[int]) -> float:
    """Exact log p of an answer under bigram_model(table): a softmax over the whole vocabulary per step."""
    total = 0.0
    for tok in answer:
        logits = np.zeros(CODEC.vocab_size)
        for nxt, logit in table.get(prev, {}).items():
            logits[nxt] = logit
        total += logits[tok] - np.log(np.exp(logits).sum())
        prev = tok
    return total


def view_prompt(task, view, max_len: int = 2048) -> list[int]:
    return CODEC.encode_prompt(
        view.pairs(task.train), view.grid(task.test[0].input), max_len=max_len, reserve=answer_budget(max_len)
    ).ids


@pytest.mark.parametrize("strategy", ["greedy", "dfs"])
def test_predict_maps_every_view_back_to_the_original_frame(task, strategy):
    model = bigram_model(TWO_ANSWERS)
    cfg = InferenceConfig(strategy=strategy, min_prob=0.1, max_len=2048, batch_size=4)
    views = make_views(task, cfg.n, cfg.seed, cfg.colours, cfg.shuffle_demos)
    preds = predict_task(model, CODEC, task, cfg)
    assert len(preds) == len(task.test)
    answers = [[[3, 5]]] if strategy == "greedy" else [[[3, 5]], [[7, 5]]]
    want = expected_votes(views, answers)
    for i, pred in enumerate(preds):
        assert pred.task_id == task.id and pred.test_index == i
        assert got_votes(pred) == want  # every candidate is the inverse image of a view's answer
        # Rotated views give the 2x1 shape back in the original frame: the D8 part was inverted too.
        assert {c.grid.shape for c in pred.candidates} == {(1, 2), (2, 1)}
        assert 1 <= len(pred.attempts) <= 2
        for attempt, j in zip(pred.attempts, pred.rankings["votes"]):
            assert np.array_equal(attempt, pred.candidates[j].grid)
        check_stats(pred, len(views))
        assert pred.stats["n_invalid"] == 0 and pred.stats["n_completions"] == len(views) * len(answers)
        for cand in pred.candidates:
            for v, logp in cand.gen_logps.items():
                in_view = CODEC.encode_answer(views[v].grid(cand.grid))
                assert logp == pytest.approx(bigram_logp(TWO_ANSWERS, OUT, in_view), abs=1e-4)


def test_dfs_over_d8_views_merges_votes(task):
    """Without colour changes the 8 D8 views map [[3, 5]] back to 4 distinct grids, 2 views each. The views are
    searched together: one prefill per batch of views, then one forward per answer token serves them all."""
    table = {**TWO_ANSWERS, OUT: {IDS["3"]: 4.0}}  # one answer, "3 5 row eos", p = 0.784 ** 4 = 0.38
    model = bigram_model(table)
    cfg = InferenceConfig(strategy="dfs", min_prob=0.3, max_len=2048, colours="none", shuffle_demos=False)
    pred = predict_task(model, CODEC, task, cfg)[0]
    assert len(pred.candidates) == 4 and all(c.votes == 2 for c in pred.candidates)
    # The prefill, then the nodes "3", "3 5", "3 5 row" (or their images) of all 8 views: 3 forwards, 8 rows each.
    assert pred.stats["forward_passes"] == 1 + 3 and pred.stats["rows_per_forward"] == 8


@pytest.mark.parametrize("strategy", ["greedy", "dfs"])
def test_predict_with_a_random_model(task, strategy):
    """Whatever a random model makes of the prompts: valid grids become candidates with their view's log p,
    the rest are counted as invalid. (The bigram tests above check the grids themselves.)"""
    model = random_model(0, eos_bias=1.0)
    cfg = InferenceConfig(strategy=strategy, min_prob=0.05, max_len=2048)
    views = make_views(task, cfg.n, cfg.seed, cfg.colours, cfg.shuffle_demos)
    preds = predict_task(model, CODEC, task, cfg)
    assert [p.test_index for p in preds] == list(range(len(task.test)))
    pred = preds[0]
    assert len(pred.attempts) <= 2 and len(pred.attempts) == min(2, len(pred.candidates))
    check_stats(pred, len(views))
    valid = sum(c.votes for c in pred.candidates)  # one vote per view and grid (no repeats within a view here)
    assert pred.stats["n_invalid"] + valid == pred.stats["n_completions"]
    if strategy == "dfs":  # the search finds completions (mostly not grids): dropped and counted, not raised
        assert pred.stats["n_completions"] >= len(views) and pred.stats["n_invalid"] > 0
    for cand in pred.candidates:
        for v, logp in cand.gen_logps.items():
            in_view = CODEC.encode_answer(views[v].grid(cand.grid))
            assert logp == pytest.approx(teacher_forced(model, view_prompt(task, views[v]), in_view), abs=1e-4)


def test_invalid_completions_are_dropped_and_counted(task):
    model = bigram_model({OUT: {EOS: 5.0}})  # answers "eos" at once: no grid
    cfg = InferenceConfig(strategy="greedy", max_len=2048, batch_size=8)
    pred = predict_task(model, CODEC, task, cfg)[0]
    assert pred.candidates == [] and pred.attempts == []
    assert pred.stats["n_invalid"] == pred.stats["n_completions"] == 8


def test_caps_and_clock(task):
    model = bigram_model(TWO_ANSWERS)
    capped = predict_task(model, CODEC, task, InferenceConfig(max_len=2048, max_candidates=3))[0]
    assert len(capped.candidates) == 3 and capped.stats["n_views"] == 8
    late = predict_task(model, CODEC, task, InferenceConfig(max_len=2048, max_seconds=0.0))[0]
    assert late.stats["timed_out"] == 1.0 and late.stats["n_views"] == 0 and late.candidates == []


def test_indices_predict_only_those_test_inputs_and_the_same_as_all_at_once(task):
    model = bigram_model(TWO_ANSWERS)
    cfg = InferenceConfig(strategy="dfs", min_prob=0.1, max_len=2048)
    everything = predict_task(model, CODEC, task, cfg)
    one = predict_task(model, CODEC, task, cfg, indices=[len(task.test) - 1])
    assert len(one) == 1 and one[0].test_index == len(task.test) - 1
    assert got_votes(one[0]) == got_votes(everything[-1]) and one[0].rankings == everything[-1].rankings


def test_sample_strategy_and_peft_model(task):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        bigram_model(TWO_ANSWERS), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    cfg = InferenceConfig(strategy="sample", samples=2, max_len=2048, batch_size=8)
    pred = predict_task(model, CODEC, task, cfg)[0]
    assert model.training  # the caller's mode comes back
    assert pred.stats["n_completions"] == 16 and pred.candidates
    views = make_views(task, cfg.n, cfg.seed, cfg.colours, cfg.shuffle_demos)
    for cand in pred.candidates:  # mapped back into its view, each candidate has the log p it was sampled with
        for v, logp in cand.gen_logps.items():
            in_view = CODEC.encode_answer(views[v].grid(cand.grid))
            assert logp == pytest.approx(teacher_forced(model, view_prompt(task, views[v]), in_view), abs=1e-4)


def test_scoring_fills_every_ranking(task):
    model = bigram_model(TWO_ANSWERS)
    cfg = InferenceConfig(
        strategy="dfs", min_prob=0.1, max_len=2048, scoring=ScoringConfig(views=8, aggregate="sum_logp")
    )
    pred = predict_task(model, CODEC, task, cfg)[0]
    assert set(pred.rankings) == set(AGGREGATES) | {"votes"}
    n = len(pred.candidates)
    for order in pred.rankings.values():
        assert sorted(order) == list(range(n))
    for attempt, j in zip(pred.attempts, pred.rankings["sum_logp"]):
        assert np.array_equal(attempt, pred.candidates[j].grid)
    assert all(len(c.scores) == 8 for c in pred.candidates)
    assert pred.stats["scoring_seconds"] > 0
    votes_only = dataclasses.replace(cfg, scoring=ScoringConfig(views=0))
    assert set(predict_task(model, CODEC, task, votes_only)[0].rankings) == {"votes"}


def test_scoring_and_the_nll_reuse_the_prompt_caches_the_dfs_leaves(task):
    """Scoring under the generation views (the default) and the true output's NLL read each view's prompt cache
    from the DFS: the same numbers as running the prompts again (cache_mb=0), each equal to a from-scratch
    teacher-forced pass in that view's frame, and no prompt token runs again. The budget is taken a batch of
    views at a time: one for three caches keeps the first three. `views_from=fresh` scores under other views."""
    model = bigram_model(TWO_ANSWERS, context=0.3)  # context-dependent: a wrong cache would change the scores
    cfg = InferenceConfig(strategy="dfs", min_prob=0.1, max_len=2048, batch_size=3, scoring=ScoringConfig(views=8))
    views = make_views(task, cfg.n, cfg.seed, cfg.colours, cfg.shuffle_demos)
    prompts = [view_prompt(task, view) for view in views]

    def run(**scoring):
        changed = dataclasses.replace(cfg, scoring=ScoringConfig(views=8, **scoring))
        return predict_task(model, CODEC, task, changed, nll_views=views)[0]

    kept, rerun = run(), run(cache_mb=0)
    assert kept.stats["scoring_kept_views"] == 8 and rerun.stats["scoring_kept_views"] == 0
    assert kept.stats["nll_kept_views"] == 8 and rerun.stats["nll_kept_views"] == 0
    prompt_tokens = sum(map(len, prompts))
    for what in ("scoring_tokens", "nll_tokens"):
        assert kept.stats[what] < min(map(len, prompts)) <= prompt_tokens <= rerun.stats[what], what
    assert len(kept.candidates) >= 2
    for a, b in zip(kept.candidates, rerun.candidates):
        assert np.array_equal(a.grid, b.grid) and sorted(a.scores) == list(range(8))
        for v in range(8):
            assert a.scores[v] == pytest.approx(b.scores[v], abs=1e-4)
            in_view = CODEC.encode_answer(views[v].grid(a.grid))
            assert a.scores[v] == pytest.approx(teacher_forced(model, prompts[v], in_view), abs=1e-4)
            if v in a.gen_logps:  # the DFS's own log p for it in that view
                assert a.scores[v] == pytest.approx(a.gen_logps[v], abs=1e-4)
    assert kept.rankings == rerun.rankings
    truth = task.test[0].output
    nll = np.mean(
        [
            -teacher_forced(model, p, CODEC.encode_answer(v.grid(truth))) / len(CODEC.encode_answer(v.grid(truth)))
            for p, v in zip(prompts, views)
        ]
    )
    assert kept.answer_nll == pytest.approx(nll, abs=1e-5) and rerun.answer_nll == pytest.approx(nll, abs=1e-5)

    with torch.inference_mode():
        first, _ = prefill(model, prompts[:3])
    assert run(cache_mb=first.nbytes() * 1.5 / 2**20).stats["scoring_kept_views"] == 3

    fresh = run(views_from="fresh")
    assert fresh.stats["scoring_kept_views"] == 0
    flat = [[c.scores[v] for c in pred.candidates for v in range(8)] for pred in (fresh, kept)]
    assert len(flat[0]) == len(flat[1]) and max(abs(a - b) for a, b in zip(*flat)) > 0.1  # other views


def test_a_search_out_of_memory_retries_with_half_the_views_per_forward(task, caplog):
    """A device that holds at most 2 views per forward (its backbone raises torch.OutOfMemoryError past that):
    the search is retried at 4, then 2 views per forward, and finds what an unconstrained one finds."""
    model = bigram_model(TWO_ANSWERS, context=0.3)
    cfg = InferenceConfig(strategy="dfs", min_prob=0.1, max_len=2048, batch_size=8, scoring=ScoringConfig(views=8))
    free = predict_task(model, CODEC, task, cfg)[0]
    tries = []

    def small_device(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tries.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in device of 2 rows)")

    hook = model.get_decoder().register_forward_pre_hook(small_device, with_kwargs=True)
    try:
        with caplog.at_level("WARNING"):
            tight = predict_task(model, CODEC, task, cfg)[0]
    finally:
        hook.remove()
    assert tries[:2] == [8, 4] and max(tries[2:]) <= 2
    assert tight.stats["search_batch"] == 2 and free.stats["search_batch"] == 8
    assert "out of memory searching 8 views per forward; again with 4" in caplog.text
    assert [c.grid.tobytes() for c in tight.candidates] == [c.grid.tobytes() for c in free.candidates]
    for a, b in zip(tight.candidates, free.candidates):
        assert a.gen_logps == pytest.approx(b.gen_logps, abs=1e-5)
    assert tight.rankings == free.rankings
