"""The life of one shard on a worker, whatever runs it (Ray or this machine's processes).

`take_shard` is the whole lifecycle: take the shard's lease (`pipeline.lease`), skip it if
another job committed it meanwhile, fill a `ShardBuffer` with every row's outcome (the
distributor's `fill`: decodes and encodes), check the lease is still held, write the shard and
then its commit record (`pipeline.store.write_shard`). The rules (failed rows keep zero tokens
and a reason; every row ends ok or failed) live here too, so the distributors
(`pipeline.distributed`, `pipeline.local`) are loops of scheduling decisions. Without a
distributor the stages are two calls: `pipeline.decode.decode_file` then
`pipeline.encoder.Encoder.encode` (as `chat --video` and the benchmarks use them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from manifests.manifest import UnsafePath, VideoEntry, video_location
from pipeline.decode import DecodedVideo, DecodeSpec, decode_file
from pipeline.errors import DecodeError, StorageError
from pipeline.lease import DEFAULT_TTL_S, ShardLease
from pipeline.storage import StoreLocation, local_copy
from pipeline.store import ShardResult, open_group, read_commit, write_shard
from pipeline.store_format import FAILED, OK, is_done


# a decode whose process died (killed by the kernel's OOM killer or by hand, its Ray node lost)
# is tried this many more times; a video that crashes its decoder every time is then recorded
DECODE_RETRIES = 1

@dataclass(frozen=True)
class ShardJob:
    """What every shard of one run needs to know (small: sent with each shard task)."""

    store: str  # path or URL
    attrs: dict[str, Any]  # the store's attributes
    video_root: str  # path or URL
    decode: DecodeSpec
    batch_size: int  # frames per encoder forward
    timeout_s: float  # per-video decode deadline, from the decode's start
    decodes_per_shard: int
    job_id: str
    redo: bool = False  # rewrite shards that are done (rebuild); else a done shard is left alone
    lease_ttl_s: float = DEFAULT_TTL_S

    @property
    def videos_per_batch(self) -> int:
        return max(1, self.batch_size // self.decode.frames)


@dataclass
class ShardOutcome:
    """What a shard's worker tells the driver: counts and the node, or who holds the shard, or
    that another job committed it meanwhile."""

    shard: int
    ok: int = 0
    failed: int = 0
    node: str = ""
    held_by: str | None = None
    done_elsewhere: bool = False


class ShardBuffer:
    """Outcomes of the rows of one shard, in any order."""

    def __init__(self, shard: int, entries: list[VideoEntry], frames: int, tokens_per_frame: int, width: int) -> None:
        self.shard = shard
        self.entries = entries
        self.start = entries[0].row
        n = len(entries)
        self.tokens = np.zeros((n, frames, tokens_per_frame, width), dtype=np.float16)
        self.frame_index = np.zeros((n, frames), dtype=np.int32)
        self.n_frames = np.zeros(n, dtype=np.int32)
        self.status = np.zeros(n, dtype=np.uint8)
        self.failures: dict[int, str] = {}

    def put(self, row: int, tokens: np.ndarray, frame_index: np.ndarray, n_frames: int) -> None:
        i = row - self.start
        self.tokens[i] = tokens
        self.frame_index[i] = frame_index
        self.n_frames[i] = n_frames
        self.status[i] = OK

    def fail(self, row: int, reason: str) -> None:
        self.failures[row] = reason
        self.status[row - self.start] = FAILED

    def result(self) -> ShardResult:
        failures = [{"row": row, "video_id": self.entries[row - self.start].video_id, "reason": reason}
                    for row, reason in sorted(self.failures.items())]
        return ShardResult(self.shard, self.start, self.tokens, self.frame_index, self.n_frames, self.status, failures)


def decode_entry(video_root: str, entry: VideoEntry, spec: DecodeSpec) -> DecodedVideo | str:
    """Decode one manifest row (under a local folder or an fsspec URL, spooled to local disk
    first); a bad file, or one that cannot be fetched, gives its reason instead of raising. A
    reason names the file where it lies (the URL, not the spooled copy)."""
    try:
        location = str(video_location(video_root, entry.path))
    except UnsafePath as err:  # a hand-edited videos.jsonl: never read
        return str(err)
    path = None
    try:
        with local_copy(location) as path:
            return decode_file(path, entry.kind, spec)
    except FileNotFoundError:
        return "file not found"
    except StorageError as err:
        return f"cannot fetch the file: {err}"
    except DecodeError as err:
        return str(err) if path is None else str(err).replace(str(path), location)


def take_shard(job: ShardJob, shard: int, entries: list[VideoEntry], rows_sha: str, node: str,
               fill: Callable[[list[VideoEntry], ShardBuffer], None]) -> ShardOutcome:
    """Lease, fill (the distributor's decodes and encodes), write and commit one shard."""
    location = StoreLocation(job.store)
    lease = ShardLease(location, shard, job.job_id, node, job.lease_ttl_s)
    held_by = lease.acquire()
    if held_by is not None:
        return ShardOutcome(shard, held_by=held_by)
    with lease.kept():
        attrs = job.attrs
        if not job.redo and is_done(read_commit(location, shard), attrs, rows_sha):
            return ShardOutcome(shard, node=node, done_elsewhere=True)
        buffer = ShardBuffer(shard, entries, attrs["frames"], attrs["tokens_per_frame"], attrs["width"])
        fill(entries, buffer)
        result = buffer.result()
        lease.check()
        write_shard(open_group(location, "r+"), location, attrs, result, rows_sha, node)
    return ShardOutcome(shard, ok=int((result.status == OK).sum()), failed=len(result.failures), node=node)
