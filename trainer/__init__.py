"""The trainer (DESIGN §3.5): learns VideoSummary, projector and MiniMind LM from cached CLIP
features, evaluates a run, and chats with it. Never decodes a video or loads CLIP while training.

Modules, one idea each:
    tokenization  byte-level BPE, chat template, loss mask; the `tokenizer` command
    store         opening the Zarr feature store; its checks against the manifest and the run
    examples      tokenised samples of a split (each with its videos' rows), and why others were left out
    features      disk/ram/gpu feature sources: fetch(rows) -> (V, F, T, D)
    batching      the batch plan (distributed sampler), padded batches, the batch stream
    loss          the precision training and evaluation run in (the loss: model.loss)
    config        TrainConfig, its checks, and the model config it gives
    optim         trainable parts, AdamW groups, the learning-rate schedule
    checkpoint    safetensors weights + the loop's TrainState (pickle-free), atomic, last K kept
    metrics       metrics.jsonl and loss.png
    distributed   torchrun ranks and collectives
    run           the run directory (config.json, tokenizer) and loading a trained model
    resume        what --resume takes from a run, what it may change, whether the data changed
    setup         building everything a run needs before its first step
    train         the training loop (TrainState carried step to step); the `train` command
    evaluate      val loss, answer accuracy, accuracy by question type, ablations; `eval`
    eval_table    `eval --table`: runs side by side, with each one's connector and speed
    chat          `chat` (store rows or video files, one or several, multi-turn, streamed)
                  and `describe`
    web           `serve`: the Gradio chat page
"""

from torch_guard import guard_torch

guard_torch()  # before torch: see torch_guard.py

from trainer.chat import ChatConfig, DescribeConfig, chat, describe
from trainer.errors import TrainerError
from trainer.evaluate import EvalConfig, evaluate
from trainer.tokenization import TokenizerConfig, tokenizer
from trainer.config import TrainConfig
from trainer.train import TrainResult, train

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
