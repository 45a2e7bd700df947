"""The engine needs nothing new for a prompt format: a tiny Hugging Face model whose tokenizer holds the
ARChitects' letters and a chat template, loaded through load_model with format architects or chat, learns one
task, and the DFS and teacher-forced scoring work on the codec alone (end token, output tokens, answers). On
the real task's augmented prompts in every format, the batched search finds what the one-row search finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from one_row_dfs import one_row_dfs

from arcfold.config import ModelConfig
from arcfold.data import ArcDataError, Task
from arcfold.data.augment import make_views
from arcfold.engine.dfs import dfs
from arcfold.engine.model import load_model
from arcfold.engine.teacher_forcing import answer_logps


@pytest.fixture(scope="module")
def format_model_dir(tmp_path_factory: pytest.TempPathFactory, format_tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("hf_formats")
    tokenizer = format_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def fit(model: torch.nn.Module, ids: list[int], labels: list[int], steps: int) -> float:
    """Full fine-tuning on one sequence, so that the random model becomes confident on its answer."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = dict(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def independent_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(answer))


@pytest.mark.parametrize("fmt", ["architects", pytest.param("chat", marks=pytest.mark.slow)])
def test_dfs_and_scoring_work_in_the_format(format_model_dir: Path, small_tasks: list[Task], fmt: str) -> None:
    loaded = load_model(ModelConfig(kind="hf", path=str(format_model_dir), device="cpu", dtype="float32"), fmt)
    codec, tok, model = loaded.codec, loaded.tokenizer, loaded.model
    end = "<|im_end|>" if fmt == "chat" else "</s>"
    assert codec.format == fmt and codec.eos_id == tok.convert_tokens_to_ids(end)
    task = small_tasks[0]
    test = task.test[0]
    train = codec.encode_train(list(task.train) + [test])
    assert fit(model, train.ids, train.labels, steps=90) < 0.05
    prompt, truth = codec.encode_prompt(task.train, test.input).ids, codec.encode_answer(test.output)
    assert prompt + truth == train.ids  # the prompt is the training sequence cut before the answer

    searched = dfs(model, [prompt], codec, min_prob=0.05, max_new_tokens=len(truth) + 8)
    (found,), stats = searched.completions, searched.stats
    assert found and stats.forward_tokens > 0
    assert np.array_equal(codec.decode(found[0].ids), test.output)  # stops at the format's end token
    assert all(c.ids[-1] == codec.eos_id for c in found)
    answers = [c.ids for c in found] + [codec.encode_answer(task.train[0].output)]
    (scored,), _ = answer_logps(model, [prompt], [answers])
    for answer, logp in zip(answers, scored):
        assert logp == pytest.approx(independent_logp(model, prompt, answer), abs=1e-4)
    for completion, logp in zip(found, scored):
        assert completion.logp == pytest.approx(logp, abs=1e-4)


def test_load_model_refuses_a_format_the_model_cannot_write(make_tiny_cfg, hf_cfg) -> None:
    for call in (lambda: load_model(make_tiny_cfg(), "architects"), lambda: load_model(hf_cfg, "chat")):
        with pytest.raises(ArcDataError) as caught:
            call()
        assert caught.value.field == "format" and "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_run_writes_the_configured_format(format_model_dir: Path, tmp_path: Path) -> None:
    """pipeline.run hands format.name to load_model: one small task end to end in the chat format."""
    from hydra import compose, initialize_config_module

    from arcfold import pipeline
    from arcfold.checks import check
    from arcfold.config import register
    from arcfold.run.worker import Engine

    register()
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"outputs={tmp_path}",
                "model=hf",
                f"model.path={format_model_dir}",
                "model.device=cpu",
                "model.dtype=float32",
                "format=chat",
                "data.limit=1",
                "data.order=size",
                "folds=1",
                "tracking=off",
                "save_adapters=none",
                "train.max_len=1200",
                "inference.max_len=1200",
                "inference.max_seconds=20",
            ],
        )
    check(cfg)
    loaded = []
    counting = Engine(load_model=lambda *args, **kwargs: loaded.append(load_model(*args, **kwargs)) or loaded[-1])
    result = pipeline.run(cfg, tmp_path, engine=counting)
    assert [m.codec.format for m in loaded] == ["chat"]
    assert not result.failures and len(result.folds) == 1 and result.folds[0].train_tokens > 0


@pytest.mark.parametrize("fmt", ["plain", "architects", pytest.param("chat", marks=pytest.mark.slow)])
def test_the_batched_search_finds_what_the_one_row_search_finds(
    format_model_dir: Path, small_tasks: list[Task], fmt: str
) -> None:
    """Eight D8 x colour views of a real ARC-AGI-2 task (prompts of two lengths), a model trained on the identity
    view so that the search has branches to follow there and few elsewhere: the batched search at batch sizes 1,
    2, 7 and 64 returns, for every view, exactly the one-row search's completions with the same log-probs
    within 1e-5."""
    loaded = load_model(ModelConfig(kind="hf", path=str(format_model_dir), device="cpu", dtype="float32"), fmt)
    codec, model = loaded.codec, loaded.model
    task = small_tasks[0]
    train = codec.encode_train(list(task.train) + [task.test[0]])
    fit(model, train.ids, train.labels, steps=60)
    views = make_views(task, 1, seed=5)
    prompts = [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views]
    assert len({len(p) for p in prompts}) == 2
    max_new = len(codec.encode_answer(task.test[0].output)) + 2
    reference = [one_row_dfs(model, prompt, codec, 0.005, max_new)[0] for prompt in prompts]
    assert any(len(found) > 1 for found in reference)
    assert any(len(c.ids) > 3 for found in reference for c in found), [[c.ids for c in f] for f in reference]
    for batch_size in (1, 2, 7, 64):
        searched = dfs(model, prompts, codec, 0.005, max_new, batch_size=batch_size)
        for found, expected in zip(searched.completions, reference):
            assert [c.ids for c in found] == [c.ids for c in expected], batch_size
            assert [c.logp for c in found] == pytest.approx([c.logp for c in expected], abs=1e-5)
