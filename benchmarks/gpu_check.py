"""One GPU check, at most 8 minutes on one card: the GPU-marked tests, then training and inference throughput and
memory with random-weight models of real shapes, printed as one table.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --skip-tests      # the table only
    python benchmarks/gpu_check.py --device cpu --small --skip-tests   # a smoke run of this script on a CPU

Cases (random weights, so nothing is downloaded; the grids are random, the codec the built-in one, whose 16 ids
are valid rows of every vocabulary here):
  qwen2-0.5b  Qwen2-0.5B's shape (hidden 896, 24 layers, vocab 151,936, tied), bf16, LoRA r 16 on every projection,
              one fold of train_fold at batch 1 on a task whose training sequence is ~4k and ~8k tokens, with
              gradient checkpointing off and on
  8b-4bit     Llama-3.1-8B's shape (hidden 4096, 32 layers, vocab 128,256), every decoder linear layer in 4-bit NF4
              (bitsandbytes), LoRA r 16, ~4k tokens, gradient checkpointing on (the QLoRA setting)
For each: training tokens/s (sequence tokens / train_fold seconds), model FLOPs utilisation, peak GPU memory
(torch.cuda.max_memory_allocated), and inference rates: the DFS's prefill (prompt + a guess in one pass) and its
step-by-step extension (one token per forward over the cache), in tokens/s.

MFU counting: a LoRA step's useful work is 2 FLOPs per weight per token forward and 2 backward (the input
gradients through the frozen base; the LoRA weights' own gradients are negligible), so 4 x (decoder linear-layer
parameters x sequence tokens + head parameters x labelled tokens): the head runs at labelled positions only.
Attention's score FLOPs and the recomputation of gradient checkpointing are not counted. Peak: dense bf16 tensor
FLOP/s of the card (a table below; --peak-tflops overrides).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a plain checkout too (the GPU machine has no editable install)

from bench_memory import train_task  # noqa: E402  (benchmarks/ is the script's own folder)

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "T4": 65.0}
SHAPES = {
    "qwen2-0.5b": dict(
        model_type="qwen2",
        vocab_size=151_936,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        model_type="llama",
        vocab_size=128_256,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        tie_word_embeddings=False,
    ),
    "small": dict(
        model_type="qwen2",
        vocab_size=151_936,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
    ),
}


def build(shape: str, device, dtype, four_bit: bool):
    import torch
    import transformers

    values = dict(SHAPES[shape])
    config = transformers.AutoConfig.for_model(values.pop("model_type"), max_position_embeddings=16384, **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if four_bit:
        quantize_4bit(model, dtype)
    return model.eval()


def quantize_4bit(model, compute_dtype) -> None:
    """Every linear layer of the decoder in NF4, quantised in place (bitsandbytes quantises on the move to the
    GPU): a random model needs no checkpoint on disk, and the head stays in bf16 as in QLoRA."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.get_decoder().modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4").cuda()
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
    torch.cuda.empty_cache()


def linear_params(model) -> tuple[int, int]:
    """(decoder linear-layer parameters, head parameters); a 4-bit layer counts its logical weights."""
    import torch

    layers = sum(
        m.in_features * m.out_features for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)
    )
    head = model.get_output_embeddings().weight
    return layers, head.shape[0] * head.shape[1]


