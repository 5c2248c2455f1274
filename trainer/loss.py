"""The training objective and the precision it runs in, shared by training and evaluation."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.tokenization import IGNORE


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the next-token cross-entropy over labelled positions (float32).

    logits: (B, L, V); labels: (B, L), ``labels[:, t]`` the token at t or IGNORE. The caller
    divides by the number of labelled tokens of the whole global batch, so every token weighs
    the same however the batch is split over micro-batches and processes.
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
