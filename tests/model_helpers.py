"""Shared builders of the model tests: the tiny VideoLM that tests/test_model_video.py and
tests/test_model_generation.py run, so its sizes are written once."""

from __future__ import annotations

import torch

from model import ProjectorConfig, SummaryConfig, VideoLM, VideoLMConfig, lm_preset


def tiny_video_lm(projector: str, video_token_id: int) -> VideoLM:
    """A random VideoLM in eval mode, seeded (torch.manual_seed(0)): the `tiny` LM over a vocabulary
    of 64, a one-layer summary of 3 queries over at most 4 frames of 32-dim vision features, and
    a projector of kind `projector` ("linear" or "mlp"); `video_token_id` is the placeholder id."""
    torch.manual_seed(0)
    cfg = VideoLMConfig(
        lm=lm_preset("tiny", vocab_size=64),
        summary=SummaryConfig(vision_dim=32, n_queries=3, n_layers=1, n_heads=4, n_frames=4),
        projector=ProjectorConfig(projector),
        video_token_id=video_token_id,
    )
    return VideoLM(cfg).eval()
