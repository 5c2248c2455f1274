"""The feature store's format (DESIGN §3.3) in one place: array names, attribute keys, the
commit-record schema, the done rule and the fingerprints. It imports neither torch nor Ray, so
`status`, `verify`, the trainer and the extraction job all read a store by the same rules.

    STORE.zarr/
      zarr.json             group attributes (`store_attrs`): format_version, encoder (spec,
                            weights sha256, preprocessing, T, D), encoder_fingerprint, frames,
                            sampling, token_layout, tokens_per_frame, width, manifest_id,
                            manifest_fingerprint, shard_size, n_rows
      tokens/               (N, F, T, D) float16; inner chunk one video, shard S videos
      frame_index/          (N, F) int32, source frame numbers decoded
      n_frames/             (N,) int32, frames the source really has (< F: repeats)
      status/               (N,) uint8, PENDING 0 / OK 1 / FAILED 2
      commits/shard-000007.json   the shard's commit record (`make_commit`), one object
      leases/shard-000007.3.json  a job's lease on shard 7 (generation 3), see pipeline.lease

The done rule (`is_done`): a shard is done when its commit record exists, is whole, and names the
store's encoder fingerprint (and, when a manifest is at hand, the sha256 of the shard's manifest
rows). A commit record is withdrawn before a shard's arrays are rewritten and written again only
after they are complete, so a shard whose arrays are half old, half new never counts as done.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np

from manifests.manifest import VideoEntry, entry_record, jsonl_line

FORMAT_VERSION = 1
PENDING, OK, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", OK: "ok", FAILED: "failed"}
ARRAYS = ("tokens", "frame_index", "n_frames", "status")  # the per-row arrays, checksum order
TOKEN_LAYOUT = "cls+patches"
COMMITS = "commits"
LEASES = "leases"
# what must agree between a store and a request to extend it (the manifest is checked apart)
SPEC_KEYS = ("encoder_fingerprint", "frames", "sampling")
# attributes that fix what the tokens mean; each commit records their hash (growth changes none)
MEANING_KEYS = ("format_version", "encoder", "encoder_fingerprint", "frames", "sampling", "token_layout",
                "tokens_per_frame", "width", "manifest_id", "shard_size")
# what a model trained on a store depends on; a run records these and refuses other stores
SIGNATURE_KEYS = ("encoder", "frames", "sampling", "token_layout", "tokens_per_frame", "width")
COMMIT_KEYS = ("shard", "rows", "ok", "failed", "failures", "data_sha256", "encoder_fingerprint", "spec_sha256",
               "rows_sha256", "node")


def store_attrs(encoder_attrs: dict[str, Any], frames: int, sampling: str, manifest_id: str,
                manifest_fingerprint: str, shard_size: int, n_rows: int) -> dict[str, Any]:
    """The group attributes of a store made with this encoder, sampling and manifest."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_attrs,
        "encoder_fingerprint": encoder_fingerprint(encoder_attrs),
        "frames": frames,
        "sampling": sampling,
        "token_layout": TOKEN_LAYOUT,
        "tokens_per_frame": encoder_attrs["tokens_per_frame"],
        "width": encoder_attrs["width"],
        "manifest_id": manifest_id,
        "manifest_fingerprint": manifest_fingerprint,
        "shard_size": shard_size,
        "n_rows": n_rows,
    }


def n_shards(attrs: dict[str, Any]) -> int:
    return -(-attrs["n_rows"] // attrs["shard_size"])


def shard_rows(attrs: dict[str, Any], shard: int) -> tuple[int, int]:
    """[start, stop) of the shard's rows."""
    size = attrs["shard_size"]
    return shard * size, min((shard + 1) * size, attrs["n_rows"])


def encoder_fingerprint(encoder_attrs: dict[str, Any]) -> str:
    """A short id of everything that determines the tokens (spec, weights, preprocessing)."""
    return hashlib.sha256(json.dumps(encoder_attrs, sort_keys=True).encode()).hexdigest()[:16]


def rows_sha256(entries: Iterable[VideoEntry]) -> str:
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


def commit_name(shard: int) -> str:
    return f"{COMMITS}/shard-{shard:06d}.json"


def make_commit(attrs: dict[str, Any], shard: int, tokens: np.ndarray, frame_index: np.ndarray,
                n_frames: np.ndarray, status: np.ndarray, failures: list[dict[str, Any]], rows_sha: str,
                node: str) -> dict[str, Any]:
    """The commit record of a shard whose arrays are these; `node` names who wrote it."""
    start, stop = shard_rows(attrs, shard)
    return {
        "shard": shard,
        "rows": [start, stop],
        "ok": int((status == OK).sum()),
        "failed": int((status == FAILED).sum()),
        "failures": failures,  # [{"row", "video_id", "reason"}], in row order
        "data_sha256": data_sha256(tokens, frame_index, n_frames, status),
        "encoder_fingerprint": attrs["encoder_fingerprint"],
        "spec_sha256": spec_sha256(attrs),
        "rows_sha256": rows_sha,
        "node": node,
    }


def parse_commit(data: bytes | None) -> dict[str, Any] | None:
    """A commit record from its bytes; None when absent or not a whole record."""
    if data is None:
        return None
    try:
        commit = json.loads(data)
    except ValueError:
        return None
    if not isinstance(commit, dict) or any(key not in commit for key in COMMIT_KEYS if key != "node"):
        return None
    return commit


def is_done(commit: dict[str, Any] | None, attrs: dict[str, Any], rows_sha: str | None = None) -> bool:
    """The done rule (module docstring); `rows_sha` None skips the manifest check."""
    return (
        commit is not None
        and commit.get("encoder_fingerprint") == attrs["encoder_fingerprint"]
        and (rows_sha is None or commit.get("rows_sha256") == rows_sha)
    )
