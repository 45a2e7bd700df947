"""One GPU check, at most 8 minutes on one card: the GPU-marked tests, then training and inference throughput and
memory with random-weight models of real shapes, printed as one table.

    make gpu-check                                   # = python benchmarks/gpu_check.py (installs nothing)
    sh gpu-bundle/install-and-check.sh               # an offline box: install `make gpu-bundle`'s wheels, then this
    python benchmarks/gpu_check.py --skip-tests      # the table only
    python benchmarks/gpu_check.py --device cpu --small --skip-tests   # a smoke run of this script on a CPU

Every case goes the way a user's run goes: a random-weight model of the shape is saved to disk (safetensors, with a
byte-level BPE tokenizer of the grid symbols), loaded by arcfold.engine.model.load_model (model=hf: k-bit
quantisation and preparation included), given a LoRA by attach_lora, trained by train_fold and decoded through
the engine's hidden_states / head_logits. Cases:
  qwen2-0.5b  Qwen2-0.5B's shape (hidden 896, 24 layers, vocab 151,936, tied), bf16, LoRA r 16 on every projection,
              one fold of train_fold at batch 1 on a task whose training sequence is ~4k and ~8k tokens, with
              gradient checkpointing off and on
  8b-4bit     Llama-3.1-8B's shape (hidden 4096, 32 layers, vocab 128,256), model.quantization=4bit (nf4, double
              quantisation, bf16 compute), LoRA r 16, ~4k tokens, gradient checkpointing on (the QLoRA setting)
For each: training tokens/s (sequence tokens / train_fold seconds), model FLOPs utilisation, peak GPU memory
(torch.cuda.max_memory_allocated during the measured fold), and two inference rates at batch 1, each timed on its
own: the prefill (the test prompt in one forward, tokens/s) and then the decode (one token per forward over the
prompt's KV cache, greedy, 64 steps, tokens/s).

Then the DFS's decode, two ways, on the test prompt under the task's 8 D8 views (8 prompts of one length):
  dfs 1-row    tests/engine/one_row_dfs.py (the search arcfold ran before the batched one): view after view, one
               KV cache of batch 1, one forward per node of the search tree
  dfs batched  engine.dfs as a run calls it: the 8 views prefilled into one cache and searched breadth-wise,
               batch_size 8, one forward per depth feeding every open branch of every view
A random model is flat (every token about 1/vocab), so a DFS would prune everything at its first step. For these
two columns only, a forward hook on the head adds DFS_BIAS (30) to one output token's logit (the codec's first
non-eos output token; bench_memory.force_chain), so each view's search is one fixed chain: at min_prob 0.5 it
keeps exactly that child at every depth (probability ~1; every other child, eos included, is ~e^-30 and pruned)
until max_new_tokens (DFS_NEW = 33) leaves no room for an eos: 32 decode forwards per view (1-row: 8 x 32
forwards of 1 token; batched: 32 forwards of 8 rows x 1 token). Both paths run their whole search (tree mask or
cache crop, log-probs over the full softmax, children, pruning); a narrow tree is what a confident model's search
mostly is. Tokens/s = decode tokens (stats.forward_tokens minus the prefill's) / decode seconds (the search's
seconds minus its prefill's, timed on its own: prefill(model, [prompt]) per view for the 1-row path, the same
forward its first step runs; dfs(..., max_new_tokens=0), which prefills and stops, for the batched one). Both
after a warm-up search of 4 tokens; the hook is removed afterwards.

MFU counting (FLOPS_FORMULA, printed with the table): a LoRA step's useful work is, per sequence of T tokens,
  linear layers   4 * N_linear * T       2 FLOPs per weight per token forward, 2 backward (input gradients through
                                         the frozen base; the LoRA weights' own gradients are negligible)
  head            4 * N_head * L         the head runs at the L labelled positions only (engine.logits)
  attention       6 * layers * d_q * T^2 scores (Q K^T) and their use (P V): 2 * T^2 * d_q FLOPs per layer forward
                                         over the causal half of the T x T matrix (d_q = query heads * head dim),
                                         x 3 for forward and backward (both operands are activations)
Gradient checkpointing's recomputation is not counted (MFU counts the model's work, not the schedule's). Peak: the
card's dense bf16 tensor FLOP/s (PEAKS, matched on the device's name: H100 SXM / PCIe / NVL, H200, A100, L40S,
L40, L4, T4 (fp16: it has no bf16)); --peak-tflops overrides it, and an unknown card gets no MFU without it.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a plain checkout too (the GPU machine has no editable install)

from bench_memory import force_chain, train_task  # noqa: E402  (benchmarks/ is the script's own folder)

FLOPS_FORMULA = "train FLOPs = 4*N_linear*T + 4*N_head*L_labelled + 6*layers*d_q*T^2 (causal attention) per sequence"
# Dense bf16 tensor TFLOP/s (no sparsity), matched in order against the upper-cased device name.
PEAKS = [
    (("H100", "PCIE"), 756.0, "H100 PCIe"),
    (("H100", "NVL"), 835.0, "H100 NVL"),
    (("H100",), 989.0, "H100 SXM"),
    (("H200",), 989.0, "H200"),
    (("A100",), 312.0, "A100"),
    (("L40S",), 362.0, "L40S"),
    (("L40",), 181.0, "L40"),
    (("L4",), 121.0, "L4"),
    (("T4",), 65.0, "T4 (fp16)"),
]
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
SPECIALS = ["<|pad|>", "<|start|>", "<|end|>"]
DECODE_STEPS = 64
DFS_VIEWS = 8  # the test prompt under the 8 D8 views
DFS_NEW = 33  # max_new_tokens: 32 decode forwards per view on the forced chain
DFS_BIAS = 30.0  # added to one output token's logit, so the flat random model's search is one chain per view
DFS_MIN_PROB = 0.5


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """The card's dense bf16 peak and the row of PEAKS that gave it; (None, "unknown") for another card."""
    name = device_name.upper()
    for keys, tflops, label in PEAKS:
        if all(k in name for k in keys):
            return tflops, label
    return None, "unknown"


