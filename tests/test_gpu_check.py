"""benchmarks/gpu_check.py's arithmetic, without a card: the peak each card's name gets, and the FLOPs formula."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))  # gpu_check imports its neighbour bench_memory
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", 65.0),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: no MFU unless --peak-tflops
    ],
)
def test_each_card_gets_its_own_peak(gpu_check, name, tflops):
    assert gpu_check.peak_tflops(name)[0] == tflops


def test_the_flops_count_linear_head_and_causal_attention(gpu_check):
    # two sequences of 10 and 20 tokens, 7 labelled positions; 100 linear weights, 30 head weights, 2 layers, d_q 8
    flops, attention = gpu_check.train_flops([10, 20], 7, linear=100, head=30, layers=2, d_q=8)
    assert attention == 6 * 2 * 8 * (10**2 + 20**2)
    assert flops == 4 * 100 * 30 + 4 * 30 * 7 + attention


def test_the_dfs_columns_time_a_forced_chain_of_fixed_length(gpu_check, make_tiny_cfg):
    # the tiny random model is flat: without the hook the DFS would stop at its first step and time nothing
    import torch

    from arcfold.data import make_views
    from arcfold.engine.model import load_model

    bench_memory = sys.modules["bench_memory"]
    loaded = load_model(make_tiny_cfg(max_position_embeddings=512))
    model, codec = loaded.model, loaded.codec
    task = bench_memory.random_task(2, 3, seed=0)
    views = make_views(task, 1, seed=0)
    prompts = [codec.encode_prompt(v.pairs(task.train), v.grid(task.test[0].input)).ids for v in views]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = gpu_check.dfs_rates(model, codec, prompts, torch.device("cpu"), max_new=9)
    finally:
        torch.set_num_threads(before)
    # one branch per view per depth, 8 decode forwards per view (max_new - 1): 1-row 8 x 8 forwards of 1 token,
    # batched 8 forwards of 8 rows x 1 token
    assert (got["dfs_1row_passes"], got["dfs_1row_tokens"]) == (64, 64)
    assert (got["dfs_batched_passes"], got["dfs_batched_tokens"]) == (8, 64)
    assert got["dfs_1row_tok_s"] > 0 and got["dfs_batched_tok_s"] > 0
    assert model.get_output_embeddings()._forward_hooks == {}  # the head is left as it was
