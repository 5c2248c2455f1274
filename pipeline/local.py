"""The one-machine distributor (no `--ray-address`): decoder processes and in-process encoders.

What img2dataset calls its multiprocessing distributor. Ray's daemons, worker start-up and
task and object bookkeeping cost a small machine dearly (on 2 cores the same job took 44.9 s on
Ray, 31.3 s here: bench/extract_speed.py), so on one machine the same shard lifecycle (`pipeline.shard.take_shard`: lease, decode, encode,
write, commit) runs here on plain processes and threads:

- decoders: one process per core the encoders do not reserve (every core on a CPU-only
  machine, one fewer per GPU), each a fresh interpreter (`pipeline.decoder_process`) decoding one
  video at a time and sending its F cropped uint8 frames back through a socket; they start first
  and decode the first rows while torch and the tower load. A decode's deadline runs from
  the moment it is handed to a started process (one that has imported its libraries), so
  neither a video queued behind busy decoders nor one handed to a replacement is killed early;
  past it the process is killed (decord can loop forever in native code) and replaced, and the
  row recorded as timed out. A decoder that dies (killed, or a crash in native code) is
  replaced and the video tried once more (`DECODE_RETRIES`); a second death fails the row.
- encoders: one `BatchingEncoder` per GPU, or one on the CPU running its torch threads beside
  the decoders, serving every shard's requests in shared batches.
- shards: each open shard is a thread of this process running `take_shard`; the driver loop
  (`pipeline.schedule.run_shards`) is the same as on Ray.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from manifests.manifest import VideoEntry
from pipeline.decode import DecodedVideo, DecodeSpec
from pipeline.encoder import BatchingEncoder, EncoderSpec, load_encoder
from pipeline.errors import ExtractError
from pipeline.schedule import RunTotals, Task, make_job, run_shards
from pipeline.shard import DECODE_RETRIES, ShardBuffer, ShardJob, take_shard

log = logging.getLogger(__name__)

DecodeRequest = tuple[str, VideoEntry, DecodeSpec]  # (video root, row, spec)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
HUNG, DIED = object(), object()  # what a decoder process gave instead of an outcome
STARTUP_S = 120.0  # a decoder process's imports take 1-3 s, longer on a busy machine
PREFETCH_MAX = 256  # rows decoded at most while the encoders load (2-10 s)


class DecodePool:
    """`n` decoder processes (`pipeline.decoder_process`); `submit` returns a future of a
    `DecodedVideo` or a failure reason. One thread here per process hands it one request at a
    time and keeps its deadline. `prefetch` queues requests before anyone asks for them (the
    first rows, while the encoder loads); `submit` of the same request then takes that future."""

    def __init__(self, n: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.requests: queue.Queue[tuple[DecodeRequest, Future] | None] = queue.Queue()
        self.prefetched: dict[DecodeRequest, Future] = {}
        self.lock = threading.Lock()
        self.retiring = 0
        self.closing = False
        self.processes: list[subprocess.Popen | None] = [None] * n
        self.slots = [threading.Thread(target=self._slot, args=(i,), name=f"decoder-{i}", daemon=True)
                      for i in range(n)]
        for slot in self.slots:
            slot.start()

    def submit(self, request: DecodeRequest) -> Future:
        with self.lock:
            done = self.prefetched.pop(request, None)
        if done is None:
            done = Future()
            self.requests.put((request, done))
        return done

    def prefetch(self, requests: list[DecodeRequest]) -> None:
        for request in requests:
            done: Future = Future()
            with self.lock:
                self.prefetched[request] = done
            self.requests.put((request, done))

    def retire(self, n: int) -> None:
        """Let `n` decoders end after their current video (their cores go to GPU encoders)."""
        with self.lock:
            self.retiring += min(n, len(self.slots) - 1)

    def close(self) -> None:
        """Drop the requests nobody took (unused prefetches), kill every decoder, even one
        mid-video, and end the threads."""
        self.closing = True
        while True:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        for _ in self.slots:
            self.requests.put(None)
        for process in self.processes:
            if process is not None:
                process.kill()
        for slot in self.slots:
            slot.join()
        self.prefetched.clear()

    def _retires(self) -> bool:
        with self.lock:
            if self.retiring:
                self.retiring -= 1
                return True
            return False

    def _start(self, i: int) -> Connection:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        self.processes[i] = subprocess.Popen(
            [sys.executable, "-m", "pipeline.decoder_process", str(theirs.fileno())], pass_fds=[theirs.fileno()],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # reasons: socket
        theirs.close()
        conn = Connection(ours.detach())
        try:  # pipeline.decoder_process.READY: its imports are done
            started = conn.poll(STARTUP_S) and conn.recv() is not None
        except (EOFError, OSError):
            started = False
        if not started:  # killed, so that its first request is DIED (a late READY must never be
            self.processes[i].kill()  # taken for that request's answer)
        return conn

    def _stop(self, i: int, conn: Connection) -> int:
        """Kill slot i's process (whatever it is doing); its exit code."""
        conn.close()
        process = self.processes[i]
        process.kill()
        return process.wait()

    def _slot(self, i: int) -> None:
        conn = self._start(i)
        try:
            while not self._retires() and (item := self.requests.get()) is not None:
                request, done = item
                for attempt in range(DECODE_RETRIES + 1):
                    outcome = self._decode(conn, request)
                    if self.closing or not (outcome is HUNG or outcome is DIED):
                        break
                    code = self._stop(i, conn)  # replace the process
                    conn = self._start(i)
                    if outcome is HUNG:  # a hang would hang again
                        outcome = f"decode timed out after {self.timeout_s:g} s (killed)"
                        break
                    outcome = f"decoder crashed (exit code {code}, {attempt + 1} times)"
                if self.closing:
                    done.cancel()
                    break
                done.set_result(outcome)
        finally:
            self._stop(i, conn)

    def _decode(self, conn: Connection, request: DecodeRequest) -> DecodedVideo | str | object:
        """The row's outcome, or HUNG (no answer by the deadline) or DIED (the process ended)."""
        try:
            conn.send(request)
            if conn.poll(self.timeout_s):  # also true when the process died: recv raises then
                return conn.recv()
            return HUNG
        except (EOFError, OSError):
            return DIED


