"""QLoRA on the CPU, through the path a real run takes: a random Llama saved to disk, loaded by load_model with
model.quantization=4bit (bitsandbytes' CPU backend: nf4, double quantisation, bf16 compute), with and without
model.shrink_vocab; a LoRA by attach_lora; training by train_fold, the DFS and augmentation scoring by
predict_task, the true output's NLL by answer_nll.

Every test also checks the path itself (check_qlora): the decoder's linear layers are bitsandbytes' 4-bit layers
wrapped by peft's bitsandbytes LoRA layers, and every weight that is not quantised is still in the compute dtype
(bf16) while the LoRA weights are fp32, and the 4-bit layers were prepared for training. So each test goes red if the
model is not quantised, if k-bit preparation is skipped, or if it leaves peft's fp32 upcast in place.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from arcfold.config import InferenceConfig, ModelConfig, ScoringConfig
from arcfold.data import make_views
from arcfold.engine.candidates import Candidate
from arcfold.engine.dfs import dfs
from arcfold.engine.lora import attach_lora
from arcfold.engine.model import load_model
from arcfold.engine.predict import generation_prompt, predict_task
from arcfold.engine.scoring import answer_nll, score_candidates
from arcfold.engine.teacher_forcing import answer_logps
from arcfold.engine.train import train_fold

bnb = pytest.importorskip("bitsandbytes")
lora_bnb = pytest.importorskip("peft.tuners.lora.bnb")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LEN = {"train.max_len": 2048, "inference.max_len": 2048}


@pytest.fixture(scope="module")
def qlora_dir(tmp_path_factory, hf_model_dir) -> Path:
    """A random Llama with an untied head and 64 embedding rows (more than the tokenizer's 22: the shrink has rows
    to drop), hidden 64 (a multiple of bitsandbytes' 64-weight blocks), the hf fixture's BPE tokenizer."""
    directory = tmp_path_factory.mktemp("qlora")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_model_dir / name, directory / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        initializer_range=64**-0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def qlora_cfg(path: Path, shrink: bool, bits: str = "4bit") -> ModelConfig:
    return ModelConfig(
        kind="hf", path=str(path), device="cpu", dtype="bfloat16", quantization=bits, shrink_vocab=shrink
    )


def check_qlora(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """The layers are bitsandbytes' 4-bit ones under peft's bitsandbytes LoRA; the weights that are not quantised
    are in `dtype`, the LoRA's in fp32."""
    wrapped = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, lora_bnb.Linear4bit)}
    assert set(wrapped) == set(PROJECTIONS), sorted(wrapped)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            assert isinstance(m, lora_bnb.Linear4bit), (name, type(m))
            assert isinstance(m.base_layer, bnb.nn.Linear4bit) and m.base_layer.weight.dtype == torch.uint8, name
            # prepared for training (engine.kbit.prepare): no repacking into bitsandbytes' backward-less CPU kernel
            assert not getattr(m.base_layer, "support_avx512bf16_for_cpu", False), name
    check_dtypes(model, dtype)


