"""k-bit base weights through bitsandbytes (model.quantization=4bit|8bit): the quantisation config, the check that
this platform has a backend for the model's device, and QLoRA's preparation in the compute dtype.

bitsandbytes (>= 0.49) has backends for CUDA, ROCm, Intel XPU and Gaudi, Apple MPS and the CPU, so a 4-bit QLoRA runs
(slowly) on a CPU too: CI tests the whole path there. A device without a backend is refused in one line, before any
weight is read.

peft's `prepare_model_for_kbit_training` freezes the base and upcasts every weight that is not quantised (embeddings,
norms, the output head) to fp32. An fp32 norm weight turns its bf16 input into fp32 output, so from the first norm on
the residual stream, attention and the KV cache would run in fp32: twice the cache, no bf16 attention kernel, and an
unshrunk 128k-row head 4 bytes a weight. `prepare` keeps the freeze and gives those weights back the dtype the model
was loaded in (model.dtype: bf16 where supported): the quantised layers compute in that dtype
(bnb_4bit_compute_dtype), and the LoRA weights peft adds stay fp32 (peft casts their input and output). It also
turns off bitsandbytes' CPU repacking of 4-bit weights for inference, whose kernel has no backward (see prepare).
"""

from __future__ import annotations

import logging

import peft
import torch
import transformers

from arcfold.checks import ConfigError
from arcfold.config import ModelConfig

log = logging.getLogger(__name__)

KEY = "model.quantization"


def quantization_config(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype
) -> transformers.BitsAndBytesConfig | None:
    """The BitsAndBytesConfig of model.quantization (None for none), after checking that bitsandbytes is installed
    and has a backend for `device`; each refusal is one ConfigError line naming model.quantization."""
    if cfg.quantization == "none":
        return None
    if cfg.kind != "hf":
        raise ConfigError(f"{cfg.quantization} quantizes a pretrained model: needs model.kind=hf", key=KEY)
    check_backend(cfg.quantization, device)
    if cfg.quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def check_backend(bits: str, device: torch.device) -> None:
    """bitsandbytes is importable and quantises a small tensor on `device`; otherwise one ConfigError line."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ConfigError(f"{bits} needs bitsandbytes (pip install 'bitsandbytes>=0.49'): {err}", key=KEY) from None
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    if device.type not in supported:
        raise ConfigError(
            f"{bits}: bitsandbytes {bitsandbytes.__version__} has no backend for {device.type} "
            f"(it has {', '.join(sorted(supported))}); set model.device to one of them or model.quantization=none",
            key=KEY,
        )
    try:  # the backend's library may still be missing for this CPU or driver: try it on 64 numbers
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.zeros(64, device=device))
    except Exception as err:  # whatever the backend's failure, it is the same refusal
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(
            f"{bits}: bitsandbytes {bitsandbytes.__version__} cannot quantize on {device}: {detail}", key=KEY
        ) from None


def prepare(model: transformers.PreTrainedModel) -> None:
    """QLoRA's preparation (peft: the base frozen), with every weight that is not quantised kept in the dtype the
    model was loaded in, not the fp32 peft casts it to (see the module docstring)."""
    loaded = {name: p.dtype for name, p in model.named_parameters()}
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # checkpointing: train's switch
    restored = 0
    for name, p in model.named_parameters():
        if p.dtype != loaded[name] and p.is_floating_point():
            p.data = p.data.to(loaded[name])
            restored += p.numel()
    log.info("k-bit base prepared: frozen, %.2fM unquantised weights kept in %s", restored / 1e6, compute_dtype(model))
    import bitsandbytes

    for m in model.modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel at the first
            # forward in eval mode, and that kernel has no backward: a LoRA trained after any inference would get
            # no gradient through the base layers. The plain (dequantising) path trains and infers alike.
            m.support_avx512bf16_for_cpu = False


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the input embeddings: what the residual stream starts in."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


__all__ = ["check_backend", "compute_dtype", "prepare", "quantization_config"]
