"""What is trained and how fast: the trainable parts, AdamW's parameter groups, and the learning
rate of each step (linear warmup, then a cosine to a floor)."""

from __future__ import annotations

import math

import torch
from torch import nn

from model import VideoLM
from trainer.config import PARTS, TrainConfig


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to ``cfg.lr``, then a cosine to ``cfg.lr * cfg.min_lr_ratio`` at ``total``."""
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.05 * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))



def set_trainable(model: VideoLM, parts: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    for part in PARTS:
        getattr(model, part).requires_grad_(part in parts)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, and the LM at `lm_lr_ratio` times the rate of
    the summary and projector. Why: AdamW moves every weight by about lr per step, which is a
    large relative change for the LM's small (std 0.02) weights; a fresh LM at the full rate learns
    the answer format within a few dozen steps by a constant that drowns the video signal at its
    final norm, and what the summary must still learn (motion, shape) never gets through. Measured
    on the demo corpus: direction at chance with one rate, 78-93% with the LM at 0.1x."""
    groups = []
    for is_lm in (False, True):
        part = [p for n, p in named if n.startswith("lm.") == is_lm]
        scale = cfg.lm_lr_ratio if is_lm else 1.0
        groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda" or None)

