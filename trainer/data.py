"""Training data over the feature store: tokenised samples, feature caches, batch plan, batches.

- `build_examples` tokenises a split of the manifest once per run (not per step). A sample whose
  video row is not ok in the store (pending, failed, or beyond the store) is skipped and counted,
  as is one that cannot be encoded (an answer-less or empty answer, text that produces the video
  placeholder id, a prompt longer than ``max_len``). Longer samples are cut to ``max_len``.
- Features come from one of three sources with one interface, ``fetch(rows) -> (B, F, T, D)``
  float16: `DiskFeatures` reads the Zarr store (each DataLoader worker opens it itself),
  `RamFeatures` loads the needed rows once into host memory (pinned on CUDA; under torchrun once
  per node, in shared memory: `SharedRamFeatures`), `GpuFeatures` keeps them on the GPU. A
  repeated run with ``ram``/``gpu`` does no I/O after loading.
- `BatchPlan` decides which samples each micro-batch holds, as a pure function of (seed, epoch,
  step), the same on every rank: the epoch's permutation is cut into global batches of
  ``batch_size * grad_accum * world`` samples (the last one filled up from the start of the
  permutation), each global batch sorted by length (less padding) and dealt out, micro-batch
  m of rank r taking slice ``m * world + r``. This is the distributed sampler, reshuffled per
  epoch; a resumed run continues at any step with no other state.
- `make_batch` pads to the longest sample of the micro-batch (right padding).

DataLoader workers (``disk``) use the ``forkserver`` (or ``spawn``) start method, never ``fork``:
zarr 3 runs an event-loop thread that a forked child would inherit in a broken state.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.distributed import Dist
from trainer.errors import TrainerError
from pipeline.store_format import OK as STATUS_OK
from pipeline.store_format import STATUS_NAMES
from trainer.store import StoreInfo, store_errors
from trainer.tokenization import IGNORE, ChatTokenizer

log = logging.getLogger(__name__)

FEATURE_CACHES = ("disk", "ram", "gpu")


# --- tokenised samples ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenised conversation and the store row of its video."""

    row: int
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, IGNORE where no loss
    sample: int = -1  # line of samples.jsonl


@dataclass
class Examples:
    """The tokenised samples of one split and why others were left out."""

    items: list[Example]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    conversations: dict[int, tuple[str, list[dict[str, str]]]] = field(default_factory=dict)  # sample -> (video_id, turns)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.items]

    @property
    def rows(self) -> list[int]:
        return sorted({e.row for e in self.items})

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"{len(self.items)} samples, skipped {sum(self.skipped.values())} ({skipped}), truncated {self.truncated}"


def build_examples(
    manifest: object,
    store: StoreInfo,
    tok: ChatTokenizer,
    split: str,
    n_video_tokens: int,
    max_len: int,
    system: str | None = None,
    keep_conversations: bool = False,
) -> Examples:
    """Tokenise every sample of ``split`` ("train" or "val") whose video row is ok in the store
    (``keep_conversations``: also keep their text, for evaluation)."""
    videos = {v.video_id: v for v in manifest.videos}  # type: ignore[attr-defined]
    out = Examples(items=[])
    for index, sample in enumerate(manifest.samples()):  # type: ignore[attr-defined]
        video = videos.get(sample.video_id)
        if video is None or video.split != split:
            continue
        if video.row >= store.n_rows:
            out.skipped["video not in store"] += 1
            continue
        status = int(store.status[video.row])
        if status != STATUS_OK:
            out.skipped[f"video {STATUS_NAMES.get(status, f'status {status}')}"] += 1
            continue
        if any(turn.get("role") == "assistant" and not str(turn.get("content", "")).strip()
               for turn in sample.conversations if isinstance(turn, dict)):
            out.skipped["empty answer"] += 1  # as the manifest builder refuses it: it would teach silence
            continue
        try:
            enc = tok.encode_conversation(sample.conversations, n_video_tokens, system)
        except (KeyError, ValueError, TypeError):
            out.skipped["malformed conversation"] += 1
            continue
        ids, labels = enc.input_ids, enc.labels
        if ids.count(tok.video_id) != n_video_tokens:
            out.skipped["text holds the video token"] += 1
            continue
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if ids.count(tok.video_id) != n_video_tokens:
                out.skipped["prompt longer than max_len"] += 1
                continue
            out.truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            out.skipped["no answer to learn"] += 1
            continue
        out.items.append(Example(video.row, np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), index))
        if keep_conversations:
            out.conversations[index] = (sample.video_id, sample.conversations)
    return out


