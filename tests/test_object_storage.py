"""Object storage (issue 11, point 6): a manifest over `s3://` videos, a store at an `s3://` URL,
`status`, `verify`, `rebuild`, `export-hdf5`/`import-hdf5` and training on it, against a real S3
HTTP endpoint on 127.0.0.1 (moto's server; s3fs is the client; `s3_env` in conftest.py points the
session's clients, Ray's workers included, at it).

The references are independent of the S3 code path: the same corpus read from local disk into a
local store, whose objects the S3 store must equal byte for byte; the requests the endpoint
received, from moto's own request log.
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import h5py
import numpy as np
import pytest
import s3fs
import zarr
from PIL import Image

import run_extract
import run_train
from manifests.build import ManifestConfig, build_manifest
from manifests.demo_corpus import make_demo_corpus
from manifests.manifest import ManifestError, cheap_fingerprint, load_manifest
from pipeline import contact_sheet
from pipeline.extract import ExtractConfig, RebuildConfig, extract, rebuild
from pipeline.hdf5 import export_hdf5, import_hdf5
from pipeline.inspect import status, verify
from pipeline.storage import StoreLocation
from trainer.config import TrainConfig
from trainer.train import train
from trainer_helpers import cli_args, read_metrics, tiny_train_args

F = 4
BUCKET = "bucket"
VIDEOS = f"s3://{BUCKET}/videos"
STORE = f"s3://{BUCKET}/store.zarr"
ARRAY_PREFIXES = ("tokens/", "frame_index/", "n_frames/", "status/")


@pytest.fixture(scope="module")
def s3(s3_env, tmp_path_factory):
    """moto's S3 server on the port `s3_env` chose, with one bucket; yields an s3fs client and
    the endpoint URL. Its request log (moto's recorder) goes to a temporary file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_RECORDER_FILEPATH", str(tmp_path_factory.mktemp("moto") / "requests.jsonl"))
        import moto.moto_api  # noqa: F401 - its recorder reads MOTO_RECORDER_FILEPATH on import
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_env, verbose=False)
        server.start()
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            fs = s3fs.S3FileSystem()
            fs.mkdir(BUCKET)
            yield fs, f"http://127.0.0.1:{s3_env}"
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """4 demo videos and one broken file, on local disk and uploaded to s3://bucket/videos, with
    a manifest over each (shard size 2: 3 shards, the broken file in shard 0)."""
    fs, _ = s3
    root = tmp_path_factory.mktemp("s3corpus")
    make_demo_corpus(root, n_videos=4, seed=10, workers=2)
    (root / "videos" / "broken.mp4").write_bytes(b"not a video at all" * 100)
    ids = sorted(json.loads((root / "labels.json").read_text())) + ["broken"]
    instructions = root / "instructions.json"
    instructions.write_text(json.dumps([{"q": f"What is in {v}?", "a": "A thing.", "video_id": v} for v in ids]))
    fs.put(str(root / "videos"), f"{BUCKET}/videos", recursive=True)
    manifests = {"local": root / "manifest_local", "s3": root / "manifest_s3"}
    build_manifest(ManifestConfig(instructions, root / "videos", manifests["local"], shard_size=2))
    build_manifest(ManifestConfig(instructions, VIDEOS, manifests["s3"], shard_size=2))
    return root, instructions, manifests


def _extract(manifest: Path, store: str | Path, **kw) -> object:
    return extract(ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none", frames=F,
                                 batch_size=16, decode_timeout_s=60, **kw))


@pytest.fixture(scope="module")
def stores(corpus, ray_cluster):
    """The corpus from local disk into a local store (this machine's processes), and from S3
    into the store at STORE (on the session's Ray cluster, whose workers reach S3 themselves)."""
    root, _, manifests = corpus
    local = root / "local.zarr"
    summaries = _extract(manifests["local"], local), _extract(manifests["s3"], STORE, ray_address=ray_cluster)
    for summary in summaries:
        assert (summary.shards_written, summary.ok, summary.failed) == (3, 4, 1), summary
    return local


def _recording(endpoint: str, action: str) -> str:
    """Drive moto's request recorder: reset-recording, start-recording, stop-recording,
    download-recording (one JSON line per request received)."""
    method = "GET" if action == "download-recording" else "POST"
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method=method)) as r:
        return r.read().decode()


