"""Loading the base model once per process: a seeded tiny Llama (no download) or a local Hugging Face causal LM.

Bad paths and settings raise ArcDataError naming the config field, so a typo in `model.path` is one line, not
a page of Hugging Face traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from arcfold.config import ModelConfig
from arcfold.data.codec import GridCodec
from arcfold.data.errors import ArcDataError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # the base model, loaded once per process
    codec: GridCodec
    tokenizer: object | None  # None for the tiny model
    device: torch.device
    dtype: torch.dtype
    name: str  # "tiny" or the path


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; otherwise the named device, which must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ArcDataError(f"not a device: {spec!r} ({err})", field="model.device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArcDataError(f"{spec!r} asked for, but CUDA is not available", field="model.device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArcDataError(f"{spec!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist",
                               field="model.device")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on a GPU that supports it, else fp32 (fp16 weights train badly without care)."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ArcDataError(f"unknown dtype {spec!r}; use auto or one of {sorted(DTYPES)}", field="model.dtype")
    return DTYPES[spec]


def load_model(cfg: ModelConfig, fmt: str = "plain") -> LoadedModel:  # fmt: the prompt format, format.name
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.kind == "tiny":
        codec, tokenizer, name = GridCodec.builtin(fmt), None, "tiny"
        model = _tiny_model(cfg, codec, dtype)
    elif cfg.kind == "hf":
        model, tokenizer = _hf_model(cfg, dtype)
        name = str(cfg.path)
        codec = GridCodec.from_tokenizer(tokenizer, name=name, fmt=fmt)
        rows = model.get_input_embeddings().num_embeddings
        if codec.vocab_size > rows:
            raise ArcDataError(f"tokenizer ids go up to {codec.vocab_size - 1} but the model has only {rows} "
                               "embedding rows", file=name, field="model.path")
    else:
        raise ArcDataError(f"unknown model kind {cfg.kind!r}; use tiny or hf", field="model.kind")
    model.to(device)
    model.eval()
    log.info("loaded %s: %.2fM parameters, %s on %s", name, model.num_parameters() / 1e6, dtype, device)
    return LoadedModel(model, codec, tokenizer, device, dtype, name)


def _tiny_model(cfg: ModelConfig, codec: GridCodec, dtype: torch.dtype) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=codec.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=codec.ids.get("bos"),
        eos_token_id=codec.eos_id, pad_token_id=codec.pad_id, tie_word_embeddings=True,
        # HF's default init (std 0.02) suits wide models; at width 64 it leaves every logit within about +-0.6,
        # so a LoRA on the projections cannot move the loss off ln(vocab). 1/sqrt(width) gives logits room.
        initializer_range=cfg.hidden_size ** -0.5)
    # Seed the weights without disturbing the caller's RNG stream: same init_seed -> identical model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation)


def _hf_model(cfg: ModelConfig, dtype: torch.dtype) -> tuple[transformers.PreTrainedModel, object]:
    if not cfg.path:
        raise ArcDataError("model.kind=hf needs a model directory", field="model.path")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise ArcDataError("no such model directory", file=str(path), field="model.path")
    if not (path / "config.json").is_file():
        raise ArcDataError("no config.json: not a Hugging Face model directory", file=str(path), field="model.path")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        # HF errors span many lines: fold them into one, cut short.
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ArcDataError(f"cannot load a causal LM: {detail}", file=str(path), field="model.path") from None
    return model, tokenizer


__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_dtype"]
