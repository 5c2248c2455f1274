"""Extraction end to end on a small demo corpus with bad files mixed in (issue 3).

References are independent of the pipeline: frames read directly with decord, cropped and
normalised with torchvision, encoded by open_clip's own vision-tower forward; frame indices
from the sampling formula written out here. The default distributor (this machine's processes)
makes the reference store; the Ray distributor (`--ray-address`, the session's cluster) must
make the same bytes, and the fault tests run on both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import decord
import numpy as np
import open_clip
import pytest
import torch
import zarr
from torchvision import transforms

from manifests.build import ManifestConfig, build_manifest
from manifests.demo_corpus import make_demo_corpus
from manifests.manifest import load_manifest
from manifests.video_writer import write_video
from pipeline.encoder import RANDOM_SEED, register_configs
from pipeline.errors import ExtractError
from pipeline.extract import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]
F = 6  # frames per video in these tests
GOOD_EXTRA = {"one_frame": 1, "three_frames": 3}  # short videos that must extract fine (repeats)
BAD = ("zero_bytes", "truncated", "random_bytes", "text_file", "audio_only")


def _write_video(path: Path, frames: int, size=(160, 120), fps=25) -> None:
    rng = np.random.default_rng(frames)
    write_video(path, (rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) for _ in range(frames)), fps)


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in s.encode(frame):
            c.mux(packet)
        c.mux(s.encode())


def _make_corpus(root: Path) -> dict[str, Path]:
    """Demo videos + short videos + bad files; returns instruction files for with/without bad."""
    make_demo_corpus(root, n_videos=5, seed=1)
    videos = root / "videos"
    for name, n in GOOD_EXTRA.items():
        _write_video(videos / f"{name}.mp4", n)
    good = sorted(p.stem for p in videos.glob("*.mp4"))
    any_video = (videos / f"{good[0]}.mp4").read_bytes()
    (videos / "zero_bytes.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(any_video[: len(any_video) // 3])
    (videos / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (videos / "text_file.mp4").write_text("this is not a video\n" * 100)
    _write_audio_only(videos / "audio_only.mp4")
    files = {}
    for label, ids in (("all", good + list(BAD)), ("good", good)):
        records = [{"q": f"What is in {v}?", "a": "Something.", "video_id": v} for v in ids]
        files[label] = root / f"instructions_{label}.json"
        files[label].write_text(json.dumps(records))
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = _make_corpus(root)
    manifests = {}
    for label, instructions in files.items():
        out = root / f"manifest_{label}"
        build_manifest(ManifestConfig(instructions, root / "videos", out, shard_size=3))
        manifests[label] = out
    return root, manifests


def _extract(manifest: Path, store: Path, **kw) -> object:
    cfg = ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none", frames=F,
                        batch_size=16, decode_timeout_s=30, **kw)
    return extract(cfg)


@pytest.fixture(scope="module")
def store_all(corpus, tmp_path_factory):
    root, manifests = corpus
    store = tmp_path_factory.mktemp("stores") / "all.zarr"
    summary = _extract(manifests["all"], store)
    return store, summary


@pytest.fixture(scope="module")
def reference_tower():
    """open_clip's own demo-tiny tower with the documented `--pretrained none` seed."""
    register_configs()
    torch.manual_seed(RANDOM_SEED)
    model = open_clip.create_model("demo-tiny", pretrained=None)
    return model.visual.eval()


def _reference_tokens(visual, path: Path, indices: list[int], size: int, block: int) -> np.ndarray:
    """decord read at the resized size, torchvision crop + normalise, open_clip forward with a
    hook on block `block`, then the tower's final LayerNorm."""
    width, height = av.open(str(path)).streams.video[0].codec_context.width, \
        av.open(str(path)).streams.video[0].codec_context.height
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    w, h = (new_long, size) if width >= height else (size, new_long)
    frames = decord.VideoReader(str(path), width=w, height=h).get_batch(indices).asnumpy()
    tf = transforms.Compose([transforms.CenterCrop(size), transforms.Normalize(open_clip.OPENAI_DATASET_MEAN,
                                                                               open_clip.OPENAI_DATASET_STD)])
    x = tf(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0)
    captured = {}
    hook = visual.transformer.resblocks[block].register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        visual(x)
        out = visual.ln_post(captured["out"])
    hook.remove()
    return out.numpy()


