"""Prompt formats: the literal text around the grids, so a pretrained ARC model sees the text it learned.

A sequence is: [bos] + prefix + pair + separator + pair + ... + pair, where a pair is
input marker + input rows + output marker + output rows + end token, and every row is its cells then the row
end. A prompt stops after the test input's output marker. Only the text pieces live here; GridCodec turns
them into token ids once (cells, row end and end token one token each, the other pieces any number).

- plain: `I` rows `O` rows eos (arcfold's own; the only one the built-in tiny vocabulary can write).
- architects: the ARChitects' text: bos, a 48-letter preprompt, `I` rows `+/-=O` rows eos.
- chat: the tokenizer's own chat template, one user turn (input rows) and one assistant turn (output rows)
  per pair, its pieces read off a rendering with sentinel contents (NVARC style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arcfold.config import CHOICES
from arcfold.data.errors import ArcDataError

FORMATS = CHOICES["format.name"]
# The ARChitects' preprompt: the alphabet without I, O, i, o (the markers and their look-alikes).
PREPROMPT = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjklmnpqrstuvwxyz"
# Message contents no chat template writes by itself, so the rendering can be split around them.
_USER, _ASSISTANT = "ArcfoldUserSentinel{}", "ArcfoldAssistantSentinel{}"


@dataclass(frozen=True)
class PromptFormat:
    name: str
    prefix: str = ""  # once, after bos: a preprompt or a chat template's system turn and first user header
    input_marker: str = "I"  # before each input grid
    output_marker: str = "O"  # after each input grid; a prompt ends with it
    row_end: str = "\n"  # after every row (one token)
    end: str | None = None  # after each output grid (one token, labelled); None: the tokenizer's eos
    separator: str = ""  # between one pair's end token and the next pair (no loss)
    bos: bool = True  # start with the tokenizer's bos token, if it has one


def plain() -> PromptFormat:
    return PromptFormat("plain")


def architects() -> PromptFormat:
    return PromptFormat("architects", prefix=PREPROMPT, output_marker="+/-=O")


def chat(tokenizer: Any, name: str = "tokenizer") -> PromptFormat:
    """The pieces of the tokenizer's chat template (duck-typed: chat_template, apply_chat_template, encode,
    decode), read off three user/assistant turn pairs with sentinel contents. The first two pairs must agree
    (the last assistant turn may differ, e.g. a thinking block, and is not used); the template writes its own
    bos, if any, so none is added."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        raise ArcDataError(
            "format=chat needs a tokenizer with a chat template; this one has none", file=name, field="format"
        )
    messages = []
    for i in range(3):
        messages += [
            {"role": "user", "content": _USER.format(i)},
            {"role": "assistant", "content": _ASSISTANT.format(i)},
        ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # a Jinja template raises whatever it likes: report it in one line
        raise ArcDataError(
            f"the chat template fails on user/assistant turns: {' '.join(str(err).split())[:200]}",
            file=name,
            field="format",
        ) from None
    sentinels = [s.format(i) for i in range(3) for s in (_USER, _ASSISTANT)]
    starts = [text.find(s) for s in sentinels]
    if any(text.count(s) != 1 for s in sentinels) or starts != sorted(starts):
        raise ArcDataError(
            "the chat template does not write each turn's content once and in order; use format=plain or architects",
            file=name,
            field="format",
        )
    ends = [start + len(s) for start, s in zip(starts, sentinels)]
    # Piece k lies between sentinel k's end and sentinel k+1's start: U0 [out] A0 [tail] U1 [out] A1 [tail] U2.
    between = [text[ends[k] : starts[k + 1]] for k in range(len(sentinels) - 1)]
    output_marker, tail = between[0], between[1]
    if (between[2], between[3]) != (output_marker, tail):
        raise ArcDataError(
            "the chat template writes the first and second turns differently; use format=plain or architects",
            file=name,
            field="format",
        )
    if not output_marker or not tail:
        raise ArcDataError(
            f"the chat template writes nothing between turns ({output_marker!r}, {tail!r}): no "
            "marker or end token to find",
            file=name,
            field="format",
        )
    first = list(tokenizer.encode(tail, add_special_tokens=False))[:1]
    end = tokenizer.decode(first, skip_special_tokens=False) if first else ""
    if not end or not tail.startswith(end):
        raise ArcDataError(f"cannot find the end token at the start of {tail!r}", file=name, field="format")
    return PromptFormat(
        "chat",
        prefix=text[: starts[0]],
        input_marker="",
        output_marker=output_marker,
        end=end,
        separator=tail[len(end) :],
        bos=False,
    )


def prompt_format(fmt: str, tokenizer: Any = None, name: str = "tokenizer") -> PromptFormat:
    """The format called `fmt` (a config's format.name); chat reads the tokenizer's template."""
    if fmt == "plain":
        return plain()
    if fmt == "architects":
        return architects()
    if fmt == "chat":
        return chat(tokenizer, name)
    raise ArcDataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", file=name, field="format")


__all__ = ["FORMATS", "PREPROMPT", "PromptFormat", "architects", "chat", "plain", "prompt_format"]