def measure(name: str, shape: str, tokens: int, checkpointing: bool, four_bit: bool, args) -> dict:
    import torch

    from arcfold.config import LoraConfig, TrainConfig
    from arcfold.data import GridCodec, make_views
    from arcfold.data.codec import IGNORE
    from arcfold.engine.dfs import dfs
    from arcfold.engine.generate import greedy
    from arcfold.engine.lora import attach_lora
    from arcfold.engine.train import build_samples, make_accelerator, train_fold

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, device, dtype, four_bit)
    layer_params, head_params = linear_params(model)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = attach_lora(model, LoraConfig(rank=16, alpha=16))
    codec = GridCodec.builtin()
    task = train_task(tokens)
    cfg = TrainConfig(
        epochs=1,
        batch_size=1,
        max_len=16384,
        lr=1e-4,
        gradient_checkpointing=checkpointing,
        mixed_precision="bf16" if cuda else "no",
    )
    samples, _ = build_samples(codec, [task], cfg)
    labelled = sum(sum(label != IGNORE for label in s.labels[1:]) for s in samples)
    train_fold(peft_model, codec, [task], cfg, make_accelerator(cfg, device), progress=False)  # warm-up fold
    if cuda:
        torch.cuda.synchronize()
    stats = train_fold(peft_model, codec, [task], cfg, make_accelerator(cfg, device), progress=False)
    if cuda:
        torch.cuda.synchronize()
    flops = 4 * (layer_params * stats.tokens + head_params * labelled)
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(device)), None
    )
    mfu = flops / stats.seconds / (peak * 1e12) if peak else float("nan")

    view = make_views(task, 1, seed=0)[0]
    prompt = codec.encode_prompt(view.pairs(task.train), view.grid(task.test[0].input)).ids
    guess = codec.encode_answer(view.grid(task.test[0].output))
    start = time.perf_counter()
    _, dfs_stats = dfs(peft_model, prompt, codec, 0.5, len(guess), guess=guess, max_candidates=1)
    if cuda:
        torch.cuda.synchronize()
    prefill_rate = dfs_stats.forward_tokens / (time.perf_counter() - start)
    steps = 64
    _, decode_stats = greedy(peft_model, [prompt], codec, steps, batch_size=1)
    decode_rate = (decode_stats.forward_passes - 1) / decode_stats.seconds  # one token per forward after prefill
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    del peft_model, model
    return {
        "case": name,
        "tokens": stats.tokens // max(stats.samples, 1),
        "train_tok_s": stats.tokens / stats.seconds,
        "mfu": mfu,
        "peak_gb": peak_gb,
        "prefill_tok_s": prefill_rate,
        "decode_tok_s": decode_rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes and lengths (a CPU smoke run of this script)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu --small for a smoke run)")
    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    if not args.skip_tests:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        code = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "engine")], env=env
        ).returncode
        print(f"GPU-marked tests: {'passed' if code == 0 else f'FAILED (exit {code})'}")
    if args.small:
        cases = [("small 512", "small", 512, False, False), ("small 512 ckpt", "small", 512, True, False)]
    else:
        cases = [
            ("qwen2-0.5b 4k", "qwen2-0.5b", 4096, False, False),
            ("qwen2-0.5b 8k", "qwen2-0.5b", 8192, False, False),
            ("qwen2-0.5b 8k ckpt", "qwen2-0.5b", 8192, True, False),
        ]
        if not args.skip_8b:
            cases.append(("8b 4-bit 4k ckpt", "8b", 4096, True, True))
    rows = []
    for case in cases:
        try:
            rows.append(measure(*case, args))
        except Exception as err:  # one case's failure (out of memory, a missing package) must not hide the rest
            rows.append({"case": case[0], "error": f"{type(err).__name__}: {str(err)[:80]}"})
        print(rows[-1], flush=True)
    print(f"\n{card}, torch {torch.__version__}")
    print(
        f"{'case':<20} {'tokens':>7} {'train tok/s':>12} {'MFU':>6} {'peak GB':>8} {'DFS prefill tok/s':>18} "
        f"{'DFS step tok/s':>15}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<20} {r['error']}")
            continue
        print(
            f"{r['case']:<20} {r['tokens']:>7} {r['train_tok_s']:>12.0f} {r['mfu']:>6.1%} {r['peak_gb']:>8.1f} "
            f"{r['prefill_tok_s']:>18.0f} {r['decode_tok_s']:>15.1f}"
        )


if __name__ == "__main__":
    main()