def check_dtypes(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Every weight that is not quantised in `dtype` and frozen, the LoRA's in fp32."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, (name, p.dtype)
        elif p.is_floating_point():  # embeddings, norms, head
            assert p.dtype == dtype and not p.requires_grad, (name, p.dtype)


@pytest.fixture(scope="module", params=[False, True], ids=["full_vocab", "shrink_vocab"])
def qlora(request, qlora_dir):
    """A 4-bit base with a LoRA, shared by the module's tests of one vocabulary (attach_lora changes it in place;
    each test that trains resets the adapter first)."""
    loaded = load_model(qlora_cfg(qlora_dir, request.param), max_len=MAX_LEN)
    return loaded, attach_lora(loaded.model, _lora())


def _lora():
    from arcfold.config import LoraConfig

    return LoraConfig(rank=8, alpha=16, init_seed=0)


def test_a_4bit_load_gives_bitsandbytes_layers_frozen_in_the_compute_dtype(qlora_dir):
    loaded = load_model(qlora_cfg(qlora_dir, shrink=False), max_len=MAX_LEN)
    model = loaded.model
    assert model.is_loaded_in_4bit and loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS}
    assert len(layers) == 2 * len(PROJECTIONS)
    assert all(type(m) is bnb.nn.Linear4bit and m.compute_dtype == torch.bfloat16 for m in layers.values())
    assert type(model.lm_head) is torch.nn.Linear  # the head is never quantised
    # k-bit preparation froze the base: nothing of it trains before a LoRA is attached
    assert not any(p.requires_grad for p in model.parameters())
    floating = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert floating and set(floating.values()) == {torch.bfloat16}, floating


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_lora_on_a_quantized_base_trains_on_the_cpu(qlora_dir, bits, small_tasks, train_cfg):
    """Both bitsandbytes modes load on the CPU; the LoRA on them trains (its weights move, the loss is finite)."""
    loaded = load_model(qlora_cfg(qlora_dir, shrink=True, bits=bits), max_len=MAX_LEN)
    assert getattr(loaded.model, f"is_loaded_in_{bits}")
    model = attach_lora(loaded.model, _lora())
    layer = {"4bit": (lora_bnb.Linear4bit, bnb.nn.Linear4bit), "8bit": (lora_bnb.Linear8bitLt, bnb.nn.Linear8bitLt)}
    wrapper, base = layer[bits]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, wrapper) and isinstance(q_proj.base_layer, base)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = train_fold(model, loaded.codec, small_tasks[:1], train_cfg, progress=False)
    assert stats.steps == 8 and all(math.isfinite(x) for x in stats.losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    check_qlora(model) if bits == "4bit" else check_dtypes(model)


def test_training_through_the_4bit_path_lowers_the_true_outputs_nll(qlora, small_tasks, train_cfg):
    loaded, model = qlora
    task = small_tasks[0]
    views = make_views(task, 1, seed=1)
    before = answer_nll(model, loaded.codec, task, 0, views, 2048)
    cfg = dataclasses.replace(train_cfg, epochs=2, lr=1e-2)
    stats = train_fold(model, loaded.codec, [task], cfg, progress=False)
    after = answer_nll(model, loaded.codec, task, 0, views, 2048)
    assert stats.steps == 16 and all(math.isfinite(x) for x in stats.losses)
    assert after < before - 0.05, (before, after)
    check_qlora(model)


def test_the_dfs_and_scoring_on_the_4bit_path_agree_with_teacher_forcing(qlora, small_tasks):
    """The DFS's completions carry the log p that teacher forcing (the scoring's engine) gives the same tokens, and
    augmentation scoring gives the true output the summed log p that answer_nll averages."""
    loaded, model = qlora
    task, codec = small_tasks[0], loaded.codec
    views = make_views(task, 1, seed=0)[:2]
    prompt = generation_prompt(codec, task, 0, views[0], 2048).ids
    searched = dfs(model, [prompt], codec, min_prob=0.002, max_new_tokens=4)
    (completions,), stats = searched.completions, searched.stats
    assert completions and stats.forward_passes > 1
    (logps,), _ = answer_logps(model, [prompt], [[c.ids for c in completions]])
    for c, lp in zip(completions, logps):
        assert c.logp == pytest.approx(lp, abs=0.05 * max(1.0, abs(lp))), c.ids

    truth = task.test[0].output
    candidates = [Candidate(truth), Candidate(np.where(truth == truth.flat[0], (truth.flat[0] + 1) % 10, truth))]
    stats = score_candidates(model, codec, task, 0, candidates, views, 2048)
    assert stats["scoring_candidates"] == 2.0 and all(math.isfinite(x) for c in candidates for x in c.scores.values())
    for v, view in enumerate(views):
        tokens = len(codec.encode_answer(view.grid(truth)))
        nll = answer_nll(model, codec, task, 0, [view], 2048)
        assert candidates[0].scores[v] == pytest.approx(-nll * tokens, rel=2e-2)

    cfg = InferenceConfig(strategy="dfs", n=1, min_prob=0.002, max_len=2048, scoring=ScoringConfig(views=2))
    (pred,) = predict_task(model, codec, task, cfg, views=views, indices=[0])  # the run's own entry point
    assert pred.stats["n_completions"] >= 1 and pred.stats["forward_tokens"] > 0
    check_qlora(model)


def test_the_nll_matches_the_models_own_forward_on_the_4bit_path(qlora, small_tasks):
    """answer_nll (backbone, head at the answer's positions only) against the model's own full forward."""
    loaded, model = qlora
    task, codec = small_tasks[0], loaded.codec
    view = make_views(task, 1, seed=3)[0]
    nll = answer_nll(model, codec, task, 0, [view], 2048)
    answer = codec.encode_answer(view.grid(task.test[0].output))
    prompt = codec.encode_prompt(view.pairs(task.train), view.grid(task.test[0].input), reserve=len(answer)).ids
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    expected = -logps.gather(-1, torch.tensor(answer)[:, None]).mean().item()
    assert nll == pytest.approx(expected, rel=2e-2)
    check_qlora(model)


def test_hidden_states_and_the_kv_cache_are_in_the_compute_dtype(qlora):
    from transformers import DynamicCache

    from arcfold.engine.logits import hidden_states

    loaded, model = qlora
    ids = torch.tensor([[loaded.codec.ids["input"], *[loaded.codec.ids[d] for d in "0120"], loaded.codec.eos_id]])
    cache = DynamicCache()
    seen: list[torch.dtype] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype))
        for layer in model.base_model.model.model.layers
    ]
    try:
        with torch.no_grad():
            hidden = hidden_states(model, ids, cache, keep=None)
    finally:
        for hook in hooks:
            hook.remove()
    assert hidden.dtype == torch.bfloat16
    assert seen == [torch.bfloat16] * len(model.base_model.model.model.layers)  # each layer's residual stream
    assert cache.get_seq_length() == ids.shape[1]
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == torch.bfloat16


def test_inference_before_training_leaves_the_gradients_alone(qlora_dir, small_tasks, train_cfg):
    """A worker predicts a fold, then trains the next: the gradients after an inference pass are those before it.
    (On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval-mode forward for a kernel
    without a backward; engine.kbit.prepare turns that off, or the LoRAs below the top layer get no gradient.)"""
    from arcfold.engine.train import build_samples, collate

    loaded = load_model(qlora_cfg(qlora_dir, shrink=True), max_len=MAX_LEN)
    model = attach_lora(loaded.model, _lora())
    with torch.no_grad():  # lora_B starts at zero: give it weights, so every LoRA has a gradient to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    samples, _ = build_samples(loaded.codec, small_tasks[:1], train_cfg)
    batch = collate(samples[:1], loaded.codec.pad_id)

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    before = gradients()
    answer_nll(model, loaded.codec, small_tasks[0], 0, make_views(small_tasks[0], 1, seed=0)[:1], 2048)
    after = gradients()
    assert len(before) == sum(p.requires_grad for p in model.parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    check_qlora(model)
