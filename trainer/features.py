"""Feature sources: ``fetch(rows) -> (B, F, T, D)`` float16 frame tokens of store rows.

`DiskFeatures` reads the Zarr store on every fetch (each DataLoader worker opens it itself);
`RamFeatures` loads the needed rows once into host memory (pinned on CUDA; under torchrun once
per node, in shared memory: `SharedRamFeatures`); `GpuFeatures` keeps them on the GPU. A repeated
run with ``ram``/``gpu`` does no I/O after loading. `make_features` picks one by name.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.store import read_rows
from trainer.distributed import Dist
from trainer.errors import TrainerError
from trainer.store import store_errors

log = logging.getLogger(__name__)

FEATURE_CACHES = ("disk", "ram", "gpu")


class Features:
    """``fetch(rows)`` -> the frame tokens (B, F, T, D) float16 of store ``rows``, in order."""

    device = torch.device("cpu")

    def fetch(self, rows: Sequence[int]) -> Tensor:
        raise NotImplementedError


class DiskFeatures(Features):
    """Reads the store on every fetch (`pipeline.store.read_rows`). Picklable: a DataLoader
    worker opens the store itself."""

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
        return torch.from_numpy(np.ascontiguousarray(read_rows(self._array(), unique)[inverse]))


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
        out[start : start + len(part)] = torch.from_numpy(read_rows(array, part))


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

