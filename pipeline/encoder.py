"""Encode stage: an open_clip vision tower, run in inference mode, frames in, tokens out.

Per frame the tower yields T = 1 + (S / patch)^2 tokens of width D: CLS then patch tokens of
block `layer` (-1 the last, -2 the penultimate that LLaVA and Video-ChatGPT use), with the
tower's final LayerNorm applied and before the projection (open_clip's
`forward_intermediates(..., normalize_intermediates=True)`). For ViT-B-16 at 224 px: 197 x 768.

On a GPU the tower is cast to the chosen precision (not autocast), so PyTorch's fused attention
kernels run; on the CPU the default is float32. Tokens always leave as float16.

`EncoderSpec` names an encoder; `load_encoder` builds it and reports everything a store must
record about it (`Encoder.attrs`), including a sha256 of the tower's weights, so that a store,
a rerun and every actor on a cluster can prove they use the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ExtractError
from pipeline.preprocess import RESIZE_MODES, normalize
from pipeline.store_format import encoder_fingerprint
from torch_guard import guard_torch

if TYPE_CHECKING:  # torch is imported when a tower is loaded: the job's driver never needs it
    import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "encoder_configs"  # demo-tiny and friends
PRECISIONS = ("fp32", "fp16", "bf16")
RANDOM_WEIGHTS = "none"
RANDOM_SEED = 0  # `--pretrained none` weights are a function of this seed


@dataclass(frozen=True)
class EncoderSpec:
    """What the user asked for: open_clip model name, weights, block, precision."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"  # open_clip tag, checkpoint file, or "none"
    layer: int = -1
    precision: str = "fp32"


