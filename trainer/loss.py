"""The precision training and evaluation run in. The loss itself is `model.loss.token_loss_sum`
(the model's own loss is the same function), imported here for the trainer's callers."""

from __future__ import annotations

import contextlib

import torch

from model.loss import token_loss_sum

__all__ = ["autocast", "token_loss_sum"]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
