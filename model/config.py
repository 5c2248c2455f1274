"""Configuration dataclasses of the video LM and the named language-model presets.

Every config round-trips through plain dicts (``dataclasses.asdict`` / ``from_dict``), so a
training run can save its model config as ``config.json`` and a later process can rebuild the
exact same model from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self


class _FromDict:
    """``from_dict`` for config dataclasses: unknown keys are a one-line error, not a TypeError."""

    @classmethod
    def _check_fields(cls, values: Mapping[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        cls._check_fields(values)
        return cls(**values)


@dataclass(frozen=True)
class LMConfig(_FromDict):
    """A Llama-style decoder (MiniMind). The defaults are MiniMind2's 26M `small` model."""

    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    hidden_dim: int = 1408  # SwiGLU width
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 8192  # the longest sequence the model is meant to see (rotary is not capped)
    tie_embeddings: bool = True  # output head shares the token-embedding matrix

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"LMConfig: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LMConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LMConfig: head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# MiniMind2's model sizes (jingyaogong/minimind), plus a `tiny` one for tests and the CPU demo.
# hidden_dim follows MiniMind's rule: 2/3 of 4 * dim, rounded up to a multiple of 64.
LM_PRESETS: Final[Mapping[str, Mapping[str, int]]] = {
    "tiny": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=384),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, hidden_dim=1408),
    "base": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, hidden_dim=2048),
}


def lm_preset(name: str, vocab_size: int = 6400) -> LMConfig:
    """The named preset (`tiny`, `small`, `base`) for a tokenizer of ``vocab_size`` tokens."""
    if name not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; choose one of {', '.join(LM_PRESETS)}")
    return LMConfig(vocab_size=vocab_size, **LM_PRESETS[name])


@dataclass(frozen=True)
class SummaryConfig(_FromDict):
    """The VideoSummary: learnable queries that read all frame tokens of a video.

    ``kind="full"`` is the GPT4Video / mPLUG-Owl abstractor (pre-LayerNorm cross-attention over
    [video tokens; queries], residuals, feed-forward, ``n_layers`` layers). ``kind="cinego"`` is
    Cinego's block (attention only, no norm, residual or feed-forward); see `cinego()`.
    Both have a spatial and a temporal query set; only the temporal set sees frame positions,
    both see token positions (the `cinego` kind has neither).
    """

    kind: Literal["full", "cinego"] = "full"
    vision_dim: int = 768  # D of the cached CLIP tokens
    n_queries: int = 32  # per query set
    n_layers: int = 2
    n_heads: int = 8
    n_frames: int = 32  # size of the frame-position table: the most frames a video may have
    use_frame_pos: bool = True
    n_tokens: int = 577  # size of the token-position table: the most tokens per frame (ViT-L/14 at 336 px)
    use_token_pos: bool = True
    pos_std: float = 1.0  # init scale of the position tables (the CLIP tokens have unit scale)
    combine: Literal["sum", "concat"] = "sum"  # how the spatial and temporal sets are joined
    mlp_ratio: float = 4.0  # feed-forward width / vision_dim (full kind only; the token MLP's too)
    token_mlp: bool = False  # a residual per-token MLP on the frame tokens before the queries read them

    def __post_init__(self) -> None:
        if self.kind not in ("full", "cinego"):
            raise ValueError(f"SummaryConfig: kind must be 'full' or 'cinego', not {self.kind!r}")
        if self.combine not in ("sum", "concat"):
            raise ValueError(f"SummaryConfig: combine must be 'sum' or 'concat', not {self.combine!r}")
        if self.vision_dim % self.n_heads:
            raise ValueError(
                f"SummaryConfig: vision_dim {self.vision_dim} is not a multiple of n_heads {self.n_heads}"
            )

    @classmethod
    def cinego(cls, vision_dim: int = 768) -> SummaryConfig:
        """Cinego's VideoSummarizer: one attention-only layer, 197 spatial + 197 temporal queries
        summed, no frame positions (so it cannot tell frame order)."""
        return cls(
            kind="cinego", vision_dim=vision_dim, n_queries=197, n_layers=1, use_frame_pos=False,
            use_token_pos=False,
        )

    @property
    def n_output_tokens(self) -> int:
        return self.n_queries * (2 if self.combine == "concat" else 1)


@dataclass(frozen=True)
class ProjectorConfig(_FromDict):
    """Vision width -> LM width: one linear layer, or LLaVA-1.5's two-layer GELU MLP."""

    kind: Literal["linear", "mlp"] = "mlp"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"ProjectorConfig: kind must be 'linear' or 'mlp', not {self.kind!r}")


@dataclass(frozen=True)
class VideoLMConfig(_FromDict):
    """The assembled model. A prompt holds one video as a run of ``n_video_tokens`` consecutive
    ``video_token_id`` placeholders, which the summary's projected tokens replace."""

    lm: LMConfig = field(default_factory=LMConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    video_token_id: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.video_token_id < self.lm.vocab_size:
            raise ValueError(
                f"VideoLMConfig: video_token_id {self.video_token_id} is outside the vocabulary "
                f"of {self.lm.vocab_size} tokens"
            )

    @property
    def n_video_tokens(self) -> int:
        """How many placeholder tokens one video occupies in a prompt."""
        return self.summary.n_output_tokens

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VideoLMConfig:
        cls._check_fields(values)
        return cls(
            lm=LMConfig.from_dict(values.get("lm", {})),
            summary=SummaryConfig.from_dict(values.get("summary", {})),
            projector=ProjectorConfig.from_dict(values.get("projector", {})),
            video_token_id=values.get("video_token_id", 0),
        )


@dataclass(frozen=True)
class GenerationConfig(_FromDict):
    """Decoding settings of `model.generation`."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    stop_ids: tuple[int, ...] = ()  # a sample stops at any of these (the stop token is not output)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))  # a JSON list works too
        if self.max_new_tokens < 0 or self.temperature < 0:
            raise ValueError("GenerationConfig: max_new_tokens and temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig: top_p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"GenerationConfig: repetition_penalty must be > 0, not {self.repetition_penalty}"
            )
