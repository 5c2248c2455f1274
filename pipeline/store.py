"""The feature store (DESIGN §3.3): a Zarr v3 group that plain `zarr.open_group` reads.

    STORE.zarr/
      zarr.json             group attributes: format_version, encoder (spec, weights sha256,
                            preprocessing, T, D), encoder_fingerprint, frames, sampling,
                            token_layout, tokens_per_frame, width, manifest_id,
                            manifest_fingerprint, shard_size, n_rows
      tokens/               (N, F, T, D) float16; inner chunk one video, shard S videos
      frame_index/          (N, F) int32, source frame numbers decoded
      n_frames/             (N,) int32, frames the source really has (< F: repeats)
      status/               (N,) uint8, PENDING 0 / OK 1 / FAILED 2
      commits/shard-000007.json   written atomically after the shard's data

Every array's Zarr shard is exactly one manifest shard (rows s*S .. (s+1)*S), so writing a
manifest shard touches one file per array and nothing else: one writer per shard, never two
(zarr has never supported concurrent partial writes to one shard). A shard counts as done only
when its commit record exists, names the store's encoder fingerprint, and its `rows_sha256`
(the manifest lines of its rows: ids, paths, file fingerprints) matches the manifest. A grown
manifest therefore leaves old full shards done and makes its new rows (and a grown last shard)
pending.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from manifests.manifest import Manifest, VideoEntry, entry_record, jsonl_line
from pipeline.errors import ExtractError

FORMAT_VERSION = 1
PENDING, OK, FAILED = 0, 1, 2
ARRAYS = ("tokens", "frame_index", "n_frames", "status")  # the per-row arrays, checksum order
TOKEN_LAYOUT = "cls+patches"
COMMITS = "commits"
# what must agree between a store and a request to extend it (the manifest is checked apart)
SPEC_KEYS = ("encoder_fingerprint", "frames", "sampling")
# attributes that fix what the tokens mean; each commit records their hash (growth changes none)
MEANING_KEYS = ("format_version", "encoder", "encoder_fingerprint", "frames", "sampling", "token_layout",
                "tokens_per_frame", "width", "manifest_id", "shard_size")


@dataclass
class ShardResult:
    """Everything one shard writes: arrays for rows [start, stop) and the failures among them."""

    shard: int
    start: int
    tokens: np.ndarray  # (n, F, T, D) float16, zeros for failed rows
    frame_index: np.ndarray  # (n, F) int32
    n_frames: np.ndarray  # (n,) int32
    status: np.ndarray  # (n,) uint8
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"row", "video_id", "reason"}

    @property
    def stop(self) -> int:
        return self.start + len(self.status)


def store_attrs(encoder_attrs: dict[str, Any], fingerprint: str, frames: int, sampling: str,
                manifest: Manifest) -> dict[str, Any]:
    """The group attributes of a store made with this encoder, sampling and manifest."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_attrs,
        "encoder_fingerprint": fingerprint,
        "frames": frames,
        "sampling": sampling,
        "token_layout": TOKEN_LAYOUT,
        "tokens_per_frame": encoder_attrs["tokens_per_frame"],
        "width": encoder_attrs["width"],
        "manifest_id": manifest.manifest_id,
        "manifest_fingerprint": manifest.fingerprint,
        "shard_size": manifest.shard_size,
        "n_rows": len(manifest.videos),
    }


def rows_sha256(entries: list[VideoEntry]) -> str:
    """Fingerprint of a shard's manifest rows: changes when a row's file or id changes."""
    return hashlib.sha256("".join(jsonl_line(entry_record(e)) for e in entries).encode()).hexdigest()


def spec_sha256(attrs: dict[str, Any]) -> str:
    """Hash of the attributes that fix what the tokens mean (`MEANING_KEYS`)."""
    meaning = {k: attrs.get(k) for k in MEANING_KEYS}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()


