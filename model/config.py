"""Configuration dataclasses of the video LM and the named language-model presets.

Every config round-trips through plain dicts (``dataclasses.asdict`` / ``from_dict``), so a
training run can save its model config as ``config.json`` and a later process can rebuild the
exact same model from it.
"""

from __future__ import annotations

import dataclasses
import math
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
class MoEConfig(_FromDict):
    """MiniMind's mixture of experts (its ``use_moe``): every feed-forward becomes ``n_experts``
    routed SwiGLU experts of the LM's hidden_dim, of which a softmax gate picks the top
    ``experts_per_token`` per token, plus an always-on shared expert. The defaults are MiniMind's
    (n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, aux_loss_alpha=0.1,
    norm_topk_prob=True; its sequence-level balance loss, seq_aux=True, is the one implemented)."""

    n_experts: int = 4
    experts_per_token: int = 2  # top-k
    shared_expert: bool = True
    aux_loss_alpha: float = 0.1  # weight of each layer's load-balancing loss
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1 (when k > 1)

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(
                f"MoEConfig: experts_per_token must be between 1 and n_experts ({self.n_experts}), "
                f"not {self.experts_per_token}"
            )
        if self.aux_loss_alpha < 0:
            raise ValueError(f"MoEConfig: aux_loss_alpha must be >= 0, not {self.aux_loss_alpha}")


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
    moe: MoEConfig | None = None  # None: dense SwiGLU feed-forwards (MiniMind's use_moe=False)

    def __post_init__(self) -> None:
        if isinstance(self.moe, Mapping):  # as config.json holds it
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
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


SUMMARY_KINDS: Final = ("full", "cinego", "mean", "concat", "vchatgpt", "pool")
QUERY_KINDS: Final = ("full", "cinego")  # the VideoSummary's kinds; the others are `model.connectors`


