"""The next-token loss: one definition for `VideoLM`'s own loss and the trainer's.

Labels are aligned with the input ids (``labels[:, t]`` is the token at position t, or IGNORE
where no loss is wanted: prompts, padding); the shift to next-token targets happens here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # label of a position without loss (F.cross_entropy's default ignore_index)


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the next-token cross-entropy over labelled positions, in float32.

    logits: (B, L, V); labels: (B, L). A sum, not a mean, so that a caller can divide by the
    labelled tokens of a whole global batch and every token weighs the same however the batch
    is split over micro-batches and processes.
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def n_targets(labels: Tensor) -> Tensor:
    """How many positions `token_loss_sum` covers (a 0-d tensor)."""
    return (labels[:, 1:] != IGNORE).sum()
