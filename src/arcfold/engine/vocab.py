"""Vocabulary shrink (the ARChitects' trick): keep only the tokens the format uses, in memory at load time.

A real model's 150k-token embedding and head cost memory and, worse, a logits tensor of sequence x vocabulary at
every step. The grid format needs a dozen tokens plus the tokenizer's special ones: their embedding and head rows
are sliced out, the ids renumbered 0..n-1, and the tokenizer rewritten to match (BPE merges dropped, so every
kept single character is its own token). The log-probabilities over the kept tokens are the full model's,
renormalised over that set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence, cast

import torch
import transformers

from arcfold.data.codec import GridCodec
from arcfold.data.errors import ArcDataError

log = logging.getLogger(__name__)


def kept_token_ids(codec: GridCodec, tokenizer: Any) -> list[int]:
    """The ids that survive the shrink, ascending: every id the codec's format can write and every special
    token."""
    return sorted(set(codec.token_ids) | set(tokenizer.all_special_ids))


def check_shrinkable(tokenizer: Any, name: str) -> None:
    """Refuse (before any weight loads) a tokenizer whose vocabulary this module cannot rewrite."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"]["type"] if backend is not None else type(tokenizer).__name__
    if kind != "BPE":
        raise ArcDataError(
            f"can shrink only a BPE tokenizer (tokenizer.json), this one is {kind}",
            file=name,
            field="model.shrink_vocab",
        )


def shrink_tokenizer(
    tokenizer: Any, keep: Sequence[int], config: transformers.PretrainedConfig, directory: str | Path
) -> Any:
    """Write the shrunk tokenizer (and `config`, which picks its class) to `directory` and load it from there.

    Kept token i gets id i; merges are dropped; added tokens and the post-processor's special-token ids are
    renumbered in tokenizer.json and tokenizer_config.json alike."""
    directory = Path(directory)
    new_id = {old: new for new, old in enumerate(keep)}
    tokenizer.save_pretrained(directory)
    config.save_pretrained(directory)  # AutoTokenizer chooses the class from model_type (qwen2: byte-level)

    path = directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    model["vocab"] = {tok: new_id[i] for tok, i in model["vocab"].items() if i in new_id}
    model["merges"] = []  # no merges: every kept single character is one token, exactly as the codec feeds it
    data["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in data.get("added_tokens", []) if t["id"] in new_id]
    id_of = {**model["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    if model.get("unk_token") is not None and model["unk_token"] not in id_of:
        model["unk_token"] = None
    _renumber_post_processor(data.get("post_processor"), id_of, str(path))
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")

    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in tok_config:
            tok_config["added_tokens_decoder"] = {
                str(new_id[int(i)]): t for i, t in tok_config["added_tokens_decoder"].items() if int(i) in new_id
            }
        config_path.write_text(json.dumps(tok_config, ensure_ascii=False, indent=2), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _renumber_post_processor(node: Any, id_of: dict[str, int], file: str) -> None:
    """Template/Bert/Roberta post-processors store special-token ids next to their text: renumber by text."""
    if not isinstance(node, dict):
        return
    for processor in node.get("processors") or []:  # a Sequence of processors
        _renumber_post_processor(processor, id_of, file)
    try:
        for special in (node.get("special_tokens") or {}).values():  # TemplateProcessing
            special["ids"] = [id_of[tok] for tok in special["tokens"]]
        for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [text, id]
            if key in node:
                node[key] = [node[key][0], id_of[node[key][0]]]
    except KeyError as err:
        raise ArcDataError(
            f"the post-processor adds token {err} that the shrink drops", file=file, field="model.shrink_vocab"
        ) from None


def shrink_model(model: transformers.PreTrainedModel, keep: Sequence[int]) -> None:
    """Keep only rows `keep` of the input embedding and the LM head (weights tied or not, bias if any), in place,
    and renumber the config's vocabulary size and special-token ids."""
    embed, head = cast(torch.nn.Embedding, model.get_input_embeddings()), model.get_output_embeddings()
    rows = embed.num_embeddings
    if keep[-1] >= rows:
        raise ArcDataError(
            f"kept token id {keep[-1]} but the model has only {rows} embedding rows", field="model.shrink_vocab"
        )
    if not isinstance(head, torch.nn.Linear):
        raise ArcDataError(f"cannot slice an output layer of type {type(head).__name__}", field="model.shrink_vocab")
    tied = head.weight is embed.weight
    before = sum(t.numel() * t.element_size() for t in {id(p): p for p in (embed.weight, head.weight)}.values())
    index = torch.tensor(list(keep), device=embed.weight.device)
    with torch.no_grad():
        embed.weight = torch.nn.Parameter(embed.weight.index_select(0, index), embed.weight.requires_grad)
        embed.num_embeddings = len(keep)
        if embed.padding_idx is not None:
            embed.padding_idx = {old: new for new, old in enumerate(keep)}.get(embed.padding_idx)
        index = index.to(head.weight.device)
        head.weight = (
            embed.weight if tied else torch.nn.Parameter(head.weight.index_select(0, index), head.weight.requires_grad)
        )
        if head.bias is not None:
            head.bias = torch.nn.Parameter(head.bias.index_select(0, index), head.bias.requires_grad)
        head.out_features = len(keep)
    after = sum(t.numel() * t.element_size() for t in {id(p): p for p in (embed.weight, head.weight)}.values())
    model.config.get_text_config().vocab_size = len(keep)
    if hasattr(model, "vocab_size"):
        model.vocab_size = len(keep)
    for config in (model.config, getattr(model, "generation_config", None)):
        _renumber_special_ids(config, keep)
    log.info(
        "vocabulary shrunk %d -> %d tokens: embeddings and head %.1f MiB -> %.2f MiB (%s)",
        rows,
        len(keep),
        before / 2**20,
        after / 2**20,
        "tied" if tied else "untied",
    )


def _renumber_special_ids(config: Any, keep: Sequence[int]) -> None:
    """bos/eos/pad ids (an eos may be a list) in the new numbering; an id the shrink dropped is removed."""
    if config is None:
        return
    new_id = {old: new for new, old in enumerate(keep)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is None:
            continue
        ids = [value] if isinstance(value, int) else list(value)
        dropped = [i for i in ids if i not in new_id]
        if dropped:
            log.warning("%s %s is not a special token of the tokenizer: dropped by the vocabulary shrink", key, dropped)
        kept = [new_id[i] for i in ids if i in new_id]
        setattr(config, key, (kept[0] if kept else None) if isinstance(value, int) else kept)


def remap_codec(codec: GridCodec, keep: Sequence[int]) -> GridCodec:
    """The same codec in the shrunk numbering."""
    new_id = {old: new for new, old in enumerate(keep)}
    return dataclasses.replace(
        codec,
        ids={symbol: new_id[i] for symbol, i in codec.ids.items()},
        pieces={piece: tuple(new_id[i] for i in ids) for piece, ids in codec.pieces.items()},
    )


__all__ = ["check_shrinkable", "kept_token_ids", "remap_codec", "shrink_model", "shrink_tokenizer"]