def _uniform(n: int, f: int) -> list[int]:
    return [int(np.floor((i + 0.5) * n / f)) for i in range(f)]


def test_store_opens_with_plain_zarr_and_records_its_making(store_all, corpus):
    store, summary = store_all
    g = zarr.open_group(store, mode="r")
    manifest = load_manifest(corpus[1]["all"])
    n = len(manifest.videos)
    assert g["tokens"].shape == (n, F, 37, 64) and g["tokens"].dtype == np.float16
    assert g["frame_index"].shape == (n, F) and g["n_frames"].shape == (n,) and g["status"].shape == (n,)
    attrs = dict(g.attrs)
    assert attrs["encoder"]["model"] == "demo-tiny" and attrs["encoder"]["pretrained"] == "none"
    assert attrs["frames"] == F and attrs["sampling"] == "uniform" and attrs["encoder"]["layer"] == -1
    assert attrs["manifest_fingerprint"] == manifest.fingerprint and attrs["shard_size"] == 3
    assert summary.shards_written == manifest.n_shards
    commits = sorted((store / "commits").glob("shard-*.json"))
    assert len(commits) == manifest.n_shards


def test_frame_index_and_tokens_match_decord_and_open_clip(store_all, corpus, reference_tower):
    store, _ = store_all
    g = zarr.open_group(store, mode="r")
    manifest = load_manifest(corpus[1]["all"])
    checked = 0
    for entry in manifest.videos:
        if entry.video_id in BAD:
            continue
        path = manifest.video_root / entry.path
        n = len(decord.VideoReader(str(path)))
        expected = _uniform(n, F)
        assert g["n_frames"][entry.row] == n
        assert g["frame_index"][entry.row].tolist() == expected, entry.video_id
        ref = _reference_tokens(reference_tower, path, expected, 96, -1)
        np.testing.assert_allclose(g["tokens"][entry.row].astype(np.float32), ref, rtol=2e-3, atol=3e-3)
        checked += 1
    assert checked == 5 + len(GOOD_EXTRA)


def test_bad_files_are_recorded_and_good_rows_unchanged(store_all, corpus, tmp_path):
    store, _ = store_all
    manifest = load_manifest(corpus[1]["all"])
    g = zarr.open_group(store, mode="r")
    reasons = {}
    for commit in (store / "commits").glob("shard-*.json"):
        for failure in json.loads(commit.read_text())["failures"]:
            reasons[failure["video_id"]] = failure["reason"]
    assert set(reasons) == set(BAD)
    assert reasons["zero_bytes"] == "empty file (0 bytes)"
    for name in ("truncated", "random_bytes", "text_file"):
        assert reasons[name].startswith(("unreadable container", "decoder error")), reasons[name]
    assert reasons["audio_only"] == "no video stream"
    status = {e.video_id: int(g["status"][e.row]) for e in manifest.videos}
    assert all(status[v] == (2 if v in BAD else 1) for v in status)
    assert int(g["n_frames"][[e.row for e in manifest.videos if e.video_id == "one_frame"][0]]) == 1

    clean = tmp_path / "good.zarr"
    _extract(corpus[1]["good"], clean)
    good_manifest = load_manifest(corpus[1]["good"])
    h = zarr.open_group(clean, mode="r")
    rows = {e.video_id: e.row for e in manifest.videos}
    for e in good_manifest.videos:
        for name in ("tokens", "frame_index", "n_frames", "status"):
            np.testing.assert_array_equal(g[name][rows[e.video_id]], h[name][e.row])


def test_rerun_does_nothing(store_all, corpus):
    store, _ = store_all
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    summary = _extract(corpus[1]["all"], store)
    assert summary.shards_written == 0 and summary.ok == 0
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before


