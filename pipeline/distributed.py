"""The Ray distributor (`--ray-address`): the only module of the project that imports Ray.

The shard is the unit of work end to end (as in img2dataset and video2dataset). The driver
only schedules shards and reads their small outcomes (`pipeline.schedule`); no frame or token
passes through it. Each shard is taken by one worker-side task, `extract_shard`, which runs
`pipeline.shard.take_shard` on the node Ray picked:

1. takes the shard's lease (another job holding it sends the shard back to the driver, which
   tries again later or finds it committed by that job),
2. decodes its videos as CPU tasks, at most `decodes_per_shard` at a time. A decode task first
   reports that it has started, and its deadline runs from then, so a healthy video queued
   behind busy workers is never killed; past the deadline the task's worker process is killed
   (decord can loop forever in native code) and the row recorded as timed out. A worker that
   crashes is a failed row too (a bad video is data, not a transient error).
3. sends the decoded frames (by reference: they go from the decoder's node to the encoder's,
   never through the driver) to the encoder pool: one actor per GPU, or a CPU actor per node.
   An actor merges the requests of all shards that reach it into batches of `batch_size`
   frames, so batches span videos and shards. A dead actor is restarted by Ray and the request
   retried; if the shard still fails, the driver retries the shard, and at worst leaves it
   pending with a one-line reason.
4. writes the whole shard and then its commit record, naming its node (`pipeline.store`).

Cores: decoders take every CPU the encoders do not reserve (one per GPU actor; a CPU actor
reserves none and runs its threads beside the decoders, which it outpaces on small towers).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from manifests.manifest import VideoEntry
from pipeline.decode import DecodeSpec
from pipeline.encoder import BatchingEncoder, EncoderSpec, load_encoder
from pipeline.errors import ExtractError
from pipeline.schedule import POLL_S, RunTotals, Task, make_job, one_line_reason, run_shards
from pipeline.shard import DECODE_RETRIES, ShardBuffer, ShardJob, ShardOutcome, decode_entry, take_shard

log = logging.getLogger(__name__)

ENCODE_RETRIES = 3


@dataclass(frozen=True)
class Resources:
    cpus: int
    gpus: int
    nodes: int


@contextmanager
def cluster(address: str) -> Iterator[Resources]:
    """Join the Ray cluster at `address` (auto or HOST:PORT, or local: a new one on this machine);
    reuse a Ray session that is already up (tests start one per session)."""
    started = not ray.is_initialized()
    if started:
        try:
            quiet = {"logging_level": logging.ERROR, "log_to_driver": False}  # outcomes are data, not log lines
            if address == "local":  # never one that `ray start` left running here
                ray.init(address="local", include_dashboard=False, num_cpus=len(os.sched_getaffinity(0)), **quiet)
            else:
                ray.init(address=address, **quiet)
        except ConnectionError as err:
            raise ExtractError(f"cannot reach the Ray cluster at {address!r}: {err}") from err
    try:
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        yield Resources(cpus=int(res.get("CPU", 1)), gpus=int(res.get("GPU", 0)), nodes=max(nodes, 1))
    finally:
        if started:
            ray.shutdown()


def node_name() -> str:
    """This process's Ray node: "IP/node-id" (several nodes can share one IP)."""
    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()}"


@ray.remote(num_cpus=1, max_retries=0)
def _decode(video_root: str, entry: VideoEntry, spec: DecodeSpec):  # noqa: ANN202 - a streaming generator
    """Yields None as soon as it runs (the deadline starts there), then the metadata of the row,
    then its frames (only when it decoded)."""
    yield None
    outcome = decode_entry(video_root, entry, spec)
    if isinstance(outcome, str):
        yield {"error": outcome}
        return
    yield {"frame_index": outcome.frame_index, "n_frames": outcome.n_frames}
    yield outcome.frames


