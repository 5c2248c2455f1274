"""Writing the feature store (format: `pipeline.store_format`): create or grow it, write a shard;
and reading rows of it (`read_rows`).

Every array's Zarr shard is exactly one manifest shard (rows s*S .. (s+1)*S), so writing a
manifest shard touches one object per array and nothing else: one writer per shard, never two
(zarr does not support concurrent partial writes to one shard; `pipeline.lease` keeps jobs
apart). `write_shard` withdraws the shard's commit record before touching its arrays and commits
only after they are whole, so no kill leaves a half-rewritten shard counted as done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync  # runs a coroutine on zarr's own loop (an fsspec store is bound to it)

from pipeline.errors import ExtractError
from pipeline.storage import StoreLocation
from pipeline.store_format import (
    ARRAYS,
    LEASES,
    PENDING,
    SPEC_KEYS,
    array_problems,
    attrs_problems,
    commit_name,
    encoder_problems,
    make_commit,
    parse_commit,
    shard_rows,
)

CREATE_WAIT_S = 10.0  # how long a job waits for another that is creating the same store

log = logging.getLogger(__name__)


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


def read_rows(array, rows: np.ndarray) -> np.ndarray:  # noqa: ANN001 - a zarr.Array
    """``array[rows]`` for sorted distinct ``rows``: each run of consecutive rows is one basic
    slice, the runs read at once on zarr's event loop.

    Not one orthogonal selection: inside a shard, zarr 3.1's sharding codec turns a list of rows
    into per-element coordinates. For 16 rows of demo-tiny's 8 x 37 x 64 tokens that costs 2.7x
    the CPU of the slices (63 against 23 ms); for 16 rows of ViT-B-16's 8 x 197 x 768, 4.2 s and
    1.6 GB of index arrays against 0.11 s."""
    if not len(rows):
        return np.empty((0, *array.shape[1:]), dtype=array.dtype)
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [slice(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, starts)]

    async def read() -> list[np.ndarray]:
        return await asyncio.gather(*(array._async_array.getitem(run) for run in runs))

    return np.concatenate(sync(read()))


def open_group(location: StoreLocation, mode: str = "r") -> zarr.Group:
    """The store's Zarr group (plain `zarr.open_group` on a path or an fsspec URL)."""
    with location.errors():
        return zarr.open_group(store=location.zarr_store(read_only=mode == "r"), mode=mode)


def read_attrs(location: StoreLocation) -> Any:
    """The store's attributes as written, or None when there is no store at `location` (no
    zarr.json, or one that a job is still creating or writing). They may have been edited:
    `check_store` before relying on them."""
    data = location.read("zarr.json")
    try:
        node = None if data is None else json.loads(data)
    except ValueError:
        return None
    attrs = node.get("attributes", {}) if isinstance(node, dict) else node
    return None if attrs is None or (isinstance(attrs, dict) and attrs.get("creating")) else attrs


def store_problems(location: StoreLocation, attrs: Any, max_rows: int | None = None) -> list[str]:
    """Why the store at `location` with these attributes (`read_attrs`) cannot be read by them:
    malformed or self-contradicting attributes, arrays whose metadata cannot be read or disagree
    with them (`array_problems`; rows up to `max_rows` allowed). One line each; [] when sound."""
    problems = attrs_problems(attrs)
    if problems:
        return problems
    group, arrays, unreadable = open_group(location), {}, []
    for name in ARRAYS:
        try:
            array = group[name]
        except KeyError:
            continue  # missing: `array_problems` says so
        except Exception as err:  # zarr raises several types for metadata it cannot parse
            unreadable.append(f"array {name} has unreadable metadata ({' '.join(str(err).split())[:120]})")
            continue
        if isinstance(array, zarr.Array):  # (a group of that name: the array is missing)
            arrays[name] = (tuple(array.shape), str(array.dtype), (array.shards or array.chunks)[0])
    return encoder_problems(attrs) + (unreadable or array_problems(attrs, arrays, max_rows))


def check_store(location: StoreLocation, attrs: Any, max_rows: int | None = None) -> None:
    """One-line refusal of a store whose attributes are malformed or disagree with its arrays
    (`store_problems`): reading or extending it by its attributes would write or read wrong rows."""
    problems = store_problems(location, attrs, max_rows)
    if problems:
        raise ExtractError(f"{location}: {'; '.join(problems)}; the store was edited or is damaged")


def read_commit(location: StoreLocation, shard: int) -> dict[str, Any] | None:
    """The shard's commit record; None when absent or not a whole record of that shard."""
    return parse_commit(location.read(commit_name(shard)), shard)


def open_or_create(location: StoreLocation, attrs: dict[str, Any]) -> zarr.Group:
    """Open the store at `location` for extraction with `attrs`, creating or growing it as
    needed. A store made with another encoder, frame count, sampling or manifest is refused.
    Two jobs may start on a new store at once: one creates it, the other waits and opens it."""
    have = read_attrs(location)
    if have is None and not location.is_empty_or_absent():
        have = _wait_for_creator(location, attrs)
    if have is None:
        try:
            with location.errors():
                return _create(location, attrs)
        except zarr.errors.ContainsGroupError:
            have = _wait_for_creator(location, attrs)
    check_store(location, have, attrs["n_rows"])
    check_compatible(have, attrs, location)
    if attrs["n_rows"] < have["n_rows"]:
        raise ExtractError(f"{location} holds {have['n_rows']} rows but the manifest only "
                           f"{attrs['n_rows']}: a manifest never shrinks; use a new store")
    group = open_group(location, "r+")
    with location.errors():
        if attrs["n_rows"] > have["n_rows"]:
            for name in ARRAYS:
                array = group[name]
                array.resize((attrs["n_rows"], *array.shape[1:]))
        grown = {k: attrs[k] for k in ("manifest_fingerprint", "n_rows") if have[k] != attrs[k]}
        if grown:  # a rerun of a finished job writes nothing at all
            group.attrs.update(grown)
    return group


