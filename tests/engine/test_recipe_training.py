"""What the winners' recipes train with (issue 19): the input embeddings and the LM head trained along with the LoRA
(lora.train_embeddings: only the format's rows of a vocabulary that is not shrunk, at train.embedding_lr), reset,
saved and restored with the adapter; bitsandbytes' 8-bit AdamW on a CPU; a warmup in steps that fits the fold."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path

import pytest
import torch
import transformers

from arcfold.config import LoraConfig, ModelConfig
from arcfold.engine.logits import base_model
from arcfold.engine.lora import (
    AdapterReset,
    attach_lora,
    load_adapter_weights,
    save_adapter,
    trainable_parameters,
    trained_rows,
)
from arcfold.engine.model import load_model
from arcfold.engine.train import make_optimizer, train_fold, warmup_steps


def embeddings(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the model reads now, through its own layers: the input embedding of every id (V, H) and the head's
    weight (V, H), read off the head applied to the identity."""
    base = base_model(model)
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    rows = base.config.vocab_size
    with torch.no_grad():
        inputs = embed(torch.arange(rows))
        hidden = inputs.shape[-1]
        outputs = head(torch.eye(hidden)).T
    return inputs.clone(), outputs.clone()


@pytest.fixture(scope="module")
def untied_dir(hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hf fixture's model with a head of its own (not tied to the embedding)."""
    directory = tmp_path_factory.mktemp("hf_untied")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir)
    config = model.config
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(hf_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(params=["tied", "untied"])
def hf_loaded(request, hf_model_dir, untied_dir):
    path = hf_model_dir if request.param == "tied" else untied_dir
    return load_model(ModelConfig(kind="hf", path=str(path), device="cpu", dtype="float32"))


def test_only_the_formats_rows_train_and_a_reset_restores_them_bit_for_bit(hf_loaded, small_tasks, train_cfg):
    codec = hf_loaded.codec
    rows = trained_rows(ModelConfig(kind="hf"), codec.token_ids)
    assert rows == sorted(codec.token_ids) and len(rows) < hf_loaded.model.config.vocab_size  # "a", "00", ... stay
    lora = LoraConfig(rank=4, train_embeddings=True)
    plain_count = trainable_parameters(attach_lora(load_model(hf_loaded_cfg(hf_loaded)).model, LoraConfig(rank=4)))
    model = attach_lora(hf_loaded.model, lora, rows)
    hidden = hf_loaded.model.config.hidden_size
    tied = hf_loaded.model.config.tie_word_embeddings
    # The disk estimate (trainable parameters x bytes) counts the trained rows: once if the head is tied, else twice.
    assert trainable_parameters(model) - plain_count == len(rows) * hidden * (1 if tied else 2)
    reset = AdapterReset(model)
    before = embeddings(model)
    stats = train_fold(model, codec, small_tasks[:1], train_cfg, progress=False)
    assert stats.steps > 0
    after = embeddings(model)
    others = [i for i in range(before[0].shape[0]) if i not in rows]
    for old, new in zip(before, after):
        assert not torch.equal(old[rows], new[rows])  # the format's rows trained (input embedding and head)
        assert all((old[i] != new[i]).any() for i in codec.output_tokens)  # each answer token's row moved
        assert torch.equal(old[others], new[others])  # every other row exactly as loaded
    reset.reset(model)
    assert all(torch.equal(a, b) for a, b in zip(before, embeddings(model)))  # bit for bit


def hf_loaded_cfg(loaded) -> ModelConfig:
    return ModelConfig(kind="hf", path=loaded.name, device="cpu", dtype="float32")


def test_trained_rows_are_saved_and_restored_exactly(hf_loaded, small_tasks, train_cfg, tmp_path):
    codec = hf_loaded.codec
    model = attach_lora(hf_loaded.model, LoraConfig(rank=4, train_embeddings=True), sorted(codec.token_ids))
    reset = AdapterReset(model)
    train_fold(model, codec, small_tasks[:1], train_cfg, progress=False)
    trained = embeddings(model)
    save_adapter(model, tmp_path / "adapter", torch.float32)
    reset.reset(model)
    assert not torch.equal(embeddings(model)[0], trained[0])
    load_adapter_weights(model, tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(trained, embeddings(model)))


def test_a_vocabulary_of_the_formats_own_trains_every_row(tiny_loaded, small_tasks, train_cfg):
    # The tiny model's vocabulary is the codec's; a shrunk one holds the format's and the special tokens only.
    assert trained_rows(ModelConfig(kind="tiny"), tiny_loaded.codec.token_ids) is None
    assert trained_rows(ModelConfig(kind="hf", shrink_vocab=True), [3, 4]) is None
    model = attach_lora(tiny_loaded.model, LoraConfig(rank=4, train_embeddings=True))
    before = embeddings(model)
    train_fold(model, tiny_loaded.codec, small_tasks[:1], train_cfg, progress=False)
    used = sorted(set(tiny_loaded.codec.token_ids) - {tiny_loaded.codec.pad_id})  # pad is never an input or a target
    assert all((before[0][i] != embeddings(model)[0][i]).any() for i in used)


def test_embeddings_have_their_own_learning_rate(tiny_loaded, train_cfg):
    model = attach_lora(tiny_loaded.model, LoraConfig(rank=4, train_embeddings=True))
    groups = make_optimizer(model, dataclasses.replace(train_cfg, lr=1e-4, embedding_lr=1e-5)).param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    assert [n for n, p in model.named_parameters() if any(p is q for q in groups[1]["params"])] == [
        n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n
    ]
    same = make_optimizer(model, dataclasses.replace(train_cfg, lr=1e-4, embedding_lr=None)).param_groups
    assert [g["lr"] for g in same] == [1e-4, 1e-4]  # null: train.lr
    plain = attach_lora(load_model(tiny_loaded_cfg()).model, LoraConfig(rank=4))
    assert len(make_optimizer(plain, train_cfg).param_groups) == 1  # without trained embeddings: one group, as before


def tiny_loaded_cfg() -> ModelConfig:
    return ModelConfig(kind="tiny", device="cpu", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_trains_the_tiny_model_on_a_cpu(make_tiny_cfg, small_tasks, train_cfg, name):
    bnb = pytest.importorskip("bitsandbytes")
    # hidden 64 and rank 64: LoRA matrices of 4096 entries, the size from which bitsandbytes keeps 8-bit states
    loaded = load_model(make_tiny_cfg(hidden_size=64, intermediate_size=128))
    model = attach_lora(loaded.model, LoraConfig(rank=64, alpha=16))
    cfg = dataclasses.replace(train_cfg, optimizer=name, epochs=3)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit)
    stats = train_fold(model, loaded.codec, small_tasks[:1], cfg, progress=False)
    first, last = statistics.mean(stats.losses[:5]), statistics.mean(stats.losses[-5:])
    assert stats.steps == 24 and last < first - 0.1, stats.losses
    # Its states are 8-bit: one step of the optimiser the fold used, on the trained weights.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in optimizer.state.values())


def test_a_warmup_in_steps_is_capped_at_its_share_of_the_fold(train_cfg, caplog):
    recipe = dataclasses.replace(train_cfg, warmup_steps=100, warmup_max_share=0.25)
    with caplog.at_level(logging.INFO, logger="arcfold"):
        assert warmup_steps(recipe, 400) == 100  # the ARChitects' own schedule: a quarter, not capped
        assert not caplog.records
        assert warmup_steps(recipe, 120) == 30  # k=8 folds: 100 would be 83% of the fold
    assert [r.getMessage() for r in caplog.records] == [
        "warmup capped at 30 of the fold's 120 steps (train.warmup_steps=100, train.warmup_max_share=0.25)"
    ]
    assert warmup_steps(dataclasses.replace(recipe, warmup_max_share=1.0), 120) == 100  # share 1: no cap
    ratio = dataclasses.replace(train_cfg, warmup_steps=0, warmup_ratio=0.1)
    assert warmup_steps(ratio, 120) == 12 and warmup_steps(ratio, 7) == 1  # a ratio is a share already
