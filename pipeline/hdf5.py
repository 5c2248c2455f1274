"""HDF5 interchange: a whole feature store (or one split of it) as one file, and back.

    F.h5   datasets tokens (n, F, T, D) float16, chunked one video per chunk; frame_index,
           n_frames, status; row (n,) int64, the store row of each dataset row
           attributes: every store attribute, JSON-encoded (h5py has no nested dicts);
           "commits": the JSON list of commit records; "split": "all", "train" or "val"

HDF5 is never a second live store: nothing extracts into it. A full export imports back into
a Zarr store equal to the original (arrays, attributes, commit records); a `--split` export is
for readers elsewhere and is refused by `import_hdf5`.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from manifests.manifest import iter_shards, read_manifest_meta
from pipeline.atomic import atomic_path
from pipeline.errors import ExtractError
from pipeline.inspect import open_store
from pipeline.storage import StoreLocation
from pipeline.store import open_or_create, read_commit, read_rows
from pipeline.store_format import ARRAYS, commit_name, n_shards

SPLITS = ("train", "val")


def export_hdf5(store: str | Path, out: Path, split: str | None = None, manifest_dir: Path | None = None) -> int:
    """Write `store` (all rows, or one split's rows, which needs the manifest) to `out`;
    returns the number of rows written. The file appears only when complete."""
    location, g = open_store(store)
    attrs = dict(g.attrs)
    n = attrs["n_rows"]
    if split is None:
        rows = np.arange(n)
    else:
        if split not in SPLITS:
            raise ExtractError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
        if manifest_dir is None:
            raise ExtractError("--split needs --manifest (the split of each video is in the manifest)")
        mdir, meta = read_manifest_meta(manifest_dir)
        if meta["manifest_id"] != attrs["manifest_id"]:
            raise ExtractError(f"{location} was not made from the manifest {manifest_dir}")
        rows = np.array([e.row for _, entries in iter_shards(mdir, int(meta["shard_size"])) for e in entries
                         if e.split == split and e.row < n], dtype=np.int64)
    commits = [c for s in range(n_shards(attrs)) if (c := read_commit(location, s)) is not None]
    out = Path(out).expanduser().resolve()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        for key, value in attrs.items():
            h5.attrs[key] = json.dumps(value)
        h5.attrs["commits"] = json.dumps(commits)
        h5.attrs["split"] = split or "all"
        h5.create_dataset("row", data=rows)
        for name in ARRAYS:
            src = g[name]
            dst = h5.create_dataset(name, shape=(len(rows), *src.shape[1:]), dtype=src.dtype,
                                    chunks=(1, *src.shape[1:]) if len(rows) else None)
            step = attrs["shard_size"]
            for start in tqdm(range(0, len(rows), step), desc=f"export {name}", unit="shard", leave=False):
                dst[start : start + step] = read_rows(src, rows[start : start + step])
    return len(rows)


def import_hdf5(h5_path: Path, store: str | Path) -> int:
    """Make a Zarr store at `store` from a full HDF5 export; returns the number of rows."""
    h5_path = Path(h5_path).expanduser().resolve()
    if not h5_path.is_file():
        raise ExtractError(f"no such file: {h5_path}")
    location = StoreLocation(store)
    if location.exists():
        raise ExtractError(f"{location} exists; import into a new store path")
    with h5py.File(h5_path, "r") as h5:
        if h5.attrs.get("split", "all") != "all":
            raise ExtractError(f"{h5_path} holds only the {h5.attrs['split']} split; import needs a full export")
        attrs = {k: json.loads(v) for k, v in h5.attrs.items() if k not in ("commits", "split")}
        g = open_or_create(location, attrs)
        step = attrs["shard_size"]
        for name in ARRAYS:
            for start in tqdm(range(0, attrs["n_rows"], step), desc=f"import {name}", unit="shard", leave=False):
                g[name][start : start + step] = h5[name][start : start + step]
        for commit in json.loads(h5.attrs["commits"]):
            location.write(commit_name(commit["shard"]), (json.dumps(commit, indent=1) + "\n").encode())
    return attrs["n_rows"]