def test_manifest_over_s3_videos_has_the_rows_of_the_same_files_on_disk(s3, corpus):
    """Listing, sizes and the cheap fingerprint (two ranged reads) over s3:// give the rows the
    local files give; the URL is recorded as given; the manifest grows over the URL."""
    fs, _ = s3
    root, instructions, manifests = corpus
    local, remote = manifests["local"], manifests["s3"]
    assert (remote / "videos.jsonl").read_bytes() == (local / "videos.jsonl").read_bytes()
    meta = json.loads((remote / "manifest.json").read_text())
    assert meta["video_root"] == VIDEOS
    assert meta["fingerprint"] == json.loads((local / "manifest.json").read_text())["fingerprint"]
    manifest = load_manifest(remote)
    assert manifest.video_root == VIDEOS
    entry = manifest.videos[-1]
    assert manifest.abs_path(entry) == f"{VIDEOS}/{entry.path}"
    assert entry.bytes > 2 * 65536  # both 64 KiB ends are read
    assert cheap_fingerprint(f"{BUCKET}/videos/{entry.path}", fs=fs) == cheap_fingerprint(root / "videos" / entry.path)

    # growth over the same URL keeps every row and appends the new videos; another root is refused
    grown = root / "manifest_grown"
    ids = [r["video_id"] for r in json.loads(instructions.read_text())]
    first = root / "first.json"
    first.write_text(json.dumps([{"q": "What is it?", "a": "A thing.", "video_id": v} for v in ids[:3]]))
    build_manifest(ManifestConfig(first, VIDEOS, grown, shard_size=2))
    before = (grown / "videos.jsonl").read_text()
    summary = build_manifest(ManifestConfig(instructions, VIDEOS + "/", grown))
    after = (grown / "videos.jsonl").read_text()
    assert after.startswith(before) and summary.new_videos == len(ids) - 3 and summary.videos == len(ids)
    with pytest.raises(ManifestError, match="growth needs the same --videos"):
        build_manifest(ManifestConfig(instructions, root / "videos", grown))


def test_s3_store_equals_the_local_store_byte_for_byte(s3, corpus, stores):
    fs, _ = s3
    local = stores
    a, b = zarr.open_group(local, mode="r"), zarr.open_group(STORE, mode="r")  # plain zarr reads both
    for name in ("tokens", "frame_index", "n_frames", "status"):
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    # every object of the arrays and the group, byte for byte
    local_files = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    data = {k: p for k, p in local_files.items() if k == "zarr.json" or k.startswith(ARRAY_PREFIXES)}
    remote = {k[len(f"{BUCKET}/store.zarr/"):] for k in fs.find(f"{BUCKET}/store.zarr")}
    assert {k for k in remote if k == "zarr.json" or k.startswith(ARRAY_PREFIXES)} == set(data)
    for key, path in data.items():
        assert fs.cat_file(f"{BUCKET}/store.zarr/{key}") == path.read_bytes(), key
    # the commit records: same data checksums and rows; the failure names the file where it lies
    for shard in range(3):
        name = f"commits/shard-{shard:06d}.json"
        mine, theirs = json.loads(fs.cat_file(f"{BUCKET}/store.zarr/{name}")), json.loads((local / name).read_text())
        for key in ("rows", "ok", "failed", "data_sha256", "rows_sha256", "spec_sha256", "encoder_fingerprint"):
            assert mine[key] == theirs[key], (shard, key)
    failure = json.loads(fs.cat_file(f"{BUCKET}/store.zarr/commits/shard-000000.json"))["failures"][0]
    assert failure["video_id"] == "broken" and f"{VIDEOS}/broken.mp4" in failure["reason"]
    assert "vidcache-" not in failure["reason"]  # not the spooled copy's path