@ray.remote(max_restarts=-1, max_task_retries=ENCODE_RETRIES, max_concurrency=64)
class EncodeActor:
    """One vision tower on one device, serving the `encode` calls of every shard task that
    reaches it in shared batches (`pipeline.encoder.BatchingEncoder`)."""

    def __init__(self, spec: EncoderSpec, fingerprint: str | None, device: str, threads: int, batch_size: int) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        encoder = load_encoder(spec, device)
        if fingerprint is not None and encoder.fingerprint != fingerprint:
            raise ExtractError(f"node {node_name()}: the encoder loaded here is not the store's (other weights "
                               f"in this node's cache?): {encoder.attrs} vs fingerprint {fingerprint}")
        self.batcher = BatchingEncoder(encoder, batch_size)

    def attrs(self) -> dict[str, Any]:
        return self.batcher.encoder.attrs

    def encode(self, *videos: np.ndarray) -> list[np.ndarray]:
        """Frames of several videos, (F, S, S, 3) each -> their tokens, (F, T, D) each."""
        return self.batcher.submit(list(videos)).result()


@ray.remote(num_cpus=0, max_retries=0)
def extract_shard(job: ShardJob, shard: int, entries: list[VideoEntry], rows_sha: str,
                  encoders: list[Any]) -> ShardOutcome:
    """Take, decode, encode, write and commit one shard (see the module docstring)."""
    turn = shard % len(encoders)
    encoders = encoders[turn:] + encoders[:turn]
    return take_shard(job, shard, entries, rows_sha, node_name(),
                      lambda rows, buffer: _decode_and_encode(job, rows, buffer, encoders))


def _decode_and_encode(job: ShardJob, entries: list[VideoEntry], buffer: ShardBuffer, encoders: list[Any]) -> None:
    """Fill `buffer` with every row's outcome: decodes bounded and killable, encodes batched."""
    videos_per_batch = job.videos_per_batch
    todo = deque(entries)
    running: dict[Any, list] = {}  # generator -> [entry, deadline or None, metadata or None]
    decoded: list[tuple[VideoEntry, dict, Any]] = []  # (entry, metadata, frames ref) waiting for an encoder
    encoding: dict[Any, tuple[list, int]] = {}  # ref -> (batch, attempts)
    turn = 0

    def send(batch: list, attempts: int = 0) -> None:
        nonlocal turn
        actor = encoders[turn % len(encoders)]
        turn += 1
        encoding[actor.encode.remote(*[frames for *_, frames in batch])] = (batch, attempts)

    while todo or running or decoded or encoding:
        while todo and len(running) + len(decoded) < job.decodes_per_shard + videos_per_batch \
                and len(running) < job.decodes_per_shard:
            entry = todo.popleft()
            running[_decode.remote(job.video_root, entry, job.decode)] = [entry, None, None, 0]
        if decoded and (len(decoded) >= videos_per_batch or not (todo or running)) and len(encoding) < 2:
            send(decoded[:videos_per_batch])
            del decoded[:videos_per_batch]

        ready, _ = ray.wait([*running, *encoding], num_returns=1, timeout=POLL_S)
        for ref in ready:
            if ref in encoding:
                batch, attempts = encoding.pop(ref)
                try:
                    tokens = ray.get(ref)
                except ray.exceptions.RayError:
                    if attempts + 1 >= ENCODE_RETRIES:
                        raise
                    send(batch, attempts + 1)
                    continue
                for (entry, meta, _), video_tokens in zip(batch, tokens):
                    buffer.put(entry.row, video_tokens, meta["frame_index"], meta["n_frames"])
            else:
                _advance(ref, running, decoded, buffer, job)
        now = time.monotonic()
        for gen, (entry, deadline, *_) in list(running.items()):
            if deadline is not None and now > deadline:
                ray.cancel(gen, force=True)
                del running[gen]
                buffer.fail(entry.row, f"decode timed out after {job.timeout_s:g} s (killed)")


