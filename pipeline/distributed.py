"""Ray orchestration of extraction; the only module of the project that imports Ray.

The shard is the unit of work end to end (as in img2dataset and video2dataset). The driver
only schedules shards and reads their small outcomes; no frame or token passes through it, and
it holds the manifest rows of the shards in flight only, so its memory does not grow with the
corpus. Each shard is taken by one worker-side task, `extract_shard`, which

1. takes the shard's lease (`pipeline.lease`; another job holding it sends the shard back to the
   driver, which tries again later or finds it committed by that job),
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
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from manifests.manifest import VideoEntry
from pipeline.decode import DecodeSpec
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.errors import ExtractError
from pipeline.lease import DEFAULT_TTL_S, ShardLease
from pipeline.shard import ShardBuffer, decode_entry
from pipeline.storage import StoreLocation
from pipeline.store import open_group, read_commit, write_shard
from pipeline.store_format import OK, is_done

log = logging.getLogger(__name__)

POLL_S = 0.2
SHARD_RETRIES = 2  # a shard whose task failed (not its videos: the task) is tried this often again
HELD_RETRY_S = 5.0  # a shard leased by another job is looked at again after this long
RETRY_PAUSE_S = 5.0  # a failed shard is tried again after this long (times the tries so far)
ENCODE_RETRIES = 3


@dataclass(frozen=True)
class Resources:
    cpus: int
    gpus: int
    nodes: int


@dataclass(frozen=True)
class ShardJob:
    """What every shard task of one run needs to know (small, sent with each task)."""

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


@dataclass
class RunTotals:
    shards: int = 0
    shards_by_others: int = 0  # committed meanwhile by another job on the same store
    ok: int = 0
    failed: int = 0
    left: list[str] = field(default_factory=list)  # one line per shard left pending


@dataclass
class ShardOutcome:
    """What a shard task tells the driver: counts and the node, or who holds the shard, or that
    another job committed it meanwhile."""

    shard: int
    ok: int = 0
    failed: int = 0
    node: str = ""
    held_by: str | None = None
    done_elsewhere: bool = False


@contextmanager
def cluster(address: str | None) -> Iterator[Resources]:
    """Join the Ray cluster at `address` (auto or HOST:PORT), or start a local one sized to this
    machine; reuse a Ray session that is already up (tests start one per session)."""
    started = not ray.is_initialized()
    if started:
        try:
            quiet = {"logging_level": logging.ERROR, "log_to_driver": False}  # outcomes are data, not log lines
            if address:
                ray.init(address=address, **quiet)
            else:
                # "local": a new cluster of this machine, never one that `ray start` left running here
                ray.init(address="local", include_dashboard=False, num_cpus=len(os.sched_getaffinity(0)), **quiet)
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
    """One vision tower on one device. `encode` calls from any number of shard tasks are queued
    and served by one thread in batches of up to `batch_size` frames."""

    def __init__(self, spec: EncoderSpec, fingerprint: str | None, device: str, threads: int, batch_size: int) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, device)
        if fingerprint is not None and self.encoder.fingerprint != fingerprint:
            raise ExtractError(f"node {node_name()}: the encoder loaded here is not the store's (other weights "
                               f"in this node's cache?): {self.encoder.attrs} vs fingerprint {fingerprint}")
        self.batch_size = batch_size
        self.requests: queue.Queue[tuple[list[np.ndarray], Future]] = queue.Queue()
        threading.Thread(target=self._serve, name="encode", daemon=True).start()

    def attrs(self) -> dict[str, Any]:
        return self.encoder.attrs

    def encode(self, *videos: np.ndarray) -> list[np.ndarray]:
        """Frames of several videos, (F, S, S, 3) each -> their tokens, (F, T, D) each."""
        done: Future = Future()
        self.requests.put((list(videos), done))
        return done.result()

    def _serve(self) -> None:
        while True:
            batch = [self.requests.get()]
            frames = sum(len(v) for v in batch[0][0])
            while frames < self.batch_size:
                try:
                    batch.append(self.requests.get_nowait())
                except queue.Empty:
                    break
                frames += sum(len(v) for v in batch[-1][0])
            videos = [v for request, _ in batch for v in request]
            try:
                tokens = self.encoder.encode(np.concatenate(videos), self.batch_size)
            except Exception as err:  # noqa: BLE001 - handed to every caller of this batch
                for _, done in batch:
                    done.set_exception(err)
                continue
            out = iter(np.split(tokens, np.cumsum([len(v) for v in videos])[:-1]))
            for request, done in batch:
                done.set_result([next(out) for _ in request])


@ray.remote(num_cpus=0, max_retries=0)
def extract_shard(job: ShardJob, shard: int, entries: list[VideoEntry], rows_sha: str,
                  encoders: list[Any]) -> ShardOutcome:
    """Take, decode, encode, write and commit one shard (see the module docstring)."""
    location = StoreLocation(job.store)
    node = node_name()
    lease = ShardLease(location, shard, job.job_id, node, job.lease_ttl_s)
    held_by = lease.acquire()
    if held_by is not None:
        return ShardOutcome(shard, held_by=held_by)
    with lease.kept():
        attrs = job.attrs
        if not job.redo and is_done(read_commit(location, shard), attrs, rows_sha):
            return ShardOutcome(shard, node=node, done_elsewhere=True)
        buffer = ShardBuffer(shard, entries, attrs["frames"], attrs["tokens_per_frame"], attrs["width"])
        _decode_and_encode(job, entries, buffer, encoders[shard % len(encoders):] + encoders[:shard % len(encoders)])
        result = buffer.result()
        lease.check()
        write_shard(open_group(location, "r+"), location, attrs, result, rows_sha, node)
    return ShardOutcome(shard, ok=int((result.status == OK).sum()), failed=len(result.failures), node=node)


def _decode_and_encode(job: ShardJob, entries: list[VideoEntry], buffer: ShardBuffer, encoders: list[Any]) -> None:
    """Fill `buffer` with every row's outcome: decodes bounded and killable, encodes batched."""
    videos_per_batch = max(1, job.batch_size // job.decode.frames)
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
            running[_decode.remote(job.video_root, entry, job.decode)] = [entry, None, None]
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
                _advance(ref, running, decoded, buffer, job.timeout_s)
        now = time.monotonic()
        for gen, (entry, deadline, _) in list(running.items()):
            if deadline is not None and now > deadline:
                ray.cancel(gen, force=True)
                del running[gen]
                buffer.fail(entry.row, f"decode timed out after {job.timeout_s:g} s (killed)")


def _advance(gen: Any, running: dict, decoded: list, buffer: ShardBuffer, timeout_s: float) -> None:
    """Take the next item a decode generator yielded: started, metadata, or frames (kept as a
    reference: the frames go from the decoder to the encoder without passing through here)."""
    state = running[gen]
    entry = state[0]
    try:
        ref = next(gen)
        item = ray.get(ref) if state[2] is None else ref
    except StopIteration:  # a failed row's generator ends after its metadata
        del running[gen]
        return
    except ray.exceptions.RayError as err:  # the worker died: a crash in native code
        del running[gen]
        buffer.fail(entry.row, f"decoder crashed: {type(err).__name__}")
        return
    if state[1] is None:
        state[1] = time.monotonic() + timeout_s
    elif state[2] is None:
        state[2] = item
        if "error" in item:
            buffer.fail(entry.row, item["error"])
    else:
        del running[gen]
        decoded.append((entry, state[2], item))


def start_encoders(spec: EncoderSpec, fingerprint: str | None, res: Resources, batch_size: int,
                   encoder_threads: int | None) -> list[Any]:
    """One encoder actor per GPU, or one CPU actor per node (reserving no CPUs; see the module
    docstring); each proves it loaded the weights with `fingerprint` (None: a new store, whose
    fingerprint `encoder_attrs` takes from them). Ray restarts a dead one."""
    if res.gpus:
        return [EncodeActor.options(num_gpus=1, num_cpus=1).remote(spec, fingerprint, "cuda", 1, batch_size)
                for _ in range(res.gpus)]
    threads = encoder_threads or max(1, res.cpus // res.nodes)
    return [EncodeActor.options(num_cpus=0, scheduling_strategy="SPREAD").remote(spec, fingerprint, "cpu", threads,
                                                                               batch_size)
            for _ in range(res.nodes)]


def encoder_attrs(encoders: list[Any]) -> dict[str, Any]:
    """What a new store records about the encoder, as the actors loaded it; they must agree."""
    try:
        loaded = ray.get([actor.attrs.remote() for actor in encoders])
    except ray.exceptions.RayError as err:
        raise ExtractError(f"the encoder could not be loaded: {_reason(err)}") from err
    if any(attrs != loaded[0] for attrs in loaded):
        raise ExtractError("the encoder actors loaded different weights (other weights in some node's cache?)")
    return loaded[0]


def decode_slots(res: Resources, decoders: int | None) -> int:
    """Concurrent decodes the cluster can run: every CPU not reserved by a GPU encoder."""
    return decoders or max(1, res.cpus - res.gpus)


def _reason(err: BaseException) -> str:
    """One line for a failed task or actor: the innermost error's type and message (the last
    "...Error: message" line of a remote traceback, else the first line)."""
    cause = getattr(err, "cause", None) or err
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(cause).splitlines()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    if raised:
        kind, message = raised[-1].split(": ", 1)
        return f"{kind.rsplit('.', 1)[-1]}: {message[:200]}"
    return f"{type(cause).__name__}: {next((line for line in lines if line), '')[:200]}"


def run(job_template: dict[str, Any], shards: Iterable[tuple[int, list[VideoEntry], str]], n_videos: int,
        encoders: list[Any], slots: int, committed_elsewhere: Callable[[int, str], bool]) -> RunTotals:
    """Extract `shards` ((shard, rows, rows sha256), read lazily, in order), keeping enough shard
    tasks in flight to fill `slots` decodes. A shard another job holds is looked at again later
    and dropped once `committed_elsewhere`."""
    per_shard = max(1, min(slots, job_template["shard_size"]))
    job = ShardJob(**{k: v for k, v in job_template.items() if k != "shard_size"}, decodes_per_shard=per_shard,
                   job_id=uuid.uuid4().hex[:12])
    max_open = max(2, -(-slots // per_shard) + 1)
    log.info("%d decode slots, %d shard tasks at a time, %d encoder(s)", slots, max_open, len(encoders))
    stream = iter(shards)
    exhausted = False
    later: list[tuple[float, int, list[VideoEntry], str, int]] = []  # (not before, shard, rows, sha, tries)
    running: dict[Any, tuple[int, list[VideoEntry], str, int]] = {}
    totals = RunTotals()
    bar = tqdm(total=n_videos, desc="extract", unit="video", dynamic_ncols=True)

    def next_task() -> tuple[int, list[VideoEntry], str, int] | None:
        nonlocal exhausted
        due = [item for item in later if item[0] <= time.monotonic()]
        if due:
            later.remove(due[0])
            return due[0][1:]
        item = None if exhausted else next(stream, None)
        exhausted = item is None
        return None if item is None else (*item, 0)

    while True:
        while len(running) < max_open and (task := next_task()) is not None:
            ref = extract_shard.options(scheduling_strategy="SPREAD").remote(job, *task[:3], encoders)
            running[ref] = task
        if not running:
            if not later:
                break
            time.sleep(POLL_S)
            continue
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        for ref in ready:
            shard, rows, sha, tries = running.pop(ref)
            try:
                outcome: ShardOutcome = ray.get(ref)
            except ray.exceptions.RayError as err:
                reason = _reason(err)
                if tries < SHARD_RETRIES:  # after a pause: a dead actor takes a while to restart
                    log.warning("shard %d failed (%s); trying it again", shard, reason)
                    later.append((time.monotonic() + RETRY_PAUSE_S * (tries + 1), shard, rows, sha, tries + 1))
                else:
                    totals.left.append(f"shard {shard}: left pending after {tries + 1} tries: {reason}")
                continue
            if outcome.done_elsewhere or (outcome.held_by is not None and committed_elsewhere(shard, sha)):
                totals.shards_by_others += 1
                bar.update(len(rows))
                continue
            if outcome.held_by is not None:  # not committed by its holder yet: look again later
                later.append((time.monotonic() + HELD_RETRY_S, shard, rows, sha, tries))
                bar.set_postfix_str(f"shard {shard} held by {outcome.held_by}")
                continue
            totals.shards += 1
            totals.ok += outcome.ok
            totals.failed += outcome.failed
            bar.update(outcome.ok + outcome.failed)
            bar.set_postfix(failed=totals.failed)
    bar.close()
    return totals
