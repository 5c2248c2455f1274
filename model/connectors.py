"""Connectors without queries: other ways than the VideoSummary to turn a video's cached frame
tokens into the tokens that the projector maps into the LM (selected by ``SummaryConfig.kind``,
``run_train.py train --summary``; `build_connector` makes any kind, the VideoSummary's included).

A frame's T tokens are the CLS token, then the g x g patch tokens in row-major order (open_clip's
layout, T = 1 + g*g: 50 tokens and a 7 x 7 grid for ViT-B/32 at 224 px). Token counts per sample,
for F = 8 frames of T = 50 tokens:

  kind      video tokens           F=8, T=50    weights               can it see frame order?
  full      Q (2Q, combine concat) 32 (Q=32)    queries, attention    yes: frame-position table
  cinego    Q = 197                197          queries, attention    no: the same output for any order
  mean      T                      50           none                  no: the same output for any order
  concat    F * k                  8 (k=1)      none                  only through where its tokens sit
                                   32 (k=4)
  vchatgpt  F + T - 1              57           none                  only through where its temporal
                                                                      tokens sit; spatial tokens: no
  pool      F * ceil(g/s)^2        128 (s=2)    frame-position table  yes: frame-position table

(ViT-B/16 at 224 px, T = 197 = 1 + 14 x 14: mean 197, vchatgpt 204, pool 392 with s=2.)

"Only through where its tokens sit": the connector itself has no notion of order, but it lists the
frames' tokens in frame order, so reordering the frames reorders its output tokens the same way;
the LM can tell which came first only from their positions in the prompt (its rotary positions).

The `pool` kind's edge windows: LLaVA-Video's ``avg_pool2d(x, s)`` floors, so on an odd grid
(7 x 7 with s=2) it drops the last row and column (13 of 49 patches); here the windows that run
over the edge average the cells they cover (``ceil_mode``), so every patch counts and there are
ceil(g/s)^2 tokens per frame. On an even grid the two are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import QUERY_KINDS, SummaryConfig
from model.summary import VideoSummary


def patch_grid(video: Tensor, g: int) -> Tensor:
    """(B, F, 1 + g*g, D) frame tokens -> (B*F, D, g, g): each frame's patch tokens as an image."""
    B, n_frames, _, D = video.shape
    return video[:, :, 1:].reshape(B * n_frames, g, g, D).permute(0, 3, 1, 2)


