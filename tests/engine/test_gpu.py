"""GPU only (skipped without CUDA): 4-bit and 8-bit loads of a random-weight Llama through bitsandbytes, a LoRA on
top, one training step. Run on a CUDA machine with `pip install .[gpu]`: pytest -m gpu."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from arcfold.config import ModelConfig
from arcfold.engine.lora import attach_lora
from arcfold.engine.model import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, hf_model_dir) -> Path:
    """A random Llama wide enough for bitsandbytes' blocks (hidden 128), with the hf fixture's tokenizer."""
    directory = tmp_path_factory.mktemp("llama_gpu")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_model_dir / name, directory / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("shrink", [False, True])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_takes_a_lora_and_one_training_step(llama_dir, lora_cfg, bits, shrink):
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(
        kind="hf", path=str(llama_dir), device="cuda", dtype="bfloat16", quantization=bits, shrink_vocab=shrink
    )
    loaded = load_model(cfg, max_len={"train.max_len": 2048, "inference.max_len": 2048})
    assert getattr(loaded.model, f"is_loaded_in_{bits}") and loaded.device.type == "cuda"
    model = attach_lora(loaded.model, lora_cfg)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    before = {n: p.detach().clone() for n, p in adapter.items()}
    codec = loaded.codec
    ids = torch.tensor(
        [
            [
                codec.ids["input"],
                *[codec.ids[d] for d in "0120"],
                codec.ids["row"],
                codec.ids["output"],
                codec.ids["3"],
                codec.ids["row"],
                codec.eos_id,
            ]
        ],
        device=loaded.device,
    )
    optimizer = torch.optim.AdamW(adapter.values(), lr=1e-2)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in adapter.items())  # the step moved the adapter
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == loaded.model.get_output_embeddings().weight.shape[0]
    assert torch.isfinite(logits).all()


def test_a_plain_cuda_load_matches_the_cpu_load(llama_dir):
    cpu = load_model(ModelConfig(kind="hf", path=str(llama_dir), device="cpu", dtype="float32"))
    gpu = load_model(ModelConfig(kind="hf", path=str(llama_dir), device="cuda", dtype="float32"))
    assert gpu.device.type == "cuda" and {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    ids = torch.tensor([[2, 6, 9, 10, 8, 7, 11, 3]])
    with torch.no_grad():
        expected = cpu.model(input_ids=ids).logits
        got = gpu.model(input_ids=ids.to(gpu.device)).logits.cpu()
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("kernel", ["torch", "liger"])
def test_bf16_autocast_loss_with_checkpointing_matches_fp32(kernel, small_tasks, train_cfg):
    """On the card: the chunked head (or Liger's fused kernel) under bf16 autocast, with gradient checkpointing,
    gives the fp32 loss of the models' own path to bf16 precision, and finite LoRA gradients."""
    if kernel == "liger":
        pytest.importorskip("liger_kernel")
    from arcfold.config import LoraConfig
    from arcfold.data import GridCodec
    from arcfold.engine.logits import causal_lm_loss, hidden_states
    from arcfold.engine.train import build_samples, collate

    codec = GridCodec.builtin()
    samples, _ = build_samples(codec, small_tasks, train_cfg)
    batch = {k: v.cuda() for k, v in collate(samples[:2], codec.pad_id).items()}
    config = transformers.Qwen2Config(
        vocab_size=151_936,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = attach_lora(transformers.Qwen2ForCausalLM(config).cuda(), LoraConfig(rank=8))
    model.train()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = hidden_states(model, batch["input_ids"], None, None, batch["attention_mask"])
        loss = causal_lm_loss(model, hidden, batch["labels"], kernel)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=2e-2)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("shrink", [False, True])
def test_the_4bit_path_computes_in_bf16_on_the_card(llama_dir, lora_cfg, shrink):
    """On the card as on the CPU (tests/engine/test_qlora.py): after k-bit preparation the weights that are not
    quantised, the residual stream and the KV cache are bf16; the LoRA's weights fp32; peft's bitsandbytes layers."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from transformers import DynamicCache

    from arcfold.engine.logits import hidden_states

    cfg = ModelConfig(
        kind="hf", path=str(llama_dir), device="cuda", dtype="bfloat16", quantization="4bit", shrink_vocab=shrink
    )
    loaded = load_model(cfg, max_len={"train.max_len": 2048})
    model = attach_lora(loaded.model, lora_cfg)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear4bit) and isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    for name, p in model.named_parameters():
        if p.is_floating_point():
            assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), (name, p.dtype)
    codec, cache = loaded.codec, DynamicCache()
    ids = torch.tensor([[codec.ids["input"], *[codec.ids[d] for d in "0120"], codec.eos_id]], device=loaded.device)
    with torch.no_grad():
        hidden = hidden_states(model, ids, cache, keep=None)
    assert hidden.dtype == torch.bfloat16
    assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 for layer in cache.layers)