def test_status_and_verify_on_s3_find_an_overwritten_shard_object(s3, corpus, stores):
    fs, _ = s3
    _, _, manifests = corpus
    for manifest in (None, manifests["s3"]):
        s = status(STORE, manifest)
        assert (s.rows, s.ok, s.failed, s.pending, s.shards_done, s.shards_total) == (5, 4, 1, 0, 3, 3)
        assert list(s.failures_by_reason.values()) == [["broken"]] and s.bytes_on_disk > 0
    assert verify(STORE, manifests["s3"]) == []

    fs.copy(f"{BUCKET}/store.zarr", f"{BUCKET}/corrupt.zarr", recursive=True)
    assert verify(f"s3://{BUCKET}/corrupt.zarr") == []
    # a valid shard object, but another shard's: only its checksum can tell
    fs.pipe_file(f"{BUCKET}/corrupt.zarr/tokens/c/1/0/0/0", fs.cat_file(f"{BUCKET}/corrupt.zarr/tokens/c/2/0/0/0"))
    problems = verify(f"s3://{BUCKET}/corrupt.zarr")
    assert problems == ["shard 1 (rows 2-3): data checksum mismatch (the shard's files changed after commit, or the record's data_sha256 was edited)"]


def test_show_decodes_the_video_from_s3_as_from_disk(corpus, stores, tmp_path):
    root, _, manifests = corpus
    video = load_manifest(manifests["s3"]).videos[1].video_id
    remote = contact_sheet.show(STORE, manifests["s3"], video, tmp_path / "s3.png")
    local = contact_sheet.show(stores, manifests["local"], video, tmp_path / "local.png")
    assert np.array_equal(np.asarray(Image.open(remote)), np.asarray(Image.open(local)))
    assert Image.open(remote).size[1] > contact_sheet.HEADER  # the tiles are there


def test_rebuild_on_s3_withdraws_then_commits_in_one_put(s3, corpus, stores):
    """Rebuild shard 1 with moto recording every request: the lease is a conditional PUT; the
    commit record is deleted before the arrays are written and written after them, in one PUT
    (no temporary key, no multipart upload); no other shard's object is touched."""
    fs, endpoint = s3
    _, _, manifests = corpus
    key = f"{BUCKET}/store.zarr"
    before = {name: fs.cat_file(f"{key}/{name}") for name in ("tokens/c/1/0/0/0", "status/c/1")}
    commit_before = json.loads(fs.cat_file(f"{key}/commits/shard-000001.json"))
    _recording(endpoint, "reset-recording")
    _recording(endpoint, "start-recording")
    try:
        summary = rebuild(RebuildConfig(manifest=manifests["s3"], store=STORE, shards=[1], batch_size=16,
                                        decode_timeout_s=60))
    finally:
        _recording(endpoint, "stop-recording")
    requests = [json.loads(line) for line in _recording(endpoint, "download-recording").splitlines() if line]
    assert summary.shards_written == 1 and not summary.left_pending

    writes = [(r["method"], urlparse(r["url"]).path, urlparse(r["url"]).query, r["headers"]) for r in requests
              if r["method"] in ("PUT", "POST", "DELETE")]
    commit_key, tokens_key = f"/{key}/commits/shard-000001.json", f"/{key}/tokens/c/1/0/0/0"
    commit_writes = [(m, p, q) for m, p, q, _ in writes if "/commits/" in p]
    assert commit_writes == [("DELETE", commit_key, ""), ("PUT", commit_key, "")]
    order = [(m, p) for m, p, _, _ in writes]
    assert order.index(("DELETE", commit_key)) < order.index(("PUT", tokens_key)) < order.index(("PUT", commit_key))
    lease_creates = [h for m, p, _, h in writes if m == "PUT" and p.startswith(f"/{key}/leases/shard-000001/")
                     and {k.lower(): v for k, v in h.items()}.get("if-none-match") == "*"]
    assert len(lease_creates) == 1
    touched = {p for _, p, _, _ in writes if p.startswith(f"/{key}/") and "/leases/" not in p}
    assert touched == {commit_key, tokens_key, f"/{key}/frame_index/c/1/0", f"/{key}/n_frames/c/1",
                       f"/{key}/status/c/1"}

    assert {name: fs.cat_file(f"{key}/{name}") for name in before} == before  # deterministic
    assert json.loads(fs.cat_file(f"{key}/commits/shard-000001.json"))["data_sha256"] == commit_before["data_sha256"]
    assert verify(STORE, manifests["s3"]) == []