def test_incompatible_store_is_refused(store_all, corpus):
    store, _ = store_all
    with pytest.raises(ExtractError, match="frames"):
        extract(ExtractConfig(manifest=corpus[1]["all"], store=store, encoder="demo-tiny", pretrained="none",
                              frames=F + 1))
    with pytest.raises(ExtractError, match="layer"):
        _extract(corpus[1]["all"], store, layer=-2)
    with pytest.raises(ExtractError, match="another manifest"):
        _extract(corpus[1]["good"], store)


def test_keyframe_sampling_and_penultimate_layer(corpus, tmp_path, reference_tower):
    store = tmp_path / "key.zarr"
    _extract(corpus[1]["good"], store, sampling="keyframe", layer=-2)
    manifest = load_manifest(corpus[1]["good"])
    g = zarr.open_group(store, mode="r")
    for entry in manifest.videos:
        path = manifest.video_root / entry.path
        reader = decord.VideoReader(str(path))
        keys = list(reader.get_key_indices())
        positions = _uniform(len(reader), F)
        expected = [min(keys, key=lambda k: (abs(k - p), k)) for p in positions]
        assert g["frame_index"][entry.row].tolist() == expected
        ref = _reference_tokens(reference_tower, path, expected, 96, -2)
        np.testing.assert_allclose(g["tokens"][entry.row].astype(np.float32), ref, rtol=2e-3, atol=3e-3)


@pytest.fixture(params=["local", "ray"])
def distributor(request) -> dict:
    """ExtractConfig keywords for each distributor: this machine's processes, the session's Ray."""
    return {} if request.param == "local" else {"ray_address": request.getfixturevalue("ray_cluster")}


def _corpus_with_fifos(tmp_path: Path, video_ids: tuple[str, ...], fifos: tuple[str, ...], shard_size: int = 64) -> Path:
    """A manifest of `video_ids` (its rows are in id order); those in `fifos` are FIFOs, which
    block a reader (in native code) until a writer opens them; the others are 10-frame videos."""
    root = tmp_path / "videos"
    root.mkdir()
    for video_id in video_ids:
        if video_id in fifos:
            (root / f"{video_id}.mp4").write_bytes(b"placeholder")  # the manifest wants a file
        else:
            _write_video(root / f"{video_id}.mp4", 10)
    instructions = tmp_path / "i.json"
    instructions.write_text(json.dumps([{"q": "q?", "a": "a.", "video_id": v} for v in video_ids]))
    build_manifest(ManifestConfig(instructions, root, tmp_path / "m", shard_size=shard_size))
    for video_id in fifos:
        (root / f"{video_id}.mp4").unlink()
        os.mkfifo(root / f"{video_id}.mp4")
    return tmp_path / "m"


def _failures(store: Path) -> dict[str, str]:
    """video id -> reason, from every commit record."""
    commits = [json.loads(path.read_text()) for path in sorted((store / "commits").glob("shard-*.json"))]
    return {f["video_id"]: f["reason"] for commit in commits for f in commit["failures"]}


def _hung_timeout(distributor: dict) -> int:
    """The decode deadline of the hang tests. A local decoder's deadline starts once its process
    has imported its libraries (only the decode counts: 2 s is enough, see the slow-start test
    below); a Ray decode task's starts before its worker's first `import decord`."""
    return 8 if distributor else 4


def test_hung_decoder_is_killed_and_recorded(tmp_path, distributor):
    """A FIFO never delivers a byte: the decoder blocks in native code until it is killed."""
    manifest = _corpus_with_fifos(tmp_path, ("fine", "hangs"), ("hangs",))
    cfg = ExtractConfig(manifest=manifest, store=tmp_path / "s.zarr", encoder="demo-tiny", pretrained="none",
                        frames=F, decode_timeout_s=_hung_timeout(distributor), **distributor)
    summary = extract(cfg)
    assert (summary.ok, summary.failed) == (1, 1)
    failures = _failures(tmp_path / "s.zarr")
    assert list(failures) == ["hangs"] and "timed out" in failures["hangs"]


