"""Store operations for curators (issue 7): rebuild, --failed, verify, growth, HDF5, show, status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import decord
import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from corpus_helpers import BROKEN_BYTES, corpus_with_a_broken_file, write_instructions
from manifests.build import ManifestConfig, build_manifest
from manifests.demo_corpus import make_demo_corpus
from manifests.manifest import load_manifest
from pipeline import contact_sheet
from pipeline.errors import ExtractError
from pipeline.extract import ExtractConfig, RebuildConfig, extract, rebuild
from pipeline.hdf5 import export_hdf5, import_hdf5
from pipeline.inspect import status, verify

F = 4


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _shard_files(store: Path, shard: int) -> set[str]:
    """The files that hold one shard: one per array (chunk key = shard number), its commit."""
    names = {f"tokens/c/{shard}/0/0/0", f"frame_index/c/{shard}/0", f"n_frames/c/{shard}", f"status/c/{shard}"}
    return names | {f"commits/shard-{shard:06d}.json"}


def _extract(manifest: Path, store: Path) -> object:
    return extract(ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none", frames=F,
                                 batch_size=16))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """5 demo videos + one broken file, shard size 2 (3 shards), both splits, extracted once."""
    root = tmp_path_factory.mktemp("curate")
    store = root / "store.zarr"
    _extract(corpus_with_a_broken_file(root, seed=2, shard_size=2, val_fraction=0.5), store)
    return root, store


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(store, dst)
    return dst


def test_status_groups_failures(made):
    root, store = made
    s = status(store)
    assert (s.rows, s.ok, s.failed, s.pending) == (6, 5, 1, 0)
    assert (s.shards_done, s.shards_total) == (3, 3)
    assert list(s.failures_by_reason.values()) == [["broken"]]
    assert s.encoder["model"] == "demo-tiny" and s.frames == F


def test_verify_passes_a_good_store_and_names_the_broken_shard(made, tmp_path):
    root, store = made
    assert verify(store, root / "manifest") == []

    flipped = _copy(store, tmp_path / "a")
    chunk = flipped / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify(flipped)
    assert problems and all(p.startswith("shard 1 ") for p in problems), problems

    no_commit = _copy(store, tmp_path / "b")
    (no_commit / "commits" / "shard-000002.json").unlink()
    problems = verify(no_commit)
    assert problems and all(p.startswith("shard 2 ") for p in problems), problems

    edited = _copy(store, tmp_path / "c")
    meta = json.loads((edited / "zarr.json").read_text())
    meta["attributes"]["sampling"] = "keyframe"
    (edited / "zarr.json").write_text(json.dumps(meta))
    problems = verify(edited)
    assert len(problems) == 3 and all("attributes changed" in p for p in problems), problems


def test_extract_status_verify_and_the_trainer_agree_on_what_is_done(made, tmp_path):
    """A shard whose commit record is gone (as in the middle of a rebuild) is pending for all four,
    although its arrays still hold rows marked ok."""
    from pipeline.extract import _pending
    from pipeline.storage import StoreLocation
    from pipeline.store import read_attrs
    from trainer.store import open_store

    root, store = made
    store = _copy(store, tmp_path)
    (store / "commits" / "shard-000001.json").unlink()
    assert (zarr.open_group(store, mode="r")["status"][2:4] == 1).all()
    s = status(store, root / "manifest")
    assert (s.shards_done, s.ok, s.failed, s.pending) == (2, 3, 1, 2)
    assert any(line.startswith("shard 1 ") for line in verify(store, root / "manifest"))
    location = StoreLocation(store)
    assert _pending(location, read_attrs(location), root / "manifest", 2) == [1]
    stored = zarr.open_group(store, mode="r")["status"][:]
    assert open_store(store).status.tolist() == [*stored[:2], 0, 0, *stored[4:]]


def test_rebuild_one_shard_touches_nothing_else(made, tmp_path):
    root, store = made
    work = _copy(store, tmp_path)
    fresh = zarr.open_group(store, mode="r")["tokens"][2:4]
    zarr.open_group(work, mode="r+")["tokens"][2:4] = np.ones_like(fresh)  # damage shard 1
    before = _files(work)
    summary = rebuild(RebuildConfig(manifest=root / "manifest", store=work, shards=[1], batch_size=16))
    assert summary.shards_written == 1
    after = _files(work)
    assert set(before) <= set(after)
    assert all(name.startswith("leases/shard-000001/") for name in set(after) - set(before))  # its taker
    changed = {name for name in before if after[name] != before[name]}
    assert changed <= _shard_files(work, 1) and "tokens/c/1/0/0/0" in changed
    np.testing.assert_array_equal(zarr.open_group(work, mode="r")["tokens"][2:4], fresh)
    assert verify(work, root / "manifest") == []


def test_rebuild_failed_after_fixing_the_file(made, tmp_path):
    root, store = made
    work = _copy(store, tmp_path)
    manifest = load_manifest(root / "manifest")
    broken = next(e for e in manifest.videos if e.video_id == "broken")
    good = next(e for e in manifest.videos if e.video_id != "broken")
    shutil.copy(manifest.video_root / good.path, manifest.video_root / "broken.mp4")
    try:
        summary = rebuild(RebuildConfig(manifest=root / "manifest", store=work, failed=True, batch_size=16))
    finally:
        (manifest.video_root / "broken.mp4").write_bytes(BROKEN_BYTES)
    assert summary.shards_written == 1 and summary.failed == 0
    g = zarr.open_group(work, mode="r")
    assert int(g["status"][broken.row]) == 1
    np.testing.assert_array_equal(g["tokens"][broken.row], g["tokens"][good.row])


def test_growth_extracts_only_new_shards(tmp_path):
    make_demo_corpus(tmp_path, n_videos=6, seed=4)
    ids = sorted(json.loads((tmp_path / "labels.json").read_text()))
    manifest = tmp_path / "manifest"
    build_manifest(ManifestConfig(write_instructions(tmp_path / "i.json", ids[:4]), tmp_path / "videos", manifest,
                                  shard_size=2))
    store = tmp_path / "store.zarr"
    assert _extract(manifest, store).shards_written == 2
    before = _files(store)
    build_manifest(ManifestConfig(write_instructions(tmp_path / "i.json", ids), tmp_path / "videos", manifest))
    summary = _extract(manifest, store)
    assert summary.shards_written == 1 and summary.ok == 2
    after = _files(store)
    for shard in (0, 1):
        for name in _shard_files(store, shard):
            assert after[name] == before[name], name
    g = zarr.open_group(store, mode="r")
    assert g["tokens"].shape[0] == 6 and (g["status"][:] == 1).all()
    assert verify(store, manifest) == []


def test_hdf5_round_trip(made, tmp_path):
    root, store = made
    h5 = tmp_path / "f.h5"
    assert export_hdf5(store, h5) == 6
    back = tmp_path / "back.zarr"
    import_hdf5(h5, back)
    a, b = zarr.open_group(store, mode="r"), zarr.open_group(back, mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in ("tokens", "frame_index", "n_frames", "status"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert sorted((store / "commits").iterdir()) != [] and all(
        (store / "commits" / p.name).read_bytes() == p.read_bytes() for p in (back / "commits").iterdir())
    assert verify(back, root / "manifest") == []
    with h5py.File(h5, "r") as f:
        assert f["tokens"].chunks == (1, *a["tokens"].shape[1:])


@pytest.mark.parametrize("split", ["train", "val"])
def test_hdf5_split_export_holds_that_splits_rows_as_the_store_has_them(made, tmp_path, split):
    """Read back with h5py and compared with the store read with zarr, row by row: exactly the
    manifest's rows of the split, in row order, every array, the attributes and commit records;
    such a file is refused by import."""
    root, store = made
    rows = [e.row for e in load_manifest(root / "manifest").videos if e.split == split]
    assert 0 < len(rows) < 6  # the fixture's manifest has both splits
    out = tmp_path / f"{split}.h5"
    assert export_hdf5(store, out, split, root / "manifest") == len(rows)
    g = zarr.open_group(store, mode="r")
    with h5py.File(out, "r") as f:
        assert f.attrs["split"] == split
        assert f["row"][:].tolist() == rows
        for name in ("tokens", "frame_index", "n_frames", "status"):
            assert f[name].dtype == g[name].dtype
            np.testing.assert_array_equal(f[name][:], g[name][:][rows])
        assert {k: json.loads(v) for k, v in f.attrs.items() if k not in ("commits", "split")} == dict(g.attrs)
        commits = [json.loads(p.read_text()) for p in sorted((store / "commits").iterdir())]
        assert json.loads(f.attrs["commits"]) == commits
    with pytest.raises(ExtractError, match=f"only the {split} split"):
        import_hdf5(out, tmp_path / "back.zarr")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left, no store made


def test_show_tiles_are_the_decoded_cropped_frames(made, tmp_path):
    root, store = made
    manifest = load_manifest(root / "manifest")
    entry = next(e for e in manifest.videos if e.video_id != "broken")
    out = contact_sheet.show(store, root / "manifest", entry.video_id, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(out).convert("RGB"))
    indices = zarr.open_group(store, mode="r")["frame_index"][entry.row].tolist()
    path = manifest.video_root / entry.path
    stream = av.open(str(path)).streams.video[0].codec_context
    w, h, S = stream.width, stream.height, 96
    rw, rh = (int(S * w / h), S) if w >= h else (S, int(S * h / w))
    frames = decord.VideoReader(str(path), width=rw, height=rh).get_batch(indices).asnumpy()
    top, left = int(round((rh - S) / 2)), int(round((rw - S) / 2))
    for i in range(F):
        x = contact_sheet.GAP + (i % contact_sheet.COLUMNS) * (S + contact_sheet.GAP)
        y = contact_sheet.HEADER + (i // contact_sheet.COLUMNS) * (S + contact_sheet.LABEL + contact_sheet.GAP)
        np.testing.assert_array_equal(sheet[y : y + S, x : x + S], frames[i, top : top + S, left : left + S])

    failed = contact_sheet.show(store, root / "manifest", "broken", tmp_path / "broken.png")
    assert Image.open(failed).size[1] == contact_sheet.HEADER  # no tiles, only the header with the reason
