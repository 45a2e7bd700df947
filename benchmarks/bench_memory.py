"""Peak memory of training and scoring with a real-size vocabulary, before and after engine.logits.

Each case runs in a fresh subprocess and reports its peak RSS (ru_maxrss) and the RSS once the model is built, so
the table shows what the work itself added. The model: a random-weight Qwen2 shape with Qwen2's 151,936-token
vocabulary and a small hidden size (64, 2 layers; embeddings tied as in Qwen2-0.5B), so the vocabulary, not the
layers, decides the memory, as it does for a real model's logits. "before" runs the same cases against the
code of BASELINE_REV (extracted with `git archive` into a temporary folder), "after" against this checkout.

Cases (the grids are random; the codec is the built-in one, whose 16 ids are valid rows of the big vocabulary):
  train N      one fold of train_fold at batch 1 on one task whose training sequence is about N tokens
               (8 augmented views = 8 optimiser steps; the peak is one step's)
  score        score_candidates: 4 candidates x 8 views on a task with a ~3k-token prompt and 20x20 answers
  nll          answer_nll of that task's true output under 8 views
  dfs          the DFS over that prompt's 8 D8 views (8 prompts of one length), each view's search forced down
               one 421-token chain (the true answer's length: a forward hook on the head adds CHAIN_BIAS to one
               output token's logit, so at min_prob 0.5 one branch per view survives each depth; the random
               model alone is flat and would prune everything at the first step). After: the batched search
               (engine.dfs, batch_size 8: one 8-row prefill, then 420 forwards of 8 rows x 1 token in one cache);
               before: the one-row search of that revision, view after view (no guess), the same chain

    .venv/bin/python benchmarks/bench_memory.py                 # every case, before and after (~5 min)
    .venv/bin/python benchmarks/bench_memory.py --cases train:2048 score --sides after
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "806a7e3"  # the last commit before engine.logits: the head over every position
VOCAB = 151_936
CASES = ("train:2048", "train:4096", "train:8192", "score", "nll", "dfs")
CHAIN_BIAS = 30.0  # logit added to one output token: ~e^-30 for every other child, so one chain per view


def force_chain(model, codec, bias: float = CHAIN_BIAS):
    """A forward hook on the model's head that adds `bias` to the codec's first non-eos output token's logit, so a
    thresholded search (min_prob 0.5) on a flat random model follows one chain of that token per prompt until its
    max_new_tokens. Returns the hook's handle (`.remove()` undoes it)."""
    import torch

    if hasattr(model, "get_base_model"):  # a PeftModel: its transformers model
        model = model.get_base_model()
    head = model.get_output_embeddings()
    extra = torch.zeros(head.weight.shape[0], device=head.weight.device, dtype=head.weight.dtype)
    extra[[t for t in codec.output_tokens if t != codec.eos_id][0]] = bias
    return head.register_forward_hook(lambda _m, _i, out: out + extra.to(out.dtype))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_task(pairs: int, side: int, seed: int):
    import numpy as np

    from arcfold.data.tasks import Pair, Task

    rng = np.random.default_rng(seed)
    grid = lambda: rng.integers(0, 10, (side, side), dtype=np.int8)  # noqa: E731
    return Task(f"random{pairs}x{side}", tuple(Pair(grid(), grid()) for _ in range(pairs)), (Pair(grid(), grid()),))


def train_task(tokens: int):
    """A task whose training sequence (all demonstrations) is about `tokens` long: 30x30-ish pairs."""
    side = 30
    per_pair = 2 + 2 * side * (side + 1) + 1
    pairs = max(2, round(tokens / per_pair))
    side = int(((tokens / pairs - 3) / 2) ** 0.5)  # fine-tune the side so pairs x pair tokens ~ tokens
    return random_task(pairs, side, seed=tokens)


def model():
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).float().eval()


