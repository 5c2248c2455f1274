"""Where a store (or a video) lives: a local path or any fsspec URL (`s3://`, `gs://`, ...).

One code path serves both. The arrays go through zarr's own store classes (`LocalStore` for a
path, `FsspecStore` for a URL); the small files beside them (commit records, leases) through
`StoreLocation`, which gives each the one guarantee the format needs:

- `write`: a whole object or nothing: temporary name + rename on a filesystem, one PUT on object
  storage (a PUT is atomic there);
- `create`: create-if-absent, atomically: `O_EXCL` on a filesystem, a conditional PUT
  (`If-None-Match: *`) on object storage; the loser of a race gets False.

Credentials and endpoints come from the usual environment and config files (AWS_* variables,
fsspec's own config); nothing here prints them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def is_url(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def normalize(location: str | os.PathLike[str]) -> str:
    """An absolute local path, or the URL as given (without a trailing slash)."""
    if is_url(location):
        return str(location).rstrip("/")
    text = str(location).removeprefix("file://")
    return str(Path(text).expanduser().resolve())


def filesystem(url: str):  # noqa: ANN201 - an fsspec AbstractFileSystem
    """The fsspec filesystem and in-filesystem path of a URL; one-line error without its package."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise ValueError(f"cannot open {url}: {err}") from err


class StoreLocation:
    """A folder on a filesystem or a prefix on object storage, with whole-object reads and writes
    of small files addressed by a relative name (`commits/shard-000001.json`)."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.url = normalize(location)
        self.remote = is_url(self.url)
        self.fs, self.root = filesystem(self.url) if self.remote else (None, self.url)

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name)) if self.remote else os.path.exists(self.path(name))

    def is_empty_or_absent(self) -> bool:
        if self.remote:
            return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)
        return not os.path.exists(self.root) or not os.listdir(self.root)

    def read(self, name: str) -> bytes | None:
        """The object's bytes; None when it does not exist."""
        try:
            if self.remote:
                return self.fs.cat_file(self.path(name))
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Replace the object whole (see the module docstring)."""
        target = self.path(name)
        if self.remote:
            self.fs.pipe_file(target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def create(self, name: str, data: bytes) -> bool:
        """Create the object only if it does not exist; False when it already does."""
        target = self.path(name)
        if self.remote:
            return _create_remote(self.fs, target, data)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def delete(self, name: str) -> None:
        """Remove the object; absent is fine."""
        try:
            if self.remote:
                self.fs.rm_file(self.path(name))
            else:
                os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def list(self, folder: str) -> list[str]:
        """Names (not paths) of the objects directly in `folder`; [] when it does not exist."""
        try:
            if self.remote:
                return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(folder), detail=False, refresh=True))
            return sorted(os.listdir(self.path(folder)))
        except FileNotFoundError:
            return []

    def zarr_store(self, read_only: bool = False):  # noqa: ANN201 - a zarr Store
        import zarr

        if self.remote:
            return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)
        return zarr.storage.LocalStore(self.root, read_only=read_only)


def _create_remote(fs, path: str, data: bytes) -> bool:  # noqa: ANN001
    """A conditional PUT: succeeds only when no object has the key (S3 `If-None-Match: *`)."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local path of the file at `location`: itself when local, else a spooled copy in a
    temporary folder that is deleted afterwards (decord reads only local files)."""
    if not is_url(location):
        yield Path(location)
        return
    fs, path = filesystem(location)
    folder = tempfile.mkdtemp(prefix="vidcache-")
    try:
        local = Path(folder) / path.rsplit("/", 1)[-1]
        fs.get_file(path, str(local))
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)
