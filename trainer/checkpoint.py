"""Checkpoints: safetensors weights plus a training state that holds no pickled object.

    RUN/checkpoints/step-00000120/
        model.safetensors       every weight of the VideoLM (a tied head stored once)
        optimizer.safetensors   the optimizer's per-parameter tensors, named "<param>/<key>"
        state.json              the loop's `TrainState` (step, epoch, RNG states as lists of
                                numbers, last and best losses), the optimizer's hyper-parameters
                                (by parameter name), and the size and sha256 of the two
                                safetensors files

Writing: a checkpoint is written into ``.tmp-step-...``, fsynced and renamed, and an old one is
renamed back to ``.tmp-...`` before it is deleted, so a kill at any moment leaves every
``step-*`` directory complete; a directory without ``state.json`` is not a checkpoint, and a
resumed run deletes the ``.tmp-*`` leftovers (`remove_leftovers`). Only the last ``keep`` are kept.

Loading reads safetensors and JSON only: nothing is unpickled, so a file carrying a pickle
payload is refused as not being safetensors or JSON, and its payload never runs. A checkpoint
whose files are truncated, corrupted (their sha256 is not the one state.json recorded) or do not
fit the model is refused with one line naming the file. Resuming does not fall back to the
previous checkpoint by itself: the error names the checkpoint to delete to do so, because a
silent fallback would hide a damaged disk and quietly redo finished steps.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from manifests.manifest import sha256_file
from trainer.errors import TrainerError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = ".tmp-"  # prefix of a checkpoint being written or deleted
WEIGHT_FILES = ("model.safetensors", "optimizer.safetensors")


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


def remove_leftovers(run: Path) -> None:
    """Delete what a killed save or deletion left (``.tmp-*`` directories): never a checkpoint."""
    root = checkpoint_dir(run)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_LEFTOVER):
                log.info("removing %s, left by an interrupted checkpoint write", path)
                shutil.rmtree(path, ignore_errors=True)


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
class TrainState:
    """Everything the loop carries from step to step beyond the weights and the optimizer's
    tensors, saved in state.json and restored as a whole: with them, a resumed run computes what
    the uninterrupted one would have, bit for bit."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position is (epoch, step - epoch * steps_per_epoch): see BatchPlan
    rng: dict[str, Any] = field(default_factory=dict)  # torch/python/numpy(/cuda) RNG states when saved
    loss: float | None = None  # of the last step
    val_loss: float | None = None  # of the last evaluation
    best_val_loss: float | None = None
    best_step: int | None = None  # where best_val_loss was measured
    saved_step: int = -1  # the step of the last checkpoint written or resumed from

    def record_val_loss(self, value: float) -> None:
        self.val_loss = value
        if self.best_val_loss is None or value < self.best_val_loss:
            self.best_val_loss, self.best_step = value, self.step


def save_checkpoint(run: Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int) -> Path:
    """Write the checkpoint of ``state.step`` atomically (the RNG states taken now) and delete all
    but the last ``keep`` (module docstring)."""
    state.rng, state.saved_step = rng_state(), state.step
    root = checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f"{_LEFTOVER}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, groups = optimizer_tensors(model, optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    record = {
        "format_version": STATE_VERSION,
        **asdict(state),
        "optimizer": {"type": type(optimizer).__name__, "param_groups": groups},
        "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in WEIGHT_FILES},
    }
    (tmp / "state.json").write_text(json.dumps(record) + "\n")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same step saved again: set the old one aside first, never delete it in place
        _withdraw(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run)[: -max(1, keep)]:
        _withdraw(old)
    log.info("checkpoint %s", final)
    return final


