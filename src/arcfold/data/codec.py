"""The grid codec: ARC pairs <-> token ids, one token per cell with any tokenizer.

The text format (the ARChitects'): per pair an input marker, the input rows, an output marker, the output rows,
an end token; every row ends with a row token. Ids are never produced by tokenizing a string, so a BPE tokenizer
that merges "00" into one token still sees exactly one token per cell: the codec works from a small symbol
table (symbol -> token id) that is either built in (the tiny model's own vocabulary) or read off a tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from arcfold.data.errors import ArcDataError
from arcfold.data.tasks import MAX_SIDE, Pair

log = logging.getLogger(__name__)

DIGITS = tuple(str(d) for d in range(10))
# The text each structural symbol has in a real tokenizer's vocabulary.
SYMBOL_TEXTS = {"input": "I", "output": "O", "row": "\n", **{d: d for d in DIGITS}}
# The built-in vocabulary of the tiny model: pad, bos, eos, markers, row end, ten digits.
BUILTIN_SYMBOLS = ("pad", "bos", "eos", "input", "output", "row") + DIGITS
IGNORE = -100  # label of a token that carries no loss (PyTorch's cross-entropy ignore_index)
MAX_OUTPUT_TOKENS = MAX_SIDE * (MAX_SIDE + 1) + 1  # a 30x30 grid, its row ends and the end token


@dataclass
class Encoded:
    """Token ids (and, for training, labels) of one sequence; `dropped` demonstrations did not fit."""

    ids: list[int]
    labels: list[int] | None = None
    dropped: int = 0
    demos: int = 0


@dataclass(frozen=True)
class GridCodec:
    ids: Mapping[str, int]  # symbol -> token id: digits, input, output, row, eos (bos, pad optional)
    name: str = "builtin"

    def __post_init__(self) -> None:
        required = set(SYMBOL_TEXTS) | {"eos"}
        missing = required - set(self.ids)
        if missing:
            raise ArcDataError(f"symbol table lacks {sorted(missing)}", file=self.name, field="codec")
        core = {s: self.ids[s] for s in required}
        if len(set(core.values())) != len(core):
            raise ArcDataError(f"two symbols share a token id: {core}", file=self.name, field="codec")
        # bos and pad may be the eos token (many tokenizers do that), never a cell, row or marker token.
        for extra in ("bos", "pad"):
            if extra in self.ids and self.ids[extra] in core.values() and self.ids[extra] != self.ids["eos"]:
                raise ArcDataError(f"{extra} id {self.ids[extra]} is also a grid symbol's id", file=self.name,
                                   field=f"codec.{extra}")

    def __hash__(self) -> int:  # the generated hash would fail on the dict of ids
        return hash((self.name, tuple(sorted(self.ids.items()))))

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def builtin(cls) -> "GridCodec":
        return cls({s: i for i, s in enumerate(BUILTIN_SYMBOLS)}, name="builtin")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, name: str = "tokenizer") -> "GridCodec":
        """Read the symbol table off a Hugging Face tokenizer (duck-typed: encode, eos/bos/pad ids).

        Each symbol must be exactly one token on its own, and not the unknown token (a tokenizer without a
        newline would map it to <unk>: one token, but the same one as every other unknown character); otherwise
        the tokenizer cannot give one token per cell and we refuse it."""
        unk = getattr(tokenizer, "unk_token_id", None)
        ids: dict[str, int] = {}
        for symbol, text in SYMBOL_TEXTS.items():
            toks = tokenizer.encode(text, add_special_tokens=False)
            toks = list(getattr(toks, "ids", toks))  # a bare `tokenizers.Tokenizer` returns an Encoding
            if len(toks) != 1:
                raise ArcDataError(f"tokenizer turns {text!r} into {len(toks)} tokens {toks}, need exactly one",
                                   file=name, field=f"codec.{symbol}")
            if unk is not None and toks[0] == unk:
                raise ArcDataError(f"tokenizer has no token for {text!r} (it becomes the unknown token)",
                                   file=name, field=f"codec.{symbol}")
            ids[symbol] = int(toks[0])
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ArcDataError("tokenizer has no eos token", file=name, field="codec.eos")
        ids["eos"] = int(tokenizer.eos_token_id)
        if getattr(tokenizer, "bos_token_id", None) is not None:
            ids["bos"] = int(tokenizer.bos_token_id)
        pad = getattr(tokenizer, "pad_token_id", None)
        ids["pad"] = int(pad) if pad is not None else ids["eos"]
        return cls(ids, name=name)

    # ----------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every id (the tiny model's size)."""
        return max(self.ids.values()) + 1

    @property
    def eos_id(self) -> int:
        return self.ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.ids.get("pad", self.ids["eos"])

    @property
    def output_tokens(self) -> list[int]:
        """The only tokens an output grid may contain: ten digits, row end, end token."""
        return [self.ids[d] for d in DIGITS] + [self.ids["row"], self.ids["eos"]]

    # ----------------------------------------------------------------------------------- encoding

    def encode_grid(self, grid: np.ndarray) -> list[int]:
        digit = [self.ids[d] for d in DIGITS]
        row = self.ids["row"]
        out: list[int] = []
        for r in np.asarray(grid):
            out.extend(digit[int(c)] for c in r)
            out.append(row)
        return out

    def encode_answer(self, grid: np.ndarray) -> list[int]:
        """The tokens a model must generate after the output marker: rows, then the end token."""
        return self.encode_grid(grid) + [self.eos_id]

    def _prefix(self) -> list[int]:
        return [self.ids["bos"]] if "bos" in self.ids else []

    def _pair(self, pair: Pair) -> tuple[list[int], list[int]]:
        """(ids, labels) of one demonstration: loss on the output rows and the end token only."""
        head = [self.ids["input"]] + self.encode_grid(pair.input) + [self.ids["output"]]
        answer = self.encode_answer(pair.output)
        return head + answer, [IGNORE] * len(head) + answer

    def pair_tokens(self, pair: Pair) -> int:
        h_in, w_in = pair.input.shape
        tokens = 2 + h_in * (w_in + 1)
        if pair.output is not None:
            h_out, w_out = pair.output.shape
            tokens += h_out * (w_out + 1) + 1
        return tokens

    def _fit(self, demos: Sequence[Pair], budget: int, keep_at_least: int, what: str) -> tuple[list[int], int]:
        """Indices of demonstrations to keep so their tokens fit `budget`: drop the longest first."""
        keep = list(range(len(demos)))
        sizes = [self.pair_tokens(p) for p in demos]
        while sum(sizes[i] for i in keep) > budget and len(keep) > keep_at_least:
            keep.remove(max(keep, key=lambda i: (sizes[i], i)))
        dropped = len(demos) - len(keep)
        if dropped:
            log.info("%s: dropped %d of %d demonstrations to fit", what, dropped, len(demos))
        return keep, dropped

    def encode_train(self, demos: Sequence[Pair], max_len: int | None = None,
                     mask_first_output: bool = False) -> Encoded | None:
        """A training sequence of all demonstrations (a view's order) with loss only on outputs.

        The last demonstration plays the test role; with mask_first_output the first output carries no loss
        (it has no earlier example to learn from). Demonstrations are dropped, longest first, until the
        sequence fits max_len; None if even two (or a lone one) do not fit."""
        keep, dropped = list(range(len(demos))), 0
        if max_len is not None:
            keep, dropped = self._fit(demos, max_len - len(self._prefix()), min(2, len(demos)), "train")
        ids, labels = self._prefix(), [IGNORE] * len(self._prefix())
        for n, i in enumerate(keep):
            pair_ids, pair_labels = self._pair(demos[i])
            if n == 0 and mask_first_output and len(keep) > 1:
                pair_labels = [IGNORE] * len(pair_labels)
            ids += pair_ids
            labels += pair_labels
        if max_len is not None and len(ids) > max_len:
            log.info("train: %d tokens with %d demonstrations still exceed max length %d: no sample",
                     len(ids), len(keep), max_len)
            return None
        return Encoded(ids, labels, dropped, len(keep))

    def encode_prompt(self, demos: Sequence[Pair], test_input: np.ndarray, max_len: int | None = None,
                      reserve: int = MAX_OUTPUT_TOKENS) -> Encoded:
        """Demonstrations, the test input and the output marker: the model continues with the answer.

        With max_len, demonstrations are dropped (longest first) until prompt + `reserve` answer tokens fit;
        at least one stays, and an ArcDataError says if even that is too long."""
        test_ids = [self.ids["input"]] + self.encode_grid(test_input) + [self.ids["output"]]
        keep, dropped = list(range(len(demos))), 0
        if max_len is not None:
            budget = max_len - reserve - len(test_ids) - len(self._prefix())
            keep, dropped = self._fit(demos, budget, 1, "prompt")
        ids = self._prefix()
        for i in keep:
            ids += self._pair(demos[i])[0]
        ids += test_ids
        if max_len is not None and len(ids) + reserve > max_len:
            raise ArcDataError(f"prompt of {len(ids)} tokens + {reserve} answer tokens exceeds max length "
                               f"{max_len} even with one demonstration", field="max_len")
        return Encoded(ids, None, dropped, len(keep))

    # ----------------------------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int]) -> np.ndarray | None:
        """The grid in generated ids (up to the first end token), or None if they hold no valid grid:
        no end token, an unknown symbol, a ragged or empty grid, a side over 30."""
        digit_of = {self.ids[d]: int(d) for d in DIGITS}
        row_id, eos = self.ids["row"], self.eos_id
        rows: list[list[int]] = []
        current: list[int] = []
        for tok in ids:
            tok = int(tok)
            if tok == eos:
                break
            if tok == row_id:
                if not current:
                    return None
                rows.append(current)
                current = []
            elif tok in digit_of:
                current.append(digit_of[tok])
            else:
                return None
        else:
            return None  # never reached the end token
        if current or not rows or len(rows) > MAX_SIDE:
            return None
        width = len(rows[0])
        if width > MAX_SIDE or any(len(r) != width for r in rows):
            return None
        return np.asarray(rows, dtype=np.int8)


def train_tokens(demos: Sequence[Pair]) -> int:
    """Tokens of one training sequence of these demonstrations (codec-independent up to a bos token)."""
    return sum(_BUILTIN.pair_tokens(p) for p in demos)


_BUILTIN = GridCodec.builtin()
