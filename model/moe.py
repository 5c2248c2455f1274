"""MiniMind's mixture-of-experts feed-forward (jingyaogong/minimind ``MOEFeedForward`` + ``MoEGate``).

Per token x: scores = softmax(gate(x)) over the ``n_experts`` routed experts; the top
``experts_per_token`` (k) are kept and, when k > 1 and ``norm_topk_prob``, renormalised to sum to
1; the output is the weighted sum of those k experts' SwiGLU outputs, plus the shared expert's
(unweighted) when there is one. Parameter names are MiniMind's: ``gate.weight``,
``experts.{i}.w1/w2/w3``, ``shared_experts.w1/w2/w3``.

Each forward keeps its routing (`Routing`: the scores and the chosen experts of every position),
from which the caller, who knows which positions are padding, takes

- `MoEFeedForward.aux_loss_sum`: MiniMind's sequence-level load-balancing loss (``seq_aux=True``),
  summed over the sequences of the batch. For a sequence of n real tokens,
  ``alpha * sum_e f_e * P_e`` with f_e = (tokens routed to e) / (n k / E), the load relative to an
  even split, and P_e the mean score of e; MiniMind averages it over the batch and adds the sum
  over layers to the loss. A sum (not a mean) so that the trainer can divide by the sequences of
  the whole global batch; padding positions do not count (in MiniMind they do, which makes a
  sequence's loss depend on the batch it is padded in);
- `MoEFeedForward.expert_counts`: how many of the real tokens' k choices went to each expert.

The experts run on their own tokens only (a gather per expert, then the k outputs of each token
are put back in slot order and summed with their weights): no scatter-add, so the result is
deterministic on the GPU too. An expert that no token picked still runs, on zero rows, so that it
takes part in every backward (DDP expects every parameter to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MoEConfig


@dataclass
class Routing:
    """The routing of one forward: scores (B, L, E) float32 softmax over the experts, and
    chosen (B, L, k) long, the experts each position was sent to (highest score first)."""

    scores: Tensor
    chosen: Tensor


class MoEFeedForward(nn.Module):
    """Routed experts plus an optional shared expert, in place of one SwiGLU feed-forward."""

    def __init__(self, dim: int, cfg: MoEConfig, make_expert: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(cfg.n_experts))
        self.shared_experts = make_expert() if cfg.shared_expert else None
        self.routing: Routing | None = None  # of the last forward

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scores (N, E) float32, chosen (N, k), weights (N, k) float32) of tokens x (N, dim)."""
        scores = self.gate(x).float().softmax(dim=-1)
        weights, chosen = scores.topk(self.cfg.experts_per_token, dim=-1)
        if self.cfg.experts_per_token > 1 and self.cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, chosen, weights

    def forward(self, x: Tensor) -> Tensor:
        B, L, dim = x.shape
        tokens = x.reshape(B * L, dim)
        scores, chosen, weights = self.route(tokens)
        self.routing = Routing(scores.view(B, L, -1), chosen.view(B, L, -1))
        y = self._mix(tokens, chosen, weights).view(B, L, dim)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _mix(self, tokens: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """sum_j weights[:, j] * experts[chosen[:, j]](tokens), each expert run on its tokens."""
        N, k = chosen.shape
        slots = chosen.flatten()  # (N*k,) the expert of each (token, choice)
        by_expert = slots.argsort(stable=True)  # the slots grouped by expert
        counts = torch.bincount(slots, minlength=len(self.experts)).tolist()
        outputs = torch.cat([
            expert(tokens[group // k]) for expert, group in zip(self.experts, by_expert.split(counts))
        ])  # (N*k, dim) in expert order
        per_slot = outputs[by_expert.argsort()].view(N, k, -1)  # back in (token, choice) order
        return (per_slot * weights[..., None]).sum(dim=1).to(tokens.dtype)

    def _last_routing(self) -> Routing:
        if self.routing is None:
            raise RuntimeError("MoEFeedForward: no forward has run yet")
        return self.routing

    def aux_loss_sum(self, token_mask: Tensor) -> Tensor:
        """MiniMind's sequence-level balance loss times aux_loss_alpha, summed over the sequences
        of the last forward; token_mask (B, L) is False/0 on padding. A 0-d float32 tensor."""
        routing = self._last_routing()
        real = token_mask.to(routing.scores.dtype)[..., None]  # (B, L, 1)
        n_real = real.sum(dim=1)  # (B, 1)
        E, k = self.cfg.n_experts, self.cfg.experts_per_token
        picked = F.one_hot(routing.chosen, E).sum(dim=2).to(real.dtype)  # (B, L, E): 1 where e is chosen
        load = (picked * real).sum(dim=1) / (n_real * k / E).clamp(min=1e-20)  # (B, E), 1 = an even share
        mean_score = (routing.scores * real).sum(dim=1) / n_real.clamp(min=1)  # (B, E)
        return self.cfg.aux_loss_alpha * (load * mean_score).sum()

    def expert_counts(self, token_mask: Tensor) -> Tensor:
        """(E,) int64: how many of the real positions' top-k choices went to each expert."""
        chosen = self._last_routing().chosen[token_mask.bool()]  # (n_real, k)
        return torch.bincount(chosen.flatten(), minlength=self.cfg.n_experts)
