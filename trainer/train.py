"""The training loop (DESIGN §3.5): SFT of VideoSummary, projector and LM from cached features.

One loop serves every kind of run; what differs is configuration:
- a fresh run builds the model from a preset (or from ``--init-lm``'s dims) and a tokenizer
  (trained on the manifest's training text, or given);
- ``--init-from RUN`` takes another run's model config, tokenizer and last weights (staged
  training: first ``--train summary,projector`` with the LM frozen, then everything);
- ``--resume`` continues this run from its last checkpoint, bit for bit: the data order is a
  function of (seed, epoch, step) (`trainer.data.BatchPlan`), the schedule a function of the
  step, and the weights, optimizer and RNG states are restored exactly. Every setting not retyped
  comes from the run's config.json (`resume_config`); one that is retyped must equal the run's
  unless it is in `RESUMABLE_CHANGES`. The data must be the data the run started on (`data_identity`:
  the manifest's files, the store's shard checksums): a grown manifest or a rebuilt store changes
  what "continue bit for bit" means, so it is refused, naming what changed, unless
  ``--allow-data-change`` says to go on (the run's config.json then records the change).

The loss of an optimizer step is the mean next-token loss over every labelled token of the
global batch (all micro-batches of all ranks), so one process with batch 2B, one with batch B
and two accumulation steps, and two processes with batch B all compute the same update.

Nothing here decodes a video or imports CLIP: features come from the store (`trainer.data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from manifests.manifest import ManifestError, load_manifest
from pipeline.storage import is_url
from model import CheckpointError, LMConfig, ProjectorConfig, SummaryConfig, VideoLM, VideoLMConfig, lm_preset, read_lm_config
from trainer.checkpoint import (latest_checkpoint, load_checkpoint, load_weights, remove_leftovers, require_checkpoint,
                                save_checkpoint)
from trainer.data import (FEATURE_CACHES, BatchDataset, BatchPlan, BatchStream, add_text_only, build_examples,
                          make_features)
from trainer.distributed import Dist, init_distributed
from trainer.errors import TrainerError
from trainer.evaluate import validation_loss
from trainer.loss import autocast, token_loss_sum
from trainer.metrics import MetricsLog, plot_loss
from trainer.run import config_path, cpu_threads, read_run_config, write_run_config
from trainer.store import StoreInfo, check_same_signature, check_store_matches_manifest, open_store
from trainer.tokenization import DEFAULT_VOCAB_SIZE, VIDEO_TOKEN, ChatTokenizer, conversation_texts, train_bpe

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
               "summary_heads", "combine", "token_mlp", "projector", "vocab_size")


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
    summary: str | None = None  # full | cinego
    queries: int | None = None  # per query set
    summary_layers: int | None = None
    summary_heads: int | None = None
    combine: str | None = None  # sum | concat
    token_mlp: bool | None = None  # a per-token MLP before the VideoSummary's queries (default off)
    projector: str | None = None  # linear | mlp
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


@dataclass
class TrainResult:
    run: Path
    step: int
    total_steps: int
    loss: float | None  # of the last step of this invocation
    val_loss: float | None
    checkpoint: Path | None
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to ``cfg.lr``, then a cosine to ``cfg.lr * cfg.min_lr_ratio`` at ``total``."""
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.05 * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- setting a run up ----------------------------------------------------------------------------


