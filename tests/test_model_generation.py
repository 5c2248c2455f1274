"""Generation with the KV cache against a plain uncached greedy loop, and the sampling rules
against transformers' logits processors."""

from __future__ import annotations

import pytest
import torch

from model import STOPPED, GenerationConfig, VideoLM, generate, stream_generate
from model.generation import next_token
from model_helpers import tiny_video_lm

VIDEO_ID = 0  # also the id that left padding uses: padding must not count as a placeholder


@pytest.fixture(scope="module")
def model() -> VideoLM:
    model = tiny_video_lm(projector="mlp", video_token_id=VIDEO_ID)
    with torch.no_grad():  # larger weights than the init, so that greedy outputs vary
        for p in model.lm.parameters():
            p.mul_(8)
    return model


def greedy_uncached(model, prompt, video, n):
    """Full forward over the whole sequence at every step, argmax of the last logits. Generated
    tokens are embedded as text even if one equals the placeholder id."""
    out: list[int] = []
    with torch.no_grad():
        prompt_embeddings = model.embed(torch.tensor([prompt]), video)  # (1, P, dim)
        for _ in range(n):
            generated = model.lm.tok_embeddings(torch.tensor([out], dtype=torch.long))
            logits = model.lm(embeddings=torch.cat([prompt_embeddings, generated], dim=1))
            out.append(int(logits[0, -1].argmax()))
    return out


PROMPTS = [
    [1, 9, 17, 33, 2],
    [1, VIDEO_ID, VIDEO_ID, VIDEO_ID, 40, 41, 12, 5, 6, 7, 50],  # with a video
    [7],
    [1, 2, VIDEO_ID, VIDEO_ID, VIDEO_ID, 60],
]


def test_cached_greedy_equals_uncached_greedy(model):
    video = torch.randn(len(PROMPTS), 2, 4, 32, generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=12)
    batched = generate(model, PROMPTS, video, gen)
    for b, prompt in enumerate(PROMPTS):
        expected = greedy_uncached(model, prompt, video[b : b + 1], 12)
        assert batched[b] == expected, b
        assert generate(model, [prompt], video[b : b + 1], gen) == [expected]
    assert len({tuple(out) for out in batched}) > 1  # the test is not trivially passing


def test_text_only_batch_without_video(model):
    prompts = [[1, 9, 17], [4, 8, 15, 16, 23, 42]]
    got = generate(model, prompts, None, GenerationConfig(max_new_tokens=6))
    assert got == [greedy_uncached(model, p, None, 6) for p in prompts]


def test_stop_tokens_and_streaming(model):
    video = torch.randn(2, 2, 4, 32, generator=torch.Generator().manual_seed(0))
    free = generate(model, PROMPTS[:2], video, GenerationConfig(max_new_tokens=10))
    stop = free[0][3]
    assert stop not in free[0][:3]
    gen = GenerationConfig(max_new_tokens=10, stop_ids=[stop])  # a JSON list is accepted
    steps = list(stream_generate(model, PROMPTS[:2], video, gen))
    assert all(step.shape == (2,) for step in steps)
    first = [int(step[0]) for step in steps]
    assert first[:3] == free[0][:3] and all(t == STOPPED for t in first[3:])
    out = generate(model, PROMPTS[:2], video, gen)
    assert out[0] == free[0][:3]  # the stop token itself is not output
    cut = free[1].index(stop) if stop in free[1] else 10
    assert out[1] == free[1][:cut]
    # the stream ends as soon as every sample stopped
    both = GenerationConfig(max_new_tokens=10, stop_ids=(free[0][0], free[1][0]))
    assert [s.tolist() for s in stream_generate(model, PROMPTS[:2], video, both)] == [[STOPPED, STOPPED]]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    video = torch.randn(len(PROMPTS), 2, 4, 32, generator=torch.Generator().manual_seed(0))
    greedy = generate(model, PROMPTS, video, GenerationConfig(max_new_tokens=8))
    sample = GenerationConfig(max_new_tokens=8, temperature=1.5)
    a = generate(model, PROMPTS, video, sample, torch.Generator().manual_seed(7))
    b = generate(model, PROMPTS, video, sample, torch.Generator().manual_seed(7))
    assert a == b and a != greedy
    nucleus = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=1e-6)
    assert generate(model, PROMPTS, video, nucleus, torch.Generator().manual_seed(7)) == greedy


def test_generation_limits(model):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1, 2]], gen=GenerationConfig(max_new_tokens=model.cfg.lm.max_seq_len))
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


# --- next_token against transformers' logits processors ----------------------------------------


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, generator=g) * 3
    history = torch.randint(0, 20, (3, 6), generator=g)
    seen = torch.zeros(3, 20, dtype=torch.bool).scatter(1, history, True)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone()).argmax(-1)
    got = next_token(logits, seen, GenerationConfig(repetition_penalty=1.7))
    assert torch.equal(got, expected)
    assert not torch.equal(got, logits.argmax(-1))  # the penalty changed some choice


def test_top_p_and_temperature_match_transformers():
    transformers = pytest.importorskip("transformers")
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0])
    draws = 20000
    rows = logits.expand(draws, -1)
    seen = torch.zeros(draws, 7, dtype=torch.bool)
    for temperature, top_p in ((1.0, 0.8), (0.7, 0.95), (2.0, 1.0)):
        scaled = transformers.TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        kept = transformers.TopPLogitsWarper(top_p)(None, scaled)
        expected = kept.softmax(-1)[0]
        gen = GenerationConfig(temperature=temperature, top_p=top_p)
        tokens = next_token(rows, seen, gen, torch.Generator().manual_seed(1))
        freq = torch.bincount(tokens, minlength=7).float() / draws
        assert torch.equal(freq > 0, expected > 0), (temperature, top_p)
        torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)
