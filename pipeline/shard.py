"""A shard in the making: per-row outcomes collected, then one `ShardResult` for the writer.

The rules (failed rows keep zero tokens and a reason; every row ends ok or failed) live here,
apart from Ray, so the orchestrator stays a loop of scheduling decisions. Without Ray the stages
are two calls: `pipeline.decode.decode_file` then `pipeline.encoder.Encoder.encode` (as
`chat --video` and the benchmarks use them).
"""

from __future__ import annotations

import numpy as np

from manifests.manifest import VideoEntry, video_location
from pipeline.decode import DecodedVideo, DecodeSpec, decode_file
from pipeline.errors import DecodeError, StorageError
from pipeline.storage import local_copy
from pipeline.store import ShardResult
from pipeline.store_format import FAILED, OK


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

    @property
    def complete(self) -> bool:
        return bool((self.status != 0).all())

    def result(self) -> ShardResult:
        failures = [{"row": row, "video_id": self.entries[row - self.start].video_id, "reason": reason}
                    for row, reason in sorted(self.failures.items())]
        return ShardResult(self.shard, self.start, self.tokens, self.frame_index, self.n_frames, self.status, failures)


def decode_entry(video_root: str, entry: VideoEntry, spec: DecodeSpec) -> DecodedVideo | str:
    """Decode one manifest row (under a local folder or an fsspec URL, spooled to local disk
    first); a bad file, or one that cannot be fetched, gives its reason instead of raising. A
    reason names the file where it lies (the URL, not the spooled copy)."""
    location = str(video_location(video_root, entry.path))
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
