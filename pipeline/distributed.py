"""Ray orchestration of extraction; the only module of the project that imports Ray.

Ray core, not Ray Data. What this job needs is (1) a deadline per video with a hard kill of the
decoder that missed it (decord can loop forever in native code; `ray.cancel(force=True)` kills
the worker process, and a segfault in a worker is just a failed task), (2) rows regrouped into
whole shards for one writer, and (3) memory in flight bounded by a fixed number of open shards
whatever the corpus size. Ray Data streams rows well but has no per-row timeout or kill, and its
output blocks do not line up with shards; with core tasks and actors all three are a short loop.

Data flow: the driver keeps at most `decoders` decode tasks running (CPU tasks, one video
each, `max_retries=0`: a bad video is data, not a transient error). A finished decode leaves its
frames in the object store; the driver only sees the small metadata. Frames of several videos
are sent to an encoder actor as one batch (one actor per GPU, or one CPU actor), at most two
batches queued per actor so the encoder never waits. Encoded tokens come back to the driver,
which fills one `ShardBuffer` per open shard and hands each complete shard to `write`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from manifests.manifest import VideoEntry
from pipeline.decode import DecodeSpec
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.errors import ExtractError
from pipeline.shard import ShardBuffer, decode_entry
from pipeline.store import ShardResult

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 2  # shards whose rows are in flight at once: bounds the driver's memory
BATCHES_PER_ACTOR = 2  # encode batches queued per actor: one running, one ready
POLL_S = 0.5


@dataclass(frozen=True)
class Resources:
    cpus: int
    gpus: int


@dataclass
class Plan:
    """One extraction run: which shards, how to decode and encode them, how wide to go."""

    video_root: Path
    shards: list[tuple[int, list[VideoEntry]]]
    decode: DecodeSpec
    encoder: EncoderSpec
    encoder_fingerprint: str
    tokens_per_frame: int
    width: int
    batch_size: int = 256  # frames per encoder forward
    decoders: int | None = None  # concurrent decode tasks; None: from the cluster's CPUs
    timeout_s: float = 120.0  # per-video decode deadline


@contextmanager
def cluster(address: str | None, temp_dir: Path | None = None) -> Iterator[Resources]:
    """Join the Ray cluster at `address` (auto or HOST:PORT), or start a local one sized to this
    machine; reuse a Ray session that is already up (tests start one per session)."""
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, num_cpus=os.cpu_count(),
                         _temp_dir=str(temp_dir) if temp_dir else None)
        except ConnectionError as err:
            raise ExtractError(f"cannot reach the Ray cluster at {address!r}: {err}") from err
    try:
        res = ray.cluster_resources()
        yield Resources(cpus=int(res.get("CPU", 1)), gpus=int(res.get("GPU", 0)))
    finally:
        if started:
            ray.shutdown()


@ray.remote(num_returns=2, max_retries=0)
def _decode(video_root: Path, entry: VideoEntry, spec: DecodeSpec) -> tuple[dict, np.ndarray | None]:
    """(metadata, frames) of one row; a bad file gives ({"error": reason}, None)."""
    outcome = decode_entry(video_root, entry, spec)
    if isinstance(outcome, str):
        return {"error": outcome}, None
    return {"frame_index": outcome.frame_index, "n_frames": outcome.n_frames}, outcome.frames


@ray.remote(max_restarts=2, max_task_retries=2)
class EncodeActor:
    """Holds one vision tower on one device; checks it loaded the weights the driver expects."""

    def __init__(self, spec: EncoderSpec, device: str, fingerprint: str, threads: int) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, device)
        if self.encoder.fingerprint != fingerprint:
            raise ExtractError(f"{ray.util.get_node_ip_address()}: the encoder loaded here differs from the driver's "
                               "(other weights in this node's cache?)")

    def encode(self, batch_size: int, *videos: np.ndarray) -> list[np.ndarray]:
        """Frames of several videos, (F, S, S, 3) each, encoded together -> (F, T, D) each."""
        tokens = self.encoder.encode(np.concatenate(videos), batch_size)
        bounds = np.cumsum([len(v) for v in videos])[:-1]
        return np.split(tokens, bounds)


def run(plan: Plan, res: Resources, write: Callable[[ShardResult], None]) -> dict[str, int]:
    """Extract `plan.shards`, calling `write` with each complete shard. Returns row counts."""
    F = plan.decode.frames
    if res.gpus:
        actors = [EncodeActor.options(num_gpus=1, num_cpus=1).remote(plan.encoder, "cuda", plan.encoder_fingerprint, 1)
                  for _ in range(res.gpus)]
        decoders = plan.decoders or max(1, res.cpus - res.gpus)
    else:
        decoders = plan.decoders or max(1, res.cpus // 4)
        threads = max(1, res.cpus - decoders)
        actors = [EncodeActor.options(num_cpus=threads).remote(plan.encoder, "cpu", plan.encoder_fingerprint, threads)]
    videos_per_batch = max(1, plan.batch_size // F)
    log.info("extracting %d shards: %d decoders, %d %s encoder(s)", len(plan.shards), decoders, len(actors),
             "GPU" if res.gpus else "CPU")

    todo = deque((shard, entry) for shard, entries in plan.shards for entry in entries)
    entries_of = dict(plan.shards)
    buffers: dict[int, ShardBuffer] = {}
    decoding: dict[ray.ObjectRef, tuple[int, VideoEntry, ray.ObjectRef, float]] = {}
    ready: list[tuple[int, VideoEntry, dict, ray.ObjectRef]] = []  # decoded, waiting for an encoder
    encoding: dict[ray.ObjectRef, tuple[int, list[tuple[int, VideoEntry, dict, ray.ObjectRef]]]] = {}
    load = [0] * len(actors)
    counts = {"ok": 0, "failed": 0}
    bar = tqdm(total=len(todo), desc="extract", unit="video", dynamic_ncols=True)

    def can_decode() -> bool:
        return bool(todo) and (todo[0][0] in buffers or len(buffers) < MAX_OPEN_SHARDS)

    def fail(shard: int, entry: VideoEntry, reason: str) -> None:
        buffers[shard].fail(entry.row, reason)
        counts["failed"] += 1
        bar.update(1)
        bar.set_postfix(failed=counts["failed"])

    while todo or decoding or ready or encoding:
        while can_decode() and len(decoding) < decoders and len(ready) < 2 * videos_per_batch * len(actors):
            shard, entry = todo.popleft()
            if shard not in buffers:
                buffers[shard] = ShardBuffer(shard, entries_of[shard], F, plan.tokens_per_frame, plan.width)
            meta_ref, frames_ref = _decode.remote(plan.video_root, entry, plan.decode)
            decoding[meta_ref] = (shard, entry, frames_ref, time.monotonic() + plan.timeout_s)

        flush = not decoding and not can_decode()  # nothing more will arrive before these are encoded
        while ready and (len(ready) >= videos_per_batch or flush) and min(load) < BATCHES_PER_ACTOR:
            actor = load.index(min(load))
            batch, ready = ready[:videos_per_batch], ready[videos_per_batch:]
            ref = actors[actor].encode.remote(plan.batch_size, *[frames for *_, frames in batch])
            encoding[ref] = (actor, batch)
            load[actor] += 1

        waiting = [*decoding, *encoding]
        done, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S) if waiting else ([], [])
        for ref in done:
            if ref in decoding:
                shard, entry, frames_ref, _ = decoding.pop(ref)
                try:
                    meta = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died: a crash in native code
                    fail(shard, entry, f"decoder crashed: {type(err).__name__}")
                    continue
                if "error" in meta:
                    fail(shard, entry, meta["error"])
                else:
                    ready.append((shard, entry, meta, frames_ref))
            else:
                actor, batch = encoding.pop(ref)
                load[actor] -= 1
                for (shard, entry, meta, _), tokens in zip(batch, ray.get(ref)):
                    buffers[shard].put(entry.row, tokens, meta["frame_index"], meta["n_frames"])
                    counts["ok"] += 1
                    bar.update(1)

        now = time.monotonic()
        for ref, (shard, entry, _, deadline) in list(decoding.items()):
            if now > deadline:
                ray.cancel(ref, force=True)
                del decoding[ref]
                fail(shard, entry, f"decode timed out after {plan.timeout_s:g} s (killed)")

        for shard in [s for s, b in buffers.items() if b.complete]:
            write(buffers.pop(shard).result())
    bar.close()
    for actor in actors:
        ray.kill(actor)
    return counts