def add_text_only(examples: Examples, tok: ChatTokenizer, fraction: float, seed: int, max_len: int,
                  system: str | None = None) -> int:
    """Append text-only copies (no video placeholders) of a seeded ``fraction`` of the samples,
    which must have been built with ``keep_conversations``. A model that has seen text-only
    prompts answers them from the language prior alone, which is what `eval --ablate no-video`
    means to measure; one that has not meets an input it was never trained on. Returns how many
    were added."""
    if examples.items and not examples.conversations:
        raise ValueError("add_text_only needs examples built with keep_conversations=True")
    n = round(fraction * len(examples.items))
    picked = np.random.default_rng([seed, 1]).choice(len(examples.items), size=n, replace=False)
    added = 0
    for index in sorted(picked.tolist()):
        example = examples.items[index]
        enc = tok.encode_conversation(examples.conversations[example.sample][1], 0, system)
        if len(enc.input_ids) <= max_len:
            ids, labels = (np.asarray(x, dtype=np.int64) for x in (enc.input_ids, enc.labels))
            examples.items.append(Example(example.row, ids, labels, example.sample))
            added += 1
    return added


# --- feature sources -----------------------------------------------------------------------------


class Features:
    """``fetch(rows)`` -> the frame tokens (B, F, T, D) float16 of store ``rows``, in order."""

    device = torch.device("cpu")

    def fetch(self, rows: Sequence[int]) -> Tensor:
        raise NotImplementedError


class DiskFeatures(Features):
    """Reads the store on every fetch. Picklable: a DataLoader worker opens the store itself."""

    def __init__(self, store_path: str | Path) -> None:
        self.store_path = str(store_path)
        self._tokens = None

    def __getstate__(self) -> dict:
        return {"store_path": self.store_path, "_tokens": None}

    def _array(self):  # noqa: ANN202 - a zarr.Array
        if self._tokens is None:
            import zarr

            self._tokens = zarr.open_group(self.store_path, mode="r")["tokens"]
        return self._tokens

    def fetch(self, rows: Sequence[int]) -> Tensor:
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        block = self._array().get_orthogonal_selection((unique,))  # (U, F, T, D), one read
        return torch.from_numpy(np.ascontiguousarray(block[inverse]))


class RamFeatures(Features):
    """The needed rows, loaded once into one host tensor (pinned when CUDA is used)."""

    def __init__(self, store_path: str | Path, rows: Sequence[int], device: torch.device | None = None) -> None:
        rows = np.asarray(sorted(set(rows)), dtype=np.int64)
        array = DiskFeatures(store_path)._array()
        _check_fits(len(rows) * math.prod(array.shape[1:]) * 2, device)
        target = device or torch.device("cpu")
        cache = torch.empty((len(rows), *array.shape[1:]), dtype=torch.float16, device=target)
        _load_rows(array, rows, cache)
        if target.type == "cpu" and torch.cuda.is_available():
            cache = cache.pin_memory()
        self._index(cache, rows, array.shape[0], target)

    def _index(self, cache: Tensor, rows: np.ndarray, n_total: int, target: torch.device) -> None:
        self.cache = cache
        self.slot = torch.full((n_total,), -1, dtype=torch.long)
        self.slot[torch.from_numpy(rows)] = torch.arange(len(rows))
        self.slot = self.slot.to(target)
        self.device = target
        log.info("feature cache: %d videos, %.1f MiB in %s", len(rows), self.cache.numel() * 2 / 2**20, target)

    def fetch(self, rows: Sequence[int]) -> Tensor:
        slots = self.slot[torch.as_tensor(rows, dtype=torch.long, device=self.device)]
        if (slots < 0).any():
            raise KeyError("a requested row is not in the feature cache")
        return self.cache.index_select(0, slots)


