from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch
import transformers

from arcfold.checks import ConfigError
from arcfold.config import ModelConfig
from arcfold.data import ArcDataError, GridCodec
from arcfold.engine.model import load_model, resolve_device, resolve_dtype


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_is_seeded_and_leaves_global_rng_alone(make_tiny_cfg):
    state = torch.get_rng_state()
    a, b = load_model(make_tiny_cfg(init_seed=3)), load_model(make_tiny_cfg(init_seed=3))
    assert torch.equal(torch.get_rng_state(), state)  # seeding the init did not move the caller's stream
    assert _same_weights(a.model, b.model)
    assert not _same_weights(a.model, load_model(make_tiny_cfg(init_seed=4)).model)


def test_tiny_matches_builtin_codec(tiny_loaded):
    codec = GridCodec.builtin()
    model = tiny_loaded.model
    assert tiny_loaded.codec == codec and tiny_loaded.tokenizer is None and tiny_loaded.name == "tiny"
    assert model.config.vocab_size == codec.vocab_size == model.get_input_embeddings().num_embeddings
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (
        codec.eos_id,
        codec.pad_id,
        codec.ids["bos"],
    )
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert not model.training
    assert tiny_loaded.device == torch.device("cpu") and tiny_loaded.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_dtype_is_applied(make_tiny_cfg):
    loaded = load_model(make_tiny_cfg(dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_hf_model_and_codec_follow_the_tokenizer(hf_cfg, hf_vocab):
    loaded = load_model(hf_cfg)
    tok = loaded.tokenizer
    assert loaded.name == hf_cfg.path and not loaded.model.training
    for symbol, text in {"input": "I", "output": "O", "row": "\n", **{d: d for d in "0123456789"}}.items():
        assert loaded.codec.ids[symbol] == hf_vocab.index(text) == tok.convert_tokens_to_ids(text)
    assert (loaded.codec.eos_id, loaded.codec.pad_id) == (tok.eos_token_id, tok.pad_token_id)
    # The tokenizer merges "00", yet the codec still gives one token per cell.
    assert len(tok.encode("00", add_special_tokens=False)) == 1
    assert loaded.codec.encode_grid(np.zeros((1, 2), dtype=np.int8)) == [hf_vocab.index("0")] * 2 + [
        hf_vocab.index("\n")
    ]
    # The loaded weights are the saved ones: a forward pass gives finite logits over the model's vocabulary.
    ids = torch.tensor([[tok.bos_token_id, loaded.codec.ids["input"], loaded.codec.ids["0"]]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, 3, 32) and torch.isfinite(logits).all()


@pytest.mark.parametrize("path", [None, "does/not/exist"])
def test_hf_missing_path_is_one_line_error(path):
    # No path is a config error, a path that is not there a bad input: one line either way.
    with pytest.raises(ConfigError if path is None else ArcDataError, match="model.path") as err:
        load_model(ModelConfig(kind="hf", path=path, device="cpu"))
    assert "\n" not in str(err.value)
    if path:
        assert path in str(err.value) and "no such model directory" in str(err.value)


def test_hf_non_model_dir_is_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ArcDataError, match="model.path") as err:
        load_model(ModelConfig(kind="hf", path=str(tmp_path), device="cpu"))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_hf_broken_model_dir_is_one_line_error(tmp_path, hf_model_dir):
    # A config.json but no weights: the HF loader's own error is cut to one line.
    (tmp_path / "config.json").write_text((hf_model_dir / "config.json").read_text())
    with pytest.raises(ArcDataError, match="model.path") as err:
        load_model(ModelConfig(kind="hf", path=str(tmp_path), device="cpu"))
    assert "\n" not in str(err.value)


def test_unknown_kind():
    with pytest.raises(ConfigError, match="model.kind"):
        load_model(ModelConfig(kind="gguf", device="cpu"))


def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="model.device"):
        resolve_device("tpu:banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_an_error():
    with pytest.raises(ConfigError, match="model.device"):
        resolve_device("cuda")


def _dir_without_weights(tmp_path, hf_model_dir, **config_changes):
    """The fixture's config and tokenizer beside a corrupt weights file: any attempt to read weights fails."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((hf_model_dir / name).read_text())
    config = json.loads((hf_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **config_changes}))
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    return str(tmp_path)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_without_bitsandbytes_is_refused_before_loading(tmp_path, hf_model_dir, monkeypatch, bits):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: `import` raises
    path = _dir_without_weights(tmp_path, hf_model_dir)
    with pytest.raises(ConfigError, match="model.quantization") as err:
        load_model(ModelConfig(kind="hf", path=path, device="cpu", quantization=bits))
    assert "bitsandbytes" in str(err.value) and bits in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_on_a_device_without_a_backend_is_refused(tmp_path, hf_model_dir, monkeypatch, bits):
    fake = types.ModuleType("bitsandbytes")  # an install whose backends leave out the CPU
    fake.__dict__.update(__version__="0.0-test", supported_torch_devices={"cuda"})
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    path = _dir_without_weights(tmp_path, hf_model_dir)
    with pytest.raises(ConfigError, match="model.quantization") as err:
        load_model(ModelConfig(kind="hf", path=path, device="cpu", quantization=bits))
    assert "no backend for cpu" in str(err.value) and "cuda" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.quantization"):  # the tiny model has nothing to quantize
        load_model(ModelConfig(kind="tiny", device="cpu", quantization=bits))


def test_the_corrupt_weights_directory_does_fail_when_read(tmp_path, hf_model_dir):
    """The refusals above prove something only if reading this directory's weights fails."""
    with pytest.raises(ArcDataError, match="model.path"):
        load_model(ModelConfig(kind="hf", path=_dir_without_weights(tmp_path, hf_model_dir), device="cpu"))


@pytest.mark.parametrize("device_map", [None, "auto", "cpu", "{'': cpu}", "{model: cpu, lm_head: cpu}"])
def test_a_device_map_load_gives_the_plain_loads_logits(hf_cfg, hf_model_dir, device_map):
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    loaded = load_model(dataclasses.replace(hf_cfg, device_map=device_map))
    assert loaded.device == torch.device("cpu")
    ids = torch.tensor([[2, 6, 9, 10, 8, 7, 11, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_device_map_load_lands_in_the_configured_dtype(hf_cfg):
    loaded = load_model(dataclasses.replace(hf_cfg, dtype="bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("device_map", ["{model: cpu", "[0, 1]"])
def test_a_bad_device_map_is_one_line(hf_cfg, device_map):
    with pytest.raises(ConfigError, match="model.device_map") as err:
        load_model(dataclasses.replace(hf_cfg, device_map=device_map))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["train.max_len", "inference.max_len"])
def test_a_max_len_past_the_hf_models_context_is_refused_before_loading(tmp_path, hf_model_dir, key):
    path = _dir_without_weights(tmp_path, hf_model_dir, max_position_embeddings=1000)
    max_len = {"train.max_len": 1000, "inference.max_len": 1000, key: 1001}
    with pytest.raises(ConfigError, match=key) as err:
        load_model(ModelConfig(kind="hf", path=path, device="cpu"), max_len=max_len)
    message = str(err.value)
    assert f"{key}: 1001 exceeds" in message and "max_position_embeddings=1000" in message and "\n" not in message


def test_a_max_len_within_the_context_loads(hf_cfg, make_tiny_cfg):
    assert load_model(hf_cfg, max_len={"train.max_len": 2048, "inference.max_len": 2048}).model is not None
    assert load_model(make_tiny_cfg(max_position_embeddings=512), max_len={"train.max_len": 512}).model is not None


@pytest.mark.parametrize("key", ["train.max_len", "inference.max_len"])
def test_a_max_len_past_the_tiny_models_context_is_refused(make_tiny_cfg, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_model(make_tiny_cfg(max_position_embeddings=512), max_len={key: 600})
    assert f"{key}: 600 exceeds" in str(err.value) and "model.max_position_embeddings=512" in str(err.value)
