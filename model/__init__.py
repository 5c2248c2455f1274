"""The video language model: MiniMind LM, VideoSummary, projector, VideoLM, its loss, generation,
and loading pretrained LMs. Plain PyTorch; nothing here reads videos or runs CLIP."""

from torch_guard import guard_torch

guard_torch()  # before torch: see torch_guard.py

from model.config import (
    GenerationConfig,
    LMConfig,
    MoEConfig,
    ProjectorConfig,
    SummaryConfig,
    VideoLMConfig,
    lm_preset,
)
from model.generation import STOPPED, generate, stream_generate
from model.lm import KVCache, MiniMindLM
from model.loss import IGNORE, n_targets, token_loss_sum
from model.pretrained import CheckpointError, load_lm, read_lm_config
from model.projector import Projector
from model.summary import VideoSummary
from model.video_lm import VideoLM, splice_video_tokens

__all__ = [
    "IGNORE",
    "STOPPED",
    "CheckpointError",
    "GenerationConfig",
    "KVCache",
    "LMConfig",
    "MiniMindLM",
    "MoEConfig",
    "Projector",
    "ProjectorConfig",
    "SummaryConfig",
    "VideoLM",
    "VideoLMConfig",
    "VideoSummary",
    "generate",
    "lm_preset",
    "load_lm",
    "n_targets",
    "read_lm_config",
    "splice_video_tokens",
    "stream_generate",
    "token_loss_sum",
]