def _advance(gen: Any, running: dict, decoded: list, buffer: ShardBuffer, job: ShardJob) -> None:
    """Take the next item a decode generator yielded: started, metadata, or frames (kept as a
    reference: the frames go from the decoder to the encoder without passing through here)."""
    state = running[gen]
    entry, tries = state[0], state[3]
    try:
        ref = next(gen)
        item = ray.get(ref) if state[2] is None else ref
    except StopIteration:  # a failed row's generator ends after its metadata
        del running[gen]
        return
    except ray.exceptions.RayError as err:  # the worker died: killed, its node lost, a crash in native code
        del running[gen]
        if tries < DECODE_RETRIES:
            running[_decode.remote(job.video_root, entry, job.decode)] = [entry, None, None, tries + 1]
        else:
            buffer.fail(entry.row, f"decoder crashed: {type(err).__name__} ({tries + 1} times)")
        return
    if state[1] is None:
        state[1] = time.monotonic() + job.timeout_s
    elif state[2] is None:
        state[2] = item
        if "error" in item:
            buffer.fail(entry.row, item["error"])
    else:
        del running[gen]
        decoded.append((entry, state[2], item))


class RayDistributor:
    """Extraction on the Ray cluster at `address` (see the module docstring), with the same
    interface as `pipeline.local.LocalDistributor`. Use as a context manager."""

    def __init__(self, address: str, decoders: int | None, encoder_threads: int | None, batch_size: int) -> None:
        self.address = address
        self.decoders = decoders
        self.encoder_threads = encoder_threads
        self.batch_size = batch_size
        self.encoders: list[Any] = []
        self._session = cluster(address)

    def __enter__(self) -> RayDistributor:
        self.res = self._session.__enter__()
        self.gpus = self.res.gpus
        self.slots = self.decoders or max(1, self.res.cpus - self.res.gpus)  # every CPU not held by a GPU actor
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.__exit__(*exc)

    def warm_up(self, video_root: str, entries: Iterable[VideoEntry], spec: DecodeSpec) -> None:
        """Nothing: on Ray the decodes start with the shard tasks (the interface is the local one's)."""

    def load_encoders(self, spec: EncoderSpec, fingerprint: str | None) -> dict[str, Any] | None:
        """One encoder actor per GPU, or one CPU actor per node (reserving no CPUs; see the module
        docstring); each proves it loaded the weights with `fingerprint`. For a new store (None)
        returns what the actors loaded, which must agree; else the actors load while shards start.
        Ray restarts a dead one."""
        res = self.res
        if res.gpus:
            self.encoders = [EncodeActor.options(num_gpus=1, num_cpus=1).remote(spec, fingerprint, "cuda", 1,
                                                                                self.batch_size)
                             for _ in range(res.gpus)]
        else:
            threads = self.encoder_threads or max(1, res.cpus // res.nodes)
            self.encoders = [EncodeActor.options(num_cpus=0, scheduling_strategy="SPREAD").remote(
                spec, fingerprint, "cpu", threads, self.batch_size) for _ in range(res.nodes)]
        if fingerprint is not None:
            return None
        try:
            loaded = ray.get([actor.attrs.remote() for actor in self.encoders])
        except ray.exceptions.RayError as err:
            raise ExtractError(f"the encoder could not be loaded: {one_line_reason(err)}") from err
        if any(attrs != loaded[0] for attrs in loaded):
            raise ExtractError("the encoder actors loaded different weights (other weights in some node's cache?)")
        return loaded[0]

    def run(self, template: dict[str, Any], shards: Iterable[Task], n_videos: int,
            committed_elsewhere: Callable[[int, str], bool]) -> RunTotals:
        """Extract `shards` as Ray tasks, enough of them in flight to fill every decode slot."""
        job, max_open = make_job(template, self.slots)
        log.info("%d decode slots, %d shard tasks at a time, %d encoder(s)", self.slots, max_open, len(self.encoders))
        encoders = self.encoders

        def submit(task: Task):  # noqa: ANN202 - a concurrent.futures.Future
            return extract_shard.options(scheduling_strategy="SPREAD").remote(job, *task, encoders).future()

        return run_shards(submit, shards, n_videos, max_open, committed_elsewhere)