class Encoder:
    """A loaded vision tower. `encode` turns (N, S, S, 3) uint8 frames into (N, T, D) float16."""

    def __init__(self, spec: EncoderSpec, visual: torch.nn.Module, preprocess: dict[str, Any], weights_sha256: str,
                 device: torch.device) -> None:
        self.spec = spec
        self.device = device
        import torch

        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        self.visual = visual.to(device=device, dtype=self.dtype).eval()
        self.mean = tuple(float(m) for m in preprocess["mean"])
        self.std = tuple(float(s) for s in preprocess["std"])
        n_blocks = len(visual.transformer.resblocks)
        if not -n_blocks <= spec.layer < n_blocks:
            raise ExtractError(f"--layer {spec.layer} is out of range: {spec.model} has {n_blocks} blocks")
        self.block = spec.layer % n_blocks
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        grid = visual.grid_size
        self.attrs: dict[str, Any] = {
            "model": spec.model,
            "pretrained": spec.pretrained,
            "weights_sha256": weights_sha256,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "resize_mode": preprocess.get("resize_mode", "shortest"),
            "precision": spec.precision,
            "layer": spec.layer,
            "tokens_per_frame": 1 + grid[0] * grid[1],
            "width": int(visual.transformer.width),
        }
        if self.attrs["resize_mode"] not in RESIZE_MODES:
            raise ExtractError(f"{spec.model}: resize mode {self.attrs['resize_mode']!r} is not supported")

    @property
    def fingerprint(self) -> str:
        return encoder_fingerprint(self.attrs)

    def encode(self, frames: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, T, D) float16, in batches of `batch_size` frames."""
        import torch

        if not len(frames):
            return np.zeros((0, self.attrs["tokens_per_frame"], self.attrs["width"]), dtype=np.float16)
        with torch.inference_mode():
            return np.concatenate([self._forward(torch.from_numpy(frames[start : start + batch_size]))
                                   for start in range(0, len(frames), batch_size)])

    def _forward(self, chunk: torch.Tensor) -> np.ndarray:
        """(n, S, S, 3) uint8 on the host -> (n, T, D) float16 tokens."""
        import torch

        x = normalize(chunk.to(self.device, non_blocking=True), self.mean, self.std, self.dtype)  # (n, 3, S, S)
        return self.tokens(x).to(torch.float16).cpu().numpy()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) normalised images in the tower's dtype -> (n, T, D): the CLS token, then
        the patches, of block ``layer`` after the tower's final LayerNorm."""
        import torch

        feats = self.visual.forward_intermediates(
            x,
            indices=[self.block],
            stop_early=True,
            normalize_intermediates=True,  # the tower's final LayerNorm
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([feats["image_intermediates_prefix"][0], feats["image_intermediates"][0]], dim=1)


class BatchingEncoder:
    """One tower shared by many callers (the shards in flight): `submit` calls from any thread
    are queued and served by one thread in forwards of up to `batch_size` frames, so batches
    span videos and shards. `close` ends the thread."""

    def __init__(self, encoder: Encoder, batch_size: int) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.requests: queue.Queue[tuple[list[np.ndarray], Future] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="encode", daemon=True)
        self.thread.start()

    def submit(self, videos: list[np.ndarray]) -> Future:
        """Frames of several videos, (F, S, S, 3) each -> a future of their tokens, (F, T, D) each."""
        done: Future = Future()
        self.requests.put((videos, done))
        return done

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join()

    def _serve(self) -> None:
        while (first := self.requests.get()) is not None:
            batch = [first]
            frames = sum(len(v) for v in first[0])
            while frames < self.batch_size:
                try:
                    request = self.requests.get_nowait()
                except queue.Empty:
                    break
                if request is None:  # closing: serve what came first, then stop
                    self.requests.put(None)
                    break
                batch.append(request)
                frames += sum(len(v) for v in request[0])
            videos = [v for request, _ in batch for v in request]
            try:
                tokens = self.encoder.encode(np.concatenate(videos), self.batch_size)
            except Exception as err:  # noqa: BLE001 - handed to every caller of this batch
                for _, done in batch:
                    done.set_exception(err)
                continue
            out = iter(np.split(tokens, np.cumsum([len(v) for v in videos])[:-1]))
            for request, done in batch:
                done.set_result([next(out) for _ in request])


def input_geometry(model: str) -> tuple[int, str] | None:
    """(input size, resize mode) that open_clip's config file of `model` names, read without
    importing torch or open_clip (a one-machine job starts decoding while they load); None when
    there is no such file. A guess: only the loaded tower's `attrs` are authoritative."""
    import importlib.util
    import json

    found = importlib.util.find_spec("open_clip")
    folders = [CONFIG_DIR, *(Path(p) / "model_configs" for p in (found.submodule_search_locations or []))] \
        if found else [CONFIG_DIR]
    for folder in folders:
        path = folder / f"{model}.json"
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            size = config.get("vision_cfg", {}).get("image_size")
            if size is None:
                return None
            return int(size[0] if isinstance(size, list) else size), \
                config.get("preprocess_cfg", {}).get("resize_mode", "shortest")
    return None


def register_configs() -> None:
    """Make the project's own open_clip configs (demo-tiny) known to open_clip."""
    import open_clip

    if "demo-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the tower's parameters and buffers (names, shapes, float32 bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_encoder(spec: EncoderSpec, device: str | torch.device = "cpu") -> Encoder:
    """Build the tower named by `spec` on `device`; one-line `ExtractError` for user mistakes."""
    guard_torch()  # this process may have decoded (imported decord) already
    import open_clip
    import torch

    register_configs()
    if spec.precision not in PRECISIONS:
        raise ExtractError(f"unknown precision {spec.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if spec.model not in open_clip.list_models():
        raise ExtractError(f"unknown encoder {spec.model!r}: not an open_clip model name "
                           "(see open_clip.list_models()) nor demo-tiny")
    pretrained = None if spec.pretrained == RANDOM_WEIGHTS else spec.pretrained
    if pretrained and not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(spec.model, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.model)) or "none known"
        raise ExtractError(f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of {spec.model} "
                           f"(tags: {tags}); use none for random weights")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = open_clip.create_model(spec.model, pretrained=pretrained, device="cpu")
    except RuntimeError as err:
        raise ExtractError(
            f"could not load weights {spec.pretrained!r} of {spec.model}: {' '.join(str(err).split())[:200]}. "
            "Without network, download them once where there is one (open_clip caches them under "
            "~/.cache/huggingface), or pass a checkpoint file with --pretrained PATH, or --pretrained none"
        ) from err
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or getattr(visual, "attn_pool", None) is not None \
            or not hasattr(visual, "transformer"):
        raise ExtractError(f"{spec.model}: only open_clip VisionTransformer towers without attention pooling "
                           "are supported")
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    sha = weights_sha256(visual)
    return Encoder(spec, visual, preprocess, sha, torch.device(device))