def save_random_model(shape: str, directory: Path, device, dtype) -> Path:
    """A random-weight model of `shape` and a byte-level BPE tokenizer (every byte one token, newline written `Ċ`, as
    in Qwen's and Llama 3's tokenizers, so Qwen2's own tokenizer class reads it alike), saved as a model directory."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if (directory / "config.json").is_file():
        return directory
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"pad_token": SPECIALS[0], "bos_token": SPECIALS[1], "eos_token": SPECIALS[2]})
    values = dict(SHAPES[shape])
    config = transformers.AutoConfig.for_model(
        values.pop("model_type"),
        max_position_embeddings=16384,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **values,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast; then written out and dropped
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return directory


def counts(model) -> tuple[int, int, int, int]:
    """(decoder linear-layer weights, head weights, layers, d_q = query heads x head dim); a 4-bit layer counts its
    logical weights (bitsandbytes' Linear4bit is an nn.Linear with in/out features)."""
    import torch

    linear = sum(
        m.in_features * m.out_features for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)
    )
    head = model.get_output_embeddings().weight
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return linear, head.shape[0] * head.shape[1], config.num_hidden_layers, config.num_attention_heads * head_dim


def train_flops(lengths: list[int], labelled: int, linear: int, head: int, layers: int, d_q: int) -> tuple[int, int]:
    """FLOPS_FORMULA over the fold's sequences: (all, the attention part)."""
    attention = sum(6 * layers * d_q * t * t for t in lengths)
    return 4 * linear * sum(lengths) + 4 * head * labelled + attention, attention


def inference_rates(model, prompt: list[int], device, steps: int = DECODE_STEPS) -> tuple[float, float]:
    """Prefill tokens/s (the prompt in one forward) and then decode tokens/s (`steps` greedy steps of one token
    each over the prompt's cache), each timed on its own at batch 1."""
    import torch
    from transformers import DynamicCache

    from arcfold.engine.generate import eval_mode
    from arcfold.engine.logits import head_logits, hidden_states

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with eval_mode(model), torch.inference_mode():
        cache = DynamicCache()
        ids = torch.tensor([prompt], device=device)
        sync()
        start = time.perf_counter()
        hidden = hidden_states(model, ids, cache)
        sync()
        prefill = len(prompt) / (time.perf_counter() - start)
        token = head_logits(model, hidden[:, -1]).argmax(-1, keepdim=True)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            hidden = hidden_states(model, token, cache)
            token = head_logits(model, hidden[:, -1]).argmax(-1, keepdim=True)
        sync()
        decode = steps / (time.perf_counter() - start)
    return prefill, decode


