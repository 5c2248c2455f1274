"""Store safety without Ray (issue 11, points 4, 5, 9): the done rule survives a crash in the
middle of a shard rewrite, leases keep jobs apart and expire, and the format module stays light.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from manifests.manifest import VideoEntry
from pipeline.lease import LeaseLost, ShardLease
from pipeline.storage import StoreLocation
from pipeline.store import ShardResult, open_or_create, read_commit, write_shard
from pipeline.store_format import FAILED, OK, encoder_fingerprint, is_done, rows_sha256

ROOT = Path(__file__).resolve().parents[1]
ENCODER = {"model": "stand-in", "pretrained": "none", "weights_sha256": "0" * 64, "image_size": 8, "mean": [0.5] * 3,
           "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "shortest", "precision": "fp32", "layer": -1,
           "tokens_per_frame": 2, "width": 3}


def _attrs(n_rows: int = 10, shard_size: int = 4) -> dict:
    return {"format_version": 1, "encoder": ENCODER, "encoder_fingerprint": encoder_fingerprint(ENCODER),
            "frames": 2, "sampling": "uniform", "token_layout": "cls+patches", "tokens_per_frame": 2, "width": 3,
            "manifest_id": "m", "manifest_fingerprint": "f", "shard_size": shard_size, "n_rows": n_rows}


def _result(shard: int, attrs: dict, value: float) -> ShardResult:
    start = shard * attrs["shard_size"]
    n = min(attrs["shard_size"], attrs["n_rows"] - start)
    status = np.full(n, OK, dtype=np.uint8)
    status[0] = FAILED
    tokens = np.full((n, 2, 2, 3), value, dtype=np.float16)
    tokens[0] = 0
    return ShardResult(shard, start, tokens, np.tile(np.arange(2, dtype=np.int32), (n, 1)),
                       np.full(n, 5, dtype=np.int32), status, [{"row": start, "video_id": "v", "reason": "bad"}])


def _rows(shard: int, tag: str) -> str:
    return rows_sha256([VideoEntry(shard * 4 + i, f"v{i}", f"v{i}.mp4", 1, tag, shard, "train") for i in range(4)])


def test_a_crash_while_rewriting_a_shard_never_leaves_it_done(tmp_path):
    """The rebuild rule: the commit record is withdrawn before the arrays are touched."""
    location = StoreLocation(tmp_path / "s.zarr")
    attrs = _attrs()
    group = open_or_create(location, attrs)
    write_shard(group, location, attrs, _result(1, attrs, 1.0), _rows(1, "a"), "node-a")
    assert is_done(read_commit(location, 1), attrs, _rows(1, "a"))

    class Crash(Exception):
        pass

    class CrashingGroup:  # the tokens are rewritten, then the process "dies" before frame_index
        def __getitem__(self, name):
            if name == "frame_index":
                raise Crash
            return group[name]

    with pytest.raises(Crash):
        write_shard(CrashingGroup(), location, attrs, _result(1, attrs, 2.0), _rows(1, "a"), "node-a")
    assert read_commit(location, 1) is None, "a half-rewritten shard still has its old commit record"
    write_shard(group, location, attrs, _result(1, attrs, 2.0), _rows(1, "a"), "node-b")
    commit = read_commit(location, 1)
    assert is_done(commit, attrs) and commit["node"] == "node-b"
    assert zarr.open_group(str(location), mode="r")["tokens"][5, 0, 0, 0] == 2.0


def test_a_torn_or_foreign_commit_record_is_not_done(tmp_path):
    location = StoreLocation(tmp_path / "s.zarr")
    attrs = _attrs()
    group = open_or_create(location, attrs)
    commit = write_shard(group, location, attrs, _result(0, attrs, 1.0), _rows(0, "a"), "n")
    assert not is_done(commit, attrs, _rows(0, "changed file"))
    assert not is_done(commit, {**attrs, "encoder_fingerprint": "other"})
    text = (tmp_path / "s.zarr" / "commits" / "shard-000000.json").read_text()
    (tmp_path / "s.zarr" / "commits" / "shard-000000.json").write_text(text[: len(text) // 2])
    assert read_commit(location, 0) is None


def test_a_lease_keeps_a_second_job_out_until_it_expires(tmp_path):
    location = StoreLocation(tmp_path / "s.zarr")
    first = ShardLease(location, 3, owner="job-1", node="n1", ttl_s=1.0)
    second = ShardLease(location, 3, owner="job-2", node="n2", ttl_s=1.0)
    assert first.acquire() is None
    held = second.acquire()
    assert held is not None and "job-1" in held and "n1" in held
    assert ShardLease(location, 4, owner="job-2").acquire() is None, "another shard is free"
    time.sleep(1.2)  # job-1 died: it stopped renewing
    assert second.acquire() is None
    with pytest.raises(LeaseLost):
        first.check()
    second.check()
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "leases" / "shard-000003").iterdir()) == \
        ["0.json", "1.json"], "a generation is never reused nor deleted"


def test_a_kept_lease_outlives_its_expiry_and_is_released(tmp_path):
    location = StoreLocation(tmp_path / "s.zarr")
    lease = ShardLease(location, 0, owner="job-1", ttl_s=0.6)
    assert lease.acquire() is None
    with lease.kept():
        time.sleep(1.5)
        assert ShardLease(location, 0, owner="job-2", ttl_s=0.6).acquire() is not None
        lease.check()
    assert ShardLease(location, 0, owner="job-2", ttl_s=0.6).acquire() is None, "released at the end"


def test_exactly_one_of_many_racing_jobs_takes_a_shard(tmp_path):
    location = StoreLocation(tmp_path / "s.zarr")
    ShardLease(location, 0, owner="dead", ttl_s=0.01).acquire()
    time.sleep(0.05)
    results: dict[int, str | None] = {}
    barrier = threading.Barrier(12)

    def race(i: int) -> None:
        barrier.wait()
        results[i] = ShardLease(location, 0, owner=f"job-{i}", ttl_s=30).acquire()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is None for r in results.values()) == 1, results


def test_the_format_module_status_and_a_fast_rerun_import_neither_torch_nor_ray():
    code = ("import sys; import pipeline.store_format, pipeline.inspect, pipeline.extract; "
            "print(sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []
