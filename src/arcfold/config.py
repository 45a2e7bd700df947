"""Typed config: one dataclass per group, registered in Hydra's ConfigStore behind the YAML files in conf/.

The YAML files only set values; these schemas give every key its type and default, so a typo or a wrong type
in an override fails at composition time with Hydra's message, before any model is loaded. The schemas are
plain dataclasses that the engine uses as type hints; Hydra is imported only by register(), which the entry
points call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

COLOURS = ("all", "keep_zero", "none")  # colour augmentation: any permutation, keep 0 (background), none


# The allowed values of every choice key: the one list that check() and the code that branches on them use.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": (
        "arc_agi_2_eval",
        "arc_agi_2_train",
        "arc_agi_1_eval",
        "arc_agi_1_train",
        "kaggle",
        "dir",
        "synthetic",
    ),
    "data.order": ("id", "size"),
    "data.on_invalid": ("raise", "skip"),
    "model.kind": ("tiny", "hf"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
    "model.quantization": ("none", "8bit", "4bit"),  # bitsandbytes (CUDA, and the CPU for tests)
    "format.name": ("plain", "architects", "chat"),  # prompt formats (data.formats)
    "split.strategy": ("random", "balanced", "per_task"),
    # transformers schedulers that need no argument beyond warmup and total steps
    "train.scheduler": (
        "cosine",
        "linear",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
    ),
    "train.colours": COLOURS,
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.loss_kernel": ("torch", "liger"),  # the chunked torch head, or Liger's fused kernel (CUDA)
    # torch's AdamW, or bitsandbytes' 8-bit AdamW (its states in 8 bits; on a CPU too) and its paged variant
    "train.optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "inference.strategy": ("greedy", "dfs", "sample"),
    "inference.colours": COLOURS,
    "inference.base_colours": COLOURS,
    "inference.scoring.aggregate": ("sum_logp", "sum_logp_bonus", "mean_prob", "max", "min", "votes", "nvarc"),
    "inference.scoring.views_from": ("generation", "fresh"),
    "inference.scoring.colours": COLOURS,
    "save_adapters": ("none", "last", "all"),
    "on_error": ("auto", "fail", "skip"),  # auto: skip for data=kaggle (a submission), fail elsewhere
    "executor.name": ("local", "ray"),  # where folds run (arcfold.orchestrate)
    "report.progress": ("auto", "bars", "lines", "off"),  # auto: bars on a terminal, log lines elsewhere
    "stage": ("run", "pretrain"),  # a TTT run, or pretraining a tiny model from scratch (arcfold.pretrain)
}


LOSS_KERNELS = CHOICES["train.loss_kernel"]


DEGRADE_STEPS = ("views", "min_prob", "greedy", "placeholders")  # budget.degrade, cheapest cut first


@dataclass
class DataConfig:
    # arc_agi_2_eval | arc_agi_2_train | arc_agi_1_eval | arc_agi_1_train | kaggle | dir | synthetic (generated)
    name: str = "arc_agi_2_eval"
    challenges: Optional[str] = None  # kaggle: the *_challenges.json
    solutions: Optional[str] = None  # kaggle: the *_solutions.json (optional: without it, predict only)
    path: Optional[str] = None  # dir: a folder of one-task-per-file JSONs
    task_ids: list[str] = field(default_factory=list)  # pick these tasks (in this order)
    limit: Optional[int] = None  # keep at most N tasks
    order: str = "id"  # id | size (smallest tasks first: cheap CPU runs)
    on_invalid: str = "raise"  # raise | skip (warn and leave the bad task out)
    # synthetic (data.synthetic): `count` tasks of these families (equal shares), grid sides in [min, max], drawn
    # from `seed` (a fixed seed is a fixed task set: pretraining and held-out sets differ by seed)
    families: list[str] = field(
        default_factory=lambda: ["identity", "colour_map", "geometry", "upscale", "tile", "crop"]
    )
    count: int = 100
    sides: list[int] = field(default_factory=lambda: [3, 7])
    seed: int = 1000


@dataclass
class ModelConfig:
    kind: str = "tiny"  # tiny (the built-in vocabulary) | hf (a local Hugging Face causal LM)
    # hf: directory with config, weights and tokenizer; tiny: a directory `stage=pretrain` saved (None: random
    # weights of the shape below)
    path: Optional[str] = None
    dtype: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | float32 | bfloat16 | float16
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2 (None: transformers' choice)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False  # true runs the model folder's own Python code (auto_map): only code you trust
    # Weights load from safetensors only; true also loads pickle weights (pytorch_model.bin, *.pt) from a model
    # directory that has no safetensors: unpickling can run code, so only for files you trust.
    allow_pickle: bool = False
    # hf only:
    quantization: str = "none"  # none | 8bit | 4bit (bitsandbytes: QLoRA; on a GPU, and on a CPU slowly)
    device_map: Optional[str] = None  # None: all on model.device | auto | "{model: 0, lm_head: 1}" (a string)
    shrink_vocab: bool = False  # keep only the format's tokens and the special tokens (embedding + head rows)
    shrink_vocab_save: Optional[str] = None  # with shrink_vocab: also save the shrunk model + tokenizer here
    # The tiny model's shape (Llama-style) when it starts from random weights; ignored for hf and for a tiny model
    # loaded from `path` (its saved config has its shape).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 8192
    init_seed: int = 0


@dataclass
class FormatConfig:
    name: str = "plain"  # plain (I / O markers) | architects (the ARChitects' text) | chat (the model's chat template)


@dataclass
class SplitConfig:
    strategy: str = "random"  # random (equal sizes) | balanced (equal training tokens) | per_task
    seed: int = 0


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = True
    init_seed: int = 0
    # Also train the input embeddings and the LM head (the ARChitects, NVARC): every row when the vocabulary is the
    # format's own (model.shrink_vocab, the tiny model), else only the rows of the format's tokens (peft's trainable
    # tokens); at train.embedding_lr. Reset, saved and restored with the LoRA weights.
    train_embeddings: bool = False


@dataclass
class AugmentConfig:
    """What TTT trains on (train.augment): each augmentation of the training views on or off. Prediction views are
    inference.*'s and do not change. Off, every view keeps the task's own orientation, colours or demonstration
    order; an epoch is still 8 views per task (the same steps). A flip or turn conjugates a geometry rule and a
    colour permutation conjugates a colour map, so with d8 and colours off the adapter sees one rule, not eight."""

    d8: bool = True  # the 8 flips and turns
    colours: bool = True  # a colour permutation per view, of train.colours's kind
    demo_order: bool = True  # a random demonstration order per view (train.shuffle_demos=false turns it off too)


@dataclass
class TrainConfig:
    epochs: int = 1  # augmented copies: one epoch = 8 D8 views of each task, all in one optimiser pass
    lr: float = 1e-4
    embedding_lr: Optional[float] = None  # with lora.train_embeddings: their learning rate (None: lr)
    optimizer: str = "adamw"  # adamw (torch) | adamw_8bit | paged_adamw_8bit (bitsandbytes)
    scheduler: str = "cosine"  # any transformers scheduler name: cosine | linear | constant_with_warmup | ...
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # > 0 overrides warmup_ratio, up to warmup_max_share of the fold's steps
    # Warmup given in steps is capped at this share of the fold's steps (logged when it is): a recipe's 100 steps
    # sized for 400 would be most of a 120-step fold (k=8) or all of a per-task one.
    warmup_max_share: float = 0.25
    batch_size: int = 1  # per device
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 8192  # longer training sequences drop demonstrations until they fit
    mask_first_output: bool = False
    colours: str = "all"  # colour augmentation: all | keep_zero | none
    shuffle_demos: bool = True
    mixed_precision: str = "auto"  # auto (bf16 where supported) | no | bf16 | fp16
    # Recompute activations in the backward pass (memory for ~30% more time): true | false | auto (on for model.kind=hf,
    # off for the tiny model; decided by the fold worker, logged). Out of memory, a fold retries with it on.
    gradient_checkpointing: Any = "auto"
    group_by_length: bool = True  # batches of similar length (little padding); false: random batches
    loss_kernel: str = "torch"  # torch (chunked head, any device) | liger (fused linear cross-entropy, CUDA)
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # which augmentations TTT trains on


@dataclass
class ScoringConfig:
    views: int = 0  # augmentation scoring under this many views (0: rank by votes, then mean log p)
    aggregate: str = "sum_logp"  # sum_logp | sum_logp_bonus | mean_prob | max | min | votes | nvarc
    # generation: the first `views` generation views, whose prompts the DFS already ran (their KV caches are
    # kept, so scoring runs only the candidates' tokens); fresh: new views from `seed` and `colours`.
    views_from: str = "generation"
    # DFS prompt caches kept for scoring and the answer NLL, per test input, on a CPU (0: keep none); on CUDA the
    # budget is half the free device memory instead.
    cache_mb: float = 1024.0
    colours: str = "all"  # fresh views (and the answer-NLL views)
    seed: int = 1


@dataclass
class InferenceConfig:
    strategy: str = "greedy"  # greedy | dfs | sample
    n: int = 1  # views = 8 * n (D8 x n colour permutations)
    colours: str = "all"
    shuffle_demos: bool = True
    min_prob: float = 0.17  # dfs: keep every completion with probability >= min_prob
    temperature: float = 1.0  # sample
    samples: int = 4  # sample: completions per view
    max_seconds: float = 120.0  # wall-clock cap per test input
    max_candidates: int = 32  # cap on candidates per test input
    max_len: int = 8192  # prompt + answer; longer prompts drop demonstrations
    batch_size: int = 8  # views per forward: decoded together (greedy, sample), or searched in one cache (dfs)
    base_nll: bool = False  # also score the true output's NLL with the base model alone (before/after TTT)
    # attempt 2 = the base model's best answer (adapter off) where it differs from the adapter's best: a hedge
    # against an adapter that learnt its demonstrations, for one more prediction per test input
    base_attempt: bool = False
    base_colours: str = "all"  # the base answer's views' colours (a no-TTT run's default, whatever `colours` says)
    seed: int = 0
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db
    experiment: str = "arcfold"
    run_name: Optional[str] = None  # None: the swept values in a sweep, else the command-line overrides
    system_metrics: bool = True  # CPU, memory, disk, network (and GPU with nvidia-ml-py) as system/* metrics
    system_metrics_interval: float = 10.0  # seconds between samples
    ui_url: Optional[str] = None  # the printed links' UI (None: the uri if http(s), else `make ui`'s address)
    # Where a NEW experiment keeps its artifacts: a directory or an URI (s3://...). None: for a SQLite store, beside
    # its database (<dir of mlflow.db>/mlartifacts/<experiment>); for a tracking server, the server's own store.
    artifacts: Optional[str] = None


@dataclass
class ReportConfig:
    progress: str = "auto"  # auto (bars on a terminal, else log lines) | bars | lines | off
    progress_every: float = 30.0  # lines mode: at most one progress line per this many seconds
    plots: bool = True  # PNG plots in <run dir>/plots, logged with the run
    render_tasks: int = 3  # plots: draw this many solved and this many failed test inputs (ARC palette)


@dataclass
class ExecutorConfig:
    name: str = "local"  # local (this process; a worker process per device when devices > 1) | ray (Ray actors)
    address: Optional[str] = None  # ray: None (a local Ray instance) | auto (`ray start`'s cluster) | ray://HOST:PORT
    threads: Optional[int] = None  # torch threads per worker (None: the cores, or $OMP_NUM_THREADS, split evenly)
    # true: a card may appear more than once in `devices` ([0,0,1,1]: two workers per card, each with its own model),
    # to keep a card busy during the DFS; false: a repeated card is refused
    share_devices: bool = False


@dataclass
class BudgetConfig:
    hours: Optional[float] = None  # the run's deadline (hours and seconds add up; neither: no deadline)
    seconds: Optional[float] = None
    # The final submission is on disk this long before the deadline. None (auto): 10% of the budget, at most 60 s
    # (a 40 s budget keeps 4 s; an hour or more, 60 s).
    margin_seconds: Optional[float] = None
    # What inference cuts, in order, when the projection passes the deadline; placeholders is the last resort.
    degrade: list[str] = field(default_factory=lambda: list(DEGRADE_STEPS))
    views: int = 2  # the views cut: generation views per test input
    min_prob: float = 0.5  # the min_prob cut: the DFS threshold is raised to this


@dataclass
class PretrainConfig:
    """stage=pretrain (arcfold.pretrain): the tiny model of `model` trained from scratch on `data`'s tasks with
    `train`'s schedule; every `eval_every` steps it is scored on held-out tasks and saved to `out`."""

    out: Optional[str] = None  # the model directory (None: <run dir>/model)
    minutes: Optional[float] = None  # stop training after this many minutes (the schedule is sized by data.count)
    eval_every: int = 500  # optimiser steps between held-out evaluations (and saves)
    eval_count: int = 60  # held-out tasks: data's families and sides, drawn from eval_seed
    eval_seed: int = 1