def dfs_rates(model, codec, prompts: list[list[int]], device, max_new: int = DFS_NEW) -> dict:
    """Decode tokens/s of the one-row DFS (prompt after prompt) and of the batched DFS (all prompts in one cache),
    prefill excluded (module docstring); one output token's logit raised by DFS_BIAS while it runs."""
    import torch

    from arcfold.engine.dfs import dfs
    from arcfold.engine.generate import eval_mode
    from arcfold.engine.prompt_cache import prefill

    sys.path.insert(0, str(ROOT / "tests" / "engine"))
    from one_row_dfs import one_row_dfs  # the tests' reference, not part of the package

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    hook = force_chain(model, codec, DFS_BIAS)
    try:
        with eval_mode(model), torch.inference_mode():
            for prompt in prompts[:2]:  # warm-up: first-call kernels and allocations, both paths
                one_row_dfs(model, prompt, codec, DFS_MIN_PROB, 4)
            dfs(model, prompts, codec, DFS_MIN_PROB, 4, batch_size=len(prompts))

            one_prefill = one_search = 0.0
            one_tokens = one_passes = 0
            for prompt in prompts:
                sync()
                start = time.perf_counter()
                prefill(model, [prompt])
                sync()
                one_prefill += time.perf_counter() - start
                start = time.perf_counter()
                _, stats = one_row_dfs(model, prompt, codec, DFS_MIN_PROB, max_new)
                sync()
                one_search += time.perf_counter() - start
                one_tokens += stats.forward_tokens - len(prompt)  # its first forward is the prompt's
                one_passes += stats.forward_passes - 1

            sync()
            start = time.perf_counter()
            prefilled = dfs(model, prompts, codec, DFS_MIN_PROB, 0, batch_size=len(prompts))
            sync()
            batched_prefill = time.perf_counter() - start
            start = time.perf_counter()
            searched = dfs(model, prompts, codec, DFS_MIN_PROB, max_new, batch_size=len(prompts))
            sync()
            batched_search = time.perf_counter() - start
    finally:
        hook.remove()
    batched_tokens = searched.stats.forward_tokens - prefilled.stats.forward_tokens
    batched_passes = searched.stats.forward_passes - prefilled.stats.forward_passes
    if one_tokens <= 0 or batched_tokens <= 0:
        raise RuntimeError(f"the DFS decoded nothing (1-row {one_tokens}, batched {batched_tokens} tokens)")
    return {
        "dfs_views": len(prompts),
        "dfs_1row_tokens": one_tokens,
        "dfs_1row_passes": one_passes,
        "dfs_1row_tok_s": one_tokens / max(one_search - one_prefill, 1e-9),
        "dfs_batched_tokens": batched_tokens,
        "dfs_batched_passes": batched_passes,
        "dfs_batched_tok_s": batched_tokens / max(batched_search - batched_prefill, 1e-9),
    }


