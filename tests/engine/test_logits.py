"""The LM head only where log-probabilities are read (engine.logits) against the models' own full-logits paths.

CHUNK_BYTES is shrunk so that every call here really runs the head in several chunks (a 600-token vocabulary
would otherwise fit in one).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

import arcfold.engine.logits as logits_module
from arcfold.config import LoraConfig
from arcfold.data import GridCodec, make_views
from arcfold.data.codec import IGNORE
from arcfold.engine.dfs import dfs
from arcfold.engine.logits import causal_lm_loss, column_logps, head_logits, hidden_states, token_logps
from arcfold.engine.lora import attach_lora
from arcfold.engine.teacher_forcing import answer_logps
from arcfold.engine.train import build_samples, collate, length_grouped_batches, random_batches

VOCAB = 600
CHUNK_ROWS = 7


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(logits_module, "CHUNK_BYTES", 4 * VOCAB * CHUNK_ROWS)


def qwen2(seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random Qwen2-shaped model with a vocabulary of VOCAB tokens (ids 0..15 double as the builtin codec's)."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**values)).float()


def batch_of(tasks, codec: GridCodec, train_cfg, count: int = 3) -> dict[str, torch.Tensor]:
    samples, _ = build_samples(codec, tasks, dataclasses.replace(train_cfg, epochs=1))
    chosen = sorted(samples, key=lambda s: len(s.ids))[:: max(1, len(samples) // count)][:count]
    assert len({len(s.ids) for s in chosen}) > 1  # really padded
    return collate(chosen, codec.pad_id)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_lora_gradients_equal_the_models_own_loss(small_tasks, train_cfg, checkpointing):
    """The chunked, labelled-positions-only loss and its LoRA gradients equal model(**batch).loss (fp32)."""
    codec = GridCodec.builtin()
    batch = batch_of(small_tasks, codec, train_cfg)
    peft_model = attach_lora(qwen2(), LoraConfig(rank=4, alpha=8, init_seed=1))
    # Non-zero B matrices, so the LoRA gradients of A are not all zero.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.train()
    expected = peft_model(**batch).loss
    expected.backward()
    want = lora_grads(peft_model)
    peft_model.zero_grad()
    if checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    hidden = hidden_states(peft_model, batch["input_ids"], None, None, batch["attention_mask"])
    loss = causal_lm_loss(peft_model, hidden, batch["labels"])
    loss.backward()
    got = lora_grads(peft_model)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert want.keys() == got.keys() and any(g.abs().sum() > 0 for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_head_sees_labelled_positions_only_a_chunk_at_a_time(small_tasks, train_cfg):
    codec = GridCodec.builtin()
    batch = batch_of(small_tasks, codec, train_cfg)
    model = qwen2()
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[0]))
    hidden = hidden_states(model, batch["input_ids"], None, None, batch["attention_mask"])
    causal_lm_loss(model, hidden, batch["labels"]).backward()
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert max(seen) <= CHUNK_ROWS
    # Forward once over the labelled positions, recomputed once in the backward: never more.
    assert sum(seen) == 2 * labelled


def test_batch_loss_is_the_per_sample_loss(small_tasks, train_cfg):
    """A padded batch gives the loss of its samples computed one by one (summed NLL over all labelled tokens)."""
    codec = GridCodec.builtin()
    samples, _ = build_samples(codec, small_tasks, train_cfg)
    chosen = samples[:4]
    model = qwen2()
    with torch.no_grad():
        whole = collate(chosen, codec.pad_id)
        loss = causal_lm_loss(
            model, hidden_states(model, whole["input_ids"], None, None, whole["attention_mask"]), whole["labels"]
        )
        total, count = 0.0, 0
        for s in chosen:
            one = collate([s], codec.pad_id)
            n = int((one["labels"][:, 1:] != IGNORE).sum())
            total += causal_lm_loss(model, hidden_states(model, one["input_ids"], None, None), one["labels"]).item() * n
            count += n
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_token_and_column_logps_equal_the_full_log_softmax():
    model = qwen2(seed=3)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        hidden = hidden_states(model, ids, None, None)
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), ids.roll(-1, 1).reshape(-1)
    picked = full.reshape(-1, VOCAB).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(token_logps(model, flat, targets).float(), picked, atol=1e-5, rtol=0)
    columns = torch.tensor([5, 0, 599, 17])
    torch.testing.assert_close(
        column_logps(model, flat, columns).float(), full.reshape(-1, VOCAB)[:, columns], atol=1e-5, rtol=0
    )


def test_softcapped_logits_equal_the_models_own():
    """Gemma 2 squashes its logits (final_logit_softcapping): the head applies it like the model does."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        final_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).float()
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = head_logits(model, hidden_states(model, ids, None, None))
    assert want.abs().max() < 2.0  # the cap is active
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_scoring_and_dfs_read_the_head_in_chunks(small_tasks):
    """Teacher-forced scores over long answers and the DFS's forwards over many branches never run the head on
    more than a chunk, and agree with each other (a DFS completion's log p is its teacher-forced score)."""
    codec = GridCodec.builtin()
    model = qwen2(seed=1)
    task = small_tasks[0]
    view = make_views(task, 1, seed=0)[0]
    prompt = codec.encode_prompt(view.pairs(task.train), view.grid(task.test[0].input)).ids
    guess = codec.encode_answer(view.grid(task.train[0].output))
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, inputs, _out: seen.append(int(np.prod(inputs[0].shape[:-1]))))
    (found,) = dfs(model, [prompt], codec, min_prob=1e-4, max_new_tokens=3).completions
    assert found and max(seen) <= CHUNK_ROWS and sum(seen) > CHUNK_ROWS
    seen.clear()
    (scores,), _ = answer_logps(model, [prompt], [[found[0].ids, guess]], reuse_prompts=False)
    assert max(seen) <= CHUNK_ROWS
    assert scores[0] == pytest.approx(found[0].logp, abs=1e-4)


def test_length_grouped_batches_partition_and_cut_padding(small_tasks, train_cfg):
    codec = GridCodec.builtin()
    samples, _ = build_samples(codec, small_tasks, dataclasses.replace(train_cfg, epochs=4))
    lengths = [len(s.ids) for s in samples]
    batches = length_grouped_batches(lengths, 4, seed=0, window=4)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    assert all(1 <= len(b) <= 4 for b in batches)
    assert batches == length_grouped_batches(lengths, 4, seed=0, window=4)
    assert batches != length_grouped_batches(lengths, 4, seed=1, window=4)

    def padding(bs: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in bs) - sum(lengths)

    shuffled = random_batches(len(samples), 4, seed=0)
    assert sorted(i for b in shuffled for i in b) == list(range(len(samples)))
    assert padding(batches) < padding(shuffled) / 3
    # One window over the whole fold: the sorted lengths leave almost nothing to pad.
    assert padding(length_grouped_batches(lengths, 4, seed=0)) < padding(shuffled) / 10
