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