def data_sha256(tokens: np.ndarray, frame_index: np.ndarray, n_frames: np.ndarray, status: np.ndarray) -> str:
    """Checksum of a shard's arrays, in this order, C-order bytes."""
    h = hashlib.sha256()
    for array in (tokens, frame_index, n_frames, status):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def open_or_create(path: Path, attrs: dict[str, Any]) -> zarr.Group:
    """Open the store at `path` for extraction with `attrs`, creating or growing it as needed.
    A store made with another encoder, frame count, sampling or manifest is refused."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        group = zarr.open_group(path, mode="r+")
        check_compatible(dict(group.attrs), attrs, path)
        if attrs["n_rows"] > group.attrs["n_rows"]:
            _grow(group, attrs["n_rows"])
        elif attrs["n_rows"] < group.attrs["n_rows"]:
            raise ExtractError(f"{path} holds {group.attrs['n_rows']} rows but the manifest only "
                               f"{attrs['n_rows']}: a manifest never shrinks; use a new store")
        grown = {k: attrs[k] for k in ("manifest_fingerprint", "n_rows") if group.attrs[k] != attrs[k]}
        if grown:  # a rerun of a finished job writes nothing at all
            group.attrs.update(grown)
        return group
    if path.exists() and any(path.iterdir()):
        raise ExtractError(f"{path} exists and is not a feature store; choose a new --store path")
    group = zarr.create_group(path, zarr_format=3, attributes=attrs)
    n, s, f = attrs["n_rows"], attrs["shard_size"], attrs["frames"]
    t, d = attrs["tokens_per_frame"], attrs["width"]
    group.create_array("tokens", shape=(n, f, t, d), chunks=(1, f, t, d), shards=(s, f, t, d), dtype="float16",
                       fill_value=0)
    group.create_array("frame_index", shape=(n, f), chunks=(s, f), dtype="int32", fill_value=0)
    group.create_array("n_frames", shape=(n,), chunks=(s,), dtype="int32", fill_value=0)
    group.create_array("status", shape=(n,), chunks=(s,), dtype="uint8", fill_value=PENDING)
    (path / COMMITS).mkdir()
    return group


def check_compatible(have: dict[str, Any], want: dict[str, Any], path: Path) -> None:
    """One-line refusal when a store and a request disagree on what the tokens mean."""
    if have.get("format_version") != FORMAT_VERSION:
        raise ExtractError(f"{path}: store format {have.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    if have["manifest_id"] != want["manifest_id"]:
        raise ExtractError(f"{path} was made from another manifest (id {have['manifest_id']}, "
                           f"this one is {want['manifest_id']}); use a new --store")
    if have["shard_size"] != want["shard_size"]:
        raise ExtractError(f"{path} has shard size {have['shard_size']}, the manifest {want['shard_size']}")
    for key in SPEC_KEYS:
        if have[key] != want[key]:
            if key == "encoder_fingerprint":
                diff = {k: (have["encoder"].get(k), v) for k, v in want["encoder"].items()
                        if have["encoder"].get(k) != v}
                detail = ", ".join(f"{k} {a!r} (asked: {b!r})" for k, (a, b) in diff.items())
                raise ExtractError(f"{path} was made with another encoder: {detail}; use the store's settings "
                                   "or a new --store")
            raise ExtractError(f"{path} was made with {key} {have[key]!r}, asked for {want[key]!r}; "
                               "use the store's settings or a new --store")


def _grow(group: zarr.Group, n_rows: int) -> None:
    for name in ARRAYS:
        array = group[name]
        array.resize((n_rows, *array.shape[1:]))


def commit_path(store: Path, shard: int) -> Path:
    return Path(store) / COMMITS / f"shard-{shard:06d}.json"


def read_commit(store: Path, shard: int) -> dict[str, Any] | None:
    try:
        return json.loads(commit_path(store, shard).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def is_done(store: Path, attrs: dict[str, Any], manifest: Manifest, shard: int) -> bool:
    """True when the shard's commit record matches this encoder and the manifest's rows."""
    commit = read_commit(store, shard)
    return (
        commit is not None
        and commit.get("encoder_fingerprint") == attrs["encoder_fingerprint"]
        and commit.get("rows_sha256") == rows_sha256(manifest.shard_rows(shard))
    )


def pending_shards(store: Path, attrs: dict[str, Any], manifest: Manifest) -> list[int]:
    return [s for s in range(manifest.n_shards) if not is_done(store, attrs, manifest, s)]


def write_shard(group: zarr.Group, store: Path, result: ShardResult, manifest: Manifest) -> dict[str, Any]:
    """Write one whole shard's arrays, then its commit record (atomically, by rename)."""
    sl = slice(result.start, result.stop)
    group["tokens"][sl] = result.tokens
    group["frame_index"][sl] = result.frame_index
    group["n_frames"][sl] = result.n_frames
    group["status"][sl] = result.status
    commit = {
        "shard": result.shard,
        "rows": [result.start, result.stop],
        "ok": int((result.status == OK).sum()),
        "failed": int((result.status == FAILED).sum()),
        "failures": result.failures,
        "data_sha256": data_sha256(result.tokens, result.frame_index, result.n_frames, result.status),
        "encoder_fingerprint": group.attrs["encoder_fingerprint"],
        "spec_sha256": spec_sha256(dict(group.attrs)),
        "rows_sha256": rows_sha256(manifest.shard_rows(result.shard)),
    }
    target = commit_path(store, result.shard)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(commit, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return commit
