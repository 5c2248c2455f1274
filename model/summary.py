"""VideoSummary: a fixed number of learnable query tokens that read all frame tokens of a video.

Following GPT4Video, two query sets read the video: a spatial set over the frame tokens and a
temporal set over the frame tokens plus a learned frame-position embedding (added to every
token of frame f), so the temporal set can tell the order of the frames. Both sets also see a
learned token-position embedding (token t of every frame), so where a thing is in the frame is
explicit rather than left to the encoder's faint positional traces. Their outputs are
summed or concatenated.

With ``token_mlp`` every frame token first goes through one residual MLP of its own (shared
weights, pre- and post-LayerNorm). Keys and values are linear in the tokens, so without it the
queries can only take weighted means of linear features of the frozen tokens; what is
non-linear in them (the outline of a small object in a random tower's patch tokens, say) stays
out of reach.

The `full` kind is the mPLUG-Owl / GPT4Video abstractor layer: pre-LayerNorm, queries attend over
[video tokens; queries], residual, feed-forward, ``n_layers`` layers and a final LayerNorm.
The `cinego` kind is Cinego's own block, kept for comparison: attention only (its output
replaces the queries; no norm, residual or feed-forward), and without frame positions it cannot
see frame order (`SummaryConfig.cinego()`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import SummaryConfig


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a context sequence, biased projections
    (the parameters of ``nn.MultiheadAttention``, computed with SDPA)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        B, Q, D = queries.shape
        S, H = context.shape[1], self.n_heads
        q = self.q(queries).view(B, Q, H, D // H).transpose(1, 2)  # (B, H, Q, hd)
        k, v = self.kv(context).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, S, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, hd)
        return self.out(y.transpose(1, 2).reshape(B, Q, D))


class AbstractorLayer(nn.Module):
    """Pre-LN cross-attention over [video; queries] with residual, then a residual GELU MLP."""

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__()
        dim, hidden = cfg.vision_dim, int(cfg.mlp_ratio * cfg.vision_dim)
        self.norm_video = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, cfg.n_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, queries: Tensor, video: Tensor) -> Tensor:
        q = self.norm_queries(queries)  # (B, Q, D)
        context = torch.cat([self.norm_video(video), q], dim=1)  # (B, F*T + Q, D)
        queries = queries + self.attention(q, context)
        return queries + self.mlp(self.norm_mlp(queries))


class CinegoLayer(nn.Module):
    """Cinego's block: the attention output over [video; queries] replaces the queries."""

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__()
        self.attention = CrossAttention(cfg.vision_dim, cfg.n_heads)

    def forward(self, queries: Tensor, video: Tensor) -> Tensor:
        return self.attention(queries, torch.cat([video, queries], dim=1))


class TokenMLP(nn.Module):
    """LayerNorm(x + MLP(LayerNorm(x))) on every frame token: a trainable non-linearity over the
    frozen features. The closing norm (no affine) keeps the tokens at the unit scale of the CLIP
    tokens and the position tables; without it the MLP's output grows during training until the
    frame positions are lost beside it (measured: direction fell from 100% to 47% on the demo)."""

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__()
        dim, hidden = cfg.vision_dim, int(cfg.mlp_ratio * cfg.vision_dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.out_norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, video: Tensor) -> Tensor:
        return self.out_norm(video + self.mlp(self.norm(video)))  # (B, F, T, D)


class QuerySet(nn.Module):
    """One set of learnable queries and the layers through which it reads the video."""

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, cfg.vision_dim) * 0.02)
        layer = AbstractorLayer if cfg.kind == "full" else CinegoLayer
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.n_layers))

    def forward(self, video: Tensor) -> Tensor:
        queries = self.queries.expand(video.shape[0], -1, -1)  # (B, Q, D)
        for layer in self.layers:
            queries = layer(queries, video)
        return queries


class VideoSummary(nn.Module):
    """(B, F, T, D) frame tokens -> (B, n_output_tokens, D) summary tokens."""

    def __init__(self, cfg: SummaryConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial = QuerySet(cfg)
        self.temporal = QuerySet(cfg)
        # Position tables at unit scale, like the LayerNorm-ed CLIP tokens they are added to (at
        # GPT's usual 0.02 they are invisible next to them and are learnt far too slowly).
        self.frame_pos = (
            nn.Parameter(torch.randn(cfg.n_frames, cfg.vision_dim) * cfg.pos_std) if cfg.use_frame_pos else None
        )
        # Where in the frame a token sits: CLIP towers carry it only weakly in the token content,
        # and motion is "where" changing with "when".
        self.token_pos = (
            nn.Parameter(torch.randn(cfg.n_tokens, cfg.vision_dim) * cfg.pos_std) if cfg.use_token_pos else None
        )
        self.norm = nn.LayerNorm(cfg.vision_dim) if cfg.kind == "full" else nn.Identity()
        self.token_mlp = TokenMLP(cfg) if cfg.token_mlp else nn.Identity()

    def forward(self, video: Tensor) -> Tensor:
        B, n_frames, T, D = video.shape
        if self.frame_pos is not None and n_frames > self.cfg.n_frames:
            raise ValueError(
                f"video has {n_frames} frames; the frame-position table holds {self.cfg.n_frames}"
            )
        video = self.token_mlp(video)
        if self.token_pos is not None:
            if T > self.cfg.n_tokens:
                raise ValueError(f"frames have {T} tokens; the token-position table holds {self.cfg.n_tokens}")
            video = video + self.token_pos[:T]  # token t of every frame gets pos t
        spatial = self.spatial(video.reshape(B, n_frames * T, D))  # (B, Q, D)
        if self.frame_pos is not None:
            video = video + self.frame_pos[:n_frames, None, :]  # every token of frame f gets pos f
        temporal = self.temporal(video.reshape(B, n_frames * T, D))  # (B, Q, D)
        if self.cfg.combine == "sum":
            summary = spatial + temporal
        else:
            summary = torch.cat([spatial, temporal], dim=1)  # (B, 2Q, D)
        return self.norm(summary)
