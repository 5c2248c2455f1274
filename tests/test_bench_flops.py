"""bench/flops.py: the FLOPs behind the benches' ceiling and MFU columns, against counts by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.flops import count_flops  # noqa: E402
from pipeline.encoder import EncoderSpec, load_encoder  # noqa: E402


def test_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(48, 80, bias=False)
    x = torch.randn(5, 48, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * 5 * 48 * 80
    # backward: the input's and the weight's gradients, one matmul each
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 5 * 48 * 80


def test_the_demo_tower_counts_its_attention():
    """demo-tiny (96 px, 16 px patches, width 64, 3 blocks, MLP 4x): per block 12 d^2 a token for
    the projections and the MLP and 2 L^2 d for attention's two products, plus the patch
    embedding, 2 FLOPs per multiply-add."""
    encoder = load_encoder(EncoderSpec("demo-tiny", "none", -1, "fp32"))
    patches, d, blocks = (96 // 16) ** 2, 64, 3
    tokens = patches + 1
    by_hand = 2 * (blocks * (12 * d * d * tokens + 2 * tokens * tokens * d) + patches * d * 3 * 16 * 16)
    x = torch.zeros(2, 3, 96, 96)
    assert count_flops(lambda: encoder.tokens(x)) == 2 * by_hand
    with torch.inference_mode():  # as the extraction runs it
        assert count_flops(lambda: encoder.tokens(x)) == 2 * by_hand