def test_a_healthy_video_queued_behind_hung_decoders_is_not_killed(tmp_path, distributor):
    """Two hung decodes hold both decoders (both CPUs of the test cluster) for the whole
    deadline; the healthy video queued behind them starts only when they are killed, and its
    deadline starts then. All three are asked for at once: on Ray by one shard with three decode
    slots (Ray queues the third), here by three one-video shards (the pool queues the third)."""
    manifest = _corpus_with_fifos(tmp_path, ("hang_a", "hang_b", "ok_after"), ("hang_a", "hang_b"),
                                  shard_size=64 if distributor else 1)
    assert [e.video_id for e in load_manifest(manifest).videos] == ["hang_a", "hang_b", "ok_after"]  # row order
    cfg = ExtractConfig(manifest=manifest, store=tmp_path / "s.zarr", encoder="demo-tiny", pretrained="none",
                        frames=F, decoders=2 if not distributor else 3,
                        decode_timeout_s=_hung_timeout(distributor), **distributor)
    summary = extract(cfg)
    assert set(_failures(tmp_path / "s.zarr")) == {"hang_a", "hang_b"}
    assert (summary.ok, summary.failed) == (1, 2)


def test_a_decode_deadline_starts_when_its_decoder_has_started(tmp_path, monkeypatch):
    """Decoder processes that take 3 s to start (a sitecustomize that sleeps, as a busy machine's
    imports can): with a 2 s deadline, the hung row is killed and the healthy rows, the one handed
    to the replacement decoder included, are decoded, not timed out."""
    slow = tmp_path / "slow_start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")
    manifest = _corpus_with_fifos(tmp_path, ("a_hangs", "b_ok", "c_ok"), ("a_hangs",))
    monkeypatch.setenv("PYTHONPATH", str(slow))
    cfg = ExtractConfig(manifest=manifest, store=tmp_path / "s.zarr", encoder="demo-tiny", pretrained="none",
                        frames=F, decoders=1, decode_timeout_s=2)
    summary = extract(cfg)
    assert _failures(tmp_path / "s.zarr") == {"a_hangs": "decode timed out after 2 s (killed)"}
    assert (summary.ok, summary.failed) == (2, 1)


def test_decoder_processes_do_not_load_cuda(corpus):
    """decord2 dlopens every library of the `nvidia` pip packages at import (380 MiB of private
    memory per process); a decoder process hides them and still decodes."""
    from pipeline.decode import DecodeSpec
    from pipeline.local import DecodePool

    root, manifests = corpus
    entry = next(e for e in load_manifest(manifests["good"]).videos)
    pool = DecodePool(1, timeout_s=60)
    try:
        decoded = pool.submit((str(root / "videos"), entry, DecodeSpec(F, "uniform", 32, "shortest"))).result()
        assert not isinstance(decoded, str), decoded
        assert decoded.frames.shape[0] == F
        pid = pool.processes[0].pid
        maps = Path(f"/proc/{pid}/maps").read_text()
        rss_kib = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS")).split()[1])
    finally:
        pool.close()
    assert "/nvidia/" not in maps
    assert rss_kib < 200 * 1024, f"a decoder process holds {rss_kib // 1024} MiB"


def _readers_of(path: Path) -> list[int]:
    """Processes other than this one that hold `path` open."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and any(fd.resolve() == path for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _open_for_writing_once_read(fifo: Path, timeout_s: float = 60) -> int:
    """A write end of `fifo`, opened as soon as some process opens it for reading (the decoder,
    which then waits for bytes that never come); fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert time.monotonic() < deadline, f"nobody opened {fifo}"
            time.sleep(0.05)


