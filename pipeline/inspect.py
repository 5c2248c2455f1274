"""What a curator asks of a finished store: `status` (what is in it) and `verify` (is it intact).

`verify` trusts nothing it can recompute: the attributes (whole, typed, self-consistent) and the
arrays' shapes and dtypes against them, each commit record (whole, its shard's, agreeing with the
attributes), each shard's data checksum and counts against its commit record, finite tokens, the
status array against the commit records, stray commit files, and (with a manifest) that the store
belongs to that manifest and every shard's commit names the manifest's current rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from manifests.manifest import iter_shards, read_manifest_meta
from pipeline.errors import ExtractError
from pipeline.storage import StoreLocation
from pipeline.store import check_store, open_group, read_attrs, read_commit, store_problems
from pipeline.store_format import (
    ARRAYS,
    COMMITS,
    FAILED,
    OK,
    PENDING,
    CommitError,
    commit_name,
    commit_problems,
    data_sha256,
    is_done,
    load_commit,
    n_shards,
    rows_sha256,
    shard_rows,
)


def _location(store: str | Path) -> StoreLocation:
    location = StoreLocation(store)
    if not location.exists("zarr.json"):
        raise ExtractError(f"{location} is not a feature store (no zarr.json); make one with `run_extract.py extract`")
    return location


def _attrs(location: StoreLocation) -> Any:
    attrs = read_attrs(location)
    if attrs is None:
        raise ExtractError(f"{location} has no attributes yet (a job is creating it, or its zarr.json is damaged)")
    return attrs


def open_store(store: str | Path) -> tuple[StoreLocation, zarr.Group]:
    """The store's location and its group, read-only; a one-line error when it is not a store or
    its attributes are malformed or disagree with its arrays (`pipeline.store.check_store`)."""
    location = _location(store)
    check_store(location, _attrs(location))
    return location, open_group(location)


def _size(location: StoreLocation) -> int:
    if location.remote:
        with location.errors():
            return int(location.fs.du(location.root))
    return sum(p.stat().st_size for p in Path(location.root).rglob("*") if p.is_file())


@dataclass
class StoreStatus:
    store: str
    rows: int
    ok: int
    failed: int
    pending: int
    shards_done: int
    shards_total: int
    failures_by_reason: dict[str, list[str]] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    frames: int = 0
    sampling: str = ""
    bytes_on_disk: int = 0

    def lines(self) -> list[str]:
        e = self.encoder
        out = [
            f"store    {self.store}",
            f"rows     {self.rows}: ok {self.ok}, failed {self.failed}, pending {self.pending}",
            f"shards   {self.shards_done}/{self.shards_total} done",
            f"encoder  {e['model']} ({e['pretrained']}), layer {e['layer']}, {e['precision']}, "
            f"{e['image_size']} px, {e['tokens_per_frame']} x {e['width']} tokens per frame",
            f"frames   {self.frames} per video, {self.sampling} sampling",
            f"size     {self.bytes_on_disk / 2**20:.1f} MiB on disk",
        ]
        for reason, ids in sorted(self.failures_by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(ids[:5]) + (f", ... ({len(ids) - 5} more)" if len(ids) > 5 else "")
            out.append(f"failed   {len(ids)} x {reason}: {shown}")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def status(store: str | Path, manifest_dir: Path | None = None) -> StoreStatus:
    """Rows by status, shards done, failures grouped by reason, how the store was made. Rows
    count as ok or failed only in done shards (the done rule of `pipeline.store_format`; with a
    manifest, its rows are checked too), so `status` agrees with `extract` and `verify`."""
    location, g = open_store(store)
    attrs = dict(g.attrs)
    st = g["status"][:]
    shas = _manifest_shas(manifest_dir, attrs)
    failures: dict[str, list[str]] = defaultdict(list)
    done = ok = failed = 0
    for shard in range(n_shards(attrs)):
        commit = read_commit(location, shard)
        if not is_done(commit, attrs, shas.get(shard) if shas is not None else None):
            continue
        done += 1
        start, stop = shard_rows(attrs, shard)
        ok += int((st[start:stop] == OK).sum())
        failed += int((st[start:stop] == FAILED).sum())
        for failure in commit["failures"]:
            failures[failure["reason"]].append(failure["video_id"])
    return StoreStatus(
        store=location.url, rows=attrs["n_rows"], ok=ok, failed=failed, pending=attrs["n_rows"] - ok - failed,
        shards_done=done, shards_total=n_shards(attrs), failures_by_reason=dict(failures), encoder=attrs["encoder"],
        frames=attrs["frames"], sampling=attrs["sampling"], bytes_on_disk=_size(location),
    )


def _manifest_shas(manifest_dir: Path | None, attrs: dict[str, Any]) -> dict[int, str] | None:
    """The rows sha256 of each shard of the manifest (checked to be the store's), or None."""
    if manifest_dir is None:
        return None
    mdir, meta = read_manifest_meta(manifest_dir)
    if meta["manifest_id"] != attrs["manifest_id"]:
        raise ExtractError(f"the store was made from manifest {attrs['manifest_id']}, not {meta['manifest_id']}")
    return {shard: rows_sha256(rows) for shard, rows in iter_shards(mdir, int(meta["shard_size"]))}


def verify(store: str | Path, manifest_dir: Path | None = None) -> list[str]:
    """Every problem found, one line each, prefixed by what it is in (`store:`, the shard, a stray
    commit file); [] when intact. Attributes and array metadata come first (`store_problems`):
    when they are wrong nothing else can be read by them."""
    location = _location(store)
    attrs = _attrs(location)
    problems = [f"store: {p}" for p in store_problems(location, attrs)]
    if problems:
        return problems
    g = open_group(location)
    n = attrs["n_rows"]
    shas = None
    if manifest_dir is not None:
        mdir, meta = read_manifest_meta(manifest_dir)
        if meta["manifest_id"] != attrs["manifest_id"]:
            problems.append(f"store: made from manifest {attrs['manifest_id']}, not {meta['manifest_id']}")
        elif meta["counts"]["videos"] != n:
            problems.append(f"store: {n} rows, the manifest {meta['counts']['videos']} (extract to grow it)")
        else:
            shas = _manifest_shas(manifest_dir, attrs)
    total = n_shards(attrs)
    for name in location.list(COMMITS):
        shard = _commit_file_shard(name)
        if shard is None or shard >= total:
            problems.append(f"{COMMITS}/{name}: not the commit record of any of the store's {total} shards")
    status_all = g["status"][:]
    arrays = [g[name] for name in ARRAYS]  # opened once: at 20k shards, reopening costs minutes
    for shard in range(total):
        start, stop = shard_rows(attrs, shard)
        where = f"shard {shard} (rows {start}-{stop - 1})"
        data = location.read(commit_name(shard))
        if data is None:
            if (status_all[start:stop] != PENDING).any():
                problems.append(f"{where}: no commit record, but rows are marked done")
            else:
                problems.append(f"{where}: not extracted (no commit record)")
            continue
        try:
            commit = load_commit(data, shard)
        except CommitError as err:
            problems.append(f"{where}: commit record {err}")
            continue
        problems += [f"{where}: {p}" for p in commit_problems(commit, attrs, None if shas is None else shas.get(shard))]
        try:  # each array of the shard read once; a corrupt shard file fails to decode
            tokens, frame_index, n_frames, st = (array[start:stop] for array in arrays)
        except Exception as err:
            problems.append(f"{where}: unreadable data ({' '.join(str(err).split())[:120]})")
            continue
        if data_sha256(tokens, frame_index, n_frames, st) != commit["data_sha256"]:
            problems.append(f"{where}: data checksum mismatch (the shard's files changed after commit, or the "
                            "record's data_sha256 was edited)")
        counts = (int((st == OK).sum()), int((st == FAILED).sum()))
        if counts != (commit["ok"], commit["failed"]):
            problems.append(f"{where}: the record counts {commit['ok']} ok, {commit['failed']} failed; the status "
                            f"array holds {counts[0]} ok, {counts[1]} failed")
        failed_rows = {f["row"] for f in commit["failures"]}
        if set((np.flatnonzero(st == FAILED) + start).tolist()) != failed_rows or (st == PENDING).any():
            problems.append(f"{where}: status array disagrees with the commit record's failures")
        if not np.isfinite(tokens.astype(np.float32)).all():
            problems.append(f"{where}: non-finite token values")
    return problems


def _commit_file_shard(name: str) -> int | None:
    """The shard whose commit record file is called `name` (`commit_name`), or None."""
    stem = name.removeprefix("shard-").removesuffix(".json")
    return int(stem) if stem.isdigit() and commit_name(int(stem)) == f"{COMMITS}/{name}" else None
