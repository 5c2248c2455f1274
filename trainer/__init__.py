"""The trainer (DESIGN §3.5): learns VideoSummary, projector and MiniMind LM from cached CLIP
features, evaluates a run, and chats with it. Never decodes a video or loads CLIP while training.

Modules, one idea each:
    tokenization  byte-level BPE, chat template, loss mask; the `tokenizer` command
    store         opening the Zarr feature store; its checks against the manifest and the run
    data          tokenised samples, disk/ram/gpu feature sources, the batch plan (sampler), batches
    loss          the token-weighted loss and the precision it runs in
    checkpoint    safetensors weights + a pickle-free training state, atomic, last K kept
    metrics       metrics.jsonl and loss.png
    distributed   torchrun ranks and collectives
    run           the run directory and loading a trained model
    train         the training loop; the `train` command
    evaluate      val loss, answer accuracy, accuracy by question type, ablations; `eval`
    chat          `chat` (store row or video file, multi-turn, streamed) and `describe`
"""

from torch_guard import guard_torch

guard_torch()  # before torch: see torch_guard.py

from trainer.chat import ChatConfig, DescribeConfig, chat, describe
from trainer.errors import TrainerError
from trainer.evaluate import EvalConfig, evaluate
from trainer.tokenization import TokenizerConfig, tokenizer
from trainer.train import TrainConfig, TrainResult, train

__all__ = [
    "ChatConfig",
    "DescribeConfig",
    "EvalConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TrainResult",
    "TrainerError",
    "chat",
    "describe",
    "evaluate",
    "tokenizer",
    "train",
]
