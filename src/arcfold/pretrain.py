"""stage=pretrain: a tiny model trained from scratch on generated tasks, saved as a directory `model=...` loads.

The same training as a fold's TTT (engine.train: D8 + colour views, loss on output tokens only, length-grouped
batches), on every parameter instead of a LoRA, over `data`'s tasks with every solved pair as a demonstration.
Every `pretrain.eval_every` steps the model is scored on held-out tasks of the same families (another seed) and
saved, so a stopped pretraining keeps its last evaluated model. The directory gets a card (README.md) and the
learning curve (curve.csv); MLflow gets the same numbers as metrics.

    python -m arcfold experiment=pretrain            # (make pretrain) the shipped model's recipe
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from arcfold.data import GridCodec, Task
from arcfold.data.sources import load_tasks
from arcfold.data.synthetic import generate
from arcfold.engine.generate import eval_mode
from arcfold.engine.logits import column_logps, hidden_states
from arcfold.engine.model import load_model
from arcfold.engine.train import train_fold
from arcfold.report.plots import learning_curve
from arcfold.run.tracker import Tracker

log = logging.getLogger(__name__)


def heldout_scores(model: torch.nn.Module, codec: GridCodec, tasks: Sequence[Task]) -> dict[str, float]:
    """Per-token NLL of each task's first test output given its demonstrations, and the share of tasks whose
    output is, at every token under teacher forcing, the argmax among the grid tokens (codec.output_tokens, all
    that greedy decoding may pick): exactly the tasks greedy decoding solves."""
    device = next(model.parameters()).device
    allowed = codec.output_tokens
    column = {token: i for i, token in enumerate(allowed)}  # an answer holds grid tokens only
    nll, solved, by_family = [], [], defaultdict(list)
    with eval_mode(model):
        for task in tasks:
            test = task.test[0]
            assert test.output is not None
            answer = codec.encode_answer(test.output)
            ids = codec.encode_prompt(task.train, test.input, reserve=len(answer)).ids + answer
            hidden = hidden_states(model, torch.tensor([ids], device=device), None, keep=len(answer) + 1)[0, :-1]
            logps = column_logps(model, hidden, torch.tensor(allowed, device=device))  # full softmax, grid columns
            target = torch.tensor([column[t] for t in answer], device=device)
            nll.append(-logps.gather(-1, target[:, None]).mean().item())
            solved.append(float(bool((logps.argmax(-1) == target).all())))  # as engine.generate: grid tokens only
            by_family[task.id.split("-")[0]].append(solved[-1])
    scores = {"heldout_nll": sum(nll) / len(nll), "heldout_solved": sum(solved) / len(solved)}
    scores.update({f"heldout_solved/{f}": sum(v) / len(v) for f, v in sorted(by_family.items())})
    return scores


def run(cfg: Any, run_dir: Path, tracker: Tracker) -> dict[str, float]:
    start = time.perf_counter()
    out = Path(cfg.pretrain.out or run_dir / "model")
    tasks, _ = load_tasks(cfg.data)
    corpus = [Task(t.id, t.train + t.test, ()) for t in tasks]  # every solved pair is a demonstration
    data = cfg.data
    held_out = generate(list(data.families), cfg.pretrain.eval_count, cfg.pretrain.eval_seed, list(data.sides))
    if cfg.pretrain.eval_seed == data.seed:
        log.warning("pretrain.eval_seed equals data.seed: the held-out tasks are training tasks")
    loaded = load_model(cfg.model, "plain", {"train.max_len": cfg.train.max_len})
    model, codec = loaded.model, loaded.codec
    model.requires_grad_(True)
    log.info("pretraining %.2fM parameters on %d tasks -> %s", model.num_parameters() / 1e6, len(corpus), out)
    curve: list[dict[str, float]] = []
    window: list[float] = []

    def evaluate(step: int) -> None:
        scores = heldout_scores(model, codec, held_out)
        row = {"step": step, "minutes": (time.perf_counter() - start) / 60, "train_loss": _mean(window), **scores}
        curve.append(row)
        window.clear()
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        log.info(
            "step %d (%.1f min): train loss %.3f, held-out nll %.3f, greedy solves %.0f%%",
            step,
            row["minutes"],
            row["train_loss"],
            row["heldout_nll"],
            100 * row["heldout_solved"],
        )
        save(model, out, curve)

    def on_step(step: int, steps: int, loss: float) -> None:
        window.append(loss)
        if step % 20 == 0:
            tracker.log_metrics({"loss": loss}, step=step)
        if step % cfg.pretrain.eval_every == 0:
            evaluate(step)

    evaluate(0)
    minutes = cfg.pretrain.minutes
    stats = train_fold(
        model,
        codec,
        corpus,
        cfg.train,
        progress=sys.stderr.isatty(),
        max_seconds=minutes * 60 if minutes else None,
        on_step=on_step,
    )
    if curve[-1]["step"] != stats.steps:
        evaluate(stats.steps)
    summary = {
        "pretrain_steps": float(stats.steps),
        "pretrain_planned_steps": float(stats.planned_steps),
        "pretrain_minutes": (time.perf_counter() - start) / 60,
        "pretrain_tokens_per_second": stats.tokens_per_second,
        "pretrain_samples": float(stats.samples),
        **{k: v for k, v in curve[-1].items() if k.startswith("heldout")},
    }
    # The held-out scores are already the curve's last point; logged again without a step they would land at step 0
    tracker.log_metrics({k: v for k, v in summary.items() if not k.startswith("heldout")})
    learning_curve(curve, out / "curve.png")
    write_card(out, cfg, curve, summary)
    for name in ("README.md", "curve.csv", "curve.png"):
        tracker.log_artifact(out / name)
    return summary


def save(model: torch.nn.Module, out: Path, curve: list[dict[str, float]]) -> None:
    """The model directory (config.json + safetensors, fp32) and its learning curve so far."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # type: ignore[operator]
    keys = list(dict.fromkeys(k for row in curve for k in row))
    with open(out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(curve)


def write_card(out: Path, cfg: Any, curve: list[dict[str, float]], summary: dict[str, float]) -> None:
    """README.md beside the weights: how it was made (command, seed, data, time) and how it learnt."""
    data, model, train = cfg.data, cfg.model, cfg.train
    command = "python -m arcfold " + " ".join(sys.argv[1:])
    rows = "\n".join(
        f"| {int(r['step'])} | {r['minutes']:.1f} | {r['train_loss']:.3f} | {r['heldout_nll']:.3f} | "
        f"{100 * r['heldout_solved']:.0f}% |"
        for r in curve
    )
    families = "\n".join(
        f"| {key.split('/')[1]} | {100 * value:.0f}% |" for key, value in summary.items() if key.count("/") == 1
    )
    card = f"""# arcfold tiny ARC model

A {model.num_layers}-layer Llama-style model (hidden {model.hidden_size}, {model.num_heads} heads, MLP
{model.intermediate_size}) with arcfold's 16-token vocabulary (format=plain), trained from scratch by
`stage=pretrain` (src/arcfold/pretrain.py). Load it with `model=shipped` (this folder) or
`model.kind=tiny model.path=DIR`.

- Command: `{command}` (reproduce: `make pretrain`)
- Data: {data.count} generated tasks (`data=synthetic`, seed {data.seed}, families {", ".join(data.families)},
  sides {list(data.sides)}); every demonstration and test pair trained on, {8 * train.epochs} augmented views
  (D8 x colours {train.colours}) per task, loss on output tokens only
- Schedule: lr {train.lr} {train.scheduler}, warmup {train.warmup_steps or train.warmup_ratio}, batch
  {train.batch_size}, weight decay {train.weight_decay}, seed {train.seed}; {int(summary["pretrain_steps"])} of
  {int(summary["pretrain_planned_steps"])} planned steps
- Time: {summary["pretrain_minutes"]:.1f} minutes, {summary["pretrain_tokens_per_second"]:.0f} tokens/s on
  {torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}), torch {torch.__version__}

## Learning curve

![learning curve](curve.png)

Held out: {cfg.pretrain.eval_count} generated tasks of the same families from seed {cfg.pretrain.eval_seed}.
NLL: per output token of the first test output. Greedy solves: the share whose output is, at every token, the
most likely grid token (exactly what greedy decoding gets right, without TTT).

| step | minutes | train loss (since last row) | held-out NLL | greedy solves |
|---|---|---|---|---|
{rows}

Greedy solves by family at the end (no TTT):

| family | solved |
|---|---|
{families}

Scores with TTT on held-out tasks: `python -m arcfold -m experiment=testbed variant=...` (README, "The testbed").
"""
    (out / "README.md").write_text(card)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


__all__ = ["heldout_scores", "run", "save", "write_card"]