def _withdraw(ckpt: Path) -> None:
    """Delete a checkpoint: renamed to a leftover name first, so a kill while its files are being
    deleted never leaves a half-deleted ``step-*`` that reads as complete."""
    aside = ckpt.with_name(f"{_LEFTOVER}old-{ckpt.name}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(ckpt, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _damaged(file: Path, what: str, verb: str = "is damaged:") -> TrainerError:
    """The one-line error for a damaged checkpoint file, with what the user can do about it."""
    ckpt = file.parent
    earlier = [p for p in list_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    hint = (f"delete {ckpt} to resume from {earlier[-1].name}" if earlier
            else "no earlier checkpoint to fall back on")
    return TrainerError(f"{file} {verb} {what}; {hint}")


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint, checked for the fields loading needs (JSON only, never a pickle)."""
    file = Path(ckpt) / "state.json"
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(file, f"not readable JSON ({type(err).__name__})") from err
    if not isinstance(state, dict):
        raise _damaged(file, "not a JSON object")
    if state.get("format_version") != STATE_VERSION:
        raise TrainerError(f"{file}: training-state version {state.get('format_version')!r}, expected {STATE_VERSION}")
    try:
        ok = (isinstance(state["step"], int) and state["step"] >= 0 and isinstance(state["epoch"], int)
              and all(isinstance(g["params"], list) for g in state["optimizer"]["param_groups"])
              and isinstance(state["rng"], dict) and isinstance(state.get("files", {}), dict)
              and all(isinstance(entry, dict) for entry in state.get("files", {}).values()))
    except KeyError as err:
        raise _damaged(file, f"a training state without {err}") from err
    except TypeError as err:
        raise _damaged(file, "a field of the training state has the wrong type") from err
    if not ok:
        raise _damaged(file, "a field of the training state has the wrong type")
    return state


def _check_file(ckpt: Path, name: str, state: dict[str, Any]) -> Path:
    """The path of ``name``, after checking its size and sha256 against state.json (checkpoints
    written before state.json recorded them are only checked by their loader)."""
    file = Path(ckpt) / name
    if not file.is_file():
        raise _damaged(file, "missing")
    expected = state.get("files", {}).get(name)
    if expected is not None:
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise _damaged(file, f"{size} bytes, state.json recorded {expected.get('bytes')} (truncated?)")
        if sha256_file(file) != expected.get("sha256"):
            raise _damaged(file, "its sha256 is not the one state.json recorded")
    return file


def load_weights(model: nn.Module, ckpt: Path, device: torch.device | str = "cpu", state: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's model.safetensors into ``model`` (every tensor must match)."""
    file = _check_file(ckpt, "model.safetensors", state if state is not None else read_state(ckpt))
    try:
        missing, unexpected = load_model(model, str(file), strict=False, device=str(device))
    except SafetensorError as err:
        raise _damaged(file, f"not a safetensors file ({str(err).splitlines()[0]})") from err
    except RuntimeError as err:  # shape mismatch: torch's first detail line names the tensor
        detail = next((line.strip() for line in str(err).splitlines() if "mismatch" in line), str(err).splitlines()[0])
        raise _damaged(file, f"({detail.rstrip('.')})", "does not fit this model") from err
    if missing or unexpected:
        raise _damaged(file, f"{len(missing)} missing, {len(unexpected)} unexpected tensors", "does not fit this model:")


def _check_optimizer_tensors(file: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor must belong to a parameter the optimizer trains and have its shape (or be a
    scalar such as ``step``): torch would otherwise accept it and fail later, deep inside
    ``optimizer.step``."""
    params = dict(model.named_parameters())
    trained = set(_param_names(model, optimizer))
    for key, value in tensors.items():
        name, _, _field = key.rpartition("/")
        if name not in trained:
            raise _damaged(file, f"{key} names no parameter this run trains")
        if value.ndim and value.shape != params[name].shape:
            raise _damaged(file, f"{key} has shape {tuple(value.shape)}, the parameter {tuple(params[name].shape)}")


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainState:
    """Restore weights, optimizer and RNG states; returns the loop's state. A damaged file is refused
    with one line naming it (module docstring)."""
    state = read_state(ckpt)
    load_weights(model, ckpt, device, state)
    # on the CPU: load_state_dict moves each tensor where its parameter's policy wants it
    file = _check_file(ckpt, "optimizer.safetensors", state)
    try:
        tensors = load_file(str(file))
    except SafetensorError as err:
        raise _damaged(file, f"not a safetensors file ({str(err).splitlines()[0]})") from err
    _check_optimizer_tensors(file, model, optimizer, tensors)
    load_optimizer(model, optimizer, tensors, state["optimizer"]["param_groups"])
    try:
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _damaged(Path(ckpt) / "state.json", f"its RNG states do not load ({type(err).__name__})") from err
    saved = {f.name: state[f.name] for f in fields(TrainState) if f.name in state}  # older checkpoints: step, epoch, rng
    return TrainState(**{**saved, "saved_step": state["step"]})