def run_case(case: str) -> dict:
    import numpy as np
    import torch

    from arcfold.config import InferenceConfig, LoraConfig, TrainConfig
    from arcfold.data import GridCodec, make_views
    from arcfold.engine.candidates import Candidate
    from arcfold.engine.lora import attach_lora

    torch.set_num_threads(2)
    codec = GridCodec.builtin()
    peft_model = attach_lora(model(), LoraConfig(rank=8))
    ready = rss_mb()
    start = time.perf_counter()
    tokens = 0
    extra: dict = {}
    if case.startswith("train"):
        from arcfold.engine.train import train_fold

        task = train_task(int(case.split(":")[1]))
        cfg = TrainConfig(epochs=1, batch_size=1, max_len=16384, lr=1e-4, mixed_precision="no")
        stats = train_fold(peft_model, codec, [task], cfg, progress=False)
        tokens = stats.tokens // max(stats.samples, 1)
    else:
        task = random_task(3, 20, seed=1)
        views = make_views(task, 1, seed=0)
        if case == "score":
            from arcfold.engine.scoring import score_candidates

            rng = np.random.default_rng(2)
            cands = [Candidate(rng.integers(0, 10, (20, 20), dtype=np.int8)) for _ in range(4)]
            score_candidates(peft_model, codec, task, 0, cands, views, InferenceConfig().max_len)
        elif case == "nll":
            from arcfold.engine.scoring import answer_nll

            answer_nll(peft_model, codec, task, 0, views, InferenceConfig().max_len)
        elif case == "dfs":
            import inspect

            from arcfold.engine.dfs import dfs

            prompts = [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views]
            chain = len(codec.encode_answer(views[0].grid(task.test[0].output)))  # 421 tokens
            hook = force_chain(peft_model, codec)
            if "prompts" in inspect.signature(dfs).parameters:  # the batched search
                searched = dfs(peft_model, prompts, codec, 0.5, chain, batch_size=len(prompts))
                passes = searched.stats.forward_passes
            else:  # a revision before it: one prompt at a time
                passes = sum(dfs(peft_model, prompt, codec, 0.5, chain)[1].forward_passes for prompt in prompts)
            hook.remove()
            extra["forwards"] = passes
        tokens = len(codec.encode_prompt(views[0].pairs(task.train), views[0].grid(task.test[0].input)).ids)
    return {
        "case": case,
        "tokens": tokens,
        "model_mb": ready,
        "peak_mb": peak_mb(),
        "seconds": time.perf_counter() - start,
        **extra,
    }


def child(case: str, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, __file__, "--child", case], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"case": case, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--sides", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"after": ROOT / "src"}
        if "before" in args.sides:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline_rev, "src"], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            srcs["before"] = Path(tmp) / "src"
        rows = {(case, side): child(case, srcs[side]) for case in args.cases for side in args.sides}
    print(f"peak RSS per case (MiB), Qwen2 shape, vocab {VOCAB}, hidden 64; before = {args.baseline_rev}")
    print(
        f"{'case':<12} {'tokens':>7} "
        + " ".join(f"{s + ' peak':>12} {s + ' work':>12} {s + ' s':>8}" for s in args.sides)
        + ("  after/before: peak  work" if len(args.sides) == 2 else "")
    )
    for case in args.cases:
        line = f"{case:<12} "
        cells = [rows[(case, side)] for side in args.sides]
        line += f"{next((c['tokens'] for c in cells if 'tokens' in c), 0):>7} "
        for c in cells:
            if "error" in c:
                line += f"{'error: ' + c['error'][:30]:>34} "
            else:
                line += f"{c['peak_mb']:>12.0f} {c['peak_mb'] - c['model_mb']:>12.0f} {c['seconds']:>8.1f} "
        if len(cells) == 2 and all("error" not in c for c in cells):
            before, after = cells
            work = (after["peak_mb"] - after["model_mb"]) / max(before["peak_mb"] - before["model_mb"], 1e-9)
            line += f"  {after['peak_mb'] / before['peak_mb']:>18.3f} {work:>5.3f}"
        print(line)
    print("work = peak RSS minus RSS with the model built (what the case itself added)")
    for (case, side), cell in rows.items():
        if "forwards" in cell:
            print(f"{case} {side}: {cell['forwards']} forwards (prefills included)")


if __name__ == "__main__":
    main()