def measure(name: str, shape: str, tokens: int, checkpointing: bool, bits: str, args, workdir: Path) -> dict:
    import torch

    from arcfold.config import LoraConfig, ModelConfig, TrainConfig
    from arcfold.data import make_views
    from arcfold.data.codec import IGNORE
    from arcfold.engine.lora import attach_lora
    from arcfold.engine.model import load_model
    from arcfold.engine.train import build_samples, make_accelerator, train_fold

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
    path = save_random_model(shape, workdir / shape, device, dtype)
    cfg = ModelConfig(
        kind="hf",
        path=str(path),
        device=args.device,
        dtype="bfloat16" if cuda else "float32",
        quantization=bits,
        attn_implementation="sdpa",
    )
    loaded = load_model(cfg, max_len={"train.max_len": 16384})  # the path a run takes: model=hf, model.*
    linear, head, layers, d_q = counts(loaded.model)
    peft_model = attach_lora(loaded.model, LoraConfig(rank=16, alpha=16))
    codec = loaded.codec
    task = train_task(tokens)
    train = TrainConfig(
        epochs=1,
        batch_size=1,
        max_len=16384,
        lr=1e-4,
        gradient_checkpointing=checkpointing,
        mixed_precision="bf16" if cuda else "no",
    )
    samples, _ = build_samples(codec, [task], train)
    lengths = [len(s.ids) for s in samples]
    labelled = sum(sum(label != IGNORE for label in s.labels[1:]) for s in samples)
    accelerator = make_accelerator(train, device)
    train_fold(peft_model, codec, [task], train, accelerator, progress=False)  # warm-up fold
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stats = train_fold(peft_model, codec, [task], train, accelerator, progress=False)
    if cuda:
        torch.cuda.synchronize()
    flops, attention = train_flops(lengths, labelled, linear, head, layers, d_q)
    peak = args.peak_tflops
    mfu = flops / stats.seconds / (peak * 1e12) if peak else float("nan")
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")

    views = make_views(task, 1, seed=0)[:DFS_VIEWS]
    prompts = [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views]
    prompt = prompts[0]
    inference_rates(peft_model, prompt[:256], device, steps=4)  # warm-up: first-call kernels and allocations
    prefill, decode = inference_rates(peft_model, prompt, device)
    try:
        searches = dfs_rates(peft_model, codec, prompts, device)
    except Exception as err:  # the DFS columns failing must not hide the training numbers
        searches = {"dfs_error": f"{type(err).__name__}: {str(err)[:100]}"}
        print(f"{name}: dfs columns failed: {searches['dfs_error']}", flush=True)
    del peft_model, loaded
    gc.collect()
    return {
        "case": name,
        "tokens": stats.tokens // max(stats.samples, 1),
        "train_tok_s": stats.tokens / stats.seconds,
        "mfu": mfu,
        "attention_share": attention / flops,
        "peak_gb": peak_gb,
        "prompt": len(prompt),
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        **searches,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes and lengths (a CPU smoke run of this script)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: PEAKS)")
    ap.add_argument("--workdir", default=None, help="where the random models are written (default: a temp dir)")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu --small for a smoke run)")
    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    if args.peak_tflops is None and card != "cpu":
        args.peak_tflops, label = peak_tflops(card)
        source = f"{label}, dense bf16" if args.peak_tflops else "unknown card: pass --peak-tflops for an MFU"
    else:
        source = "--peak-tflops" if args.peak_tflops else "no peak on a CPU"
    if not args.skip_tests:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        code = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "engine")], env=env
        ).returncode
        print(f"GPU-marked tests: {'passed' if code == 0 else f'FAILED (exit {code})'}")
    if args.small:
        cases = [
            ("small 512", "small", 512, False, "none"),
            ("small 512 ckpt", "small", 512, True, "none"),
            ("small 4-bit 512 ckpt", "small", 512, True, "4bit"),
        ]
    else:
        cases = [
            ("qwen2-0.5b 4k", "qwen2-0.5b", 4096, False, "none"),
            ("qwen2-0.5b 8k", "qwen2-0.5b", 8192, False, "none"),
            ("qwen2-0.5b 8k ckpt", "qwen2-0.5b", 8192, True, "none"),
        ]
        if not args.skip_8b:
            cases.append(("8b 4-bit 4k ckpt", "8b", 4096, True, "4bit"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.workdir) as workdir:
        for case in cases:
            try:
                rows.append(measure(*case, args, Path(workdir)))
            except Exception as err:  # one case's failure (out of memory, a missing package) must not hide the rest
                rows.append({"case": case[0], "error": f"{type(err).__name__}: {str(err)[:100]}"})
            print(rows[-1], flush=True)
    print(f"\n{card}, torch {torch.__version__}; peak {args.peak_tflops or float('nan'):g} TFLOPS ({source})")
    print(f"MFU: {FLOPS_FORMULA}; checkpointing's recomputation not counted")
    print(
        f"{'case':<22} {'tokens':>7} {'train tok/s':>12} {'MFU':>6} {'attn':>5} {'peak GB':>8} {'prompt':>7} "
        f"{'prefill tok/s':>14} {'decode tok/s':>13} {'dfs 1-row tok/s':>16} {'dfs batched tok/s':>18}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<22} {r['error']}")
            continue
        print(
            f"{r['case']:<22} {r['tokens']:>7} {r['train_tok_s']:>12.0f} {r['mfu']:>6.1%} {r['attention_share']:>5.0%} "
            f"{r['peak_gb']:>8.1f} {r['prompt']:>7} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} "
            f"{r.get('dfs_1row_tok_s', float('nan')):>16.1f} {r.get('dfs_batched_tok_s', float('nan')):>18.1f}"
        )
    print("attn: attention's share of the counted FLOPs; decode: batch 1, one token per forward, after the prefill")
    print(
        f"dfs: decode tokens/s after the prefill, the test prompt under {DFS_VIEWS} D8 views, a forced chain of "
        f"{DFS_NEW - 1} steps per view (1-row: view after view; batched: {DFS_VIEWS} rows per forward)"
    )


if __name__ == "__main__":
    main()
