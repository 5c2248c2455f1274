"""A run directory and loading a trained model from it.

    RUN/config.json      the training settings, the model config, the tokenizer's special ids,
                         the chat template settings, and the manifest and store (signature)
                         the run was trained on: enough to rebuild the model in another process
    RUN/tokenizer.json   the run's tokenizer (trained here, or a copy of the one it was given)
    RUN/checkpoints/     see `trainer.checkpoint`
    RUN/metrics.jsonl    see `trainer.metrics`
    RUN/loss.png

What `--resume` takes from RUN/config.json and may change is `trainer.resume`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import VideoLM, VideoLMConfig
from pipeline.atomic import write_atomic
from trainer.checkpoint import load_weights, read_state, require_checkpoint
from trainer.errors import TrainerError
from trainer.tokenization import ChatTokenizer

log = logging.getLogger(__name__)

RUN_FORMAT_VERSION = 1


def config_path(run: Path) -> Path:
    return Path(run) / "config.json"


def read_run_config(run: str | Path) -> dict[str, Any]:
    run = Path(run).expanduser()
    if not run.is_dir():
        raise TrainerError(f"no such run directory: {run}")
    path = config_path(run)
    if not path.is_file():
        raise TrainerError(f"{run} is not a training run (no config.json)")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise TrainerError(f"{path} is damaged: not readable JSON ({type(err).__name__})") from err
    if not isinstance(config, dict):
        raise TrainerError(f"{path} is damaged: not a JSON object")
    if config.get("format_version") != RUN_FORMAT_VERSION:
        raise TrainerError(f"{path}: run format version {config.get('format_version')!r}, expected {RUN_FORMAT_VERSION}")
    return config


def write_run_config(run: Path, config: dict[str, Any]) -> None:
    write_atomic(config_path(run), json.dumps({"format_version": RUN_FORMAT_VERSION, **config}, indent=2, default=str) + "\n")


def run_tokenizer(run: Path, config: dict[str, Any]) -> ChatTokenizer:
    return ChatTokenizer.load(Path(run) / "tokenizer.json", config["tokenizer"]["video_token"])


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (None: leave torch's setting). The tiny models of the
    demo and the tests are small enough that one thread is often as fast as several, and far
    faster when other processes compete for the cores (OpenMP threads then wait on each other)."""
    if n is None:
        yield
        return
    if n < 1:
        from trainer.errors import TrainerError

        raise TrainerError(f"--threads must be at least 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pick_device(name: str | None = None) -> torch.device:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise TrainerError(f"--device {name}: CUDA is not available")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedRun:
    """A trained model ready for inference."""

    run: Path
    config: dict[str, Any]
    model: VideoLM
    tok: ChatTokenizer
    checkpoint: Path
    step: int

    @property
    def device(self) -> torch.device:
        return self.model.lm.tok_embeddings.weight.device

    @property
    def system(self) -> str | None:
        return self.config.get("template", {}).get("system")

    @property
    def store_signature(self) -> dict[str, Any]:
        return self.config["store"]["signature"]


def load_run(run: str | Path, device: torch.device | None = None) -> LoadedRun:
    """The run's model (latest checkpoint, eval mode) and tokenizer."""
    run = Path(run).expanduser()
    config = read_run_config(run)
    ckpt = require_checkpoint(run)
    device = device or pick_device()
    model = VideoLM(VideoLMConfig.from_dict(config["model"]))
    state = read_state(ckpt)
    load_weights(model, ckpt, state=state)
    model.to(device).eval()
    tok = run_tokenizer(run, config)
    if tok.video_id != model.cfg.video_token_id:
        raise TrainerError(f"{run}: tokenizer.json's video token id {tok.video_id} is not the model's {model.cfg.video_token_id}")
    step = state["step"]
    log.info("loaded %s (step %d) on %s", run, step, device)
    return LoadedRun(run=run, config=config, model=model, tok=tok, checkpoint=ckpt, step=step)