def _decode_and_encode(job: ShardJob, entries: list[VideoEntry], buffer: ShardBuffer, pool: DecodePool,
                       encoder: BatchingEncoder) -> None:
    """Fill `buffer` with every row's outcome: at most `decodes_per_shard` decodes at a time,
    decoded videos sent to the encoder in batches."""
    todo = deque(entries)
    decoding: dict[Future, VideoEntry] = {}
    decoded: list[tuple[VideoEntry, DecodedVideo]] = []  # waiting for the encoder
    encoding: dict[Future, list[tuple[VideoEntry, DecodedVideo]]] = {}
    per_batch = job.videos_per_batch
    while todo or decoding or decoded or encoding:
        while todo and len(decoding) < job.decodes_per_shard and len(decoding) + len(decoded) < \
                job.decodes_per_shard + per_batch:
            entry = todo.popleft()
            decoding[pool.submit((job.video_root, entry, job.decode))] = entry
        if decoded and (len(decoded) >= per_batch or not (todo or decoding)) and len(encoding) < 2:
            batch, decoded[:] = decoded[:per_batch], decoded[per_batch:]
            encoding[encoder.submit([video.frames for _, video in batch])] = batch
        ready, _ = wait([*decoding, *encoding], return_when=FIRST_COMPLETED)
        for future in ready:
            if future in encoding:
                for (entry, video), tokens in zip(encoding.pop(future), future.result()):
                    buffer.put(entry.row, tokens, video.frame_index, video.n_frames)
                continue
            entry = decoding.pop(future)
            outcome = future.result()
            if isinstance(outcome, str):
                buffer.fail(entry.row, outcome)
            else:
                decoded.append((entry, outcome))


