"""Batched autoregressive generation with a KV cache: greedy, temperature, top-p, repetition
penalty, stop tokens, and a streaming form.

Prompts of different lengths are left-padded so every sample's next token lands in the same
column; rotary positions are counted from each sample's first real token, so padding changes
nothing but the batch shape. The prompt (with its video spliced in) is run once; every later
step feeds one token per sample and reads the earlier keys and values from the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from model.config import GenerationConfig
from model.lm import KVCache
from model.video_lm import VideoLM

STOPPED = -1  # what `stream_generate` yields for a sample that has already stopped


def next_token(
    logits: Tensor, seen: Tensor, gen: GenerationConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Choose one token per row of ``logits`` (B, V); ``seen`` (B, V) bool marks tokens already
    in the sequence, for the repetition penalty (CTRL's rule, as Hugging Face applies it)."""
    logits = logits.float()
    if gen.repetition_penalty != 1.0:
        penalised = torch.where(
            logits > 0, logits / gen.repetition_penalty, logits * gen.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if gen.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= gen.top_p
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids (B, P) left-padded with 0, and the mask (B, P) of real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            mask[row, width - len(prompt) :] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def stream_generate(
    model: VideoLM,
    prompts: Sequence[Sequence[int]],
    video: Tensor | None = None,
    gen: GenerationConfig = GenerationConfig(),
    generator: torch.Generator | None = None,
    video_counts: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every prompt, (B,) long, one step at a time.

    prompts: B token-id lists (each with a placeholder run per video it has); video: (V, F, T, D)
    or None, the videos of prompt 0, then of prompt 1, ...; video_counts: (B,) videos per prompt
    (None: one each). A sample that met a stop token yields `STOPPED` from then on; the iteration
    ends when all samples stopped or after ``gen.max_new_tokens`` steps.
    """
    if not prompts or not all(prompts):
        raise ValueError("generation needs at least one prompt and no empty prompt")
    device = model.lm.tok_embeddings.weight.device
    ids, mask = left_pad(prompts, device)  # (B, P)
    B, P = ids.shape
    if P + gen.max_new_tokens > model.cfg.lm.max_seq_len:
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({gen.max_new_tokens}) exceed the model's "
            f"max_seq_len {model.cfg.lm.max_seq_len}"
        )
    embeddings = model.embed(ids, video, mask, None if video_counts is None else video_counts.to(device))
    cache = KVCache(model.cfg.lm, B, P + gen.max_new_tokens, device, embeddings.dtype)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P), real tokens from 0
    logits = model.lm(embeddings=embeddings, attention_mask=mask, positions=positions, cache=cache)
    seen = torch.zeros(B, model.cfg.lm.vocab_size, dtype=torch.long, device=device)
    seen = seen.scatter_add(1, ids, mask.long()) > 0  # (B, V): tokens of the prompt
    stop_ids = torch.tensor(gen.stop_ids, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1  # (B, 1)
    for step in range(gen.max_new_tokens):
        token = next_token(logits[:, -1], seen, gen, generator)  # (B,)
        stopped |= torch.isin(token, stop_ids)
        yield token.masked_fill(stopped, STOPPED)
        if stopped.all() or step == gen.max_new_tokens - 1:
            return
        seen[torch.arange(B, device=device), token] = True
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = model.lm(
            token[:, None], attention_mask=mask, positions=next_position, cache=cache
        )  # (B, 1, V)
        next_position = next_position + 1


def generate(model: VideoLM, prompts: Sequence[Sequence[int]], video: Tensor | None = None,
             gen: GenerationConfig = GenerationConfig(), generator: torch.Generator | None = None,
             video_counts: Tensor | None = None) -> list[list[int]]:
    """The new tokens of every prompt (without the stop token); `stream_generate`'s arguments."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(model, prompts, video, gen, generator, video_counts):
        for out, token in zip(outputs, step.tolist()):
            if token != STOPPED:
                out.append(token)
    return outputs
