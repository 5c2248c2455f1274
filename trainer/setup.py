"""Setting a run up: everything the loop needs, built once before the first step (`prepare`).

In order: the run directory (refuse to overwrite a run; on resume, its config.json and the resume
rules of `trainer.resume`), the manifest and the store (checked against each other and, on
resume, against the data the run started on), the tokenizer, the model config, the tokenised
examples, the batch plan and the run's length, config.json, the model (fresh, from `--init-from`,
from `--init-lm`, or the resumed checkpoint's) with its optimizer, and the feature sources.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manifests.manifest import ManifestError, load_manifest
from model import CheckpointError, VideoLM
from trainer.batching import BatchDataset, BatchPlan, BatchStream
from trainer.checkpoint import TrainState, latest_checkpoint, load_checkpoint, load_weights, remove_leftovers, require_checkpoint
from trainer.config import TrainConfig, model_config
from trainer.distributed import Dist
from trainer.errors import TrainerError
from trainer.examples import Examples, add_text_only, build_examples
from trainer.features import Features, make_features
from trainer.metrics import MetricsLog
from trainer.optim import make_optimizer, set_trainable
from trainer.resume import data_changes, data_identity, prepare_out, update_run_config
from trainer.run import read_run_config, write_run_config
from trainer.store import check_same_signature, check_store_matches_manifest, open_store
from trainer.tokenization import DEFAULT_VOCAB_SIZE, VIDEO_TOKEN, ChatTokenizer, train_bpe, training_texts

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run, set up: what the loop reads and steps."""

    out: Path
    model: VideoLM
    net: nn.Module  # the model as stepped: wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # the trainable ones
    tok: ChatTokenizer
    train_set: Examples
    val_set: Examples
    plan: BatchPlan
    total: int  # optimizer steps of the whole run
    state: TrainState  # fresh, or the resumed checkpoint's
    metrics: MetricsLog
    stream: BatchStream | None  # None when the run is already finished
    val_features: Features | None  # on the main rank only


def prepare(cfg: TrainConfig, dist: Dist) -> Run:
    """Set the run ``cfg.out`` up (module docstring); refuses, before anything is written, what
    would overwrite a run or break its resume rules."""
    out = Path(cfg.out).expanduser()
    saved = prepare_out(cfg)  # the run's own config when resuming
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

    tok, tok_origin = _tokenizer(cfg, manifest, source, dist)
    model_cfg = model_config(cfg, tok, store, source)
    system = source.get("template", {}).get("system") if source is not None else cfg.system
    train_set = build_examples(manifest, store, tok, "train", model_cfg.n_video_tokens, cfg.max_len, system,
                               keep_conversations=cfg.text_only_fraction > 0)
    val_set = build_examples(manifest, store, tok, "val", model_cfg.n_video_tokens, cfg.max_len, system)
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
        "data": {name: {"samples": len(s), "skipped": dict(s.skipped), "truncated": s.truncated}
                 for name, s in (("train", train_set), ("val", val_set))},
        "data_identity": identity,
    }
    if dist.is_main and saved is None:
        if not (out / "tokenizer.json").is_file():  # a trained one is already there
            tok.save(out)
        write_run_config(out, {
            "train": cfg.record(),
            "model": dataclasses.asdict(model_cfg),
            "tokenizer": {
                "file": "tokenizer.json", "source": tok_origin, "video_token": tok.video_token,
                "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "video_id": tok.video_id,
                "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id,
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
    if init_ckpt is not None:
        load_weights(model, init_ckpt)
        log.info("initialised every part from %s", init_ckpt)
    elif cfg.init_lm is not None and resume_ckpt is None:
        try:
            model.load_lm(cfg.init_lm)
        except CheckpointError as err:
            raise TrainerError(str(err)) from err
    device = dist.device
    model.to(device)
    trainable = set_trainable(model, cfg.train_parts)
    optimizer = make_optimizer(trainable, cfg, device)
    log.info("model: %.2fM parameters, %.2fM trainable (%s)", sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for _, p in trainable) / 1e6, ",".join(cfg.train_parts))
    if (moe := model_cfg.lm.moe) is not None:
        log.info("LM: mixture of experts, %d per layer, top-%d%s, balance loss x %g", moe.n_experts,
                 moe.experts_per_token, " + a shared expert" if moe.shared_expert else "", moe.aux_loss_alpha)

    state = TrainState()
    if resume_ckpt is not None:
        state = load_checkpoint(resume_ckpt, model, optimizer, device)
        log.info("resumed %s at step %d", resume_ckpt, state.step)
    elif saved is not None:
        log.info("%s has no checkpoint yet: starting it from the beginning", out)
    metrics = MetricsLog(out / "metrics.jsonl")
    if dist.is_main:
        if saved is not None:  # only now: a resume refused for a damaged checkpoint changes nothing
            update_run_config(out, saved, cfg, total, data, changed, resume_ckpt)
        if metrics.path.exists():
            metrics.truncate_after(state.step)
        else:
            metrics.path.touch()
    dist.barrier()

    run = Run(out, model, model, optimizer, [p for _, p in trainable], tok, train_set, val_set, plan, total, state,
              metrics, None, None)
    if state.step >= total:
        return run
    if dist.enabled:
        run.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        run.net = torch.compile(run.net)
    features = make_features(cfg.feature_cache, store.path, train_set.rows, device, dist)
    run.stream = BatchStream(BatchDataset(train_set.items, features, tok.pad_id), plan, cfg.workers, pin_memory=device.type == "cuda")
    # only the main rank evaluates: the validation features are loaded there only
    if len(val_set) and dist.is_main:
        run.val_features = make_features(cfg.feature_cache, store.path, val_set.rows, device)
    return run


def _tokenizer(cfg: TrainConfig, manifest: Any, source: dict[str, Any] | None, dist: Dist) -> tuple[ChatTokenizer, str]:
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
        return ChatTokenizer.load(path, video_token), str(path)
    if dist.is_main:
        tok = ChatTokenizer(train_bpe(training_texts(manifest), cfg.vocab_size or DEFAULT_VOCAB_SIZE), video_token)
        tok.save(out)
        log.info("trained a byte-level BPE of %d tokens on the training text", tok.vocab_size)
    dist.barrier()
    if not dist.is_main:
        tok = ChatTokenizer.load(out / "tokenizer.json", video_token)
    return tok, "trained"
