"""Model configs round-trip through JSON and refuse bad values with one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model import GenerationConfig, LMConfig, SummaryConfig, VideoLMConfig, lm_preset


def test_video_lm_config_round_trips_through_json():
    cfg = VideoLMConfig(
        lm=lm_preset("small", vocab_size=8000),
        summary=SummaryConfig(n_queries=16, combine="concat"),
        video_token_id=7,
    )
    again = VideoLMConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and again.n_video_tokens == 32
    assert VideoLMConfig.from_dict({}) == VideoLMConfig()


def test_generation_config_from_json():
    gen = GenerationConfig.from_dict(json.loads('{"stop_ids": [2, 5], "temperature": 0.7}'))
    assert gen.stop_ids == (2, 5) and gen.temperature == 0.7
    hash(gen)  # frozen and hashable: the JSON list became a tuple


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LMConfig(dim=100, n_heads=8), "multiple of n_heads"),
        (lambda: LMConfig(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (lambda: SummaryConfig(kind="perceiver"), "kind"),
        (lambda: SummaryConfig(vision_dim=100, n_heads=8), "vision_dim"),
        (lambda: VideoLMConfig(video_token_id=6400), "video_token_id"),
        (lambda: VideoLMConfig.from_dict({"lm": {"width": 3}}), "unknown LMConfig field"),
        (lambda: lm_preset("huge"), "unknown LM preset"),
        (lambda: GenerationConfig(top_p=1.5), "top_p"),
    ],
)
def test_bad_values(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)
