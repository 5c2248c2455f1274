"""`extract`: a manifest in, a feature store out (DESIGN §3.2-3.3), resumable.

The driver reads the manifest shard by shard, lists the shards that are not done (by the done
rule of `pipeline.store_format`), and hands exactly those to a distributor: with
`--ray-address`, Ray (`pipeline.distributed`: shard tasks on the cluster's nodes write and commit
each shard themselves, the driver never loads a tower nor imports torch); without it, this
machine's processes (`pipeline.local`: no Ray daemons, whose cost would eat a third of a small
machine). Both run the same shard lifecycle (`pipeline.shard.take_shard`) and make the same store
byte for byte. A killed job loses at most the shards in flight; a rerun redoes exactly those.
When nothing is pending the job ends before starting either or loading the encoder (a rerun
costs the reading of the commit records).

Defaults decided here: the precision is fp16 when there are GPUs and fp32 otherwise, or the
store's own precision when extending an existing store. A new store records the encoder
attributes that the encoders report; an existing store's are taken from the store, and every
encoder proves it loaded the same weights (fingerprint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from manifests.manifest import IMAGE_EXTENSIONS, VideoEntry, iter_shards, read_manifest_meta
from pipeline.decode import DecodedVideo, DecodeSpec, decode_file
from pipeline.encoder import EncoderSpec, input_geometry, load_encoder
from pipeline.errors import DecodeError, ExtractError
from pipeline.lease import DEFAULT_TTL_S
from pipeline.sampling import SAMPLING_POLICIES
from pipeline.storage import StoreLocation
from pipeline.store import check_compatible, check_store, open_group, open_or_create, read_attrs, read_commit
from pipeline.store_format import FAILED, is_done, rows_sha256, store_attrs

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """What `run_extract.py extract` runs; see its --help for every field."""

    manifest: Path
    store: str | Path
    encoder: str = "ViT-B-16"
    pretrained: str = "openai"
    frames: int = 8
    sampling: str = "uniform"
    layer: int = -1
    batch_size: int = 256
    ray_address: str | None = None
    decoders: int | None = None
    encoder_threads: int | None = None
    precision: str | None = None  # None: the store's, else fp16 on GPU clusters, fp32 on CPU
    decode_timeout_s: float = 120.0
    lease_ttl_s: float = DEFAULT_TTL_S  # how long a shard stays held after this job is killed
    shards: list[int] | None = None  # None: every pending shard; else exactly these (rebuild)


@dataclass
class ExtractSummary:
    store: str
    shards_total: int
    shards_done_before: int
    shards_written: int
    ok: int
    failed: int
    shards_by_others: int = 0  # committed meanwhile by another job on the same store
    left_pending: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.shards_written and not self.shards_by_others and not self.left_pending:
            return f"{self.store}: all {self.shards_total} shards already done; nothing to extract"
        done = self.shards_done_before + self.shards_written + self.shards_by_others
        others = f" ({self.shards_by_others} by another job)" if self.shards_by_others else ""
        text = (f"{self.store}: wrote {self.shards_written} shards ({self.ok} videos ok, {self.failed} failed); "
                f"{done}/{self.shards_total} shards done{others}")
        return "\n".join([text, *self.left_pending])


def _validate(cfg: ExtractConfig) -> None:
    if cfg.frames < 1:
        raise ExtractError(f"--frames must be at least 1, got {cfg.frames}")
    if cfg.sampling not in SAMPLING_POLICIES:
        raise ExtractError(f"--sampling must be one of {', '.join(SAMPLING_POLICIES)}, got {cfg.sampling!r}")
    if cfg.batch_size < 1:
        raise ExtractError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.decode_timeout_s <= 0:
        raise ExtractError(f"--decode-timeout must be positive, got {cfg.decode_timeout_s}")
    if cfg.lease_ttl_s < 3:
        raise ExtractError(f"--lease-expiry must be at least 3 seconds, got {cfg.lease_ttl_s}")


def _asks_for_store(cfg: ExtractConfig, have: dict[str, Any]) -> bool:
    """Does the request name the encoder the existing store was made with? (If so its recorded
    attributes stand for the request until an actor loads the weights and proves it.)"""
    enc = have["encoder"]  # a record edited to lack a field names another encoder
    return (enc.get("model"), enc.get("pretrained"), enc.get("layer")) == (cfg.encoder, cfg.pretrained, cfg.layer) \
        and cfg.precision in (None, enc.get("precision"))


def _shards_with_sha(manifest_dir: Path, shard_size: int) -> Iterator[tuple[int, list[VideoEntry], str]]:
    for shard, rows in iter_shards(manifest_dir, shard_size):
        yield shard, rows, rows_sha256(rows)


def _rows_of(manifest_dir: Path, shard_size: int, shards: set[int] | None) -> Iterator[VideoEntry]:
    """The rows of `shards` (None: of every shard) in manifest order, read lazily."""
    for shard, entries in iter_shards(manifest_dir, shard_size):
        if shards is None or shard in shards:
            yield from entries


def _pending(location: StoreLocation, attrs: dict[str, Any], manifest_dir: Path, shard_size: int) -> list[int]:
    return [s for s, _, sha in _shards_with_sha(manifest_dir, shard_size)
            if not is_done(read_commit(location, s), attrs, sha)]


def _distributor(cfg: ExtractConfig) -> Any:
    """Ray with --ray-address (a cluster, or `local`: a one-machine Ray), else this machine's
    processes; both run the same shard lifecycle (`pipeline.shard.take_shard`)."""
    if cfg.ray_address:
        from pipeline.distributed import RayDistributor

        return RayDistributor(cfg.ray_address, cfg.decoders, cfg.encoder_threads, cfg.batch_size)
    from pipeline.local import LocalDistributor

    return LocalDistributor(cfg.decoders, cfg.encoder_threads, cfg.batch_size, cfg.decode_timeout_s)


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract every pending shard of `cfg.manifest` into `cfg.store` (see the module docstring),
    then delete the temporary files that a killed job left in the store: those older than this
    job and than the lease expiry (no live writer of any job keeps one that long)."""
    _validate(cfg)
    started = time.time()
    location = StoreLocation(cfg.store)
    summary = _extract(cfg, location)
    try:
        removed = location.remove_temporaries(older_than=min(started, time.time() - cfg.lease_ttl_s))
    except OSError as err:  # a store on a read-only mount: its leftovers never count anyway
        log.warning("could not remove temporary files left in %s: %s", location, err)
        removed = 0
    if removed:
        log.info("removed %d temporary files left by a killed job", removed)
    return summary


