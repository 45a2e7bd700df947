"""Loading the base model once per process: a seeded tiny Llama (no download) or a local Hugging Face causal LM.

Bad settings raise ConfigError and bad model files ArcDataError, each naming the config key, so a typo in
`model.path` is one line, not a page of Hugging Face traceback.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, cast

import safetensors
import torch
import transformers
import yaml

from arcfold.checks import ConfigError
from arcfold.config import ModelConfig
from arcfold.data.codec import GridCodec
from arcfold.data.errors import ArcDataError
from arcfold.engine.kbit import prepare as prepare_kbit
from arcfold.engine.kbit import quantization_config
from arcfold.engine.modelfiles import check_json_files, weights_to_load
from arcfold.engine.vocab import check_shrinkable, kept_token_ids, remap_codec, shrink_model, shrink_tokenizer

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # the base model, loaded once per process
    codec: GridCodec
    tokenizer: object | None  # None for the tiny model
    device: torch.device
    dtype: torch.dtype
    name: str  # "tiny" or the path


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> cuda if available, else cpu; otherwise the named device, which must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"not a device: {spec!r} ({err})", key="model.device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{spec!r} asked for, but CUDA is not available", key="model.device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{spec!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist", key="model.device"
            )
    return device


def select_device(spec: str) -> None:
    """Make a named card (cuda:N) the current CUDA device before anything loads on it: bitsandbytes quantises and
    accelerate places a k-bit model on the current device, whatever the device map says. Nothing for another
    spec (auto, cpu, cuda) or a card that is not there (resolve_device refuses it, in its own words)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        return
    if device.type == "cuda" and device.index is not None and device.index < torch.cuda.device_count():
        torch.cuda.set_device(device)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bf16 on a GPU that supports it, else fp32 (fp16 weights train badly without care)."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[spec]


