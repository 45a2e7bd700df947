"""Which model files load, checked before transformers reads them: weights from safetensors only (a pickle can
run code when it is loaded), pickle weights only with `model.allow_pickle=true`, and every weights, config and
tokenizer file whole and parseable, or refused in one line naming it (ArcDataError).

A safetensors file is an 8-byte header length, a JSON header (tensor -> dtype, shape, byte offsets) and the
bytes: `check_safetensors` reads only the header and checks that the offsets fit the file, so a truncated,
garbled or foreign file is named here instead of failing inside a load. No torch here: the run's process checks a
checkpoint's adapter with it before any model loads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from arcfold.data.errors import ArcDataError
from arcfold.data.jsonfile import parse_json_file

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# The JSON files a config or tokenizer load reads, where present (tokenizer.model is sentencepiece's protobuf).
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)
MAX_HEADER = 100_000_000  # the safetensors library's own limit on a header


def check_safetensors(path: Path, field: str = "model.path") -> None:
    """`path` is a whole safetensors file (its header parses, every tensor's bytes lie inside the file), else
    ArcDataError naming it."""

    def bad(problem: str) -> ArcDataError:
        return ArcDataError(f"not a whole safetensors file: {problem}", file=str(path), field=field)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise bad(f"{size} bytes, header length {length}")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise ArcDataError("missing", file=str(path), field=field) from None
    except OSError as err:
        raise ArcDataError(f"cannot read ({err.strerror or type(err).__name__})", file=str(path), field=field) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"tensor {name!r} has no data_offsets")
        if not 0 <= offsets[0] <= offsets[1]:
            raise bad(f"tensor {name!r} has data_offsets {offsets}")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise bad(f"the header describes {8 + length + end} bytes, the file has {size} (cut short or padded)")


def check_json_files(directory: Path) -> None:
    """Each config and tokenizer JSON file in `directory` parses, else ArcDataError naming it."""
    for name in JSON_FILES:
        if (directory / name).is_file():
            parse_json_file(directory / name)


def weights_to_load(directory: Path, allow_pickle: bool) -> bool:
    """Check the weights a from_pretrained of `directory` would read; return its use_safetensors.

    True: safetensors weights (one file, or the shards an index names: each inside the directory, each whole).
    False: only with allow_pickle, a directory whose weights are pickles alone. Otherwise ArcDataError naming the
    file, and the switch that would allow it."""
    explicit = _explicit_weights(directory)
    if explicit is not None and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        if not allow_pickle:
            raise ArcDataError(
                f"config.json's transformers_weights names {explicit!r}, not safetensors: arcfold loads safetensors "
                "only (model.allow_pickle=true loads pickle weights you trust)",
                file=str(directory / "config.json"),
                field="model.allow_pickle",
            )
        return False
    if (directory / SAFE_WEIGHTS).is_file():
        check_safetensors(directory / SAFE_WEIGHTS)
        return True
    if (directory / SAFE_INDEX).is_file():
        for shard in _shards(directory / SAFE_INDEX):
            check_safetensors(directory / shard)
        return True
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern)})
    if not pickles:
        raise ArcDataError(f"no weights ({SAFE_WEIGHTS})", file=str(directory), field="model.path")
    if not allow_pickle:
        raise ArcDataError(
            "pickle weights only (no model.safetensors): arcfold loads safetensors only, as unpickling can run code; "
            "convert them, or set model.allow_pickle=true for a file you trust",
            file=str(directory / pickles[0]),
            field="model.allow_pickle",
        )
    return False


def _explicit_weights(directory: Path) -> str | None:
    """The weights file config.json names (transformers reads it before anything else), if any."""
    config = directory / "config.json"
    data = parse_json_file(config)[0] if config.is_file() else None
    name = data.get("transformers_weights") if isinstance(data, dict) else None
    return None if name is None else str(name)


def _shards(index: Path) -> list[str]:
    """The shard files a safetensors index names: plain file names in its directory."""
    data = parse_json_file(index)[0]
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ArcDataError("no weight_map of tensor -> shard file", file=str(index), field="model.path")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if Path(shard).name != shard or "\\" in shard or not shard.endswith(".safetensors"):
            raise ArcDataError(
                f"names {shard!r}, not a safetensors file beside it", file=str(index), field="model.path"
            )
    return shards


__all__ = ["check_json_files", "check_safetensors", "weights_to_load"]