def _the_reader_of(path: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while not (readers := _readers_of(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(readers) == 1, readers
    return readers[0]


def test_a_decoder_killed_mid_decode_twice_fails_its_row_and_the_job_goes_on(tmp_path, distributor):
    """SIGKILL the process decoding a video (found by the file it holds open), and again the one
    that tries it once more: that row is recorded as a crashed decode, the rows after it are
    decoded by a replacement."""
    manifest = _corpus_with_fifos(tmp_path, ("a_killed", "b_after", "c_after"), ("a_killed",))
    fifo = (tmp_path / "videos" / "a_killed.mp4").resolve()
    cfg = ExtractConfig(manifest=manifest, store=tmp_path / "s.zarr", encoder="demo-tiny", pretrained="none",
                        frames=F, decoders=1, decode_timeout_s=60, **distributor)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=extract(cfg)))
    job.start()
    writer = _open_for_writing_once_read(fifo)
    try:
        first = _the_reader_of(fifo)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (second := _readers_of(fifo)) in ([], [first]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(second) == 1 and second[0] != first, "the killed decode was not tried again"
        os.kill(second[0], signal.SIGKILL)
        job.join(timeout=60)
    finally:
        os.close(writer)
    assert not job.is_alive()
    assert (result["summary"].ok, result["summary"].failed) == (2, 1)
    failures = _failures(tmp_path / "s.zarr")
    assert list(failures) == ["a_killed"] and "crashed" in failures["a_killed"], failures
    assert "2 times" in failures["a_killed"], failures


def test_a_killed_job_leaves_no_decoder_behind_not_even_one_stuck(tmp_path):
    """SIGKILL a one-machine job while its decoder is stuck reading (a FIFO that never
    delivers, held open here): the decoder dies with the job."""
    manifest = _corpus_with_fifos(tmp_path, ("stuck",), ("stuck",))
    fifo = (tmp_path / "videos" / "stuck.mp4").resolve()
    cmd = [sys.executable, str(ROOT / "run_extract.py"), "extract", "--manifest", str(manifest),
           "--store", str(tmp_path / "s.zarr"), "--encoder", "demo-tiny", "--pretrained", "none",
           "--frames", str(F), "--decode-timeout", "600"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writer = _open_for_writing_once_read(fifo)
    try:
        decoder = _the_reader_of(fifo)
        assert decoder in _descendants(job.pid)
        job.kill()
        job.wait()
        deadline = time.monotonic() + 10
        while _alive(decoder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(decoder), "the decoder outlived the killed job"
    finally:
        os.close(writer)
        job.kill()


def test_a_killed_encoder_actor_is_replaced_and_the_job_completes(store_all, corpus, ray_cluster, tmp_path):
    """SIGKILL the encoder actor's process once the first shard is committed: Ray restarts it,
    the lost requests are retried, and the store equals an undisturbed run's."""
    reference, _ = store_all
    store = tmp_path / "victim.zarr"
    result: dict = {}
    cfg = ExtractConfig(manifest=corpus[1]["all"], store=store, encoder="demo-tiny", pretrained="none", frames=F,
                        batch_size=6, decoders=1, decode_timeout_s=30, ray_address=ray_cluster)
    job = threading.Thread(target=lambda: result.update(summary=extract(cfg)))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while job.is_alive() and killed is None and time.monotonic() < deadline:
        if list((store / "commits").glob("*.json")) if store.exists() else []:
            killed = _kill_process_titled("ray::EncodeActor", ray_cluster)
        time.sleep(0.05)
    job.join()
    assert killed, "the kill did not land mid-job"
    summary = result["summary"]
    assert not summary.left_pending and summary.shards_written == load_manifest(corpus[1]["all"]).n_shards
    a, b = zarr.open_group(reference, mode="r"), zarr.open_group(store, mode="r")
    for name in ("tokens", "frame_index", "n_frames", "status"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def _kill_process_titled(prefix: str, gcs_address: str) -> int | None:
    """SIGKILL the first process whose title (Ray sets it to ray::Class) starts with `prefix`
    and whose parent is the raylet of the cluster at `gcs_address` (not another cluster's)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        if title.startswith(prefix) and gcs_address in parent_cmdline:
            os.kill(int(proc.name), signal.SIGKILL)
            return int(proc.name)
    return None


def _descendants(pid: int) -> set[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_then_rerun_gives_identical_tokens(store_all, corpus, distributor, tmp_path):
    """SIGKILL the job once a shard is committed: none of its processes outlive it (a decoder
    mid-video included), its leases (--lease-expiry 5) hold its shards only that long, and the
    rerun makes the undisturbed store's bytes."""
    reference, _ = store_all
    store = tmp_path / "killed.zarr"
    cmd = [sys.executable, str(ROOT / "run_extract.py"), "extract", "--manifest", str(corpus[1]["all"]),
           "--store", str(store), "--encoder", "demo-tiny", "--pretrained", "none", "--frames", str(F),
           "--batch-size", "6", "--lease-expiry", "5",
           *(["--ray-address", distributor["ray_address"]] if distributor else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_shards = load_manifest(corpus[1]["all"]).n_shards
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists() and list((store / "commits").glob("*.json")):
            break
        time.sleep(0.05)
    children = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    committed = len(list((store / "commits").glob("*.json")))
    assert 1 <= committed < n_shards, "the kill did not land mid-job"
    while (left := {pid for pid in children if _alive(pid)}) and time.monotonic() < killed_at + 10:
        time.sleep(0.1)
    assert not left, f"processes of the killed job outlived it: {left}"
    # what a writer killed between writing and renaming leaves: ours (.tmp), zarr's (.partial)
    stale = [store / "commits" / "shard-000000.json.0badc0de.tmp",
             next(p for p in (store / "tokens").rglob("*") if p.is_file()).with_suffix(".0badc0de.partial")]
    for path in stale:
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - 3600,) * 2)
    summary = _extract(corpus[1]["all"], store, lease_ttl_s=5)
    assert summary.shards_written == n_shards - committed
    assert time.monotonic() - killed_at < 5 + 30, "the killed job's leases held its shards past their expiry"
    a, b = zarr.open_group(reference, mode="r"), zarr.open_group(store, mode="r")
    for name in ("tokens", "frame_index", "n_frames", "status"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    left_over = [p for p in store.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not left_over, f"the rerun left temporary files: {left_over}"


def test_a_creation_killed_midway_is_finished_by_the_next_job(store_all, corpus, tmp_path, monkeypatch):
    """A job killed while creating the store leaves the group's `creating` mark and part of the
    arrays: the next job waits (CREATE_WAIT_S), then finishes the creation and the extraction."""
    import pipeline.store

    reference, _ = store_all
    store = tmp_path / "half_created.zarr"
    group = zarr.create_group(store=str(store), zarr_format=3, attributes={"creating": "0f0f0f"})
    group.create_array("tokens", shape=(3, 1), dtype="float16")  # what the killed job got to
    monkeypatch.setattr(pipeline.store, "CREATE_WAIT_S", 0.5)
    summary = _extract(corpus[1]["all"], store)
    assert summary.shards_written == summary.shards_total and not summary.left_pending
    a, b = zarr.open_group(reference, mode="r"), zarr.open_group(store, mode="r")
    for name in ("tokens", "frame_index", "n_frames", "status"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_two_jobs_on_one_store_share_the_shards_and_both_finish(store_all, corpus, ray_cluster, tmp_path):
    """One job on Ray, one on this machine's processes, started together on one store."""
    reference, _ = store_all
    store = tmp_path / "shared.zarr"
    cmd = [sys.executable, str(ROOT / "run_extract.py"), "extract", "--manifest", str(corpus[1]["all"]),
           "--store", str(store), "--encoder", "demo-tiny", "--pretrained", "none", "--frames", str(F),
           "--batch-size", "6", "--decoders", "1"]
    jobs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in (cmd + ["--ray-address", ray_cluster], cmd)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    written = [int(out.split("wrote ")[1].split(" shards")[0]) if "wrote " in out else 0 for out in outputs]
    n_shards = load_manifest(corpus[1]["all"]).n_shards
    assert sum(written) == n_shards, outputs  # no shard written twice
    assert all(f"{n_shards}/{n_shards} shards done" in out or "already done" in out for out in outputs), outputs
    a, b = zarr.open_group(reference, mode="r"), zarr.open_group(store, mode="r")
    for name in ("tokens", "frame_index", "n_frames", "status"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_a_dead_jobs_lease_holds_its_shard_only_until_it_expires(corpus, tmp_path):
    from pipeline.lease import ShardLease
    from pipeline.storage import StoreLocation

    store = tmp_path / "leased.zarr"
    _extract(corpus[1]["good"], store)
    (store / "commits" / "shard-000000.json").unlink()  # a job was rewriting shard 0 ...
    # 6 s: the job below reaches shard 0 within about 2 s (it would commit there, were the lease ignored)
    dead = ShardLease(StoreLocation(store), 0, owner="killed-job", node="gone", ttl_s=6.0)
    assert dead.acquire() is None  # ... and was SIGKILLed: nobody renews its lease
    expiry = time.time() + 5.9
    summary = _extract(corpus[1]["good"], store)
    assert summary.shards_written == 1 and not summary.left_pending
    assert (store / "commits" / "shard-000000.json").stat().st_mtime >= expiry, "taken while its lease was live"
    assert time.time() < expiry + 30, "the expired lease held the shard much longer than its expiry"
    assert json.loads((store / "commits" / "shard-000000.json").read_text())["node"] != "gone"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_the_job_with_one_line_and_a_rerun_completes(store_all, corpus, small_disk):
    """The store on a tmpfs smaller than the store: the CLI exits with one line naming the cause,
    every committed shard holds the undisturbed store's rows, and after the disk grows a rerun
    makes the undisturbed store."""
    reference, _ = store_all
    need = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    subprocess.run(["mount", "-o", f"remount,size={need // 2}", str(small_disk)], check=True)
    store = small_disk / "s.zarr"
    cmd = [sys.executable, str(ROOT / "run_extract.py"), "extract", "--manifest", str(corpus[1]["all"]),
           "--store", str(store), "--encoder", "demo-tiny", "--pretrained", "none", "--frames", str(F),
           "--batch-size", "16", "--decode-timeout", "30",
           # the stopped job cannot release its lease on the full disk: it holds the shard this long
           "--lease-expiry", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    a, b = zarr.open_group(reference, mode="r"), zarr.open_group(store, mode="r")
    commits = [json.loads(p.read_text())["rows"] for p in (store / "commits").glob("shard-*.json")]
    for start, stop in commits:
        for name in ("tokens", "frame_index", "n_frames", "status"):
            np.testing.assert_array_equal(a[name][start:stop], b[name][start:stop])
    subprocess.run(["mount", "-o", f"remount,size={need * 2}", str(small_disk)], check=True)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for name in ("tokens", "frame_index", "n_frames", "status"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_real_size_vit_b_16(corpus, tmp_path):
    root, _ = corpus
    ids = sorted(json.loads((root / "labels.json").read_text()))[:2]
    instructions = tmp_path / "i.json"
    instructions.write_text(json.dumps([{"q": "q?", "a": "a.", "video_id": v} for v in ids]))
    build_manifest(ManifestConfig(instructions, root / "videos", tmp_path / "m"))
    cfg = ExtractConfig(manifest=tmp_path / "m", store=tmp_path / "vitb.zarr", encoder="ViT-B-16", pretrained="none",
                        frames=2, batch_size=4)
    summary = extract(cfg)
    assert (summary.ok, summary.failed) == (2, 0)
    g = zarr.open_group(tmp_path / "vitb.zarr", mode="r")
    assert g["tokens"].shape == (2, 2, 197, 768)
    assert np.isfinite(g["tokens"][:].astype(np.float32)).all() and np.abs(g["tokens"][:]).max() > 0


def test_hand_edited_rows_that_leave_the_video_root_are_refused(tmp_path):
    """videos.jsonl edited after the build: a `..` path and a symlink inside the root that
    points out. Both rows fail with the reason; the file outside is never decoded."""
    root = tmp_path / "videos"
    root.mkdir()
    for video_id in ("a", "b", "c"):
        _write_video(root / f"{video_id}.mp4", 10)
    instructions = tmp_path / "i.json"
    instructions.write_text(json.dumps([{"q": "q?", "a": "a.", "video_id": v} for v in ("a", "b", "c")]))
    build_manifest(ManifestConfig(instructions, root, tmp_path / "m"))
    _write_video(tmp_path / "outside.mp4", 10)
    (root / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    rows = [json.loads(line) for line in (tmp_path / "m" / "videos.jsonl").read_text().splitlines()]
    rows[1]["path"], rows[2]["path"] = "../outside.mp4", "link.mp4"
    (tmp_path / "m" / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _extract(tmp_path / "m", tmp_path / "s.zarr")
    assert (summary.ok, summary.failed) == (1, 2)
    failures = _failures(tmp_path / "s.zarr")
    assert "escapes the video root" in failures["b"] and "points outside the video root" in failures["c"], failures
