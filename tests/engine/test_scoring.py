"""Augmentation scoring and the true output's likelihood (engine.scoring), on tiny random Llama models and a real
ARC-AGI-2 task. The teacher forcing under them is engine.teacher_forcing's (tests/engine/test_teacher_forcing.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arcfold.data.augment import Transform, epoch_plan, make_views
from arcfold.data.codec import IGNORE, GridCodec
from arcfold.data.tasks import Task
from arcfold.engine.candidates import Candidate
from arcfold.engine.scoring import answer_nll, score_candidates
from arcfold.engine.teacher_forcing import answer_logps

MAX_LEN = 4096


def tiny_llama(seed: int = 0, intermediate: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=GridCodec.builtin().vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_LEN,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def perturbed(grid: np.ndarray) -> list[np.ndarray]:
    """The grid, one cell changed, its transpose, a recolouring: distinct candidates of different lengths."""
    cell = grid.copy()
    cell[0, 0] = (cell[0, 0] + 1) % 10
    recoloured = np.asarray([3, 0, 5, 1, 9, 2, 8, 7, 4, 6], dtype=np.int8)[grid]
    return [grid.copy(), cell, np.ascontiguousarray(grid.T), recoloured]


# ------------------------------------------------------------------------------------------ scoring views


def test_the_identity_view_scores_the_candidate_after_the_task_prompt(model, codec, task):
    truth = task.test[0].output
    cand = Candidate(truth.copy())
    score_candidates(model, codec, task, 0, [cand], [Transform()], MAX_LEN)
    prompt = codec.encode_prompt(task.train, task.test[0].input).ids
    (expected,), _ = answer_logps(model, [prompt], [[codec.encode_answer(truth)]], reuse_prompts=False)
    assert cand.scores == {0: pytest.approx(expected[0], abs=1e-4)}


def test_scoring_under_views_on_a_real_task(model, codec, task):
    """Every candidate under every view, duplicates scored once, each score the from-scratch teacher-forced log p
    of the candidate mapped into the view after the view's prompt (with room for the longest candidate), in less
    than half the from-scratch tokens."""
    views = make_views(task, 1, seed=3)
    assert len(views) == 8
    grids = perturbed(task.test[0].output)
    cands = [Candidate(g) for g in grids] + [Candidate(grids[0].copy())]  # a duplicate is scored once
    stats = score_candidates(model, codec, task, 0, cands, views, MAX_LEN, batch_size=3)
    assert stats["scoring_views"] == 8 and stats["scoring_candidates"] == 4 and stats["scoring_kept_views"] == 0
    assert all(sorted(c.scores) == list(range(8)) for c in cands)
    assert cands[-1].scores == cands[0].scores
    answers = [[codec.encode_answer(view.grid(g)) for g in grids] for view in views]
    prompts = [
        codec.encode_prompt(
            view.pairs(task.train), view.grid(task.test[0].input), max_len=MAX_LEN, reserve=max(map(len, a))
        ).ids
        for view, a in zip(views, answers)
    ]
    expected, scratch_tokens = answer_logps(model, prompts, answers, 3, reuse_prompts=False)
    for c, cand in enumerate(cands[:4]):
        for v in range(8):
            assert math.isfinite(cand.scores[v]) and cand.scores[v] < 0
            assert cand.scores[v] == pytest.approx(expected[v][c], abs=1e-4)
    assert stats["scoring_tokens"] < scratch_tokens.tokens / 2
    with pytest.raises(ValueError, match="2 prompts for 8 views"):
        score_candidates(model, codec, task, 0, cands, views, MAX_LEN, prompts=prompts[:2])


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
        ((logp,),), _ = answer_logps(model, [prompt], [[answer]])
        nlls.append(-logp / len(answer))
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
