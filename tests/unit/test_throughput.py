"""The FLOPs behind MFU (launcher.planning.flops, launcher.train.throughput.ModelFlops) against hand counts,
and the peak table."""

from __future__ import annotations

import pytest

from launcher.planning.flops import mfu, model_flops, peak_flops, step_flops
from launcher.train.throughput import ModelFlops


def test_model_flops_of_the_tiny_llama_by_hand(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    c = model.config  # hidden 32, 2 layers, 2 heads (1 KV head), intermediate 64, head tied to the embedding
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)  # width of k and v: 1 head of 16
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two RMSNorm weights
    dense = c.num_hidden_layers * per_layer + h + v * h  # + the final norm + the (tied) head's matmul
    assert ModelFlops.of(model) == ModelFlops(num_dense_params=dense, num_layers=2, attention_width=32)


def test_step_flops_by_hand():
    # N = 1000, L = 2, H = 8; sequences of 3 and 5 tokens: 6·1000·8 + 12·2·8·(9 + 25)
    assert step_flops(1000, 2, 8, [3, 5]) == 48_000 + 6_528
    # fixed-length rows: the familiar (6N + 12·L·H·T) per token
    assert step_flops(1000, 2, 8, [4] * 10) == 40 * (6 * 1000 + 12 * 2 * 8 * 4)
    assert model_flops(1000, 2, 8, tokens=8, squares=34) == step_flops(1000, 2, 8, [3, 5])


def test_peak_table_and_override():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("NVIDIA H200") == 989.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L4") == 121e12 and peak_flops("NVIDIA L40S") == 366.5e12
    assert peak_flops("cpu") is None and peak_flops(None) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    assert mfu(989.5e12 * 2 * 0.4, 1.0, world_size=2, peak=989.5e12) == pytest.approx(0.4)
    assert mfu(1e12, 1.0, 1, None) is None
