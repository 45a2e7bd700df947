"""GridCodec.from_tokenizer with a real BPE tokenizer that merges digit runs ("00", "123"), built offline.

This test alone imports tokenizers/transformers: it checks the duck-typed interface the data layer reads.
"""

from __future__ import annotations

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from arcfold.data import ArcDataError, GridCodec, Task  # noqa: E402

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def grid_text(grid: np.ndarray) -> str:
    return "".join("".join(str(c) for c in row) + "\n" for row in grid.tolist())


def train_bpe(texts: list[str], alphabet: list[str], unk: bool = False) -> "transformers.PreTrainedTokenizerFast":
    """A BPE over single characters (no pre-tokenizer, so newlines and digit runs merge freely)."""
    model = tokenizers.models.BPE(unk_token="<unk>" if unk else None)
    tok = tokenizers.Tokenizer(model)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>" if unk else None,
    )


@pytest.fixture(scope="module")
def bpe(eval_tasks: list[Task]) -> "transformers.PreTrainedTokenizerFast":
    texts = [f"I{grid_text(p.input)}O{grid_text(p.output)}" for t in eval_tasks for p in t.train]
    return train_bpe(texts, alphabet=list("0123456789IO\n"))


def test_the_tokenizer_really_merges_digits(bpe) -> None:
    assert len(bpe.encode("0000", add_special_tokens=False)) < 4
    assert len(bpe.encode("0000000000\n", add_special_tokens=False)) < 11
    merged = [t for t in bpe.get_vocab() if len(t) > 1 and t.strip("0123456789") == ""]
    assert merged, "no merged digit tokens: the test would prove nothing"


def test_from_tokenizer_gives_one_token_per_cell_and_round_trips(bpe, eval_grids: list[np.ndarray]) -> None:
    codec = GridCodec.from_tokenizer(bpe, name="bpe")
    assert codec.eos_id == bpe.eos_token_id and codec.pad_id == bpe.pad_token_id
    for grid in eval_grids:
        h, w = grid.shape
        ids = codec.encode_grid(grid)
        assert len(ids) == h * (w + 1)
        # The ids are the tokenizer's own tokens for these characters, one per cell.
        assert "".join(bpe.convert_ids_to_tokens(ids)) == grid_text(grid)
        assert np.array_equal(codec.decode(codec.encode_answer(grid)), grid)
    # What the tokenizer would produce by itself is shorter: the merges are real, the codec avoids them.
    big = eval_grids[0]
    assert len(bpe.encode(grid_text(big), add_special_tokens=False)) < len(codec.encode_grid(big))


def bare_copy(bpe) -> "tokenizers.Tokenizer":
    """The `tokenizers` object under the wrapper, as a fresh copy (it has no eos attribute of its own)."""
    return tokenizers.Tokenizer.from_str(bpe.backend_tokenizer.to_str())


def test_from_tokenizer_reads_a_bare_tokenizers_object(bpe) -> None:
    wrapped = GridCodec.from_tokenizer(bpe)
    bare = bare_copy(bpe)
    bare.eos_token_id = bpe.eos_token_id
    codec = GridCodec.from_tokenizer(bare)
    grid_symbols = {s: i for s, i in wrapped.ids.items() if s not in ("bos", "pad")}
    assert codec.ids == {**grid_symbols, "pad": bpe.eos_token_id}  # no bos; pad falls back to eos


@pytest.mark.parametrize("missing, field", [("\n", "codec.row"), ("7", "codec.7"), ("O", "codec.output")])
@pytest.mark.parametrize("unk", [False, True])
def test_a_symbol_that_is_not_one_token_is_refused(missing: str, field: str, unk: bool) -> None:
    alphabet = [c for c in "0123456789IO\n" if c != missing]
    texts = ["I0012300\nO3210\n", "I77\n7\nO00\n"]
    tok = train_bpe([t.replace(missing, "") for t in texts] * 3, alphabet, unk=unk)
    with pytest.raises(ArcDataError) as caught:
        GridCodec.from_tokenizer(tok, name="tiny-bpe")
    message = str(caught.value)
    assert caught.value.field == field and f": {field}:" in message and "tiny-bpe" in message


def test_a_tokenizer_without_eos_is_refused(bpe) -> None:
    with pytest.raises(ArcDataError, match="codec.eos"):
        GridCodec.from_tokenizer(bare_copy(bpe))


def test_a_symbol_split_into_two_tokens_is_refused() -> None:
    """Like SentencePiece models that prefix a word marker: "7" becomes ["▁", "7"]."""
    model = tokenizers.models.BPE()
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = tokenizers.normalizers.Prepend("▁")
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=100, special_tokens=SPECIALS, show_progress=False, initial_alphabet=list("0123456789IO\n▁")
    )
    tok.train_from_iterator(["I0012300\nO3210\n"] * 3, trainer)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    assert len(wrapped.encode("7", add_special_tokens=False)) == 2
    with pytest.raises(ArcDataError) as caught:
        GridCodec.from_tokenizer(wrapped, name="spm-like")
    assert caught.value.field.startswith("codec.") and "into 2 tokens" in str(caught.value)
