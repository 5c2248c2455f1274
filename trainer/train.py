"""The training loop (DESIGN §3.5): SFT of VideoSummary, projector and LM from cached features.

`train` sets the run up (`trainer.setup.prepare`: a fresh run, `--init-from RUN`, `--init-lm`, or
`--resume`), then, for each step: fetch this rank's micro-batches, take one optimizer step, log,
evaluate, checkpoint. Everything the loop carries from step to step is one `TrainState`, saved in
every checkpoint and restored as a whole; with the data order a function of (seed, epoch, step)
(`trainer.batching.BatchPlan`) and the learning rate a function of the step (`trainer.optim`),
a resumed run continues bit for bit.

The loss of an optimizer step is the mean next-token loss over every labelled token of the
global batch (all micro-batches of all ranks), so one process with batch 2B, one with batch B
and two accumulation steps, and two processes with batch B all compute the same update. A
mixture-of-experts LM adds, as MiniMind does, its load-balancing loss summed over layers (each
layer's already weighted by aux_loss_alpha) and averaged over the sequences of the global batch
(not while the LM is frozen: it trains the routers only); metrics.jsonl then logs it as
``aux_loss`` beside ``loss``, which stays the next-token loss.

Nothing here decodes a video or imports CLIP: features come from the store (`trainer.features`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from trainer.checkpoint import latest_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.distributed import Dist, init_distributed
from trainer.evaluate import validation_loss
from trainer.loss import autocast, token_loss_sum
from trainer.metrics import plot_loss
from trainer.optim import lr_at
from trainer.run import cpu_threads
from trainer.setup import Run, prepare

log = logging.getLogger(__name__)

PLOT_EVERY_S = 10  # loss.png is redrawn at most this often while training


@dataclass
class TrainResult:
    run: Path
    step: int
    total_steps: int
    loss: float | None  # of the last step of this invocation
    val_loss: float | None  # of the run's last evaluation
    checkpoint: Path | None
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run ``cfg.out``; see the module docstring."""
    cfg.check()
    started = time.time()
    dist = init_distributed(cfg.device)
    try:
        with cpu_threads(cfg.threads):
            run = prepare(cfg, dist)
            last_loss = _loop(cfg, run, dist, started)
            return TrainResult(run=run.out, step=run.state.step, total_steps=run.total, loss=last_loss,
                               val_loss=run.state.val_loss,
                               checkpoint=latest_checkpoint(run.out), samples=len(run.train_set),
                               skipped=dict(run.train_set.skipped), seconds=time.time() - started)
    finally:
        dist.close()


def _loop(cfg: TrainConfig, run: Run, dist: Dist, started: float) -> float | None:
    """Step ``run`` to its end (or ``--stop-after`` steps); the loss of the last step taken here."""
    state, device, spe = run.state, dist.device, run.plan.steps_per_epoch
    if state.step >= run.total:
        log.info("run %s is already finished (step %d of %d)", run.out, state.step, run.total)
        return None
    stop_at = run.total if cfg.stop_after is None else min(run.total, state.step + cfg.stop_after)
    last_loss = None
    at_boundary = True  # False while the weights may be a step ahead of state.step
    bar = tqdm(total=run.total, initial=state.step, desc="train", unit="step", disable=not dist.is_main, dynamic_ncols=True)
    tokens_seen, window_start, last_plot = 0.0, time.time(), 0.0
    run.model.train()
    try:
        while state.step < stop_at:
            epoch, in_epoch = divmod(state.step, spe)
            batches = run.stream.epoch(epoch, in_epoch)  # type: ignore[union-attr]
            for _ in range(in_epoch, min(spe, in_epoch + stop_at - state.step)):
                micro = [next(batches).to(device) for _ in range(cfg.grad_accum)]
                lr = lr_at(state.step, cfg, run.total)
                at_boundary = False
                stats = train_step(run.net, micro, run.optimizer, run.params, lr, cfg.clip, dist, device)
                last_loss, n_tokens = stats.loss, stats.tokens
                state.step, state.loss, state.epoch = state.step + 1, last_loss, (state.step + 1) // spe
                at_boundary = True
                tokens_seen += n_tokens
                now = time.time()
                rate = tokens_seen / max(now - window_start, 1e-9)
                if dist.is_main:
                    if state.step % cfg.log_every == 0 or state.step == stop_at:
                        moe_fields = {} if stats.aux_loss is None else {"aux_loss": stats.aux_loss}
                        run.metrics.append({
                            "step": state.step, "epoch": epoch, "loss": last_loss, **moe_fields, "lr": lr, "grad_norm": stats.grad_norm,
                            "tokens": int(n_tokens), "tokens_per_s": round(rate, 1), "elapsed_s": round(now - started, 3),
                        })
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{rate:.0f}", epoch=epoch)
                    if now - last_plot > PLOT_EVERY_S:
                        plot_loss(run.metrics.read(), run.out / "loss.png")
                        last_plot = now
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < run.total:
                    _evaluate(cfg, run, dist)
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < stop_at:
                    _checkpoint(cfg, run, dist)
    except KeyboardInterrupt:
        if dist.is_main and state.step > 0 and state.saved_step != state.step and at_boundary:
            log.warning("interrupted: saving step %d", state.step)
            save_checkpoint(run.out, state, run.model, run.optimizer, cfg.keep)
        raise
    finally:
        bar.close()
    if state.step >= run.total:
        _evaluate(cfg, run, dist)
    if state.saved_step != state.step:
        _checkpoint(cfg, run, dist)
    elif dist.is_main:
        plot_loss(run.metrics.read(), run.out / "loss.png")
    if state.step >= run.total:
        log.info("run %s finished at step %d", run.out, state.step)
    else:
        log.info("stopped at step %d of %d; continue with --resume", state.step, run.total)
    return last_loss


