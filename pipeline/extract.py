"""`extract`: a manifest in, a feature store out (DESIGN §3.2-3.3), resumable.

The store is opened (created, or grown when the manifest grew), the shards that are not done
are listed, and only those are extracted, on the local machine or a Ray cluster
(`pipeline.distributed`). Each complete shard is written whole, then committed; a killed job
loses at most the shards in flight, and a rerun redoes exactly those.

Defaults decided here: the precision is fp16 when the cluster has GPUs and fp32 otherwise, or
the store's own precision when extending an existing store; the encoder is loaded once in the
driver to fingerprint its weights before any worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from manifests.manifest import IMAGE_EXTENSIONS, load_manifest
from pipeline import distributed
from pipeline.decode import DecodeSpec, decode_file
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.errors import DecodeError, ExtractError
from pipeline.sampling import SAMPLING_POLICIES
from pipeline.inspect import open_store
from pipeline.store import FAILED, ShardResult, open_or_create, pending_shards, store_attrs, write_shard

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """What `run_extract.py extract` runs; see its --help for every field."""

    manifest: Path
    store: Path
    encoder: str = "ViT-B-16"
    pretrained: str = "openai"
    frames: int = 8
    sampling: str = "uniform"
    layer: int = -1
    batch_size: int = 256
    ray_address: str | None = None
    decoders: int | None = None
    precision: str | None = None  # None: the store's, else fp16 on GPU clusters, fp32 on CPU
    decode_timeout_s: float = 120.0
    shards: list[int] | None = None  # None: every pending shard; else exactly these (rebuild)


@dataclass
class ExtractSummary:
    store: Path
    shards_total: int
    shards_done_before: int
    shards_written: int
    ok: int
    failed: int

    def __str__(self) -> str:
        if not self.shards_written:
            return f"{self.store}: all {self.shards_total} shards already done; nothing to extract"
        return (f"{self.store}: wrote {self.shards_written} shards ({self.ok} videos ok, {self.failed} failed); "
                f"{self.shards_done_before + self.shards_written}/{self.shards_total} shards done")


def _validate(cfg: ExtractConfig) -> None:
    if cfg.frames < 1:
        raise ExtractError(f"--frames must be at least 1, got {cfg.frames}")
    if cfg.sampling not in SAMPLING_POLICIES:
        raise ExtractError(f"--sampling must be one of {', '.join(SAMPLING_POLICIES)}, got {cfg.sampling!r}")
    if cfg.batch_size < 1:
        raise ExtractError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.decode_timeout_s <= 0:
        raise ExtractError(f"--decode-timeout must be positive, got {cfg.decode_timeout_s}")


def _store_precision(store: Path) -> str | None:
    if (Path(store) / "zarr.json").is_file():
        return zarr.open_group(store, mode="r").attrs["encoder"]["precision"]
    return None


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract every pending shard of `cfg.manifest` into `cfg.store` (see the module docstring)."""
    _validate(cfg)
    manifest = load_manifest(cfg.manifest)
    store = Path(cfg.store).expanduser().resolve()
    with distributed.cluster(cfg.ray_address, temp_dir=None) as res:
        precision = cfg.precision or _store_precision(store) or ("fp16" if res.gpus else "fp32")
        spec = EncoderSpec(cfg.encoder, cfg.pretrained, cfg.layer, precision)
        encoder = load_encoder(spec, "cpu")  # fingerprint only; the actors load their own
        attrs = store_attrs(encoder.attrs, encoder.fingerprint, cfg.frames, cfg.sampling, manifest)
        group = open_or_create(store, attrs)
        pending = pending_shards(store, attrs, manifest)
        todo = pending if cfg.shards is None else sorted(set(cfg.shards))
        if todo and (todo[0] < 0 or todo[-1] >= manifest.n_shards):
            raise ExtractError(f"shards {todo} are not all in 0..{manifest.n_shards - 1}")
        done_before = manifest.n_shards - len(set(pending) | set(todo))
        summary = ExtractSummary(store, manifest.n_shards, done_before, 0, 0, 0)
        if not todo:
            return summary
        decode = DecodeSpec(cfg.frames, cfg.sampling, encoder.image_size, encoder.attrs["resize_mode"])
        del encoder

        def write(result: ShardResult) -> None:
            write_shard(group, store, result, manifest)
            summary.shards_written += 1

        plan = distributed.Plan(
            video_root=manifest.video_root,
            shards=[(s, manifest.shard_rows(s)) for s in todo],
            decode=decode,
            encoder=spec,
            encoder_fingerprint=attrs["encoder_fingerprint"],
            tokens_per_frame=attrs["tokens_per_frame"],
            width=attrs["width"],
            batch_size=cfg.batch_size,
            decoders=cfg.decoders,
            timeout_s=cfg.decode_timeout_s,
        )
        counts = distributed.run(plan, res, write)
    summary.ok, summary.failed = counts["ok"], counts["failed"]
    return summary