def _extract(cfg: ExtractConfig, location: StoreLocation) -> ExtractSummary:
    manifest_dir, meta = read_manifest_meta(cfg.manifest)
    shard_size, n_rows = int(meta["shard_size"]), int(meta["counts"]["videos"])
    n_shards = -(-n_rows // shard_size)
    if cfg.shards is not None and cfg.shards and (min(cfg.shards) < 0 or max(cfg.shards) >= n_shards):
        raise ExtractError(f"shards {sorted(cfg.shards)} are not all in 0..{n_shards - 1}")
    have = read_attrs(location)
    if have is not None:  # an edited or damaged store is refused before its attributes are used
        check_store(location, have, n_rows)
    attrs = None
    todo = None if cfg.shards is None else set(cfg.shards)  # None: every shard, as far as is known yet
    if have is not None and _asks_for_store(cfg, have):
        attrs = store_attrs(have["encoder"], cfg.frames, cfg.sampling, meta["manifest_id"], meta["fingerprint"],
                            shard_size, n_rows)
        pending = _pending(location, attrs, manifest_dir, shard_size)
        todo = set(pending) if cfg.shards is None else todo
        if not todo:
            check_store(location, have)  # all done, so no growth was cut short: rows must match exactly
            check_compatible(have, attrs, location)
            return ExtractSummary(str(location), n_shards, n_shards, 0, 0, 0)

    with _distributor(cfg) as distributor:  # started only when there is work
        geometry = (attrs["encoder"]["image_size"], attrs["encoder"]["resize_mode"]) if attrs \
            else input_geometry(cfg.encoder)
        if geometry is not None:
            distributor.warm_up(str(meta["video_root"]), _rows_of(manifest_dir, shard_size, todo),
                                DecodeSpec(cfg.frames, cfg.sampling, *geometry))
        precision = attrs["encoder"]["precision"] if attrs else cfg.precision or ("fp16" if distributor.gpus else "fp32")
        spec = EncoderSpec(cfg.encoder, cfg.pretrained, cfg.layer, precision)
        loaded = distributor.load_encoders(spec, attrs["encoder_fingerprint"] if attrs else None)
        if attrs is None:  # a new store records what the encoders loaded
            attrs = store_attrs(loaded, cfg.frames, cfg.sampling, meta["manifest_id"], meta["fingerprint"],
                                shard_size, n_rows)
        open_or_create(location, attrs)
        pending = _pending(location, attrs, manifest_dir, shard_size)
        todo = set(pending if cfg.shards is None else cfg.shards)
        summary = ExtractSummary(str(location), n_shards, n_shards - len(set(pending) | todo), 0, 0, 0)
        if not todo:
            return summary
        enc = attrs["encoder"]
        job = {
            "store": location.url,
            "attrs": attrs,
            "video_root": str(meta["video_root"]),
            "decode": DecodeSpec(cfg.frames, cfg.sampling, enc["image_size"], enc["resize_mode"]),
            "batch_size": cfg.batch_size,
            "timeout_s": cfg.decode_timeout_s,
            "lease_ttl_s": cfg.lease_ttl_s,
            "redo": cfg.shards is not None,
            "shard_size": shard_size,
        }
        shards = ((s, rows, sha) for s, rows, sha in _shards_with_sha(manifest_dir, shard_size) if s in todo)
        n_videos = sum(min(shard_size, n_rows - s * shard_size) for s in todo)

        def committed_elsewhere(shard: int, sha: str) -> bool:
            return is_done(read_commit(location, shard), attrs, sha)

        totals = distributor.run(job, shards, n_videos, committed_elsewhere)
    if totals.stopped:  # after the distributor closed: nothing of this job runs any more
        done = summary.shards_done_before + totals.shards + totals.shards_by_others
        raise ExtractError(f"{location}: stopped: {totals.stopped} ({totals.shards} shards written by this job, "
                           f"{done}/{n_shards} done and kept); free space and run it again")
    summary.shards_written, summary.ok, summary.failed = totals.shards, totals.ok, totals.failed
    summary.shards_by_others, summary.left_pending = totals.shards_by_others, totals.left
    for line in totals.left:
        log.error(line)
    return summary


@dataclass
class RebuildConfig:
    """What `run_extract.py rebuild` redoes: explicit shards, the shards holding failed rows,
    or the shards holding the named videos. The store's own encoder settings are reused."""

    manifest: Path
    store: str | Path
    shards: list[int] | None = None
    failed: bool = False
    videos: list[str] | None = None
    batch_size: int = 256
    ray_address: str | None = None
    decoders: int | None = None
    encoder_threads: int | None = None
    decode_timeout_s: float = 120.0
    lease_ttl_s: float = DEFAULT_TTL_S


def rebuild(cfg: RebuildConfig) -> ExtractSummary:
    """Re-extract exactly the chosen shards in place; every other shard's files stay untouched."""
    if sum([cfg.shards is not None, cfg.failed, cfg.videos is not None]) != 1:
        raise ExtractError("rebuild needs exactly one of --shards, --failed, --videos")
    location = StoreLocation(cfg.store)
    attrs = read_attrs(location)
    if attrs is None:
        raise ExtractError(f"{location} is not a feature store (no zarr.json)")
    check_store(location, attrs)
    shard_size = attrs["shard_size"]
    if cfg.shards is not None:
        shards = sorted(set(cfg.shards))
    elif cfg.failed:
        status = open_group(location)["status"][:]
        shards = sorted({int(row) // shard_size for row in np.flatnonzero(status == FAILED)})
    else:
        manifest_dir, meta = read_manifest_meta(cfg.manifest)
        wanted = set(cfg.videos)
        rows = {e.video_id: e.row for _, entries in iter_shards(manifest_dir, int(meta["shard_size"]))
                for e in entries if e.video_id in wanted}
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
        ray_address=cfg.ray_address, decoders=cfg.decoders, encoder_threads=cfg.encoder_threads,
        precision=enc["precision"],
        decode_timeout_s=cfg.decode_timeout_s, lease_ttl_s=cfg.lease_ttl_s, shards=shards,
    ))


class FileEncoder:
    """The store's encoder, loaded once, for encoding files that are not in the store exactly as
    the store with `store_attrs` was made (encoder, weights, frames, sampling, layer). A command
    or a server keeps one for all its files; loading the tower per file would cost seconds each."""

    def __init__(self, store_attrs: dict[str, Any], device: str = "cpu") -> None:
        enc = store_attrs["encoder"]
        spec = EncoderSpec(enc["model"], enc["pretrained"], enc["layer"], enc["precision"] if device != "cpu" else "fp32")
        self.encoder = load_encoder(spec, device)
        if self.encoder.attrs["weights_sha256"] != enc["weights_sha256"]:
            raise ExtractError(f"the weights {enc['model']}/{enc['pretrained']} loaded here differ from the store's")
        self.decode = DecodeSpec(store_attrs["frames"], store_attrs["sampling"], self.encoder.image_size,
                                 self.encoder.attrs["resize_mode"])

    def encode(self, video_path: Path) -> tuple[np.ndarray, DecodedVideo]:
        """(F, T, D) float16 tokens of one file, and the decoded frames the encoder read."""
        path = Path(video_path).expanduser().resolve()
        kind = "image" if path.suffix.lower() in IMAGE_EXTENSIONS else "video"
        try:
            decoded = decode_file(path, kind, self.decode)
        except DecodeError as err:
            raise ExtractError(f"{path}: {err}") from err
        return self.encoder.encode(decoded.frames), decoded