class LocalDistributor:
    """Extraction on this machine's cores and GPUs (see the module docstring). Use as a context
    manager: the decoder processes live from `__enter__` to `__exit__`. They start before torch
    is imported (2-5 s on a small machine), and `warm_up` has them decode the first rows while
    the encoders load."""

    def __init__(self, decoders: int | None, encoder_threads: int | None, batch_size: int, timeout_s: float) -> None:
        self.cpus = len(os.sched_getaffinity(0))
        self.decoders = decoders
        self.slots = decoders or self.cpus  # one fewer per GPU, once `gpus` has looked
        self.encoder_threads = encoder_threads or self.cpus
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.encoders: list[BatchingEncoder] = []
        self.pool: DecodePool | None = None
        self.loaded = threading.Event()  # the encoders are up: the warm-up stops
        self._gpus: int | None = None

    def __enter__(self) -> LocalDistributor:
        self.pool = DecodePool(self.slots, self.timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loaded.set()
        for encoder in self.encoders:
            encoder.close()
        if self.pool is not None:
            self.pool.close()

    def warm_up(self, video_root: str, entries: Iterable[VideoEntry], spec: DecodeSpec) -> None:
        """Decode `entries` (the rows the first shards will ask for, in order) with `spec`, a
        guess, until the encoders have loaded: a shard that asks for the same row and spec takes
        the result. Fed a few at a time, so the decoders stay busy however long the load takes."""
        assert self.pool is not None, "use LocalDistributor as a context manager"
        pool = self.pool

        def feed() -> None:
            for entry in itertools.islice(entries, PREFETCH_MAX):
                while pool.requests.qsize() >= self.slots and not self.loaded.is_set():
                    self.loaded.wait(0.05)
                if self.loaded.is_set():
                    return
                pool.prefetch([(video_root, entry, spec)])

        threading.Thread(target=feed, name="warm-up", daemon=True).start()

    @property
    def gpus(self) -> int:
        """CUDA devices (imports torch the first time); each takes a decoder's core to feed it."""
        if self._gpus is None:
            import torch

            self._gpus = torch.cuda.device_count()
            if self._gpus and not self.decoders and self.pool is not None:
                self.pool.retire(self._gpus)
                self.slots = max(1, self.cpus - self._gpus)
        return self._gpus

    def load_encoders(self, spec: EncoderSpec, fingerprint: str | None) -> dict[str, Any]:
        """One encoder per GPU, or one on the CPU; each must load the weights with `fingerprint`
        (None: a new store). Returns what the store records about the encoder."""
        import torch

        if not self.gpus:
            torch.set_num_threads(self.encoder_threads)
        for device in [f"cuda:{i}" for i in range(self.gpus)] or ["cpu"]:
            encoder = load_encoder(spec, device)
            if fingerprint is not None and encoder.fingerprint != fingerprint:
                raise ExtractError(f"the encoder loaded here is not the store's (other weights in the cache?): "
                                   f"{encoder.attrs} vs fingerprint {fingerprint}")
            self.encoders.append(BatchingEncoder(encoder, self.batch_size))
        self.loaded.set()
        return self.encoders[0].encoder.attrs

    def run(self, template: dict[str, Any], shards: Iterable[Task], n_videos: int,
            committed_elsewhere: Callable[[int, str], bool]) -> RunTotals:
        job, max_open = make_job(template, self.slots)
        log.info("%d decoder processes, %d shards at a time, %d encoder(s)", self.slots, max_open, len(self.encoders))
        node = f"{socket.gethostname()}/local"
        assert self.pool is not None, "use LocalDistributor as a context manager"
        pool = self.pool

        def take(task: Task) -> Any:
            encoder = self.encoders[task[0] % len(self.encoders)]
            return take_shard(job, *task, node, lambda rows, buffer: _decode_and_encode(job, rows, buffer, pool,
                                                                                          encoder))

        with ThreadPoolExecutor(max_workers=max_open, thread_name_prefix="shard") as shards_pool:
            return run_shards(lambda task: shards_pool.submit(take, task), shards, n_videos, max_open,
                              committed_elsewhere)