def load_model(cfg: ModelConfig, fmt: str = "plain", max_len: Mapping[str, int] | None = None) -> LoadedModel:
    """The base model, its codec (in prompt format `fmt`, format.name) and tokenizer. `max_len`
    ({"train.max_len": n, ...}) is checked against the model's context length; that and every other refusal
    comes before any weight is read."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quantization = quantization_config(cfg, device, dtype)
    if cfg.kind == "tiny":
        if cfg.shrink_vocab:
            raise ConfigError(
                "the tiny model's vocabulary is the codec's already; use it with model.kind=hf",
                key="model.shrink_vocab",
            )
        codec, tokenizer, name = GridCodec.builtin(fmt), None, str(cfg.path or "tiny")
        if cfg.path:  # a pretrained tiny model (stage=pretrain): its own shape, the built-in vocabulary
            model = _pretrained_tiny(cfg, codec, device, dtype, max_len)
        else:
            check_context(cfg.max_position_embeddings, "model.max_position_embeddings", max_len, file="config")
            # Built on the CPU from a seed, then moved (transformers' @wraps(Module.to) hides the bound signature).
            model = _tiny_model(cfg, codec, dtype).to(device)  # type: ignore[arg-type]
    elif cfg.kind == "hf":
        model, codec, tokenizer = _hf_model(cfg, fmt, device, dtype, quantization, max_len or {})
        name = str(cfg.path)
        # Inputs go where the device map put the embeddings.
        device = cast(torch.nn.Embedding, model.get_input_embeddings()).weight.device
    else:
        raise ConfigError(f"unknown model kind {cfg.kind!r}; use tiny or hf", key="model.kind")
    model.eval()
    log.info(
        "loaded %s: %.2fM parameters, %s%s on %s",
        name,
        model.num_parameters() / 1e6,
        dtype,
        f" ({cfg.quantization} weights)" if quantization else "",
        device,
    )
    return LoadedModel(model, codec, tokenizer, device, dtype, name)


def check_context(
    context: int | None, context_key: str, max_len: Mapping[str, int] | None, file: str | None = None
) -> None:
    """Refuse a max_len the model has no positions for (it would run past the context it was trained on)."""
    for key, n in (max_len or {}).items():
        if context is not None and n > context:
            raise ConfigError(
                f"{n} exceeds the model's context length {context_key}={context}"
                f"{f' ({file})' if file else ''}; lower {key}",
                key=key,
            )


def _device_map(spec: str | None, device: torch.device) -> Any:
    """None: everything on the resolved device; a placement strategy or a device as given; "{...}": a dict."""
    if spec is None:
        return {"": device}
    if spec in ("auto", "balanced", "balanced_low_0", "sequential"):
        return spec
    if spec.lstrip().startswith("{"):
        try:
            value = yaml.safe_load(spec)  # a YAML flow mapping: {model: 0, lm_head: 1} or {'': 0}
        except yaml.YAMLError:
            value = None
        if isinstance(value, dict):
            return value
    else:
        try:
            return str(torch.device(spec))
        except RuntimeError:
            pass
    raise ConfigError(
        f"{spec!r} is not auto, balanced, sequential, a device or a mapping of module names to devices",
        key="model.device_map",
    )


def _tiny_model(cfg: ModelConfig, codec: GridCodec, dtype: torch.dtype) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=codec.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=codec.ids.get("bos"),
        eos_token_id=codec.eos_id,
        pad_token_id=codec.pad_id,
        tie_word_embeddings=True,
        # HF's default init (std 0.02) suits wide models; at width 64 it leaves every logit within about +-0.6,
        # so a LoRA on the projections cannot move the loss off ln(vocab). 1/sqrt(width) gives logits room.
        initializer_range=cfg.hidden_size**-0.5,
    )
    # Seed the weights without disturbing the caller's RNG stream: same init_seed -> identical model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation
        )


def _pretrained_tiny(
    cfg: ModelConfig, codec: GridCodec, device: torch.device, dtype: torch.dtype, max_len: Mapping[str, int] | None
) -> transformers.PreTrainedModel:
    path = Path(str(cfg.path)).expanduser()
    if not (path / "config.json").is_file():
        raise ArcDataError("no config.json: not a model directory that stage=pretrain saved", file=str(path))
    check_json_files(path)
    with _one_line_errors(path):
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "vocab_size", None) != codec.vocab_size:
        raise ArcDataError(
            f"vocab_size {getattr(config, 'vocab_size', None)} is not the built-in vocabulary's {codec.vocab_size}: "
            "not a tiny model (use model.kind=hf for a model with a tokenizer)",
            file=str(path / "config.json"),
            field="model.path",
        )
    check_context(config.max_position_embeddings, "max_position_embeddings", max_len, file=str(path / "config.json"))
    use_safetensors = weights_to_load(path, cfg.allow_pickle)  # safetensors, or refused (model.allow_pickle)
    with _one_line_errors(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=use_safetensors,
            dtype=dtype,
            device_map={"": device},
            attn_implementation=cfg.attn_implementation,
            local_files_only=True,
        )


def _hf_model(
    cfg: ModelConfig,
    fmt: str,
    device: torch.device,
    dtype: torch.dtype,
    quantization: transformers.BitsAndBytesConfig | None,
    max_len: Mapping[str, int],
) -> tuple[transformers.PreTrainedModel, GridCodec, object]:
    if not cfg.path:
        raise ConfigError("model.kind=hf needs a model directory", key="model.path")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise ArcDataError("no such model directory", file=str(path), field="model.path")
    if not (path / "config.json").is_file():
        raise ArcDataError("no config.json: not a Hugging Face model directory", file=str(path), field="model.path")
    device_map = _device_map(cfg.device_map, device)
    check_json_files(path)  # config and tokenizer files: one that does not parse is named
    with _one_line_errors(path):
        config = transformers.AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, local_files_only=True
        )
    text_config = config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", getattr(text_config, "n_positions", None))
    if context is None:
        log.warning("%s: config.json gives no max_position_embeddings: max_len is not checked", path)
    check_context(context, "max_position_embeddings", max_len, file=str(path / "config.json"))
    with _one_line_errors(path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, local_files_only=True
        )
    codec = GridCodec.from_tokenizer(tokenizer, name=str(path), fmt=fmt)
    keep = kept_token_ids(codec, tokenizer) if cfg.shrink_vocab else None
    if keep is not None:  # the tokenizer is rewritten first: an unshrinkable one is refused before the weights
        check_shrinkable(tokenizer, str(path))
        with _directory(cfg.shrink_vocab_save) as directory:
            tokenizer = shrink_tokenizer(tokenizer, keep, config, directory)
    use_safetensors = weights_to_load(path, cfg.allow_pickle)  # safetensors, or refused (model.allow_pickle)
    with _one_line_errors(path):
        # Straight onto the device(s) in the final dtype (or quantized): never a full fp32 copy on the CPU first.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            use_safetensors=use_safetensors,
            dtype=dtype,
            device_map=device_map,
            quantization_config=quantization,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=True,
        )
    rows = cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings
    if codec.vocab_size > rows:
        raise ArcDataError(
            f"tokenizer ids go up to {codec.vocab_size - 1} but the model has only {rows} embedding rows",
            file=str(path),
            field="model.path",
        )
    if keep is not None:
        shrink_model(model, keep)
        codec = remap_codec(codec, keep)
        if cfg.shrink_vocab_save:
            model.save_pretrained(cfg.shrink_vocab_save)
            log.info("shrunk model and tokenizer saved to %s", cfg.shrink_vocab_save)
    if quantization is not None:  # QLoRA's preparation: the base frozen, its unquantised weights in `dtype`
        prepare_kbit(model)
    return model, codec, tokenizer


@contextmanager
def _one_line_errors(path: Path) -> Iterator[None]:
    """HF errors span many lines: fold them into one ArcDataError, cut short."""
    try:
        yield
    except (OSError, ValueError, KeyError, safetensors.SafetensorError, pickle.UnpicklingError) as err:
        if isinstance(err, ArcDataError):
            raise
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ArcDataError(f"cannot load a causal LM: {detail}", file=str(path), field="model.path") from None


@contextmanager
def _directory(path: str | None) -> Iterator[str]:
    """The given directory (created), or a temporary one removed afterwards."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="arcfold-vocab-") as tmp:
            yield tmp


__all__ = ["LoadedModel", "check_context", "load_model", "resolve_device", "resolve_dtype", "select_device"]