class StepStats(NamedTuple):
    loss: float  # the global mean next-token loss
    grad_norm: float
    tokens: float  # global input tokens
    aux_loss: float | None  # a mixture-of-experts LM's load-balancing loss (global mean per sequence)


def train_step(net: nn.Module, micro: list, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], lr: float,
               clip: float, dist: Dist, device: torch.device) -> StepStats:
    """One optimizer step over this rank's micro-batches. Every labelled token of the global
    batch weighs the same: each micro-batch's loss sum is divided by the global token count
    (times the world size, which DDP's gradient averaging divides out again); a mixture of
    experts' balance loss likewise weighs every sequence of the global batch the same."""
    lm = _unwrapped(net).lm
    moe = bool(lm.moe_layers())
    # the balance loss trains the routers; with them frozen it would only bend the video tokens
    balance = moe and any(layer.gate.weight.requires_grad for layer in lm.moe_layers())
    n_target, n_tokens, n_seqs = dist.sum([sum(b.n_target_tokens for b in micro), sum(float(b.attention_mask.sum()) for b in micro),
                                           sum(len(b.input_ids) for b in micro)])
    scale, aux_scale = dist.world / max(n_target, 1.0), dist.world / max(n_seqs, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or not dist.enabled  # DDP all-reduces on the last micro-batch only
        with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device):
            logits, _ = net(batch.input_ids, video=batch.video, video_counts=batch.video_counts)
            part = token_loss_sum(logits, batch.labels)
            objective = part * scale
            if moe:
                aux = lm.aux_loss_sum(batch.attention_mask)
                objective = objective + aux * aux_scale if balance else objective
                aux_sum += aux.detach().double()
        objective.backward()
        loss_sum += part.detach().double()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    total_loss, total_aux = dist.sum([loss_sum.item(), aux_sum.item()])
    return StepStats(total_loss / max(n_target, 1.0), float(grad_norm), n_tokens, total_aux / max(n_seqs, 1.0) if moe else None)


def _unwrapped(net: nn.Module) -> nn.Module:
    """The model inside a torch.compile and/or DDP wrapper."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def _evaluate(cfg: TrainConfig, run: Run, dist: Dist) -> None:
    """The validation loss, on the main rank (the others wait): logged and kept in the state."""
    if not len(run.val_set):
        return
    if dist.is_main:
        run.model.eval()
        value = validation_loss(run.model, run.val_set.items, run.val_features, run.tok.pad_id, cfg.batch_size, dist.device)
        run.model.train()
        run.state.record_val_loss(value)
        run.metrics.append({"step": run.state.step, "val_loss": value})
        log.info("step %d: val loss %.4f", run.state.step, value)
    dist.barrier()


def _checkpoint(cfg: TrainConfig, run: Run, dist: Dist) -> None:
    if dist.is_main:
        save_checkpoint(run.out, run.state, run.model, run.optimizer, cfg.keep)
        plot_loss(run.metrics.read(), run.out / "loss.png")
    else:
        run.state.saved_step = run.state.step
    dist.barrier()
