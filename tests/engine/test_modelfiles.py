"""Model files load safely or not at all: safetensors by default, pickle weights only with model.allow_pickle, a
model folder's own code never run, and a weights, config or tokenizer file that cannot load named in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from arcfold.data.errors import ArcDataError
from arcfold.engine.model import load_model
from arcfold.engine.modelfiles import check_safetensors, weights_to_load


class Payload:
    """Unpickling this creates `marker`: what a hostile pickle could do (anything the process may)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def model_dir(tmp_path: Path, source: Path, weights: bool = True) -> Path:
    """A copy of `source` (a saved model), its weights left out on request."""
    target = tmp_path / "model"
    target.mkdir()
    for f in source.iterdir():
        if weights or f.suffix != ".safetensors":
            shutil.copy(f, target / f.name)
    return target


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.isprintable() and len(text) < 600, text
    return text


def test_a_saved_model_loads_from_safetensors(hf_model_dir, hf_cfg):
    assert weights_to_load(hf_model_dir, allow_pickle=False) is True
    assert load_model(hf_cfg).model.num_parameters() > 0


@pytest.mark.parametrize("kind", ["hf", "tiny"])
def test_pickle_only_weights_are_refused_naming_the_file_and_the_switch_and_never_unpickled(
    tmp_path, hf_model_dir, make_tiny_cfg, kind
):
    marker = tmp_path / "PWNED"
    if kind == "hf":
        path = model_dir(tmp_path, hf_model_dir, weights=False)
    else:  # a tiny model directory as stage=pretrain saves it
        tiny = load_model(make_tiny_cfg()).model
        tiny.save_pretrained(tmp_path / "saved")
        path = model_dir(tmp_path, tmp_path / "saved", weights=False)
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path / "pytorch_model.bin")
    base = dataclasses.replace(make_tiny_cfg(), kind=kind, path=str(path), dtype="float32")
    with pytest.raises(ArcDataError) as err:
        load_model(base)
    text = one_line(err)
    assert str(path / "pytorch_model.bin") in text and "model.allow_pickle=true" in text and "pickle" in text
    # Allowed, the pickle is read with torch's weights_only loader: the payload is refused, in one line, and never runs
    with pytest.raises(ArcDataError) as err:
        load_model(dataclasses.replace(base, allow_pickle=True))
    assert str(path) in one_line(err)
    assert not marker.exists()


def test_allow_pickle_loads_plain_pickled_weights(tmp_path, hf_model_dir, hf_cfg):
    path = model_dir(tmp_path, hf_model_dir, weights=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    torch.save(reference.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ArcDataError, match="model.allow_pickle"):
        load_model(dataclasses.replace(hf_cfg, path=str(path)))
    loaded = load_model(dataclasses.replace(hf_cfg, path=str(path), allow_pickle=True))
    ids = torch.tensor([[2, 6, 9, 10]])
    assert torch.equal(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_config_naming_pickle_weights_is_refused(tmp_path, hf_model_dir, hf_cfg):
    """transformers reads config.json's transformers_weights before anything else, use_safetensors or not."""
    path = model_dir(tmp_path, hf_model_dir)
    torch.save({}, path / "pytorch_model.bin")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "transformers_weights": "pytorch_model.bin"}))
    with pytest.raises(ArcDataError, match="transformers_weights") as err:
        load_model(dataclasses.replace(hf_cfg, path=str(path)))
    assert str(path / "config.json") in one_line(err)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda b: b[: len(b) // 2], "cut short"),
        (lambda b: b + b"\0" * 16, "padded"),
        (lambda b: b[:8] + b"{garbage" + b[16:], "header is not JSON"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header length"),
        (lambda b: b"", "0 bytes"),
    ],
)
def test_a_damaged_safetensors_file_is_refused_naming_it(tmp_path, hf_model_dir, hf_cfg, damage, problem):
    path = model_dir(tmp_path, hf_model_dir)
    weights = path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ArcDataError, match=problem) as err:
        load_model(dataclasses.replace(hf_cfg, path=str(path)))
    assert one_line(err).startswith(f"{weights}: model.path: not a whole safetensors file")


def test_a_sharded_index_may_name_only_shards_beside_it(tmp_path, hf_model_dir):
    path = model_dir(tmp_path, hf_model_dir, weights=False)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(ArcDataError, match="not a safetensors file beside it"):
        weights_to_load(path, allow_pickle=False)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(ArcDataError, match="model-1.safetensors: model.path: missing"):
        weights_to_load(path, allow_pickle=False)


def test_check_safetensors_takes_what_safetensors_writes(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5), "b": torch.ones(2, dtype=torch.int8)}, tmp_path / "w.safetensors")
    check_safetensors(tmp_path / "w.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    check_safetensors(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_a_config_or_tokenizer_file_that_does_not_parse_is_named(tmp_path, hf_model_dir, hf_cfg, name):
    path = model_dir(tmp_path, hf_model_dir)
    (path / name).write_text('{"truncated": ')
    with pytest.raises(ArcDataError, match="not valid JSON") as err:
        load_model(dataclasses.replace(hf_cfg, path=str(path)))
    assert one_line(err).startswith(str(path / name))


@pytest.mark.parametrize("model_type", ["llama", "arcfold_custom"])
def test_a_model_folders_own_code_never_runs(tmp_path, hf_model_dir, hf_cfg, model_type):
    """config.json's auto_map points at the folder's custom.py, which would leave a marker: with a known model_type
    the standard class loads, with an unknown one the load is refused in one line; the code runs in neither."""
    path = model_dir(tmp_path, hf_model_dir)
    marker = tmp_path / "RAN"
    (path / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'arcfold_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((path / "config.json").read_text())
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (path / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": auto_map}))
    cfg = dataclasses.replace(hf_cfg, path=str(path))
    assert cfg.trust_remote_code is False  # the default
    if model_type == "llama":
        assert type(load_model(cfg).model) is transformers.LlamaForCausalLM
    else:
        with pytest.raises(ArcDataError, match="custom code") as err:
            load_model(cfg)
        one_line(err)
    assert not marker.exists()
