"""Prompt formats (plain, architects, chat) with a real BPE tokenizer that merges digit runs, built offline.

The reference texts are written here from the formats' descriptions with plain f-strings over the grids, never
through the codec or arcfold.data.formats; every count is taken independently of the codec.
"""

from __future__ import annotations

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from arcfold.data import IGNORE, ArcDataError, GridCodec, Pair, Task, select  # noqa: E402

FORMATS = ["plain", "architects", "chat"]
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjklmnpqrstuvwxyz"  # the ARChitects' preprompt, written out again
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# A Qwen-style template: a default system turn, then <|im_start|>ROLE\nCONTENT<|im_end|>\n per message.
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]


def rows(grid: np.ndarray) -> str:
    return "".join("".join(str(c) for c in row) + "\n" for row in grid.tolist())


def lines(grid: np.ndarray) -> list[str]:
    return ["".join(str(c) for c in row) for row in grid.tolist()]


def reference(fmt: str, demos: list[Pair], test: np.ndarray | None = None) -> str:
    """The text of a training sequence (test=None) or of the prompt for `test`, from the format's description."""
    if fmt == "plain":
        text = "<bos>" + "".join(f"I{rows(p.input)}O{rows(p.output)}<eos>" for p in demos)
        return text if test is None else text + f"I{rows(test)}O"
    if fmt == "architects":  # the way their code writes it: rows joined by newlines, then "\n+/-=O", ...
        pair = [f"I{chr(10).join(lines(p.input))}\n+/-=O{chr(10).join(lines(p.output))}\n<eos>" for p in demos]
        text = "<bos>" + LETTERS + "".join(pair)
        return text if test is None else text + f"I{chr(10).join(lines(test))}\n+/-=O"
    turns = [
        f"<|im_start|>user\n{rows(p.input)}<|im_end|>\n<|im_start|>assistant\n{rows(p.output)}<|im_end|>" for p in demos
    ]
    if test is None:
        return SYSTEM + "\n".join(turns)
    return (
        SYSTEM + "".join(t + "\n" for t in turns) + f"<|im_start|>user\n{rows(test)}<|im_end|>\n<|im_start|>assistant\n"
    )