def _create(location: StoreLocation, attrs: dict[str, Any]) -> zarr.Group:
    """A new store: the group with a `creating` mark first (a random id; never over an existing
    group: of two jobs creating the same store one wins and the other waits), then the arrays,
    then the real attributes, which make it a store (`read_attrs`)."""
    group = zarr.create_group(store=location.zarr_store(), zarr_format=3,
                              attributes={"creating": uuid.uuid4().hex}, overwrite=False)
    return _finish_creation(group, attrs, overwrite=False)


def _finish_creation(group: zarr.Group, attrs: dict[str, Any], overwrite: bool) -> zarr.Group:
    n, s, f = attrs["n_rows"], attrs["shard_size"], attrs["frames"]
    t, d = attrs["tokens_per_frame"], attrs["width"]
    group.create_array("tokens", shape=(n, f, t, d), chunks=(1, f, t, d), shards=(s, f, t, d), dtype="float16",
                       fill_value=0, overwrite=overwrite)
    group.create_array("frame_index", shape=(n, f), chunks=(s, f), dtype="int32", fill_value=0, overwrite=overwrite)
    group.create_array("n_frames", shape=(n,), chunks=(s,), dtype="int32", fill_value=0, overwrite=overwrite)
    group.create_array("status", shape=(n,), chunks=(s,), dtype="uint8", fill_value=PENDING, overwrite=overwrite)
    group.attrs.put(attrs)
    return group


def _wait_for_creator(location: StoreLocation, attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes of a store another job is creating; a one-line error when the folder holds
    something else. A creation takes well under a second, so a `creating` mark still there after
    CREATE_WAIT_S is a killed job's: exactly one waiting job (create-if-absent of a record named
    after the mark) finishes that creation, with its own `attrs`; no shard can exist yet (shards
    need the real attributes), and nothing else under the store is deleted."""
    have = _poll_attrs(location)
    if have is None and _take_over_creation(location, attrs):
        return attrs
    have = have or _poll_attrs(location)  # a job that took over finishes it meanwhile
    if have is None:
        raise ExtractError(f"{location} exists and is not a feature store; choose a new --store path")
    return have


def _poll_attrs(location: StoreLocation) -> dict[str, Any] | None:
    deadline = time.monotonic() + CREATE_WAIT_S
    while time.monotonic() < deadline:
        have = read_attrs(location)
        if have is not None:
            return have
        time.sleep(0.2)
    return None


def _take_over_creation(location: StoreLocation, attrs: dict[str, Any]) -> bool:
    """Finish the creation of a store left with a `creating` mark, if this job is the one that
    takes it over; False when the folder has no such mark or another job took it."""
    with location.errors():
        try:
            group = zarr.open_group(store=location.zarr_store(), mode="r+")
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError):
            return False
        mark = group.attrs.get("creating")
        if not isinstance(mark, (str, bool)) or not location.create(f"{LEASES}/creation-{mark}.json", b"{}"):
            return False
        log.warning("%s: the job creating it was killed; this job finishes its creation", location)
        _finish_creation(group, attrs, overwrite=True)
    return True


def check_compatible(have: dict[str, Any], want: dict[str, Any], location: StoreLocation) -> None:
    """One-line refusal when a store (which `check_store` passed) and a request disagree on what
    the tokens mean."""
    if have["manifest_id"] != want["manifest_id"]:
        raise ExtractError(f"{location} was made from another manifest (id {have['manifest_id']}, "
                           f"this one is {want['manifest_id']}); use a new --store")
    if have["shard_size"] != want["shard_size"]:
        raise ExtractError(f"{location} has shard size {have['shard_size']}, the manifest {want['shard_size']}")
    for key in SPEC_KEYS:
        if have[key] != want[key]:
            if key == "encoder_fingerprint":
                diff = {k: (have["encoder"].get(k), v) for k, v in want["encoder"].items()
                        if have["encoder"].get(k) != v}
                detail = ", ".join(f"{k} {a!r} (asked: {b!r})" for k, (a, b) in diff.items())
                raise ExtractError(f"{location} was made with another encoder: {detail}; use the store's settings "
                                   "or a new --store")
            raise ExtractError(f"{location} was made with {key} {have[key]!r}, asked for {want[key]!r}; "
                               "use the store's settings or a new --store")


def write_shard(group: zarr.Group, location: StoreLocation, attrs: dict[str, Any], result: ShardResult,
                rows_sha: str, node: str) -> dict[str, Any]:
    """Withdraw the shard's commit record, write its arrays whole, then commit (one object)."""
    start, stop = shard_rows(attrs, result.shard)
    if (result.start, result.start + len(result.status)) != (start, stop):
        raise ValueError(f"shard {result.shard} covers rows {start}-{stop - 1}, the result {result.start}-...")
    location.delete(commit_name(result.shard))
    sl = slice(start, stop)
    group["tokens"][sl] = result.tokens
    group["frame_index"][sl] = result.frame_index
    group["n_frames"][sl] = result.n_frames
    group["status"][sl] = result.status
    commit = make_commit(attrs, result.shard, result.tokens, result.frame_index, result.n_frames, result.status,
                         result.failures, rows_sha, node)
    location.write(commit_name(result.shard), (json.dumps(commit, indent=1) + "\n").encode())
    return commit
