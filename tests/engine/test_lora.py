from __future__ import annotations

import peft
import pytest
import torch

from arcfold.config import LoraConfig
from arcfold.data import ArcDataError
from arcfold.engine.lora import AdapterReset, attach_lora, load_adapter_weights, save_adapter, trainable_parameters
from arcfold.engine.model import load_model


def _adapter(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def test_attach_targets_every_projection_and_counts(tiny_loaded, lora_cfg):
    # Expected count from the base layers themselves: r * (in + out) per targeted linear layer.
    targets = set(lora_cfg.target_modules)
    expected = sum(
        lora_cfg.rank * (m.in_features + m.out_features)
        for name, m in tiny_loaded.model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    assert isinstance(pm, peft.PeftModel)
    assert expected > 0 and trainable_parameters(pm) == expected
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert layers == targets
    lora = pm.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.use_rslora) == (8, 16, True)


def test_lora_init_is_seeded(make_tiny_cfg, lora_cfg):
    state = torch.get_rng_state()
    a = _adapter(attach_lora(load_model(make_tiny_cfg()).model, lora_cfg))
    b = _adapter(attach_lora(load_model(make_tiny_cfg()).model, lora_cfg))
    other = LoraConfig(rank=lora_cfg.rank, alpha=lora_cfg.alpha, init_seed=lora_cfg.init_seed + 1)
    c = _adapter(attach_lora(load_model(make_tiny_cfg()).model, other))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_target_modules_list_what_exists(tiny_loaded):
    cfg = LoraConfig(target_modules=["q_proj", "c_attn", "query_key_value"])
    with pytest.raises(ArcDataError, match="lora.target_modules") as err:
        attach_lora(tiny_loaded.model, cfg)
    message = str(err.value)
    assert "c_attn" in message and "query_key_value" in message  # what was asked and is missing
    assert "down_proj" in message and "q_proj" in message  # what the model has


def test_all_linear_shorthand(tiny_loaded):
    pm = attach_lora(tiny_loaded.model, LoraConfig(rank=4, target_modules=["all-linear"]))
    assert trainable_parameters(pm) > 0


def test_reset_restores_initial_adapter_in_place(tiny_loaded, lora_cfg):
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    initial = _adapter(pm)
    reset = AdapterReset(pm)
    params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    pointers = {n: p.data_ptr() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    reset.reset(pm)
    assert all(torch.equal(params[n], initial[n]) for n in initial)
    # In place: the same parameters over the same storage, so whatever holds them stays valid.
    assert all(p is q for p, q in zip(params.values(), (p for n, p in pm.named_parameters() if "lora_" in n)))
    assert all(params[n].data_ptr() == pointers[n] for n in params)


def test_save_adapter_round_trips(tiny_loaded, lora_cfg, make_tiny_cfg, tmp_path):
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # non-zero B, so the saved adapter actually changes the model
    out = save_adapter(pm, tmp_path / "adapter", torch.float32)
    assert (out / "adapter_config.json").is_file()
    restored = peft.PeftModel.from_pretrained(load_model(make_tiny_cfg()).model, out)
    a, b = _adapter(pm), _adapter(restored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_adapter_weights_restores_a_saved_adapter_in_place(tiny_loaded, lora_cfg, tmp_path):
    pm = attach_lora(tiny_loaded.model, lora_cfg)
    reset = AdapterReset(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()  # as if trained
    trained = _adapter(pm)
    save_adapter(pm, tmp_path / "adapter", torch.float32)
    reset.reset(pm)
    tensors = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert not all(torch.equal(trained[k], tensors[k]) for k in trained)
    load_adapter_weights(pm, tmp_path / "adapter")  # what a resumed run does instead of training again
    assert all(torch.equal(trained[k], tensors[k]) for k in trained)
    assert all(p is tensors[n] for n, p in pm.named_parameters() if "lora_" in n)  # the same tensors, in place