class SharedRamFeatures(RamFeatures):
    """`RamFeatures` for the processes of one node under torchrun: the node's first local rank
    loads the rows once into a file in shared memory (``/dev/shm``, or the temp folder where there
    is none) and every local rank maps that file, so the node holds one copy of the cache, not one
    per process. It refuses before loading when the one copy does not fit in the free host memory
    or the shared folder (`_check_fits`). The file is made at full size, mapped by every rank,
    and its name unlinked (the mappings stay valid) before the first row is loaded into it, so a
    kill during the long load leaves no ``vidcache-features-*`` file behind. Every rank learns
    whether the others succeeded (a collective), so a failure on one rank never leaves the others
    waiting."""

    def __init__(self, store_path: str | Path, rows: Sequence[int], dist: Dist) -> None:
        rows = np.asarray(sorted(set(rows)), dtype=np.int64)
        array = DiskFeatures(store_path)._array()
        shape = (len(rows), *array.shape[1:])
        numel = math.prod(shape)
        # one random name per launch, chosen by rank 0 (a float64 sum carries 48 bits exactly)
        (token,) = dist.sum([float(int.from_bytes(os.urandom(6), "big")) if dist.is_main else 0.0])
        path = _shared_folder() / f"vidcache-features-{int(token):012x}"
        error: Exception | None = None
        if dist.local_rank == 0:
            try:
                _check_fits(numel * 2, None, path.parent)
                with open(path, "xb") as f:
                    if numel:
                        os.posix_fallocate(f.fileno(), 0, numel * 2)  # ENOSPC now, not SIGBUS later
            except Exception as err:  # noqa: BLE001 - reported to every rank by _agree, then raised
                path.unlink(missing_ok=True)
                error = err
        _agree(dist, error, "make the shared feature cache")
        cache = None
        try:
            cache = _map(path, numel, shape)
        except Exception as err:  # noqa: BLE001 - as above
            error = err
        try:
            _agree(dist, error, f"map the shared feature cache {path}")  # also: every rank has mapped it
        finally:
            if dist.local_rank == 0:
                path.unlink(missing_ok=True)  # before the load: a kill from here on leaves no file
        if dist.local_rank == 0:
            try:
                _load_rows(array, rows, cache)
            except Exception as err:  # noqa: BLE001 - as above
                error = err
        _agree(dist, error, "load the shared feature cache")
        self._index(cache, rows, array.shape[0], torch.device("cpu"))  # type: ignore[arg-type]


def _shared_folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def _map(path: Path, numel: int, shape: tuple[int, ...]) -> Tensor:
    """The file as a (writable, shared) float16 tensor of ``shape``: pages are the page cache's,
    one copy for every process that maps it."""
    if not numel:
        return torch.empty(shape, dtype=torch.float16)
    return torch.from_file(str(path), shared=True, size=numel, dtype=torch.float16).view(shape)


def _agree(dist: Dist, error: Exception | None, what: str) -> None:
    """Raise on every rank if any rank failed: this rank's own error, or a line naming the step."""
    (failed,) = dist.sum([1.0 if error is not None else 0.0])
    if error is not None:
        if isinstance(error, TrainerError):
            raise error
        raise TrainerError(f"could not {what}: {error}") from error
    if failed:
        raise TrainerError(f"could not {what}: it failed on {int(failed)} other rank(s) (see their error)")


def _load_rows(array, rows: np.ndarray, out: Tensor) -> None:  # noqa: ANN001 - a zarr.Array
    """Copy store ``rows`` into ``out``, one store shard at a time (bounded host memory)."""
    step = (getattr(array, "shards", None) or array.chunks)[0]
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        out[start : start + len(part)] = torch.from_numpy(array.get_orthogonal_selection((part,)))


class GpuFeatures(RamFeatures):
    """`RamFeatures` resident on the GPU: a batch is an index_select in GPU memory."""

    def __init__(self, store_path: str | Path, rows: Sequence[int], device: torch.device) -> None:
        if device.type != "cuda":
            raise TrainerError("--feature-cache gpu needs a CUDA device; use ram or disk")
        super().__init__(store_path, rows, device)


def _check_fits(nbytes: int, device: torch.device | None, shared_folder: Path | None = None) -> None:
    """Refuse, before loading, a cache that would not fit where it goes (with a 20% margin)."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room, where = free * 0.8, "GPU memory"
    else:
        room, where = _available_host_memory() * 0.8, "host memory"
        if shared_folder is not None:
            stat = os.statvfs(shared_folder)
            if stat.f_bavail * stat.f_frsize * 0.8 < room:
                room, where = stat.f_bavail * stat.f_frsize * 0.8, f"space in {shared_folder}"
    if nbytes > room:
        raise TrainerError(
            f"the feature cache needs {nbytes / 2**30:.2f} GiB but only {room / 2**30:.2f} GiB of "
            f"{where} is free; use --feature-cache disk"
        )


def _available_host_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def make_features(kind: str, store_path: str | Path, rows: Sequence[int], device: torch.device,
                  dist: Dist | None = None) -> Features:
    """The feature source for ``rows``. Called with ``dist`` (by every rank, together) a ``ram``
    cache is shared by the processes of a node (`SharedRamFeatures`); without, it is this
    process's own."""
    if kind == "disk":
        return DiskFeatures(store_path)
    if kind in ("ram", "gpu"):
        with store_errors(store_path):  # loading from object storage: a failure is one line
            if kind == "ram" and dist is not None and dist.local_world > 1:
                return SharedRamFeatures(store_path, rows, dist)
            return RamFeatures(store_path, rows) if kind == "ram" else GpuFeatures(store_path, rows, device)
    raise TrainerError(f"--feature-cache must be one of {', '.join(FEATURE_CACHES)}, not {kind!r}")


