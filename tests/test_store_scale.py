"""The store at real-corpus shape (issue 11, point 8): 13,300 rows in 208 shards of 64, the shape
of VideoInstruct-100K's 13.3k videos, through `status`, `verify`, `rebuild`, the HDF5 round trip
and the trainer's reader; and the one place that holds every shard's metadata at once (the HDF5
export's commit records) at 100x that, 20,800 shards.

Built fast, not by decoding 13k files: one tiny real video (2 frames, 32x24) hard-linked 13,300
times under VideoInstruct ids, an instruction file in VideoInstruct's flat format, a manifest from
`build_manifest`, and a store with the real `demo-tiny` encoder attributes (F=1, tokens
(13300, 1, 37, 64) float16) whose every shard is written through `write_shard` with synthetic
tokens that name their row (and a few rows failed with reasons). Every expected count below is
computed from that synthetic data (`Synthetic`), never from the code under test; `rebuild` is
checked against a direct `decode_file` + `Encoder.encode` of the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from manifests.build import ManifestConfig, build_manifest
from manifests.manifest import iter_shards, read_manifest_meta
from manifests.video_writer import write_video
from pipeline import hdf5 as hdf5_module
from pipeline.decode import DecodeSpec, decode_file
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.extract import RebuildConfig, rebuild
from pipeline.hdf5 import export_hdf5, import_hdf5
from pipeline.inspect import status, verify
from pipeline.storage import StoreLocation
from pipeline.store import ShardResult, open_or_create, write_shard
from pipeline.store_format import (
    ARRAYS,
    FAILED,
    OK,
    PENDING,
    commit_name,
    data_sha256,
    make_commit,
    rows_sha256,
    store_attrs,
)
from trainer.features import DiskFeatures
from trainer.store import open_store

pytestmark = pytest.mark.slow

N_ROWS = 13_300  # VideoInstruct-100K's videos
SHARD = 64
N_SHARDS = -(-N_ROWS // SHARD)  # 208; the last one holds 52 rows
F = 1
REASONS = ("decoder error: moov atom not found", "file not found", "decode timed out after 120 s (killed)")
# failed rows: spread over shards, several in shard 3, one in the last (partial) shard
FAILED_ROWS = {row: REASONS[i % len(REASONS)]
               for i, row in enumerate([5, 200, 201, 202, 640, 4097, 6400, 9000, 12_345, N_ROWS - 1])}


def _tokens(rows: np.ndarray, t: int, d: int) -> np.ndarray:
    """The synthetic tokens of `rows`: token 0 holds row % 2048, token 1 row // 2048 (both exact
    in float16), token 2 a ramp, the rest zeros; failed rows are all zeros."""
    tokens = np.zeros((len(rows), F, t, d), dtype=np.float16)
    tokens[:, 0, 0, :] = (rows % 2048)[:, None]
    tokens[:, 0, 1, :] = (rows // 2048)[:, None]
    tokens[:, 0, 2, :] = np.arange(d) / d
    tokens[np.isin(rows, list(FAILED_ROWS))] = 0
    return tokens


@dataclass
class Synthetic:
    """What the store was built from, to count against."""

    root: Path
    manifest: Path
    store: Path
    attrs: dict
    video_ids: list[str]  # by row
    video_path: Path  # the one real file every row points to (hard links)
    encoder: object  # the demo-tiny Encoder, for the reference encode

    def expected_status(self, not_done: set[int] = frozenset()) -> np.ndarray:
        """The per-row status `status` and the trainer must report when `not_done` shards are
        not done: FAILED_ROWS failed, every other row ok, rows of `not_done` shards pending."""
        st = np.full(N_ROWS, OK, dtype=np.uint8)
        st[list(FAILED_ROWS)] = FAILED
        for shard in not_done:
            st[shard * SHARD : (shard + 1) * SHARD] = PENDING
        return st

    def expected_failures(self, not_done: set[int] = frozenset()) -> dict[str, list[str]]:
        by_reason: dict[str, list[str]] = defaultdict(list)
        for row in sorted(FAILED_ROWS):
            if row // SHARD not in not_done:
                by_reason[FAILED_ROWS[row]].append(self.video_ids[row])
        return dict(by_reason)


def _tiny_video(path: Path) -> None:
    """A real 2-frame 32x24 H.264 file (decord decodes it; F=1 samples one frame)."""
    frames = []
    for index in range(2):
        pixels = np.zeros((24, 32, 3), dtype=np.uint8)
        pixels[4:20, 6 + 8 * index : 18 + 8 * index] = (200, 40 + 100 * index, 90)
        frames.append(pixels)
    write_video(path, frames, 25, options={"preset": "ultrafast", "threads": "1"})


@pytest.fixture(scope="module")
def scale(tmp_path_factory) -> Synthetic:
    root = tmp_path_factory.mktemp("scale")
    source = root / "one.mp4"
    _tiny_video(source)
    videos = root / "videos"
    videos.mkdir()
    ids = [f"v_{row:05d}abcdefg" for row in range(N_ROWS)]  # sorted = row order (the build sorts by id)
    for video_id in ids:
        os.link(source, videos / f"{video_id}.mp4")
    instructions = root / "VideoInstruct_Dataset.json"
    instructions.write_text(json.dumps([{"video_id": v, "q": "What happens in the video?", "a": "A shape moves."}
                                        for v in ids]))
    manifest = root / "manifest"
    summary = build_manifest(ManifestConfig(instructions, videos, manifest, shard_size=SHARD))
    assert (summary.videos, summary.shards) == (N_ROWS, N_SHARDS)

    encoder = load_encoder(EncoderSpec("demo-tiny", "none", -1, "fp32"))
    mdir, meta = read_manifest_meta(manifest)
    attrs = store_attrs(encoder.attrs, F, "uniform", meta["manifest_id"], meta["fingerprint"], SHARD, N_ROWS)
    location = StoreLocation(root / "store.zarr")
    group = open_or_create(location, attrs)
    t, d = attrs["tokens_per_frame"], attrs["width"]
    for shard, entries in iter_shards(mdir, SHARD):
        assert [e.video_id for e in entries] == ids[entries[0].row : entries[-1].row + 1]
        rows = np.array([e.row for e in entries])
        failed = np.isin(rows, list(FAILED_ROWS))
        st = np.where(failed, FAILED, OK).astype(np.uint8)
        result = ShardResult(shard, int(rows[0]), _tokens(rows, t, d),
                             np.where(failed, 0, 1).astype(np.int32)[:, None].repeat(F, axis=1),
                             np.where(failed, 0, 2).astype(np.int32), st,
                             [{"row": int(r), "video_id": ids[r], "reason": FAILED_ROWS[r]} for r in rows[failed]])
        write_shard(group, location, attrs, result, rows_sha256(entries), "synthetic")
    return Synthetic(root, manifest, root / "store.zarr", attrs, ids, source, encoder)


def _copy(store: Path, dst: Path) -> Path:
    shutil.copytree(store, dst)
    return dst


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _same_array_objects(store_a: Path, store_b: Path, name: str) -> bool:
    """Do the two stores hold array `name` as the same objects byte for byte (its metadata and
    every chunk object)? Then its data are the same, without decoding 13k chunks twice; when
    not, the caller compares the decoded arrays."""
    files_a, files_b = _files(store_a / name), _files(store_b / name)
    return "zarr.json" in files_a and files_a == files_b


def _shard_files(shard: int) -> set[str]:
    """The files that hold one shard: one object per array (chunk key = shard number), its commit."""
    return {f"tokens/c/{shard}/0/0/0", f"frame_index/c/{shard}/0", f"n_frames/c/{shard}", f"status/c/{shard}",
            commit_name(shard)}


def test_status_and_the_trainer_reader_count_as_the_synthetic_data(scale, tmp_path):
    s = status(scale.store)
    want = scale.expected_status()
    assert (s.rows, s.shards_total, s.shards_done) == (N_ROWS, N_SHARDS, N_SHARDS)
    assert (s.ok, s.failed, s.pending) == ((want == OK).sum(), (want == FAILED).sum(), 0)
    assert s.failures_by_reason == scale.expected_failures()
    assert len(s.lines()) == 6 + len(REASONS)

    # two shards not done: shard 100's commit gone, the last (partial) shard's commit made with
    # another encoder; their rows (failed ones included) are pending, whatever the status array says
    partial = _copy(scale.store, tmp_path / "partial.zarr")
    (partial / commit_name(100)).unlink()
    foreign = json.loads((partial / commit_name(N_SHARDS - 1)).read_text())
    (partial / commit_name(N_SHARDS - 1)).write_text(json.dumps({**foreign, "encoder_fingerprint": "0" * 16}))
    not_done = {100, N_SHARDS - 1}
    want = scale.expected_status(not_done)
    s = status(partial)
    assert s.shards_done == N_SHARDS - 2
    assert (s.ok, s.failed, s.pending) == ((want == OK).sum(), (want == FAILED).sum(), (want == PENDING).sum())
    assert s.pending == SHARD + (N_ROWS - (N_SHARDS - 1) * SHARD)
    assert s.failures_by_reason == scale.expected_failures(not_done)

    # the trainer's reader: the same per-row status, and the disk feature source returns the
    # stored tokens (rows unsorted, repeated, a failed one, across shards)
    info = open_store(partial)
    assert info.shape == (N_ROWS, F, 37, 64)
    np.testing.assert_array_equal(info.status, want)
    rows = [13_000, 5, 64, 63, 5, 6400, N_ROWS - 2, 4097]
    got = DiskFeatures(partial).fetch(rows).numpy()
    np.testing.assert_array_equal(got, _tokens(np.array(rows), 37, 64))


def test_verify_names_the_broken_shards_and_rebuild_redoes_exactly_them(scale, tmp_path):
    assert verify(scale.store, scale.manifest) == []

    work = _copy(scale.store, tmp_path / "work.zarr")
    # shard 3: its tokens object overwritten by shard 4's (a whole, readable object: only the
    # checksum in the commit record tells), the last shard: its commit record deleted
    shutil.copyfile(work / "tokens" / "c" / "4" / "0" / "0" / "0", work / "tokens" / "c" / "3" / "0" / "0" / "0")
    last = N_SHARDS - 1
    (work / commit_name(last)).unlink()
    problems = verify(work, scale.manifest)
    assert problems, "verify found nothing wrong"
    assert {p.split(" (rows")[0] for p in problems} == {"shard 3", f"shard {last}"}, problems

    before = _files(work)
    summary = rebuild(RebuildConfig(manifest=scale.manifest, store=work, shards=[3, last], batch_size=64))
    assert summary.shards_written == 2 and summary.failed == 0
    assert summary.ok == SHARD + (N_ROWS - last * SHARD)
    after = _files(work)
    redone = _shard_files(3) | _shard_files(last)
    untouched = {name for name in before if name not in redone and not name.startswith("leases/")}
    assert untouched and all(after[name] == before[name] for name in untouched)
    assert set(after) - set(before) - {commit_name(last)} <= {n for n in after if n.startswith("leases/")}

    # the rebuilt shards hold the file's real tokens: a direct decode + encode of the file
    decoded = decode_file(scale.video_path, "video", DecodeSpec(F, "uniform", scale.attrs["encoder"]["image_size"],
                                                                   scale.attrs["encoder"]["resize_mode"]))
    reference = scale.encoder.encode(decoded.frames).astype(np.float32)
    g = zarr.open_group(work, mode="r")
    for start, stop in ((3 * SHARD, 4 * SHARD), (last * SHARD, N_ROWS)):
        assert (g["status"][start:stop] == OK).all()  # the synthetic failures are gone
        tokens = g["tokens"][start:stop].astype(np.float32)
        for row in (0, stop - start - 1):
            np.testing.assert_allclose(tokens[row], reference, rtol=2e-3, atol=3e-3)
        np.testing.assert_array_equal(g["frame_index"][start:stop], np.tile(decoded.frame_index, (stop - start, 1)))
        np.testing.assert_array_equal(g["n_frames"][start:stop], decoded.n_frames)
    for shard, (start, stop) in ((3, (3 * SHARD, 4 * SHARD)), (last, (last * SHARD, N_ROWS))):
        commit = json.loads((work / commit_name(shard)).read_text())
        assert commit["node"] != "synthetic" and commit["failures"] == [] and commit["ok"] == stop - start
        assert commit["data_sha256"] == data_sha256(*(g[name][start:stop] for name in ARRAYS))
    assert json.loads((work / commit_name(4)).read_text())["node"] == "synthetic"
    # every shard done again by the manifest's rows (the whole-store `verify` already passed on
    # the untouched shards' bytes above; `status` with the manifest applies the done rule)
    s = status(work, scale.manifest)
    assert (s.shards_done, s.pending) == (N_SHARDS, 0)
    assert s.failed == sum(1 for row in FAILED_ROWS if row // SHARD not in (3, last))


def test_hdf5_round_trip_at_corpus_scale(scale, tmp_path):
    h5 = tmp_path / "features.h5"
    assert export_hdf5(scale.store, h5) == N_ROWS
    back = tmp_path / "back.zarr"
    assert import_hdf5(h5, back) == N_ROWS
    a, b = zarr.open_group(scale.store, mode="r"), zarr.open_group(back, mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in ARRAYS:
        if not _same_array_objects(scale.store, back, name):  # else the same bytes: the same data
            np.testing.assert_array_equal(a[name][:], b[name][:])
    np.testing.assert_array_equal(b["status"][:], scale.expected_status())
    commits = sorted(p.name for p in (scale.store / "commits").iterdir())
    assert len(commits) == N_SHARDS and sorted(p.name for p in (back / "commits").iterdir()) == commits
    assert all((back / "commits" / n).read_bytes() == (scale.store / "commits" / n).read_bytes() for n in commits)
    assert status(back).failures_by_reason == scale.expected_failures()


def test_hdf5_carries_the_commit_records_of_20800_shards(tmp_path, monkeypatch):
    """100x the corpus: the commit records of 20,800 shards (1.33M rows) through `export_hdf5`
    and `import_hdf5`. The export holds every record in one place, the file's `commits` attribute
    (~11 MB here; ~80 KB at 208 shards). HDF5 caps an attribute stored in the object header at
    64 KiB; h5py writes a Python str as a variable-length string, whose bytes live in the global
    heap, so this one has no such cap (a fixed-length attribute fails here, and already at 208
    shards). The records are `make_commit`'s (one per shard, each with its rows, rows sha256 and a
    failure) for a store of 1,331,200 rows; the arrays exported are a small store's: only the
    records grow with the shard count (the arrays grow with the rows)."""
    n_shards = 20_800
    big = {"n_rows": n_shards * SHARD, "shard_size": SHARD, "encoder_fingerprint": "f" * 16}
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((SHARD, F, 37, 64)).astype(np.float16)
    st = np.full(SHARD, OK, dtype=np.uint8)
    st[7] = FAILED
    fi, nf = np.zeros((SHARD, F), dtype=np.int32), np.full(SHARD, 2, dtype=np.int32)
    template = make_commit(big, 0, tokens, fi, nf, st, [], "0" * 64, "10.0.0.1/" + "a" * 56)
    records = {}
    for shard in range(n_shards):
        start = shard * SHARD
        records[shard] = {**template, "shard": shard, "rows": [start, start + SHARD], "rows_sha256": f"{shard:064x}",
                          "failures": [{"row": start + 7, "video_id": f"v_{start + 7:07d}", "reason": REASONS[0]}]}

    small = StoreLocation(tmp_path / "small.zarr")
    attrs = store_attrs({"model": "stand-in", "tokens_per_frame": 1, "width": 1}, F, "uniform", "m", "f", SHARD,
                        2 * SHARD)
    open_or_create(small, attrs)
    monkeypatch.setattr(hdf5_module, "n_shards", lambda a: n_shards)
    monkeypatch.setattr(hdf5_module, "read_commit", lambda location, shard: records[shard])
    h5 = tmp_path / "big.h5"
    export_hdf5(small.url, h5)
    with h5py.File(h5, "r") as f:
        stored = f.attrs["commits"]
        assert len(stored) > 10 * 2**20 and len(json.loads(stored)) == n_shards
    back = tmp_path / "back.zarr"
    import_hdf5(h5, back)
    names = sorted(p.name for p in (back / "commits").iterdir())
    assert len(names) == n_shards
    for shard in (0, 1, 12_345, n_shards - 1):
        assert json.loads((back / commit_name(shard)).read_text()) == records[shard]