def test_export_hdf5_from_s3_and_import_back_to_s3(s3, corpus, stores, tmp_path):
    local = stores
    out = tmp_path / "store.h5"
    assert export_hdf5(STORE, out) == 5
    reference = zarr.open_group(local, mode="r")
    with h5py.File(out, "r") as h5:
        for name in ("tokens", "frame_index", "n_frames", "status"):
            np.testing.assert_array_equal(h5[name][:], reference[name][:])
        assert len(json.loads(h5.attrs["commits"])) == 3
    imported = f"s3://{BUCKET}/imported.zarr"
    assert import_hdf5(out, imported) == 5
    assert verify(imported) == []
    copy = zarr.open_group(imported, mode="r")
    assert copy["tokens"][:].tobytes() == reference["tokens"][:].tobytes()


def test_training_from_the_s3_store_with_a_ram_cache(corpus, stores, tmp_path):
    """`run_train.py train --store s3://... --feature-cache ram` trains exactly as from the local
    store of the same corpus (the same losses, step by step)."""
    _, _, manifests = corpus
    local = stores
    args = dict(steps=3, feature_cache="ram")
    flags = cli_args(**tiny_train_args(manifests["s3"], STORE, tmp_path / "s3run", **args))
    assert run_train.main(["train", *flags]) == 0
    train(TrainConfig(**tiny_train_args(manifests["local"], local, tmp_path / "localrun", **args)))
    config = json.loads((tmp_path / "s3run" / "config.json").read_text())
    assert config["store"]["path"] == STORE
    losses = [[m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m and "val_loss" not in m]
              for run in ("s3run", "localrun")]
    assert len(losses[0]) == 3 and all(math.isfinite(x) for x in losses[0])
    assert losses[0] == losses[1]


def test_reads_see_what_another_process_wrote_after_a_listing(s3):
    """s3fs answers `exists`, and the size lookup of `cat_file`, from its last listing of the
    folder: an object that another process (a worker committing a shard) writes or deletes after
    this one listed the folder must still be seen as it is."""
    location = StoreLocation(f"s3://{BUCKET}/cache.zarr")
    location.write("commits/shard-000000.json", b"zero")
    assert location.list("commits") == ["shard-000000.json"]  # this process has listed the folder
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    other.pipe_file(f"{BUCKET}/cache.zarr/commits/shard-000001.json", b"one")
    assert location.exists("commits/shard-000001.json") and location.read("commits/shard-000001.json") == b"one"
    other.rm_file(f"{BUCKET}/cache.zarr/commits/shard-000000.json")
    assert not location.exists("commits/shard-000000.json") and location.read("commits/shard-000000.json") is None


def _one_line_error(code: int, capsys, secret: str) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in out + err and secret not in out + err
    return lines[0]


def test_storage_failures_end_as_one_line_without_secrets(s3, corpus, monkeypatch, capsys):
    """No bucket, an endpoint that is down, no credentials: one `error:` line from each CLI, and
    a credential that a message would quote is masked."""
    root, instructions, manifests = corpus
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    try:
        code = run_extract.main(["manifest", "--instructions", str(instructions), "--videos",
                                 "s3://no-such-bucket/videos", "--out", str(root / "m_x")])
        line = _one_line_error(code, capsys, secret)
        assert "s3://no-such-bucket/videos" in line and "bucket does not exist" in line

        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:9/{secret}")  # nothing listens on port 9
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        s3fs.S3FileSystem.clear_instance_cache()
        line = _one_line_error(run_extract.main(["status", "--store", STORE]), capsys, secret)
        assert STORE in line and "EndpointConnectionError" in line and "***" in line
        monkeypatch.undo()

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        s3fs.S3FileSystem.clear_instance_cache()
        line = _one_line_error(run_extract.main(["verify", "--store", STORE]), capsys, secret)
        assert STORE in line and "NoCredentialsError" in line
        code = run_train.main(["train", "--manifest", str(manifests["s3"]), "--store", STORE, "--out",
                               str(root / "run_x"), "--preset", "tiny"])
        line = _one_line_error(code, capsys, secret)
        assert STORE in line and "NoCredentialsError" in line
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()  # instances made above hold the broken settings