def wrap(backend: "tokenizers.Tokenizer", template: str | None) -> "transformers.PreTrainedTokenizerFast":
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(backend.to_str()),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def backend(eval_tasks: list[Task]) -> "tokenizers.Tokenizer":
    """A BPE over single characters, trained on ARChitects-style text: digit runs, "+/-=O" and more merge."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.decoder = tokenizers.decoders.Fuse()  # decode = the tokens' text, concatenated
    texts = [f"I{rows(p.input)}+/-=O{rows(p.output)}" for t in eval_tasks for p in t.train]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=list("0123456789\nIO+/-=" + LETTERS + "io .Y"),
    )
    tok.train_from_iterator(texts + [LETTERS] * 3, trainer)
    tok.add_tokens(["user", "assistant"])
    return tok


@pytest.fixture(scope="module")
def bpe(backend) -> "transformers.PreTrainedTokenizerFast":
    return wrap(backend, QWEN_TEMPLATE)


@pytest.fixture(scope="module")
def codecs(bpe) -> dict[str, GridCodec]:
    return {fmt: GridCodec.from_tokenizer(bpe, name="bpe", fmt=fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def task(eval_tasks: list[Task]) -> Task:
    """The smallest real task with three or more demonstrations."""
    return next(t for t in select(eval_tasks, order="size") if len(t.train) >= 3)


def decoded(bpe, ids: list[int]) -> str:
    return bpe.decode(ids, skip_special_tokens=False)


def test_the_tokenizer_really_merges(bpe) -> None:
    assert len(bpe.encode("0000000000\n", add_special_tokens=False)) < 11
    assert len(bpe.encode("+/-=O", add_special_tokens=False)) < 5
    assert bpe.encode("<|im_end|>", add_special_tokens=False) == [bpe.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_is_the_formats_reference_text(codecs, bpe, task: Task, eval_tasks: list[Task], fmt: str) -> None:
    codec = codecs[fmt]
    for t in [task] + eval_tasks[:5]:
        assert decoded(bpe, codec.encode_train(t.train).ids) == reference(fmt, t.train)
        for test in t.test:
            assert decoded(bpe, codec.encode_prompt(t.train, test.input).ids) == reference(fmt, t.train, test.input)


def chat_messages(demos: list[Pair]) -> list[dict[str, str]]:
    return [
        m
        for p in demos
        for m in ({"role": "user", "content": rows(p.input)}, {"role": "assistant", "content": rows(p.output)})
    ]


def test_chat_text_is_what_the_template_itself_renders(codecs, bpe, task: Task) -> None:
    codec, test = codecs["chat"], task.test[0].input
    rendered = bpe.apply_chat_template(chat_messages(task.train), tokenize=False)
    assert decoded(bpe, codec.encode_train(task.train).ids) + "\n" == rendered
    prompt = bpe.apply_chat_template(
        chat_messages(task.train) + [{"role": "user", "content": rows(test)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert decoded(bpe, codec.encode_prompt(task.train, test).ids) == prompt
    # Generation stops at the template's end of turn, which is not the tokenizer's eos.
    assert codec.eos_id == bpe.convert_tokens_to_ids("<|im_end|>") != bpe.eos_token_id


def end_id(bpe, fmt: str) -> int:
    return bpe.convert_tokens_to_ids("<|im_end|>") if fmt == "chat" else bpe.eos_token_id


def answer_len(grid: np.ndarray) -> int:
    return grid.shape[0] * (grid.shape[1] + 1) + 1


def segments(labels: list[int]) -> list[list[int]]:
    """The runs of labelled (not IGNORE) positions."""
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


@pytest.mark.parametrize("mask_first_output", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_one_token_per_cell_and_labels_on_outputs_and_end_tokens(
    codecs, bpe, eval_tasks: list[Task], fmt: str, mask_first_output: bool
) -> None:
    codec = codecs[fmt]
    digits = {bpe.convert_tokens_to_ids(d): int(d) for d in "0123456789"}
    row, end = bpe.convert_tokens_to_ids("\n"), end_id(bpe, fmt)
    for t in eval_tasks[:40]:
        enc = codec.encode_train(t.train, mask_first_output=mask_first_output)
        cells = sum(p.input.size + p.output.size for p in t.train)
        assert sum(tok in digits for tok in enc.ids) == cells
        assert all(lab in (IGNORE, tok) for lab, tok in zip(enc.labels, enc.ids))
        learned = t.train[1:] if mask_first_output else t.train
        runs = segments(enc.labels)
        assert [len(r) for r in runs] == [answer_len(p.output) for p in learned]
        for run, pair in zip(runs, learned):  # each run is that output's rows, then the end token
            assert run[-1] == end and sum(tok == row for tok in run) == pair.output.shape[0]
            assert [digits[tok] for tok in run if tok in digits] == pair.output.ravel().tolist()
        for test in t.test:
            prompt = codec.encode_prompt(t.train, test.input).ids
            assert sum(tok in digits for tok in prompt) == cells + test.input.size


@pytest.mark.parametrize("fmt", FORMATS)
def test_answers_round_trip_and_stop_at_the_end_token(codecs, bpe, eval_grids: list[np.ndarray], fmt: str) -> None:
    codec = codecs[fmt]
    assert sorted(codec.output_tokens) == sorted(
        [bpe.convert_tokens_to_ids(d) for d in "0123456789"] + [bpe.convert_tokens_to_ids("\n"), end_id(bpe, fmt)]
    )
    for grid in eval_grids:
        ids = codec.encode_answer(grid)
        assert len(ids) == answer_len(grid) and ids[-1] == end_id(bpe, fmt)
        assert np.array_equal(codec.decode(ids), grid)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pair_tokens_is_what_a_pair_adds(codecs, eval_tasks: list[Task], fmt: str) -> None:
    codec = codecs[fmt]
    for t in eval_tasks[:20]:
        demos, test = t.train, t.test[0].input
        for k in range(1, len(demos)):  # a demonstration followed by another pair
            grown = len(codec.encode_train(demos[: k + 1]).ids) - len(codec.encode_train(demos[:k]).ids)
            assert codec.pair_tokens(demos[k]) == grown
            grown = len(codec.encode_prompt(demos[: k + 1], test).ids) - len(codec.encode_prompt(demos[:k], test).ids)
            assert codec.pair_tokens(demos[k]) == grown
        # A test input: the prompt's length beyond the sequence's opening (the empty training sequence).
        assert codec.pair_tokens(Pair(test)) == len(codec.encode_prompt([], test).ids) - len(codec.encode_train([]).ids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_plus_answer_is_the_training_sequence(codecs, eval_tasks: list[Task], fmt: str) -> None:
    """What generation and scoring see (prompt, then answer) is exactly what training saw."""
    codec = codecs[fmt]
    for t in eval_tasks[:30]:
        for test in t.test:
            full = codec.encode_train(list(t.train) + [test])
            assert codec.encode_prompt(t.train, test.input).ids + codec.encode_answer(test.output) == full.ids


def without(demos: list[Pair], i: int) -> list[Pair]:
    return demos[:i] + demos[i + 1 :]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_too_long_task_drops_exactly_the_demonstrations_it_must(codecs, eval_tasks: list[Task], fmt: str) -> None:
    codec = codecs[fmt]
    task = max(eval_tasks, key=lambda t: len(codec.encode_train(t.train).ids))
    demos, test = list(task.train), task.test[0].input
    assert len(demos) >= 3
    # The real lengths without one demonstration: the shortest is what dropping the longest gives.
    train_len = min(len(codec.encode_train(without(demos, i)).ids) for i in range(len(demos)))
    enc = codec.encode_train(demos, max_len=train_len)
    assert enc.dropped == 1 and len(enc.ids) == train_len
    assert codec.encode_train(demos, max_len=train_len - 1).dropped >= 2
    reserve = 100
    prompt_len = min(len(codec.encode_prompt(without(demos, i), test).ids) for i in range(len(demos)))
    enc = codec.encode_prompt(demos, test, max_len=prompt_len + reserve, reserve=reserve)
    assert enc.dropped == 1 and len(enc.ids) == prompt_len
    assert codec.encode_prompt(demos, test, max_len=prompt_len + reserve - 1, reserve=reserve).dropped >= 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_token_ids_are_every_id_the_codec_writes(codecs, eval_tasks: list[Task], fmt: str) -> None:
    codec = codecs[fmt]
    seen = {codec.pad_id}
    for t in eval_tasks:
        seen.update(codec.encode_train(t.train).ids)
        seen.update(tok for test in t.test for tok in codec.encode_prompt(t.train, test.input).ids)
    assert codec.token_ids == tuple(sorted(seen))
    assert codec.vocab_size == max(seen) + 1


def one_line_refusal(call, field: str = "format") -> str:
    with pytest.raises(ArcDataError) as caught:
        call()
    assert caught.value.field == field and "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("fmt", ["architects", "chat"])
def test_the_builtin_vocabulary_writes_only_plain(fmt: str) -> None:
    assert fmt in one_line_refusal(lambda: GridCodec.builtin(fmt))
    assert GridCodec.builtin("plain") == GridCodec.builtin()


def test_chat_needs_a_template_it_can_split(backend) -> None:
    assert "no" in one_line_refusal(lambda: GridCodec.from_tokenizer(wrap(backend, None), fmt="chat"))
    broken = {  # template -> what the refusal says
        "{{ messages[-1]['content'] }}": "once and in order",
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}": (
            "once and in order"
        ),
        "{% for m in messages %}{{ m['role'] }}{% if loop.index0 < 2 %}!{% endif %}:{{ m['content'] }}<|im_end|>"
        "{% endfor %}": "first and second turns differently",
        "{% for m in messages %}{{ m['content'] }}{% endfor %}": "nothing between turns",
        "{{ raise_exception('roles must alternate') }}": "roles must alternate",
    }
    for template, says in broken.items():
        message = one_line_refusal(
            lambda template=template: GridCodec.from_tokenizer(wrap(backend, template), name="tpl", fmt="chat")
        )
        assert message.startswith("tpl: format: ") and says in message, template
    assert "xml" in one_line_refusal(lambda: GridCodec.from_tokenizer(wrap(backend, None), fmt="xml"))


def test_architects_needs_letters_in_the_vocabulary(eval_tasks: list[Task]) -> None:
    """A tokenizer without the preprompt's letters maps them to <unk>: refused, naming the piece."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=100,
        special_tokens=["<unk>", "<eos>"],
        show_progress=False,
        initial_alphabet=list("0123456789IO+/-=\n"),
    )
    tok.train_from_iterator(["I0012300\n+/-=O3210\n"] * 3, trainer)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    GridCodec.from_tokenizer(wrapped, fmt="plain")  # the plain format needs no letters
    assert "unknown token" in one_line_refusal(
        lambda: GridCodec.from_tokenizer(wrapped, fmt="architects"), field="codec.prefix"
    )
