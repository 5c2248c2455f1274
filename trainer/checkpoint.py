"""Checkpoints: safetensors weights plus a training state that holds no pickled object.

    RUN/checkpoints/step-00000120/
        model.safetensors       every weight of the VideoLM (a tied head stored once)
        optimizer.safetensors   the optimizer's per-parameter tensors, named "<param>/<key>"
        state.json              step, epoch, optimizer hyper-parameters (by parameter name),
                                RNG states (as lists of numbers), the metrics position

A checkpoint is written into ``.tmp-step-...`` and renamed, so a crash never leaves half of one;
a directory without ``state.json`` is not a checkpoint. Only the last ``keep`` are kept.
Loading reads safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from trainer.errors import TrainerError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def require_checkpoint(run: Path) -> Path:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise TrainerError(f"{run} has no checkpoint yet (checkpoints/step-*/state.json)")
    return ckpt


# --- RNG states as JSON --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --- optimizer state by parameter name -----------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own index order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    tensors = {
        f"{names[index]}/{key}": value.detach().cpu().contiguous()
        for index, entry in sd["state"].items()
        for key, value in entry.items()
    }
    groups = [
        {**{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in sd["param_groups"]
    ]
    return tensors, groups


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    names = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    saved = [n for g in groups for n in g["params"]]
    if saved != names:
        raise TrainerError(
            "the checkpoint's optimizer covers other parameters than this run trains "
            f"({len(saved)} saved, {len(names)} now); resume with the same --train"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    param_groups = [
        {**{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
        for g in groups
    ]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# --- save / load ---------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """The scalars of a checkpoint (state.json)."""

    step: int  # optimizer steps done
    epoch: int
    extra: dict[str, Any]


def save_checkpoint(
    run: Path,
    step: int,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the last ``keep``."""
    root = checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, groups = optimizer_tensors(model, optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "format_version": STATE_VERSION,
        "step": step,
        "epoch": epoch,
        "optimizer": {"type": type(optimizer).__name__, "param_groups": groups},
        "rng": rng_state(),
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def load_weights(model: nn.Module, ckpt: Path, device: torch.device | str = "cpu") -> None:
    """Load a checkpoint's model.safetensors into ``model`` (every tensor must match)."""
    file = Path(ckpt) / "model.safetensors"
    if not file.is_file():
        raise TrainerError(f"{ckpt}: no model.safetensors")
    try:
        missing, unexpected = load_model(model, str(file), strict=False, device=str(device))
    except RuntimeError as err:  # shape mismatch
        raise TrainerError(f"{file} does not fit this model ({str(err).splitlines()[0]})") from err
    if missing or unexpected:
        raise TrainerError(f"{file} does not fit this model: {len(missing)} missing, {len(unexpected)} unexpected tensors")


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainingState:
    """Restore weights, optimizer and RNG states; returns the scalars."""
    state = json.loads((Path(ckpt) / "state.json").read_text())
    if state.get("format_version") != STATE_VERSION:
        raise TrainerError(f"{ckpt}: training-state version {state.get('format_version')!r}, expected {STATE_VERSION}")
    load_weights(model, ckpt, device)
    # on the CPU: load_state_dict moves each tensor where its parameter's policy wants it
    tensors = load_file(str(Path(ckpt) / "optimizer.safetensors"))
    load_optimizer(model, optimizer, tensors, state["optimizer"]["param_groups"])
    set_rng_state(state["rng"])
    return TrainingState(step=state["step"], epoch=state["epoch"], extra=state.get("extra", {}))