@dataclass(frozen=True)
class SummaryConfig(_FromDict):
    """The connector that turns a video's frame tokens into the LM's video tokens (before the
    projector). Its name in the model and in ``--train`` stays ``summary``.

    The VideoSummary kinds (learnable queries that read all frame tokens of a video):
    ``kind="full"`` is the GPT4Video / mPLUG-Owl abstractor (pre-LayerNorm cross-attention over
    [video tokens; queries], residuals, feed-forward, ``n_layers`` layers). ``kind="cinego"`` is
    Cinego's block (attention only, no norm, residual or feed-forward); see `cinego()`.
    Both have a spatial and a temporal query set; only the temporal set sees frame positions,
    both see token positions (the `cinego` kind has neither).

    The pooling kinds (`model.connectors`; the query fields above do not apply to them): ``mean``
    (each token position averaged over frames), ``concat`` (``concat_tokens`` per frame, frames
    in a row), ``vchatgpt`` (Video-ChatGPT's temporal + spatial means of the patch tokens) and
    ``pool`` (LLaVA-Video's ``pool_stride`` x ``pool_stride`` average pooling of each frame's patch
    grid, plus a frame-position table unless ``use_frame_pos`` is off). Their token count depends
    on the video's shape, so ``n_frames`` is then the exact F (not a table size) and
    ``tokens_per_frame`` the exact T.
    """

    kind: Literal["full", "cinego", "mean", "concat", "vchatgpt", "pool"] = "full"
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
    # pooling kinds only (a config.json from before they existed has none of these: the defaults)
    tokens_per_frame: int | None = None  # T: CLS + g*g patch tokens; needed where the count depends on it
    concat_tokens: int = 1  # concat: tokens per frame; 1 = the CLS token, m*m = the patch grid pooled to m x m
    pool_stride: int = 2  # pool: window and stride of the average pooling of the patch grid

    def __post_init__(self) -> None:
        if self.kind not in SUMMARY_KINDS:
            raise ValueError(f"SummaryConfig: kind must be one of {', '.join(SUMMARY_KINDS)}, not {self.kind!r}")
        if self.combine not in ("sum", "concat"):
            raise ValueError(f"SummaryConfig: combine must be 'sum' or 'concat', not {self.combine!r}")
        if self.kind in QUERY_KINDS and self.vision_dim % self.n_heads:
            raise ValueError(
                f"SummaryConfig: vision_dim {self.vision_dim} is not a multiple of n_heads {self.n_heads}"
            )
        if self.kind not in QUERY_KINDS:
            self._check_pooling()

    def _check_pooling(self) -> None:
        """The pooling kinds' shape settings (see `model.connectors`)."""
        k, m = self.concat_tokens, math.isqrt(max(self.concat_tokens, 0))
        if k != 1 and (k < 4 or m * m != k):
            raise ValueError(
                f"SummaryConfig: concat_tokens must be 1 (the CLS token) or a square m*m >= 4 (the patch grid "
                f"pooled to m x m), not {k}"
            )
        if self.n_frames < 1 or self.pool_stride < 1:
            raise ValueError(
                f"SummaryConfig: n_frames and pool_stride must be at least 1, not {self.n_frames} and {self.pool_stride}"
            )
        T = self.tokens_per_frame
        if self.kind == "concat" and k == 1 and T is None:
            return  # CLS tokens only: nothing depends on T
        if T is None or T < 2:
            raise ValueError(f"SummaryConfig: the {self.kind} kind needs tokens_per_frame >= 2 (T of the store), not {T}")
        if self.kind == "pool" or (self.kind == "concat" and k > 1):
            g = self.patch_grid
            if g * g != T - 1:
                raise ValueError(
                    f"SummaryConfig: the {self.kind} kind needs a square patch grid; {T} tokens per frame are "
                    f"CLS + {T - 1} patches"
                )
            name, side = ("pool_stride", self.pool_stride) if self.kind == "pool" else ("concat_tokens", m)
            if side > g:
                raise ValueError(f"SummaryConfig: {name} {getattr(self, name)} is too large for the {g} x {g} patch grid")

    @classmethod
    def cinego(cls, vision_dim: int = 768) -> SummaryConfig:
        """Cinego's VideoSummarizer: one attention-only layer, 197 spatial + 197 temporal queries
        summed, no frame positions (so it cannot tell frame order)."""
        return cls(
            kind="cinego", vision_dim=vision_dim, n_queries=197, n_layers=1, use_frame_pos=False,
            use_token_pos=False,
        )

    @property
    def patch_grid(self) -> int:
        """g: the side of the square grid of patch tokens (T = 1 + g*g)."""
        return math.isqrt((self.tokens_per_frame or 1) - 1)

    @property
    def n_output_tokens(self) -> int:
        """Video tokens per video (a sample about several videos has a run of them per video): for
        F frames of T = 1 + g*g tokens, k = concat_tokens and s = pool_stride, full/cinego Q (2Q
        with combine concat), mean T, concat F*k, vchatgpt F + T - 1, pool F * ceil(g/s)^2."""
        F, T = self.n_frames, self.tokens_per_frame or 0
        if self.kind in QUERY_KINDS:
            return self.n_queries * (2 if self.combine == "concat" else 1)
        if self.kind == "mean":
            return T
        if self.kind == "concat":
            return F * self.concat_tokens
        if self.kind == "vchatgpt":
            return F + T - 1
        return F * math.ceil(self.patch_grid / self.pool_stride) ** 2  # pool


@dataclass(frozen=True)
class ProjectorConfig(_FromDict):
    """Vision width -> LM width: one linear layer, or LLaVA-1.5's two-layer GELU MLP."""

    kind: Literal["linear", "mlp"] = "mlp"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"ProjectorConfig: kind must be 'linear' or 'mlp', not {self.kind!r}")


@dataclass(frozen=True)
class VideoLMConfig(_FromDict):
    """The assembled model. A prompt holds each of its videos as a run of ``n_video_tokens``
    consecutive ``video_token_id`` placeholders, which that video's projected summary tokens replace."""

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
