"""The grid codec: ARC pairs <-> token ids, one token per cell with any tokenizer, in any prompt format.

A sequence is [bos] + prefix + pairs (separated by a separator), a pair being an input marker, the input rows,
an output marker, the output rows and an end token; every row ends with a row token (data.formats describes
the three formats' text). Cell ids are never produced by tokenizing a grid's text, so a BPE tokenizer that
merges "00" into one token still sees exactly one token per cell: the codec works from a small symbol table
(symbol -> token id: digits, row end, end token) that is either built in (the tiny model's own vocabulary) or
read off a tokenizer, and from the format's literal pieces, tokenized once at construction.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from arcfold.data.errors import ArcDataError
from arcfold.data.formats import prompt_format
from arcfold.data.tasks import MAX_SIDE, Pair

log = logging.getLogger(__name__)

DIGITS = tuple(str(d) for d in range(10))
# The built-in vocabulary of the tiny model: pad, bos, eos, markers, row end, ten digits.
BUILTIN_SYMBOLS = ("pad", "bos", "eos", "input", "output", "row") + DIGITS
# A format's literal pieces, as token ids: prefix once per sequence, input and output markers per pair, the
# separator between pairs.
PIECES = ("prefix", "input", "output", "separator")
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
    ids: Mapping[str, int]  # symbol -> token id: digits, row, eos (the end token); plain: input, output; bos, pad
    name: str = "builtin"
    pieces: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # PIECES -> token ids; empty: plain's
    format: str = "plain"  # the prompt format's name (data.formats)

    def __post_init__(self) -> None:
        plain = not self.pieces
        required = set(DIGITS) | {"row", "eos"} | ({"input", "output"} if plain else set())
        missing = required - set(self.ids)
        if missing:
            raise ArcDataError(f"symbol table lacks {sorted(missing)}", file=self.name, field="codec")
        core = {s: self.ids[s] for s in required | ({"input", "output"} & set(self.ids))}
        if len(set(core.values())) != len(core):
            raise ArcDataError(f"two symbols share a token id: {core}", file=self.name, field="codec")
        # bos and pad may be the eos token (many tokenizers do that), never a cell, row or marker token.
        for extra in ("bos", "pad"):
            if extra in self.ids and self.ids[extra] in core.values() and self.ids[extra] != self.ids["eos"]:
                raise ArcDataError(
                    f"{extra} id {self.ids[extra]} is also a grid symbol's id", file=self.name, field=f"codec.{extra}"
                )
        if plain:  # frozen: set the derived field once, here
            object.__setattr__(
                self,
                "pieces",
                {"prefix": (), "input": (self.ids["input"],), "output": (self.ids["output"],), "separator": ()},
            )
        elif set(self.pieces) != set(PIECES):
            raise ArcDataError(f"pieces must be {PIECES}, got {sorted(self.pieces)}", file=self.name, field="codec")

    def __hash__(self) -> int:  # the generated hash would fail on the dicts
        return hash((self.name, self.format, tuple(sorted(self.ids.items())), tuple(sorted(self.pieces.items()))))

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def builtin(cls, fmt: str = "plain") -> "GridCodec":
        """The tiny model's 16-token vocabulary: it holds no letters, so it writes the plain format only."""
        if fmt != "plain":
            raise ArcDataError(
                f"the tiny model's built-in vocabulary writes only format=plain, not {fmt!r} "
                "(use model=hf with a tokenizer)",
                file="builtin",
                field="format",
            )
        return cls({s: i for i, s in enumerate(BUILTIN_SYMBOLS)}, name="builtin")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, name: str = "tokenizer", fmt: str = "plain") -> "GridCodec":
        """Read the symbol table and the format's pieces off a Hugging Face tokenizer (duck-typed: encode,
        eos/bos/pad/unk ids; chat also apply_chat_template and decode).

        Each cell, the row end and the end token (and plain's markers, as before formats existed) must be exactly
        one token on its own, and not the unknown token (a tokenizer without a newline would map it to <unk>: one
        token, but the same one as every other unknown character); otherwise the tokenizer cannot give one token
        per cell and we refuse it. The other pieces may be several tokens (special tokens included)."""
        form = prompt_format(fmt, tokenizer, name)
        texts = {**{d: d for d in DIGITS}, "row": form.row_end}
        if form.name == "plain":  # the markers are symbols of arcfold's own table, one token each
            texts.update(input=form.input_marker, output=form.output_marker)
        if form.end is not None:
            texts["eos"] = form.end
        ids = {symbol: _one_token(tokenizer, text, name, symbol) for symbol, text in texts.items()}
        if "eos" not in ids:
            if getattr(tokenizer, "eos_token_id", None) is None:
                raise ArcDataError("tokenizer has no eos token", file=name, field="codec.eos")
            ids["eos"] = int(tokenizer.eos_token_id)
        if form.bos and getattr(tokenizer, "bos_token_id", None) is not None:
            ids["bos"] = int(tokenizer.bos_token_id)
        pad = getattr(tokenizer, "pad_token_id", None)
        ids["pad"] = int(pad) if pad is not None else ids["eos"]
        texts = {
            "prefix": form.prefix,
            "input": form.input_marker,
            "output": form.output_marker,
            "separator": form.separator,
        }
        pieces = {piece: _tokens(tokenizer, text, name, piece) for piece, text in texts.items()}
        return cls(ids, name=name, pieces=pieces, format=form.name)

    # ----------------------------------------------------------------------------------- properties

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every id this codec can ever write: cells, row end, end token, bos, pad and the pieces' tokens."""
        return tuple(sorted(set(self.ids.values()).union(*self.pieces.values())))

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every id (the tiny model's size)."""
        return max(self.token_ids) + 1

    @property
    def eos_id(self) -> int:
        """The end token: what generation stops at (the chat format's end-of-turn token)."""
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
        # One table lookup over the grid with a row-end column appended: a fold encodes thousands of grids.
        grid = np.asarray(grid)
        cells = np.concatenate([grid, np.full((grid.shape[0], 1), len(DIGITS), grid.dtype)], axis=1)
        return self._grid_table[cells.ravel()].tolist()

    @functools.cached_property
    def _grid_table(self) -> np.ndarray:
        """Token id per cell value 0-9, then the row end at index 10."""
        return np.array([self.ids[d] for d in DIGITS] + [self.ids["row"]], dtype=np.int64)

    def encode_answer(self, grid: np.ndarray) -> list[int]:
        """The tokens a model must generate after the output marker: rows, then the end token."""
        return self.encode_grid(grid) + [self.eos_id]

    def _start(self) -> list[int]:
        """What opens every sequence: bos (if any), then the format's prefix."""
        return ([self.ids["bos"]] if "bos" in self.ids else []) + list(self.pieces["prefix"])

    def _head(self, grid: np.ndarray) -> list[int]:
        """An input grid between its markers: what a prompt ends with."""
        return list(self.pieces["input"]) + self.encode_grid(grid) + list(self.pieces["output"])

    def _pair(self, pair: Pair) -> tuple[list[int], list[int]]:
        """(ids, labels) of one demonstration: loss on the output rows and the end token only."""
        assert pair.output is not None  # a demonstration always has one (the loaders refuse it otherwise)
        head = self._head(pair.input)
        answer = self.encode_answer(pair.output)
        return head + answer, [IGNORE] * len(head) + answer

    def pair_tokens(self, pair: Pair) -> int:
        """Tokens a pair adds to a sequence: a demonstration with the separator after it (a training sequence's
        last pair has none), or a lone test input with its markers."""
        h_in, w_in = pair.input.shape
        tokens = len(self.pieces["input"]) + h_in * (w_in + 1) + len(self.pieces["output"])
        if pair.output is not None:
            h_out, w_out = pair.output.shape
            tokens += h_out * (w_out + 1) + 1 + len(self.pieces["separator"])
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

    def encode_train(
        self, demos: Sequence[Pair], max_len: int | None = None, mask_first_output: bool = False
    ) -> Encoded | None:
        """A training sequence of all demonstrations (a view's order) with loss only on outputs.

        The last demonstration plays the test role; with mask_first_output the first output carries no loss
        (it has no earlier example to learn from). Demonstrations are dropped, longest first, until the
        sequence fits max_len; None if even two (or a lone one) do not fit."""
        start, sep = self._start(), list(self.pieces["separator"])
        keep, dropped = list(range(len(demos))), 0
        if max_len is not None:  # + len(sep): pair_tokens counts a separator the last pair does not have
            keep, dropped = self._fit(demos, max_len - len(start) + len(sep), min(2, len(demos)), "train")
        ids, labels = list(start), [IGNORE] * len(start)
        for n, i in enumerate(keep):
            pair_ids, pair_labels = self._pair(demos[i])
            if n == 0 and mask_first_output and len(keep) > 1:
                pair_labels = [IGNORE] * len(pair_labels)
            if n:
                ids += sep
                labels += [IGNORE] * len(sep)
            ids += pair_ids
            labels += pair_labels
        if max_len is not None and len(ids) > max_len:
            log.info(
                "train: %d tokens with %d demonstrations still exceed max length %d: no sample",
                len(ids),
                len(keep),
                max_len,
            )
            return None
        return Encoded(ids, labels, dropped, len(keep))

    def encode_prompt(
        self,
        demos: Sequence[Pair],
        test_input: np.ndarray,
        max_len: int | None = None,
        reserve: int = MAX_OUTPUT_TOKENS,
    ) -> Encoded:
        """Demonstrations, the test input and the output marker: the model continues with the answer.

        With max_len, demonstrations are dropped (longest first) until prompt + `reserve` answer tokens fit;
        at least one stays, and an ArcDataError says if even that is too long."""
        start, test_ids = self._start(), self._head(test_input)
        keep, dropped = list(range(len(demos))), 0
        if max_len is not None:
            budget = max_len - reserve - len(test_ids) - len(start)
            keep, dropped = self._fit(demos, budget, 1, "prompt")
        ids = list(start)
        for i in keep:
            ids += self._pair(demos[i])[0] + list(self.pieces["separator"])
        ids += test_ids
        if max_len is not None and len(ids) + reserve > max_len:
            raise ArcDataError(
                f"prompt of {len(ids)} tokens + {reserve} answer tokens exceeds max length "
                f"{max_len} even with one demonstration",
                field="max_len",
            )
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


def _one_token(tokenizer: Any, text: str, name: str, symbol: str) -> int:
    """The single token `text` is on its own; refused if it is several, none, or the unknown token."""
    toks = _tokens(tokenizer, text, name, symbol)
    if len(toks) != 1:
        raise ArcDataError(
            f"tokenizer turns {text!r} into {len(toks)} tokens {list(toks)}, need exactly one",
            file=name,
            field=f"codec.{symbol}",
        )
    return toks[0]


def _tokens(tokenizer: Any, text: str, name: str, piece: str) -> tuple[int, ...]:
    """The tokens of a literal piece (special tokens written as text become their ids); refused if any
    character is lost or becomes the unknown token."""
    toks = tokenizer.encode(text, add_special_tokens=False)
    toks = tuple(int(t) for t in getattr(toks, "ids", toks))  # a bare `tokenizers.Tokenizer` returns an Encoding
    unk = getattr(tokenizer, "unk_token_id", None)
    if text and not toks:
        raise ArcDataError(f"tokenizer turns {text!r} into no tokens at all", file=name, field=f"codec.{piece}")
    if unk is not None and unk in toks:
        raise ArcDataError(
            f"tokenizer has no token for some of {text!r} (it becomes the unknown token)",
            file=name,
            field=f"codec.{piece}",
        )
    return toks


def train_tokens(demos: Sequence[Pair]) -> int:
    """Tokens of one training sequence of these demonstrations (codec-independent up to a bos token)."""
    return sum(_BUILTIN.pair_tokens(p) for p in demos)


_BUILTIN = GridCodec.builtin()
