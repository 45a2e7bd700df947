"""Shared test helpers: PNG checks (a real image with real content, not just a file), a small tokenizer that
writes both text formats (architects, chat) for the tests that save a Hugging Face model, and the config of a
very small random tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arcfold.config import ModelConfig


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def _read_png(path: Path, min_bytes: int = 8_000, min_colours: int = 20) -> np.ndarray:
    """The image as uint8 RGB after checking it is a PNG of some size with some variety of pixels."""
    from matplotlib.image import imread

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) >= min_bytes, (path, len(data))
    image = (imread(path)[..., :3] * 255).round().astype(np.uint8)
    assert image.shape[0] >= 200 and image.shape[1] >= 300, image.shape
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours, (path, len(colours))
    return image


def _has_colour(image: np.ndarray, hex_colour: str, min_pixels: int = 20) -> bool:
    return int(np.all(image == np.array(rgb(hex_colour), dtype=np.uint8), axis=-1).sum()) >= min_pixels


@pytest.fixture
def read_png():
    return _read_png


@pytest.fixture
def has_colour():
    return _has_colour


LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjklmnpqrstuvwxyz"
# A small BPE vocabulary that speaks both formats: the ARChitects' letters and `+/-=O`, the chat markers; digits
# merge ("00", "000") as in real tokenizers, so the codec must get round merges.
FORMAT_VOCAB = [
    "<unk>",
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "\n",
    *"0123456789",
    "00",
    "000",
    *LETTERS,
    "I",
    "O",
    "+",
    "/",
    "-",
    "=",
    "user",
    "assistant",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _format_tokenizer(extra: tuple[str, ...] = ()):
    import transformers
    from tokenizers import AddedToken, Tokenizer, models

    vocab = FORMAT_VOCAB + list(extra)
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[("0", "0"), ("00", "0")], unk_token="<unk>")
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    backend.add_tokens(["user", "assistant"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def format_tokenizer():
    """format_tokenizer(extra=()) -> a PreTrainedTokenizerFast over FORMAT_VOCAB + extra, with a chat template."""
    return _format_tokenizer


def tiny_model_config(**overrides) -> ModelConfig:
    """A very small tiny-kind config: quick to build and to train on CPU."""
    values = dict(
        kind="tiny",
        device="cpu",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
        init_seed=0,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def make_tiny_cfg():
    """tiny_model_config as a fixture: test modules cannot import conftest reliably (several exist)."""
    return tiny_model_config