def grid_tokens(grid: Tensor, B: int) -> Tensor:
    """(B*F, D, h, w) pooled grids -> (B, F, h*w, D) tokens, row-major like the patch tokens."""
    BF, D, h, w = grid.shape
    return grid.permute(0, 2, 3, 1).reshape(B, BF // B, h * w, D)


class Connector(nn.Module):
    """Base of the query-free connectors: (B, F, T, D) -> (B, cfg.n_output_tokens, D). It refuses a
    video of another shape than the config counts its tokens for (the prompt holds exactly
    ``n_output_tokens`` placeholders)."""

    uses_frames = True  # whether the token count depends on F

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def check(self, video: Tensor) -> None:
        _, n_frames, T, _ = video.shape
        if self.uses_frames and n_frames != self.cfg.n_frames:
            raise ValueError(f"video has {n_frames} frames; the {self.cfg.kind} connector is built for {self.cfg.n_frames}")
        if self.cfg.tokens_per_frame is not None and T != self.cfg.tokens_per_frame:
            raise ValueError(
                f"frames have {T} tokens; the {self.cfg.kind} connector is built for {self.cfg.tokens_per_frame}"
            )


class MeanConnector(Connector):
    """``mean``: each token position (CLS and every patch) averaged over the frames, T tokens.
    Blind to frame order by construction: any reordering of the frames gives the same output."""

    uses_frames = False

    def forward(self, video: Tensor) -> Tensor:
        self.check(video)
        return video.mean(dim=1)  # (B, F, T, D) -> (B, T, D)


class ConcatConnector(Connector):
    """``concat``: every frame reduced to k = ``concat_tokens`` tokens, the frames' tokens one after
    another (F*k tokens). k = 1 keeps each frame's CLS token; k = m*m averages the g x g patch grid
    into an m x m grid (adaptive average pooling: torch's bins, which overlap when m does not
    divide g). No weights and no frame positions: reordering the frames reorders the output's
    per-frame blocks the same way, so order is visible to the LM only from where the blocks sit."""

    def forward(self, video: Tensor) -> Tensor:
        self.check(video)
        B, n_frames, _, D = video.shape
        if self.cfg.concat_tokens == 1:
            return video[:, :, 0]  # CLS of each frame: (B, F, D)
        m = math.isqrt(self.cfg.concat_tokens)
        pooled = F.adaptive_avg_pool2d(patch_grid(video, self.cfg.patch_grid), m)  # (B*F, D, m, m)
        return grid_tokens(pooled, B).reshape(B, n_frames * m * m, D)  # (B, F*k, D)


class VChatGPTConnector(Connector):
    """``vchatgpt``: Video-ChatGPT's spatio-temporal pooling of the patch tokens (CLS left out, as
    Video-ChatGPT takes CLIP's patch tokens without it): F temporal tokens (frame f's patch
    tokens averaged) then T-1 spatial tokens (patch position p averaged over the frames), F + T - 1
    tokens, in that order as in Video-ChatGPT (whose temporal part is zero-padded to 100 frames;
    here F is fixed by the store, so there is no padding). No weights: the spatial tokens are
    blind to frame order; the temporal tokens are reordered with the frames, so order is visible
    to the LM only from where they sit. Video-ChatGPT reads CLIP's penultimate layer before the
    final LayerNorm; a store extracted with ``--layer -2`` has that layer after the LayerNorm."""

    def forward(self, video: Tensor) -> Tensor:
        self.check(video)
        patches = video[:, :, 1:]  # (B, F, T-1, D)
        temporal = patches.mean(dim=2)  # (B, F, D)
        spatial = patches.mean(dim=1)  # (B, T-1, D)
        return torch.cat([temporal, spatial], dim=1)  # (B, F + T-1, D)


class PoolConnector(Connector):
    """``pool``: LLaVA-Video's per-frame spatial pooling: each frame's g x g patch grid (CLS left
    out) average-pooled with an s x s window and stride s = ``pool_stride`` (edge windows average
    the cells they cover: ceil(g/s) x ceil(g/s) tokens), the frames' tokens one after another,
    F * ceil(g/s)^2 tokens. A learned frame-position table (unit-scale init, as the VideoSummary's)
    is added to every token of frame f, so the connector's output itself depends on frame order;
    ``use_frame_pos=False`` leaves it out (then only the tokens' places tell the order)."""

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__(cfg)
        self.frame_pos = (
            nn.Parameter(torch.randn(cfg.n_frames, cfg.vision_dim) * cfg.pos_std) if cfg.use_frame_pos else None
        )

    def forward(self, video: Tensor) -> Tensor:
        self.check(video)
        B, n_frames, _, D = video.shape
        s = self.cfg.pool_stride
        pooled = F.avg_pool2d(patch_grid(video, self.cfg.patch_grid), s, s, ceil_mode=True)  # (B*F, D, h, w)
        tokens = grid_tokens(pooled, B)  # (B, F, h*w, D)
        if self.frame_pos is not None:
            tokens = tokens + self.frame_pos[:, None, :]  # every token of frame f gets pos f
        return tokens.reshape(B, -1, D)  # (B, F*h*w, D)


CONNECTORS: dict[str, type[Connector]] = {
    "mean": MeanConnector, "concat": ConcatConnector, "vchatgpt": VChatGPTConnector, "pool": PoolConnector,
}


def build_connector(cfg: SummaryConfig) -> nn.Module:
    """The connector of ``cfg.kind``: the VideoSummary for `full` and `cinego`, else one above."""
    return VideoSummary(cfg) if cfg.kind in QUERY_KINDS else CONNECTORS[cfg.kind](cfg)
