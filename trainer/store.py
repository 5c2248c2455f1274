"""The feature store as the trainer sees it (DESIGN §3.3): opened read-only with plain
``zarr.open_group``, its attributes checked against the manifest and against the run.

A store's *signature* is everything about it that a model trained on it depends on: the encoder
spec, frames per video, sampling policy, token layout, tokens per frame and width. A run records
the signature of the store it was trained on; evaluating, resuming or chatting with another store
is refused unless the signatures are equal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StorageError
from pipeline.storage import StoreLocation, is_url, storage_errors
from pipeline.store import open_group, read_commit
from pipeline.store_format import FORMAT_VERSION, PENDING, SIGNATURE_KEYS, is_done, n_shards, shard_rows
from trainer.errors import TrainerError

log = logging.getLogger(__name__)



@dataclass
class StoreInfo:
    """What the trainer needs from a store: its path, attributes and row status."""

    path: str  # a local path or an fsspec URL
    attrs: dict[str, Any]
    status: np.ndarray  # (N,) uint8; rows of shards that are not done read as pending
    shape: tuple[int, int, int, int]  # tokens: (N, F, T, D)

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def frames(self) -> int:
        return self.shape[1]

    @property
    def tokens_per_frame(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]

    @property
    def signature(self) -> dict[str, Any]:
        return store_signature(self.attrs)


def store_signature(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: attrs.get(key) for key in SIGNATURE_KEYS}


@contextlib.contextmanager
def store_errors(path: str | Path) -> Iterator[None]:
    """A failure of the storage under a remote store (no credentials, endpoint down, no bucket)
    becomes one `TrainerError` line (`pipeline.storage.storage_errors`)."""
    try:
        with storage_errors(str(path)) if is_url(path) else contextlib.nullcontext():
            yield
    except StorageError as err:
        raise TrainerError(str(err)) from err


def open_store(path: str | Path) -> StoreInfo:
    """Open and check a feature store (a path or an fsspec URL); a one-line `TrainerError` for
    anything that is not one. Only rows of done shards (the store format's done rule) are ok."""
    with store_errors(path):
        return _open_store(path)


def _open_store(path: str | Path) -> StoreInfo:
    location = StoreLocation(path)
    if not location.exists():
        raise TrainerError(f"no such feature store: {location}")
    try:
        group = open_group(location)
    except Exception as err:  # zarr raises several types for "not a group"
        raise TrainerError(f"{location} is not a Zarr feature store ({type(err).__name__})") from err
    attrs = dict(group.attrs)
    if attrs.get("format_version") != FORMAT_VERSION:
        raise TrainerError(f"{location}: store format version {attrs.get('format_version')!r}, expected {FORMAT_VERSION}")
    missing = [name for name in ("tokens", "status") if name not in group]
    if missing:
        raise TrainerError(f"{location}: store has no {', '.join(missing)} array")
    tokens = group["tokens"]
    if tokens.ndim != 4 or tokens.dtype != np.float16:
        raise TrainerError(f"{location}: tokens must be a (N, F, T, D) float16 array, found {tokens.shape} {tokens.dtype}")
    shape = tuple(int(s) for s in tokens.shape)
    expected = (attrs.get("frames"), attrs.get("tokens_per_frame"), attrs.get("width"))
    if shape[1:] != expected:
        raise TrainerError(f"{location}: tokens have shape {shape} but the attributes say (F, T, D) = {expected}")
    status = np.asarray(group["status"][:], dtype=np.uint8)
    if status.shape != (shape[0],):
        raise TrainerError(f"{location}: status has shape {status.shape}, tokens {shape[0]} rows")
    for shard in range(n_shards(attrs)):
        if not is_done(read_commit(location, shard), attrs):
            start, stop = shard_rows(attrs, shard)
            status[start:stop] = PENDING
    return StoreInfo(path=location.url, attrs=attrs, status=status, shape=shape)  # type: ignore[arg-type]


def check_store_matches_manifest(store: StoreInfo, manifest: Any) -> None:
    """The store must have been extracted from this manifest (the same id; a grown manifest
    whose new rows are not extracted yet is fine: those rows are not ok and are skipped)."""
    if store.attrs.get("manifest_id") != manifest.manifest_id:
        raise TrainerError(
            f"store {store.path} was extracted from manifest {store.attrs.get('manifest_id')}, "
            f"not from {manifest.dir} ({manifest.manifest_id})"
        )
    if store.n_rows > len(manifest.videos):
        raise TrainerError(f"store {store.path} has {store.n_rows} rows, the manifest only {len(manifest.videos)}")
    if store.attrs.get("manifest_fingerprint") != manifest.fingerprint:
        log.warning(
            "store %s was extracted from an earlier version of manifest %s; rows it lacks are skipped",
            store.path, manifest.dir,
        )


def check_same_signature(expected: dict[str, Any], store: StoreInfo, what: str) -> None:
    """Refuse a store whose features differ from those ``what`` (a run) was trained on."""
    found = store.signature
    for key in SIGNATURE_KEYS:
        if found.get(key) != expected.get(key):
            raise TrainerError(
                f"store {store.path} does not match {what}: {key} is {_short(found.get(key))}, "
                f"the run was trained on {_short(expected.get(key))}"
            )


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if k in ("model", "pretrained", "layer", "image_size")) + ", ...}"
    return repr(value)