# --- batches -------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A right-padded micro-batch."""

    input_ids: Tensor  # (B, L) long
    labels: Tensor  # (B, L) long, IGNORE on padding and prompts
    attention_mask: Tensor  # (B, L) bool, False on padding
    video: Tensor  # (B, F, T, D) float16
    rows: Tensor  # (B,) store rows

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in self._tensors()))

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.input_ids, self.labels, self.attention_mask, self.video, self.rows)

    @property
    def n_target_tokens(self) -> int:
        """Positions that contribute to the next-token loss."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def make_batch(examples: Sequence[Example], features: Features | None, pad_id: int) -> Batch:
    """Right-padded ids and labels; ``features`` None gives an empty (B, 0) video (text only)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.from_numpy(e.input_ids)
        labels[i, :n] = torch.from_numpy(e.labels)
        mask[i, :n] = True
    rows = [e.row for e in examples]
    video = features.fetch(rows) if features is not None else torch.empty(len(rows), 0, dtype=torch.float16)
    return Batch(ids, labels, mask, video, torch.tensor(rows, dtype=torch.long))


class BatchDataset(Dataset):
    """``dataset[list of example indices]`` -> one collated `Batch` (built in the worker)."""

    def __init__(self, examples: Sequence[Example], features: Features, pad_id: int) -> None:
        self.examples = list(examples)
        self.features = features
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        return make_batch([self.examples[i] for i in indices], self.features, self.pad_id)


# --- the batch plan (distributed sampler) --------------------------------------------------------


class BatchPlan(Sampler[list[int]]):
    """Which examples each micro-batch of this rank holds; see the module docstring.

    Iterating yields this rank's micro-batches (lists of example indices) from the position set
    by `set_position` to the end of that epoch, ``grad_accum`` per optimizer step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        grad_accum: int = 1,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not lengths:
            raise TrainerError("no training samples: every sample was skipped (see the log)")
        self.lengths = list(lengths)
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.lengths) // self.global_batch))

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.lengths), generator=generator).numpy()

    def step_batches(self, epoch: int, step: int, order: np.ndarray | None = None) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches of optimizer step ``step`` of ``epoch``."""
        order = self._order(epoch) if order is None else order
        G, B = self.global_batch, self.batch_size
        picked = [int(order[(step * G + k) % len(order)]) for k in range(G)]
        picked.sort(key=lambda i: (self.lengths[i], i))
        return [picked[(m * self.world + self.rank) * B : (m * self.world + self.rank + 1) * B] for m in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            yield from self.step_batches(self.epoch, step, order)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum


def worker_context() -> multiprocessing.context.BaseContext:
    """Never ``fork`` (zarr's event-loop thread); ``forkserver`` where it exists, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class BatchStream:
    """Yields this rank's micro-batches of one epoch from a step on: through a DataLoader with
    worker processes for ``disk`` features, in the main process for cached ones."""

    def __init__(
        self,
        dataset: BatchDataset,
        plan: BatchPlan,
        workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.plan = dataset, plan
        self.loader: DataLoader | None = None
        if isinstance(dataset.features, DiskFeatures) and workers > 0:
            self.loader = DataLoader(
                dataset,
                batch_size=None,
                sampler=plan,
                num_workers=workers,
                multiprocessing_context=worker_context(),
                persistent_workers=True,
                prefetch_factor=4,
                pin_memory=pin_memory,
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.plan.set_position(epoch, start_step)
        if self.loader is not None:
            yield from self.loader
        else:
            for indices in self.plan:
                yield self.dataset[indices]


def sequential_batches(examples: Sequence[Example], features: Features, pad_id: int, batch_size: int) -> Iterator[Batch]:
    """Every example once, in length order (little padding), for evaluation."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    for start in range(0, len(order), batch_size):
        yield make_batch([examples[i] for i in order[start : start + batch_size]], features, pad_id)
