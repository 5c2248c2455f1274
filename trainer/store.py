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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ExtractError, StorageError
from pipeline.storage import StoreLocation, is_url, storage_errors
from pipeline.store import check_store, open_group, read_attrs, read_commit
from pipeline.store_format import PENDING, SIGNATURE_KEYS, is_done, n_shards, shard_rows
from trainer.errors import TrainerError

log = logging.getLogger(__name__)



@dataclass
class StoreInfo:
    """What the trainer needs from a store: its path, attributes and row status."""

    path: str  # a local path or an fsspec URL
    attrs: dict[str, Any]
    status: np.ndarray  # (N,) uint8; rows of shards that are not done read as pending
    shape: tuple[int, int, int, int]  # tokens: (N, F, T, D)
    shard_data: dict[int, str] = field(default_factory=dict)  # done shard -> its commit's data_sha256

    n_rows = property(lambda self: self.shape[0], doc="N, rows of the store")
    frames = property(lambda self: self.shape[1], doc="F, frames per row")
    tokens_per_frame = property(lambda self: self.shape[2], doc="T, tokens per frame")
    width = property(lambda self: self.shape[3], doc="D, feature width")

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
    attrs = read_attrs(location)
    if attrs is None:
        raise TrainerError(f"{location} is not a Zarr feature store (no attributes in zarr.json)")
    try:  # the attributes must be whole and agree with the arrays: rows are read by them
        check_store(location, attrs)
    except ExtractError as err:
        raise TrainerError(f"store {err}") from err
    group = open_group(location)
    shape = tuple(int(s) for s in group["tokens"].shape)
    status = np.asarray(group["status"][:], dtype=np.uint8)
    shard_data = {}
    for shard in range(n_shards(attrs)):
        commit = read_commit(location, shard)
        if is_done(commit, attrs):
            shard_data[shard] = str(commit.get("data_sha256"))  # type: ignore[union-attr]
        else:
            start, stop = shard_rows(attrs, shard)
            status[start:stop] = PENDING
    if len(shard_data) < n_shards(attrs):
        log.warning("store %s: %d of %d shards are not done (no whole, matching commit record); their rows are "
                    "skipped (`run_extract.py verify` says why)", location, n_shards(attrs) - len(shard_data),
                    n_shards(attrs))
    return StoreInfo(path=location.url, attrs=attrs, status=status, shape=shape, shard_data=shard_data)  # type: ignore[arg-type]


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
    if store.n_rows < len(manifest.videos):
        log.warning("store %s has %d of the %d videos of manifest %s (it grew since); the samples of the other "
                    "%d are skipped until `run_extract.py extract` adds them", store.path, store.n_rows,
                    len(manifest.videos), manifest.dir, len(manifest.videos) - store.n_rows)
    elif store.attrs.get("manifest_fingerprint") != manifest.fingerprint:
        log.info("manifest %s changed since store %s was extracted (its conversations; the same %d videos)",
                 manifest.dir, store.path, store.n_rows)


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
