"""Files that appear whole or not at all, on a local filesystem.

A file is written under a temporary name beside its target and renamed over it (a rename within
one folder is atomic), so a reader, or a run resumed after a kill, sees the old file or the new
one, never half of one. Manifests, commit records, HDF5 exports, metrics, plots, tokenizers and
run configs are all written this way.

The temporary name is ``<name>.<random hex>.tmp``: unique, so two writers of the same file never
share a temporary, and ending in ``.tmp``, the suffix that `pipeline.storage` leaves out of
listings and whose leftovers (a writer killed before its rename) `remove_temporaries` deletes.
Nothing is fsynced: this guards against a killed process, not a power cut, as zarr's own chunk
writes do.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: str | os.PathLike[str]) -> str:
    """A fresh temporary name beside ``path`` (the same folder, so the rename stays atomic)."""
    return f"{os.fspath(path)}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path for a writer that needs a file name (h5py, ``savefig``, a tokenizer's
    ``save``): renamed to ``path`` when the block ends, removed when it raises (an existing
    ``path`` is then left as it was). The folder of ``path`` must exist."""
    tmp = Path(temporary_name(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (a str is written as UTF-8), whole."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
