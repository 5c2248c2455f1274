"""VideoLM: connector (the VideoSummary or a `model.connectors` kind) -> projector -> video tokens
spliced into the prompt -> MiniMind LM.

A prompt carries each of its videos as one run of ``cfg.n_video_tokens`` consecutive
``video_token_id`` placeholder tokens; the projected connector tokens of its k-th video replace
its k-th run, in order. The videos of a batch come as one (V, F, T, D) tensor, sample after
sample, with ``video_counts`` (B,) saying how many each sample has (None: one each). A sample
without placeholders is text-only (its videos, if any, are ignored), and ``video=None`` means no
sample has a video: placeholders then keep their own token embedding.

Batches are right-padded for training (``forward``); generation left-pads (see
`model.generation`). The splice is one gather + where over the whole batch, so its cost does not
grow with a Python loop over samples and its shapes stay static.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from model.config import VideoLMConfig
from model.connectors import build_connector
from model.lm import MiniMindLM
from model.loss import n_targets, token_loss_sum
from model.pretrained import load_lm
from model.projector import Projector


def splice_video_tokens(
    embeddings: Tensor, is_placeholder: Tensor, video_tokens: Tensor, video_counts: Tensor | None = None
) -> Tensor:
    """Replace each sample's placeholder positions by its videos' tokens, in order.

    embeddings: (B, L, dim); video_tokens: (V, N, dim), the videos of sample 0, then of sample 1,
    ...; video_counts: (B,) videos per sample (None: one each, V = B); is_placeholder: (B, L)
    bool, each row holds 0 or video_counts * N True. Returns (B, L, dim).
    """
    V, N, dim = video_tokens.shape
    if video_counts is None:
        video_counts = torch.ones(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
    counts = is_placeholder.sum(dim=1)  # (B,)
    if not ((counts == 0) | (counts == video_counts * N)).all():
        raise ValueError(
            f"each prompt needs 0 or exactly {N} video placeholder tokens per video; got "
            f"{counts.tolist()} placeholders for {video_counts.tolist()} videos"
        )
    # the k-th placeholder of sample b takes flat video token (its first video) * N + k; other
    # positions gather a dummy token 0
    first = (video_counts.cumsum(dim=0) - video_counts) * N  # (B,)
    slot = (first[:, None] + is_placeholder.cumsum(dim=1) - 1).clamp(0, V * N - 1)  # (B, L)
    gathered = video_tokens.reshape(V * N, dim).index_select(0, slot.flatten()).view(*slot.shape, dim)  # (B, L, dim)
    return torch.where(is_placeholder[..., None], gathered.to(embeddings.dtype), embeddings)


class VideoLM(nn.Module):
    """The video chat model. Submodules ``lm``, ``summary`` (the connector of ``cfg.summary.kind``)
    and ``projector`` can be frozen by name."""

    def __init__(self, cfg: VideoLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm = MiniMindLM(cfg.lm)
        self.summary = build_connector(cfg.summary)  # (B, F, T, D) -> (B, n_video_tokens, D)
        self.projector = Projector(cfg.projector, cfg.summary.vision_dim, cfg.lm.dim)

    def load_lm(self, path: str | Path) -> None:
        """Load a pretrained MiniMind file or Hugging Face Llama directory into ``self.lm``."""
        load_lm(self.lm, path)

    def embed(
        self, input_ids: Tensor, video: Tensor | None, attention_mask: Tensor | None = None,
        video_counts: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings (B, L, dim) with each placeholder run replaced by its video's tokens.

        video: (V, F, T, D) frame tokens, any float dtype (cast to the model's), or None;
        video_counts: (B,) videos per sample (None: one each, V = B).
        attention_mask: (B, L), 0/False on padding, so that a pad id equal to the placeholder
        id is not taken for a placeholder.
        """
        embeddings = self.lm.tok_embeddings(input_ids)  # (B, L, dim)
        if video is None:
            return embeddings
        is_placeholder = input_ids == self.cfg.video_token_id  # (B, L)
        if attention_mask is not None:
            is_placeholder &= attention_mask.bool()
        video = video.to(self.lm.tok_embeddings.weight.dtype)
        video_tokens = self.projector(self.summary(video))  # (V, N, dim)
        return splice_video_tokens(embeddings, is_placeholder, video_tokens, video_counts)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        video: Tensor | None = None,
        labels: Tensor | None = None,
        video_counts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, L, vocab) and the mean next-token loss over labelled positions (or None).

        input_ids: (B, L) long, right-padded; attention_mask: (B, L), 0/False on padding;
        video: (V, F, T, D) or None, video_counts (B,) as in `embed`; labels: (B, L) long aligned
        with input_ids (labels[:, t] is the token at position t), IGNORE where no loss is wanted
        (`model.loss`).
        """
        embeddings = self.embed(input_ids, video, attention_mask, video_counts)
        # Causality already hides right padding from real positions, so the LM gets no mask
        # and runs SDPA's fused causal kernel (padded positions must carry label -100).
        logits = self.lm(embeddings=embeddings)
        if labels is None:
            return logits, None
        # a batch with no labelled target (an answer cut off by truncation) gives 0, not NaN
        return logits, token_loss_sum(logits, labels) / n_targets(labels).clamp(min=1)