def resume_config(out: Path, **given: Any) -> TrainConfig:
    """`run_train.py train --out RUN --resume [flags]`: the run's own settings (its config.json)
    with the ``given`` flags on top, so that nothing needs retyping; `train` then refuses a given
    flag that differs from the run's and is not in `RESUMABLE_CHANGES`. Settings of one launch
    (`PER_LAUNCH`, e.g. ``--stop-after``) are never taken from the run. A run whose first launch
    died before writing config.json starts again from the given flags."""
    if not (Path(out) / "config.json").is_file():
        if "manifest" not in given or "store" not in given:
            raise TrainerError(f"{out} has no config.json yet (its first launch died early): "
                               "pass --manifest and --store (and the other settings) again")
        return TrainConfig(**{**given, "out": Path(out), "resume": True})
    saved = read_run_config(out)["train"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in {**SETTINGS_BEFORE_THEY_EXISTED, **saved}.items():
        if key in names and key not in PER_LAUNCH:
            values[key] = Path(value) if key in PATH_SETTINGS and value is not None else value
    values["train_parts"] = tuple(values.get("train_parts", PARTS))
    if "steps" in given or "epochs" in given:  # a new length replaces the run's, whichever way given
        values.pop("steps", None)
        values.pop("epochs", None)
    return TrainConfig(**{**values, **given, "out": Path(out), "resume": True})


def data_identity(manifest: Any, store: StoreInfo) -> dict[str, Any]:
    """What the run's data is, to tell on resume whether it changed: the manifest's files (sha256
    and counts of videos.jsonl and samples.jsonl, read as they are, so a hand edit counts) and the
    store's done shards with their commit checksums (a rebuilt shard with other data has another)."""
    files: dict[str, Any] = {"manifest_id": manifest.manifest_id, "fingerprint": manifest.fingerprint}
    for name in ("videos", "samples"):
        h, lines = hashlib.sha256(), 0
        with open(Path(manifest.dir) / f"{name}.jsonl", "rb") as f:
            for line in f:
                h.update(line)
                lines += 1
        files[name] = lines
        files[f"{name}_sha256"] = h.hexdigest()
    return {"manifest": files, "store_shards": {str(k): v for k, v in sorted(store.shard_data.items())}}


def data_changes(before: dict[str, Any], now: dict[str, Any], manifest_path: Any, store_path: str) -> list[str]:
    """What differs between two `data_identity` records, one phrase each (empty: nothing)."""
    changes = []
    old, new = before["manifest"], now["manifest"]
    if old.get("manifest_id") != new["manifest_id"]:
        changes.append(f"manifest {manifest_path} is another manifest (id {new['manifest_id']}, the run's was {old.get('manifest_id')})")
    elif "videos_sha256" in old and (old["videos_sha256"], old["samples_sha256"]) != (new["videos_sha256"], new["samples_sha256"]):
        changes.append(f"manifest {manifest_path} changed: {old['videos']} videos and {old['samples']} samples "
                       f"when the run started, {new['videos']} and {new['samples']} now")
    elif old.get("fingerprint") != new["fingerprint"]:  # a run made before the files were recorded
        changes.append(f"manifest {manifest_path} changed (fingerprint {old.get('fingerprint')}, now {new['fingerprint']})")
    if "store_shards" in before:  # runs made before it was recorded are checked by signature only
        was, is_ = before["store_shards"], now["store_shards"]
        for what, shards in (("hold other data (rebuilt)", [k for k in is_ if k in was and is_[k] != was[k]]),
                             ("were extracted since", [k for k in is_ if k not in was]),
                             ("are no longer done", [k for k in was if k not in is_])):
            if shards:
                changes.append(f"store {store_path}: shards {', '.join(shards[:8])}{' ...' if len(shards) > 8 else ''} {what}")
    return changes


def _prepare_out(cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's own earlier config when resuming, else None; refuses to overwrite a run. A run
    whose first launch died before writing its config.json (and so has no checkpoint) resumes by
    starting."""
    out = Path(cfg.out)
    if cfg.resume and not config_path(out).is_file() and out.is_dir() and latest_checkpoint(out) is None:
        log.info("%s has no config.json: its first launch stopped before writing it; starting it", out)
        return None
    if cfg.resume:
        saved = read_run_config(out)
        old = {**SETTINGS_BEFORE_THEY_EXISTED, **saved["train"]}
        new = cfg.record()
        changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
        if changed:
            k = changed[0]
            raise TrainerError(f"{out} was trained with --{k.replace('_', '-')} {old.get(k)}, not {new[k]}; resume with the run's settings")
        if (old.get("steps"), old.get("epochs")) != (cfg.steps, cfg.epochs):
            log.warning("resuming with a different length: the learning-rate schedule changes from here on")
        return saved
    if (out / "config.json").exists() or latest_checkpoint(out) is not None:
        raise TrainerError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    return None


def _update_run_config(out: Path, saved: dict[str, Any], cfg: TrainConfig, total: int, data: dict[str, Any],
                       changed: list[str], resume_ckpt: Path | None) -> None:
    """On resume, record the settings this launch changed (a longer ``--steps``, another
    ``--feature-cache``) so that a later plain ``--resume`` continues with them, and data changes
    that ``--allow-data-change`` accepted, with the step they took effect at (``data``: the
    manifest, store, data and data_identity records of this launch)."""
    before = {k: v for k, v in saved.items() if k != "format_version"}
    config = {**before, "train": cfg.record(), "total_steps": total}
    if changed:
        at = int(resume_ckpt.name.split("-")[-1]) if resume_ckpt is not None else 0
        config.update(data, data_changes=[*saved.get("data_changes", []), {"step": at, "changes": changed}])
    elif "data_identity" not in saved:  # a run made before it was recorded: from now on it is
        config["data_identity"] = data["data_identity"]
    if config != before:
        write_run_config(out, config)


def _resolve_tokenizer(cfg: TrainConfig, manifest: Any, source: dict[str, Any] | None, dist: Dist) -> tuple[ChatTokenizer, str]:
    """The run's tokenizer and where it came from; saved as RUN/tokenizer.json by the main rank."""
    out = Path(cfg.out)
    if source is not None:  # resume or init-from
        src_dir = out if cfg.resume else Path(cfg.init_from)  # type: ignore[arg-type]
        return ChatTokenizer.load(src_dir / "tokenizer.json", source["tokenizer"]["video_token"]), source["tokenizer"]["source"]
    video_token = cfg.video_token or VIDEO_TOKEN
    path = cfg.tokenizer
    if path is None and cfg.init_lm is not None:
        if Path(cfg.init_lm).is_dir() and (Path(cfg.init_lm) / "tokenizer.json").is_file():
            path = Path(cfg.init_lm)
        else:
            raise TrainerError(f"--init-lm {cfg.init_lm} needs the LM's own tokenizer: pass --tokenizer (e.g. MiniMind's tokenizer.json)")
    if path is not None:
        tok = ChatTokenizer.load(path, video_token)
        origin = str(path)
    else:
        if dist.is_main:
            train_ids = {v.video_id for v in manifest.videos if v.split == "train"}
            texts = (t for s in manifest.samples() if s.video_id in train_ids for t in conversation_texts(s.conversations))
            tok = ChatTokenizer(train_bpe(texts, cfg.vocab_size or DEFAULT_VOCAB_SIZE), video_token)
            tok.save(out)
            log.info("trained a byte-level BPE of %d tokens on the training text", tok.vocab_size)
        dist.barrier()
        if not dist.is_main:
            tok = ChatTokenizer.load(out / "tokenizer.json", video_token)
        origin = "trained"
    return tok, origin


def _model_config(cfg: TrainConfig, tok: ChatTokenizer, store: Any, source: dict[str, Any] | None) -> VideoLMConfig:
    if source is not None:
        model_cfg = VideoLMConfig.from_dict(source["model"])
        if model_cfg.video_token_id != tok.video_id:
            raise TrainerError(f"the tokenizer's video token id {tok.video_id} is not the model's {model_cfg.video_token_id}")
        return model_cfg
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
        kind = cfg.summary or "full"
        if kind not in ("full", "cinego"):
            raise TrainerError(f"--summary must be full or cinego, got {kind!r}")
        base = SummaryConfig.cinego(store.width) if kind == "cinego" else SummaryConfig(vision_dim=store.width)
        overrides = {"n_queries": cfg.queries, "n_layers": cfg.summary_layers, "n_heads": cfg.summary_heads,
                     "combine": cfg.combine, "token_mlp": cfg.token_mlp}
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
    return model_cfg


def _set_trainable(model: VideoLM, parts: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    for part in PARTS:
        getattr(model, part).requires_grad_(part in parts)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, and the LM at `lm_lr_ratio` times the rate of
    the summary and projector. Why: AdamW moves every weight by about lr per step, which is a
    large relative change for the LM's small (std 0.02) weights; a fresh LM at the full rate learns
    the answer format within a few dozen steps by a constant that drowns the video signal at its
    final norm, and what the summary must still learn (motion, shape) never gets through. Measured
    on the demo corpus: direction at chance with one rate, 78-93% with the LM at 0.1x."""
    groups = []
    for is_lm in (False, True):
        part = [p for n, p in named if n.startswith("lm.") == is_lm]
        scale = cfg.lm_lr_ratio if is_lm else 1.0
        groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda" or None)


# --- the loop ------------------------------------------------------------------------------------


def _step(
    net: nn.Module,
    micro: list,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    lr: float,
    clip: float,
    dist: Dist,
    device: torch.device,
) -> tuple[float, float, float]:
    """One optimizer step over this rank's micro-batches: (global mean loss, gradient norm,
    global input tokens). Every labelled token of the global batch weighs the same: each
    micro-batch's loss sum is divided by the global token count (times the world size, which
    DDP's gradient averaging divides out again)."""
    n_target, n_tokens = dist.sum([sum(b.n_target_tokens for b in micro), sum(float(b.attention_mask.sum()) for b in micro)])
    scale = dist.world / max(n_target, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or not dist.enabled  # DDP all-reduces on the last micro-batch only
        with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device):
            logits, _ = net(batch.input_ids, video=batch.video)
            part = token_loss_sum(logits, batch.labels)
        (part * scale).backward()
        loss_sum += part.detach().double()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (total_loss,) = dist.sum([loss_sum.item()])
    return total_loss / max(n_target, 1.0), float(grad_norm), n_tokens


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run ``cfg.out``; see the module docstring."""
    cfg.check()
    started = time.time()
    dist = init_distributed(cfg.device)
    try:
        with cpu_threads(cfg.threads):
            return _train(cfg, dist, started)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, started: float) -> TrainResult:
    out = Path(cfg.out).expanduser()
    saved = _prepare_out(cfg)  # the run's own config when resuming; refuses before anything is written
    resume_ckpt = latest_checkpoint(out) if saved is not None else None
    init_run = read_run_config(cfg.init_from) if cfg.init_from is not None else None
    source = saved or init_run  # model config and tokenizer come from here, if anywhere
    # weights to start from: a resumed run's own checkpoint, else --init-from's, else --init-lm
    init_ckpt = require_checkpoint(Path(cfg.init_from)) if cfg.init_from is not None and resume_ckpt is None else None
    try:
        manifest = load_manifest(cfg.manifest)
    except ManifestError as err:
        raise TrainerError(str(err)) from err
    store = open_store(cfg.store)
    check_store_matches_manifest(store, manifest)
    if source is not None:
        check_same_signature(source["store"]["signature"], store, f"run {cfg.out if cfg.resume else cfg.init_from}")
    identity = data_identity(manifest, store)
    changed = data_changes(saved["data_identity"] if "data_identity" in saved else {"manifest": saved["manifest"]},
                           identity, cfg.manifest, store.path) if saved is not None else []
    if changed and not cfg.allow_data_change:
        raise TrainerError(f"the data changed since {out} started: {'; '.join(changed)}; "
                           "resume with --allow-data-change to train on it anyway")
    for change in changed:
        log.warning("resuming on changed data (--allow-data-change): %s", change)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
    dist.barrier()

    tok, tok_origin = _resolve_tokenizer(cfg, manifest, source, dist)
    model_cfg = _model_config(cfg, tok, store, source)
    system = source.get("template", {}).get("system") if source is not None else cfg.system
    n_video = model_cfg.n_video_tokens
    train_set = build_examples(manifest, store, tok, "train", n_video, cfg.max_len, system,
                               keep_conversations=cfg.text_only_fraction > 0)
    val_set = build_examples(manifest, store, tok, "val", n_video, cfg.max_len, system)
    log.info("train: %s", train_set.summary())
    if cfg.text_only_fraction > 0:
        added = add_text_only(train_set, tok, cfg.text_only_fraction, cfg.seed, cfg.max_len, system)
        log.info("train: %d text-only copies added (--text-only-fraction %g): %d samples in all", added,
                 cfg.text_only_fraction, len(train_set))
    log.info("val: %s", val_set.summary())

    plan = BatchPlan(train_set.lengths, cfg.batch_size, cfg.grad_accum, dist.world, dist.rank, cfg.seed)
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    if saved is not None and saved.get("global_batch") != plan.global_batch:
        raise TrainerError(
            f"{out} was trained with a global batch of {saved.get('global_batch')} samples, this launch gives "
            f"{plan.global_batch} (batch size x grad accum x processes); resume with the same"
        )

    data = {
        "store": {"path": store.path, "signature": store.signature, "attrs": store.attrs},
        "manifest": {"path": str(manifest.dir), "manifest_id": manifest.manifest_id, "fingerprint": manifest.fingerprint},
        "data": {
            "train": {"samples": len(train_set), "skipped": dict(train_set.skipped), "truncated": train_set.truncated},
            "val": {"samples": len(val_set), "skipped": dict(val_set.skipped), "truncated": val_set.truncated},
        },
        "data_identity": identity,
    }
    if dist.is_main and saved is None:
        if not (out / "tokenizer.json").is_file():  # a trained one is already there
            tok.save(out)
        write_run_config(out, {
            "train": cfg.record(),
            "model": dataclasses.asdict(model_cfg),
            "tokenizer": {
                "file": "tokenizer.json", "source": tok_origin if source is None else source["tokenizer"]["source"],
                "video_token": tok.video_token, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                "video_id": tok.video_id, "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id,
            },
            "template": {"system": system},
            "init": {"lm": str(cfg.init_lm) if cfg.init_lm else None, "from": str(init_ckpt) if init_ckpt else None},
            "global_batch": plan.global_batch,
            "world_size": dist.world,
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total,
            **data,
        })
    dist.barrier()

    # the model: same seed on every rank, so every rank starts from the same weights
    torch.manual_seed(cfg.seed)
    model = VideoLM(model_cfg)
    if resume_ckpt is not None:
        pass  # loaded below with the optimizer
    elif init_ckpt is not None:
        load_weights(model, init_ckpt)
        log.info("initialised every part from %s", init_ckpt)
    elif cfg.init_lm is not None:
        try:
            model.load_lm(cfg.init_lm)
        except CheckpointError as err:
            raise TrainerError(str(err)) from err
    device = dist.device
    model.to(device)
    trainable = _set_trainable(model, cfg.train_parts)
    optimizer = _optimizer(trainable, cfg, device)
    n_trainable = sum(p.numel() for _, p in trainable)
    log.info("model: %.2fM parameters, %.2fM trainable (%s)", sum(p.numel() for p in model.parameters()) / 1e6, n_trainable / 1e6, ",".join(cfg.train_parts))

    step = 0
    metrics = MetricsLog(out / "metrics.jsonl")
    if resume_ckpt is not None:
        state = load_checkpoint(resume_ckpt, model, optimizer, device)
        step = state.step
        log.info("resumed %s at step %d", resume_ckpt, step)
    elif saved is not None:
        log.info("%s has no checkpoint yet: starting it from the beginning", out)
    if dist.is_main:
        if saved is not None:  # only now: a resume refused for a damaged checkpoint changes nothing
            _update_run_config(out, saved, cfg, total, data, changed, resume_ckpt)
        if metrics.path.exists():
            metrics.truncate_after(step)
        else:
            metrics.path.touch()
    dist.barrier()
    if step >= total:
        log.info("run %s is already finished (step %d of %d)", out, step, total)
        return TrainResult(run=out, step=step, total_steps=total, loss=None, val_loss=None,
                           checkpoint=latest_checkpoint(out), samples=len(train_set),
                           skipped=dict(train_set.skipped), seconds=time.time() - started)

    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    features = make_features(cfg.feature_cache, store.path, train_set.rows, device, dist)
    stream = BatchStream(BatchDataset(train_set.items, features, tok.pad_id), plan, cfg.workers, pin_memory=device.type == "cuda")
    # only the main rank evaluates: the validation features are loaded there only
    val_features = make_features(cfg.feature_cache, store.path, val_set.rows, device) if len(val_set) and dist.is_main else None

    def evaluate_now(at: int) -> float | None:
        if not len(val_set):
            return None
        value = None
        if dist.is_main:
            model.eval()
            value = validation_loss(model, val_set.items, val_features, tok.pad_id, cfg.batch_size, device)
            model.train()
            metrics.append({"step": at, "val_loss": value})
            log.info("step %d: val loss %.4f", at, value)
        dist.barrier()
        return value

    def checkpoint_now(at: int, epoch: int) -> Path | None:
        path = None
        if dist.is_main:
            path = save_checkpoint(out, at, epoch, model, optimizer, cfg.keep, {"total_steps": total})
            plot_loss(metrics.read(), out / "loss.png")
        dist.barrier()
        return path

    stop_at = total if cfg.stop_after is None else min(total, step + cfg.stop_after)
    model.train()
    last_loss: float | None = None
    val_loss: float | None = None
    at_boundary = True
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not dist.is_main, dynamic_ncols=True)
    tokens_seen, window_start, last_plot = 0.0, time.time(), 0.0
    spe = plan.steps_per_epoch
    saved_at = step if resume_ckpt is not None else -1
    try:
        while step < stop_at:
            epoch, in_epoch = divmod(step, spe)
            batches = stream.epoch(epoch, in_epoch)
            while step < stop_at and in_epoch < spe:
                micro = [next(batches).to(device) for _ in range(cfg.grad_accum)]
                lr = lr_at(step, cfg, total)
                at_boundary = False  # an interrupt now would leave weights a step ahead of `step`
                last_loss, grad_norm, n_tokens = _step(net, micro, optimizer, [p for _, p in trainable], lr, cfg.clip, dist, device)
                step += 1
                at_boundary = True
                in_epoch += 1
                tokens_seen += n_tokens
                now = time.time()
                rate = tokens_seen / max(now - window_start, 1e-9)
                if dist.is_main:
                    if step % cfg.log_every == 0 or step == stop_at:
                        metrics.append({
                            "step": step, "epoch": epoch, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens": int(n_tokens), "tokens_per_s": round(rate, 1), "elapsed_s": round(now - started, 3),
                        })
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{rate:.0f}", epoch=epoch)
                    if now - last_plot > 10:
                        plot_loss(metrics.read(), out / "loss.png")
                        last_plot = now
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    val_loss = evaluate_now(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
                    checkpoint_now(step, epoch)
                    saved_at = step
    except KeyboardInterrupt:
        if dist.is_main and step > 0 and saved_at != step and at_boundary:
            log.warning("interrupted: saving step %d", step)
            save_checkpoint(out, step, step // spe, model, optimizer, cfg.keep, {"total_steps": total})
        raise
    finally:
        bar.close()
    if step >= total:
        val_loss = evaluate_now(step)
    if saved_at != step:
        checkpoint_now(step, step // spe)
    elif dist.is_main:
        plot_loss(metrics.read(), out / "loss.png")
    if step >= total:
        log.info("run %s finished at step %d", out, step)
    else:
        log.info("stopped at step %d of %d; continue with --resume", step, total)
    return TrainResult(
        run=out, step=step, total_steps=total, loss=last_loss, val_loss=val_loss,
        checkpoint=latest_checkpoint(out), samples=len(train_set), skipped=dict(train_set.skipped),
        seconds=time.time() - started,
    )