@dataclass
class RunConfig:
    # folds is a value, not a config group: Hydra parses `folds=8` as an int, which a group cannot take.
    # An int k (k folds, strategy from `split`) or "per_task" (one fold per task).
    folds: Any = 2
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    format: FormatConfig = field(default_factory=FormatConfig)  # the prompt text the model sees
    split: SplitConfig = field(default_factory=SplitConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # where folds run (arcfold.orchestrate)
    # One worker per device, each loading the base model once: auto (every GPU; a CPU: this process) | N | [0, 2].
    devices: Any = "auto"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    on_error: str = "auto"  # fail | skip (placeholders, recorded) | auto (skip for data=kaggle, else fail)
    train_fallback: bool = True  # a fold whose training failed (and was skipped) predicts with the base model
    resume: Optional[str] = None  # a run dir to finish: its config, its finished folds and test inputs are kept
    report: ReportConfig = field(default_factory=ReportConfig)  # progress, end-of-run summary, plots
    # seed drives every random choice of a run (conf/config.yaml points split.seed, train.seed, inference.seed,
    # inference.scoring.seed and lora.init_seed at it); `-m seed=1,2,3` repeats a configuration.
    seed: int = 0
    repeats: int = 1  # with -m: N runs of each configuration, seed=0..N-1 (hydra.sweeper.params in config.yaml)
    outputs: str = "outputs"  # root of runs, sweeps and the default MLflow store
    save_adapters: str = "none"  # none | last (the last fold's adapter) | all (every fold's)
    stage: str = "run"  # run (TTT: train, predict, score) | pretrain (a tiny model from scratch: arcfold.pretrain)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def session_dir(resume: Optional[str], outputs: str, stamp: str) -> str:
    """Where Hydra puts this session's log and .hydra: <resume>/resumed/<time>, else <outputs>/runs/<time>."""
    return f"{resume}/resumed/{stamp}" if resume else f"{outputs}/runs/{stamp}"


def register() -> None:
    """Register the root schema as `base_config` (the head of conf/config.yaml's defaults list, which types every
    key of every group below it) and the resolvers the YAML files use."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # hydra.run.dir: a resumed run's session logs go under the run it resumes, not into a new run dir.
    OmegaConf.register_new_resolver("arcfold_run_dir", session_dir, replace=True)
    # ${seed_plus:${seed},1}: a seed derived from `seed` (scoring views must differ from generation views).
    OmegaConf.register_new_resolver("seed_plus", lambda seed, offset: int(seed) + int(offset), replace=True)
    # ${arcfold_package:shipped}: a folder inside the installed package (the shipped model), wherever it lives.
    OmegaConf.register_new_resolver("arcfold_package", lambda name: str(Path(__file__).parent / name), replace=True)
    ConfigStore.instance().store(name="base_config", node=RunConfig)
