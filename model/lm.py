"""MiniMind: a Llama-style decoder-only language model.

Token embedding, ``n_layers`` pre-norm blocks (RMSNorm, grouped-query attention with rotary
position embeddings, SwiGLU feed-forward), a final RMSNorm and an output head that by default
shares the embedding matrix. Parameter names are MiniMind's (``tok_embeddings``,
``layers.N.attention.wq``, ...), so a MiniMind state dict maps onto this module one to one.

With ``cfg.moe`` set, each feed-forward is MiniMind's mixture of experts (`model.moe`); after a
forward, `MiniMindLM.aux_loss_sum` and `MiniMindLM.expert_counts` read the routing it took.

Rotary layout: this module rotates the two *halves* of each head (Llama / Hugging Face
``rotate_half``). MiniMind itself rotates interleaved pairs; `model.pretrained` permutes the
q/k projection rows of MiniMind checkpoints on load, so one rotary code serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import LMConfig
from model.moe import MoEFeedForward


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (as Llama and MiniMind do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for ``positions`` (B, L), each (B, 1, L, head_dim).

    Computed in float32 from the positions on every call: no table to outgrow and no buffer
    that a ``.to(bfloat16)`` would round.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = theta**-exponent  # (head_dim/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, L, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + head_dim/2]) of x (B, H, L, head_dim) by its angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated_half * sin).type_as(x)


class KVCache:
    """Keys and values of every layer for the positions processed so far, preallocated."""

    def __init__(
        self,
        cfg: LMConfig,
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored; advanced by MiniMindLM after all layers ran

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k, v (B, H_kv, L, hd) of ``layer``; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions; {end} were needed")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention: n_kv_heads key/value heads shared by n_heads query heads."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
    ) -> Tensor:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd), S = cached + L
        if mask is not None:  # SDPA's flash and mem-efficient kernels refuse GQA with a mask
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=mask is None
        )  # (B, H, L, hd)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then h + feed_forward(norm(h)); the
    feed-forward is one SwiGLU, or MiniMind's mixture of SwiGLU experts with ``cfg.moe``."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe is None:
            self.feed_forward: nn.Module = FeedForward(cfg)
        else:
            self.feed_forward = MoEFeedForward(cfg.dim, cfg.moe, lambda: FeedForward(cfg))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask_4d(key_mask: Tensor, n_queries: int) -> Tensor:
    """Boolean mask (B, 1, Lq, Lk), True = may attend, for the last ``n_queries`` of Lk positions.

    A query sees earlier-or-same positions whose ``key_mask`` (B, Lk) is set, and always itself,
    so a padding query never has an empty row (which would make SDPA return NaN).
    """
    n_keys = key_mask.shape[1]
    q_index = torch.arange(n_keys - n_queries, n_keys, device=key_mask.device)[:, None]  # (Lq, 1)
    k_index = torch.arange(n_keys, device=key_mask.device)[None, :]  # (1, Lk)
    allowed = (k_index <= q_index) & key_mask[:, None, None, :].bool()
    return allowed | (k_index == q_index)


class MiniMindLM(nn.Module):
    """The language model. ``forward`` returns logits (B, L, vocab_size)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, param in self.named_parameters():
            if name.endswith(("attention.wo.weight", ".w2.weight")):  # experts' w2 too
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        embeddings: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (B, L, V) for ``input_ids`` (B, L) or ready ``embeddings`` (B, L, dim).

        attention_mask: (B, S) bool/int over all keys, S = cached + L; False/0 marks padding.
            With right padding it does not change the logits of real positions (causality
            already hides the padding), so None is fine there and takes the fused causal kernel.
        positions: (B, L) rotary positions; default cached .. cached + L - 1. Left-padded
            batches pass their own (real tokens counted from 0).
        cache: KV cache to read and extend (generation).
        """
        x = self.tok_embeddings(input_ids) if embeddings is None else embeddings  # (B, L, dim)
        B, L, _ = x.shape
        start = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(start, start + L, device=x.device).expand(B, L)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        if attention_mask is None and start == 0:
            mask = None  # plain causal attention
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, start + L, dtype=torch.bool, device=x.device)
            mask = attention_mask_4d(attention_mask, L)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += L
        return self.output(self.norm(x))

    def moe_layers(self) -> list[MoEFeedForward]:
        """The mixture-of-experts feed-forwards, in layer order (none in a dense LM)."""
        return [block.feed_forward for block in self.layers if isinstance(block.feed_forward, MoEFeedForward)]

    def aux_loss_sum(self, token_mask: Tensor) -> Tensor:
        """The load-balancing loss of the last forward, summed over layers and sequences
        (`MoEFeedForward.aux_loss_sum`); token_mask (B, L) False/0 on padding. 0 when dense."""
        total = torch.zeros((), device=token_mask.device)
        for layer in self.moe_layers():
            total = total + layer.aux_loss_sum(token_mask)
        return total

    def expert_counts(self, token_mask: Tensor) -> Tensor:
        """(MoE layers, experts) int64: the top-k choices of the last forward's real positions
        per expert (`MoEFeedForward.expert_counts`)."""
        return torch.stack([layer.expert_counts(token_mask) for layer in self.moe_layers()])