@dataclass
class RebuildConfig:
    """What `run_extract.py rebuild` redoes: explicit shards, the shards holding failed rows,
    or the shards holding the named videos. The store's own encoder settings are reused."""

    manifest: Path
    store: Path
    shards: list[int] | None = None
    failed: bool = False
    videos: list[str] | None = None
    batch_size: int = 256
    ray_address: str | None = None
    decoders: int | None = None
    decode_timeout_s: float = 120.0


def rebuild(cfg: RebuildConfig) -> ExtractSummary:
    """Re-extract exactly the chosen shards in place; every other shard's files stay untouched."""
    if sum([cfg.shards is not None, cfg.failed, cfg.videos is not None]) != 1:
        raise ExtractError("rebuild needs exactly one of --shards, --failed, --videos")
    group = open_store(cfg.store)
    attrs = dict(group.attrs)
    shard_size = attrs["shard_size"]
    if cfg.shards is not None:
        shards = sorted(set(cfg.shards))
    elif cfg.failed:
        shards = sorted({int(row) // shard_size for row in np.flatnonzero(group["status"][:] == FAILED)})
    else:
        rows = {e.video_id: e.row for e in load_manifest(cfg.manifest).videos}
        unknown = [v for v in cfg.videos if v not in rows]
        if unknown:
            raise ExtractError(f"not in the manifest: {', '.join(unknown)}")
        shards = sorted({rows[v] // shard_size for v in cfg.videos})
    enc = attrs["encoder"]
    if not shards:
        log.info("nothing to rebuild")
    return extract(ExtractConfig(
        manifest=cfg.manifest, store=cfg.store, encoder=enc["model"], pretrained=enc["pretrained"],
        frames=attrs["frames"], sampling=attrs["sampling"], layer=enc["layer"], batch_size=cfg.batch_size,
        ray_address=cfg.ray_address, decoders=cfg.decoders, precision=enc["precision"],
        decode_timeout_s=cfg.decode_timeout_s, shards=shards,
    ))


def encode_video_file(video_path: Path, store_attrs: dict[str, Any], device: str = "cpu") -> np.ndarray:
    """(F, T, D) float16 tokens of one file, made exactly as the store with `store_attrs` was
    (encoder, weights, frames, sampling, layer); for chatting about a video not in the store."""
    enc = store_attrs["encoder"]
    spec = EncoderSpec(enc["model"], enc["pretrained"], enc["layer"], enc["precision"] if device != "cpu" else "fp32")
    encoder = load_encoder(spec, device)
    if encoder.attrs["weights_sha256"] != enc["weights_sha256"]:
        raise ExtractError(f"the weights {enc['model']}/{enc['pretrained']} loaded here differ from the store's")
    path = Path(video_path).expanduser().resolve()
    kind = "image" if path.suffix.lower() in IMAGE_EXTENSIONS else "video"
    decode = DecodeSpec(store_attrs["frames"], store_attrs["sampling"], encoder.image_size,
                        encoder.attrs["resize_mode"])
    try:
        decoded = decode_file(path, kind, decode)
    except DecodeError as err:
        raise ExtractError(f"{path}: {err}") from err
    return encoder.encode(decoded.frames)
