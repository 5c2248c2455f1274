"""Projector: maps the connector's vision-width tokens (any `SummaryConfig` kind) into the language
model's embedding space."""

from __future__ import annotations

from torch import Tensor, nn

from model.config import ProjectorConfig


class Projector(nn.Module):
    """``linear``: one Linear (MiniMind-V, Cinego). ``mlp``: Linear-GELU-Linear (LLaVA-1.5)."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if cfg.kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (..., in_dim) -> (..., out_dim)
