"""The training settings: `TrainConfig` (one field per `run_train.py train` flag), its checks, how
config.json records it, and the model config a fresh run builds from it (`model_config`). What a
resume takes from the run and what it may change is `trainer.resume`'s business.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import CheckpointError, LMConfig, ProjectorConfig, SummaryConfig, VideoLMConfig, lm_preset, read_lm_config
from model.config import QUERY_KINDS, SUMMARY_KINDS, MoEConfig
from pipeline.storage import is_url
from trainer.errors import TrainerError
from trainer.features import FEATURE_CACHES
from trainer.store import StoreInfo
from trainer.tokenization import ChatTokenizer

log = logging.getLogger(__name__)

PARTS = ("summary", "projector", "lm")
DEFAULT_PRESET = "small"
# settings that may change when a run is resumed: they do not change what is computed
RESUMABLE_CHANGES = {
    "resume", "stop_after", "eval_every", "save_every", "keep", "workers", "feature_cache",
    "compile", "device", "manifest", "store", "out", "steps", "epochs", "log_every", "threads",
    "allow_data_change",
}
# settings of one launch only: `--resume` never takes them from the run's config.json
PER_LAUNCH = ("resume", "stop_after", "allow_data_change", "out", "compile")
PATH_SETTINGS = ("manifest", "out", "init_lm", "init_from", "tokenizer")
# Settings added after the first runs were made, and what a run made before them did: a run's
# config.json without the key was trained with this value.
SETTINGS_BEFORE_THEY_EXISTED = {"lm_lr_ratio": 1.0, "text_only_fraction": 0.0}
MODEL_FLAGS = ("preset", "init_lm", "tokenizer", "video_token", "summary", "queries", "summary_layers",
               "summary_heads", "combine", "token_mlp", "projector", "vocab_size", "concat_tokens", "pool_stride",
               "moe", "experts", "experts_per_token", "shared_expert", "aux_loss_alpha")
# the --summary kinds each connector flag applies to (a flag given with another kind is refused)
CONNECTOR_FLAGS = {**dict.fromkeys(("queries", "summary_layers", "summary_heads", "combine", "token_mlp"), QUERY_KINDS),
                   "concat_tokens": ("concat",), "pool_stride": ("pool",)}


@dataclass
class TrainConfig:
    """`run_train.py train`. Model-shape settings left at None take their defaults (or, with
    ``init_from``, the earlier run's values)."""

    manifest: Path
    store: Path | str  # a path or an fsspec URL
    out: Path
    # model and tokenizer
    preset: str | None = None  # tiny | small | base (default small)
    init_lm: Path | None = None
    init_from: Path | None = None
    tokenizer: Path | None = None
    vocab_size: int | None = None  # of a tokenizer trained here (default 6400)
    video_token: str | None = None  # default <|video|>
    summary: str | None = None  # full | cinego | mean | concat | vchatgpt | pool
    queries: int | None = None  # per query set
    summary_layers: int | None = None
    summary_heads: int | None = None
    combine: str | None = None  # sum | concat
    token_mlp: bool | None = None  # a per-token MLP before the VideoSummary's queries (default off)
    concat_tokens: int | None = None  # --summary concat: tokens per frame, 1 (CLS) or m*m (default 1)
    pool_stride: int | None = None  # --summary pool: pooling window and stride (default 2)
    projector: str | None = None  # linear | mlp
    moe: bool | None = None  # MiniMind's mixture-of-experts LM (default dense; an --init-lm MoE file is one)
    experts: int | None = None  # routed experts per layer (default 4)
    experts_per_token: int | None = None  # top-k of the routing (default 2)
    shared_expert: bool | None = None  # an always-on shared expert beside the routed ones (default on)
    aux_loss_alpha: float | None = None  # weight of each layer's load-balancing loss (default 0.1)
    system: str | None = None  # system prompt of the chat template
    max_len: int = 1024  # tokens per sample, video placeholders included
    # schedule
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 16  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int | None = None  # steps; default 5% of the run
    lm_lr_ratio: float = 0.1  # the LM learns at lr x this (see `_optimizer`)
    text_only_fraction: float = 0.0  # also train on text-only copies of this share of the samples
    weight_decay: float = 0.01
    clip: float = 1.0  # max gradient norm; 0 = no clipping
    train_parts: tuple[str, ...] = PARTS
    seed: int = 0
    # machinery
    feature_cache: str = "disk"
    workers: int = 2  # DataLoader workers for disk features
    compile: bool = False
    device: str | None = None
    resume: bool = False
    allow_data_change: bool = False  # resume on a manifest or store that changed since the run started
    eval_every: int = 0  # steps; 0 = at the end only
    save_every: int = 0  # steps; 0 = at the end only
    keep: int = 2
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    log_every: int = 1  # metrics.jsonl line every N steps
    threads: int | None = None  # CPU threads of torch (None: its default)

    def check(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "keep": self.keep, "max_len": self.max_len, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise TrainerError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.steps is not None and self.steps < 1:
            raise TrainerError(f"--steps must be at least 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise TrainerError(f"--epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise TrainerError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.text_only_fraction <= 1:
            raise TrainerError(f"--text-only-fraction must be between 0 and 1, got {self.text_only_fraction}")
        if self.stop_after is not None and self.stop_after < 1:
            raise TrainerError(f"--stop-after must be at least 1, got {self.stop_after}")
        unknown = [p for p in self.train_parts if p not in PARTS]
        if unknown or not self.train_parts:
            raise TrainerError(f"--train takes a comma-separated subset of {','.join(PARTS)}, got {','.join(self.train_parts) or 'nothing'}")
        if self.feature_cache not in FEATURE_CACHES:
            raise TrainerError(f"--feature-cache must be one of {', '.join(FEATURE_CACHES)}, got {self.feature_cache!r}")
        if self.init_from is not None:
            given = [name for name in MODEL_FLAGS if getattr(self, name) is not None]
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                raise TrainerError(f"--init-from takes the model and tokenizer of its run; drop {flags}")
        if self.init_lm is not None and self.vocab_size is not None:
            raise TrainerError("--vocab-size is for a tokenizer trained here; --init-lm uses the LM's own tokenizer")

    def record(self) -> dict[str, Any]:
        """The settings as config.json holds them: local paths absolute (a `--resume` alone may be
        typed from another folder), tuples as lists."""
        def plain(key: str, value: Any) -> Any:
            if isinstance(value, tuple):
                return list(value)
            if value is not None and (key in PATH_SETTINGS or (key == "store" and not is_url(value))):
                return str(Path(value).expanduser().resolve())
            return value

        return {k: plain(k, v) for k, v in dataclasses.asdict(self).items()}


def model_config(cfg: TrainConfig, tok: ChatTokenizer, store: StoreInfo, source: dict[str, Any] | None) -> VideoLMConfig:
    """The model a run trains: ``source``'s (a resumed or --init-from run's config.json) when given,
    else built from the preset (or --init-lm's dims), the store's width and frames and the flags."""
    if source is not None:
        model_cfg = VideoLMConfig.from_dict(source["model"])
        if model_cfg.video_token_id != tok.video_id:
            raise TrainerError(f"the tokenizer's video token id {tok.video_id} is not the model's {model_cfg.video_token_id}")
        return _check_connector(cfg, model_cfg, store)
    try:
        if cfg.init_lm is not None:
            lm: LMConfig = read_lm_config(cfg.init_lm)
            if cfg.preset is not None:
                log.info("--init-lm %s: its dims replace preset %s", cfg.init_lm, cfg.preset)
            if tok.vocab_size > lm.vocab_size:
                raise TrainerError(
                    f"the tokenizer has {tok.vocab_size} tokens but --init-lm {cfg.init_lm} only {lm.vocab_size}; "
                    "use the LM's own tokenizer (with --video-token naming a token it has, e.g. @ as MiniMind-V does)"
                )
        else:
            lm = lm_preset(cfg.preset or DEFAULT_PRESET, vocab_size=tok.vocab_size)
        lm = _with_moe(cfg, lm)
        kind = cfg.summary or "full"
        if kind not in SUMMARY_KINDS:
            raise TrainerError(f"--summary must be one of {', '.join(SUMMARY_KINDS)}, got {kind!r}")
        misplaced = ["--" + flag.replace("_", "-") for flag, kinds in CONNECTOR_FLAGS.items()
                     if getattr(cfg, flag) is not None and kind not in kinds]
        if misplaced:
            raise TrainerError(f"--summary {kind} does not take {', '.join(misplaced)}")
        if kind in QUERY_KINDS:
            base = SummaryConfig.cinego(store.width) if kind == "cinego" else SummaryConfig(vision_dim=store.width)
        else:  # the pooling kinds count their tokens for the store's exact F and T
            base = SummaryConfig(kind=kind, vision_dim=store.width, n_frames=store.frames,  # type: ignore[arg-type]
                                 tokens_per_frame=store.tokens_per_frame)
        overrides = {"n_queries": cfg.queries, "n_layers": cfg.summary_layers, "n_heads": cfg.summary_heads,
                     "combine": cfg.combine, "token_mlp": cfg.token_mlp, "concat_tokens": cfg.concat_tokens,
                     "pool_stride": cfg.pool_stride}
        summary = dataclasses.replace(base, n_frames=store.frames, **{k: v for k, v in overrides.items() if v is not None})
        projector = ProjectorConfig(kind=cfg.projector or "mlp")  # type: ignore[arg-type]
        model_cfg = VideoLMConfig(lm=lm, summary=summary, projector=projector, video_token_id=tok.video_id)
    except (ValueError, CheckpointError) as err:
        if isinstance(err, TrainerError):
            raise
        raise TrainerError(str(err)) from err
    if cfg.max_len > lm.max_seq_len:
        raise TrainerError(f"--max-len {cfg.max_len} exceeds the LM's max_seq_len {lm.max_seq_len}")
    if model_cfg.n_video_tokens >= cfg.max_len:
        raise TrainerError(f"--max-len {cfg.max_len} leaves no room after {model_cfg.n_video_tokens} video tokens")
    return _check_connector(cfg, model_cfg, store)


def _check_connector(cfg: TrainConfig, model_cfg: VideoLMConfig, store: StoreInfo) -> VideoLMConfig:
    """A query-free connector counts its tokens for exactly the store's F and T, and a weightless
    one (mean, concat, vchatgpt; pool without its frame table) cannot be the only part trained."""
    summary = model_cfg.summary
    if summary.kind not in QUERY_KINDS:
        built = (summary.n_frames, summary.tokens_per_frame or store.tokens_per_frame)
        if built != (store.frames, store.tokens_per_frame):
            raise TrainerError(f"the --summary {summary.kind} connector is built for {built[0]} frames of {built[1]} "
                               f"tokens; the store has {store.frames} of {store.tokens_per_frame}")
        weightless = summary.kind != "pool" or not summary.use_frame_pos
        if weightless and set(cfg.train_parts) == {"summary"}:
            raise TrainerError(f"--summary {summary.kind} has no weights: --train needs projector or lm too")
    return model_cfg


def _with_moe(cfg: TrainConfig, lm: LMConfig) -> LMConfig:
    """``lm`` with --moe and its settings: MiniMind's experts on a preset, or the routing settings
    changed on an --init-lm MoE checkpoint (whose experts are weights: their number and the shared
    one are the file's)."""
    settings = {"n_experts": cfg.experts, "experts_per_token": cfg.experts_per_token,
                "shared_expert": cfg.shared_expert, "aux_loss_alpha": cfg.aux_loss_alpha}
    given = {k: v for k, v in settings.items() if v is not None}
    flags = {"n_experts": "--experts", "experts_per_token": "--experts-per-token",
             "shared_expert": "--shared-expert", "aux_loss_alpha": "--aux-loss-alpha"}
    if lm.moe is not None:
        for name in ("n_experts", "shared_expert"):
            if name in given and given[name] != getattr(lm.moe, name):
                raise TrainerError(f"--init-lm {cfg.init_lm} has {lm.moe.n_experts} experts "
                                   f"and {'a' if lm.moe.shared_expert else 'no'} shared expert: drop {flags[name]}")
        return dataclasses.replace(lm, moe=dataclasses.replace(lm.moe, **given))
    if cfg.moe and cfg.init_lm is not None:
        raise TrainerError(f"--moe: --init-lm {cfg.init_lm} is a dense LM (MiniMind mixture-of-experts files load as such)")
    if not cfg.moe:
        if given:
            raise TrainerError(f"{', '.join(flags[k] for k in given)} need --moe (a mixture-of-experts LM)")
        return lm
    return dataclasses.replace(lm, moe=MoEConfig(**given))
