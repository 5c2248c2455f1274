"""Where a store (or a video) lives: a local path or any fsspec URL (`s3://`, `gs://`, ...).

One code path serves both. The arrays go through zarr's own store classes (`LocalStore` for a
path, `FsspecStore` for a URL); the small files beside them (commit records, leases) through
`StoreLocation`, which gives each the one guarantee the format needs:

- `write`: a whole object or nothing: temporary name + rename on a filesystem (`pipeline.atomic`),
  one PUT on object storage (a PUT is atomic there);
- `create`: create-if-absent, atomically: a hard link from a whole temporary file on a
  filesystem (it fails when the name exists), a conditional PUT (`If-None-Match: *`) on object
  storage; the loser of a race gets False.

On a filesystem both go through a temporary file, as zarr's `LocalStore` does for every chunk; a
writer killed between the two leaves it behind. Temporary names never count as objects, and
`remove_temporaries` deletes the ones a killed writer left (each job does at its end).

Credentials and endpoints come from the usual environment and config files (AWS_* variables,
fsspec's own config); nothing here prints them. A failure of the storage itself (no credentials,
an unreachable endpoint, no such bucket, access denied) becomes one `StorageError` line naming the
location (`storage_errors`), with any credential found in the environment masked.

Reads never trust fsspec's listings cache: s3fs answers `exists`, and the size lookup inside
`cat_file`, from the last listing of the parent folder when it has one, which another process
(a worker committing a shard) makes stale; so each read or existence check drops the cached
listings of its path first (it costs no request: without a cached entry s3fs asks the object
itself, as it would anyway).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.atomic import TEMPORARY_SUFFIX, temporary_name, write_atomic
from pipeline.errors import StorageError

# endings of the temporary files of a filesystem store: ours (`pipeline.atomic`, for `write` and
# `create`) and zarr's `LocalStore` (every chunk and metadata file is written as
# `<name>.<uuid>.partial`, then renamed)
TEMPORARY_SUFFIXES = (TEMPORARY_SUFFIX, ".partial")

# packages whose exceptions are failures of the storage client (fsspec turns a service's own
# refusals into OSError: FileNotFoundError for a missing bucket, PermissionError, ...)
_CLIENT_PACKAGES = frozenset({"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "adlfs", "azure",
                              "fsspec", "requests", "urllib3"})
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
                     "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN")


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
        raise StorageError(f"cannot open {url}: {err}") from err
    except ValueError as err:  # an unknown protocol
        raise StorageError(f"cannot open {url}: {_one_line(err)}") from err


def is_storage_failure(err: BaseException) -> bool:
    """Is `err` a failure of a remote filesystem's client or service (rather than of our code)?"""
    if isinstance(err, OSError):
        return True
    return any(cls.__module__.split(".")[0] in _CLIENT_PACKAGES for cls in type(err).__mro__)


def _one_line(err: BaseException) -> str:
    """`Type: message` on one line, short, with every credential of the environment masked."""
    text = " ".join(str(err).split())
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def storage_errors(where: str, passing: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside the block, a storage failure (`is_storage_failure`) becomes one `StorageError`
    line naming `where`; anything else, and the errors of the `passing` types, pass through."""
    try:
        yield
    except (StorageError, *passing):
        raise
    except Exception as err:
        if not is_storage_failure(err):
            raise
        raise StorageError(f"{where}: storage error ({_one_line(err)})") from err


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

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """`storage_errors` for this location when it is remote (local paths raise as they are)."""
        return storage_errors(self.url) if self.remote else contextlib.nullcontext()

    def _fresh(self, path: str) -> str:
        """`path`, with fsspec's cached listings of it and its parents dropped (module docstring)."""
        self.fs.invalidate_cache(path)
        return path

    def exists(self, name: str = "") -> bool:
        with self.errors():
            return self.fs.exists(self._fresh(self.path(name))) if self.remote else os.path.exists(self.path(name))

    def is_empty_or_absent(self) -> bool:
        with self.errors():
            if self.remote:
                try:
                    return not self.fs.ls(self._fresh(self.root), detail=False, refresh=True)
                except FileNotFoundError:
                    return True
            return not os.path.exists(self.root) or not os.listdir(self.root)

    def read(self, name: str) -> bytes | None:
        """The object's bytes; None when it does not exist."""
        with self.errors():
            try:
                if self.remote:
                    return self.fs.cat_file(self._fresh(self.path(name)))
                with open(self.path(name), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

    def write(self, name: str, data: bytes) -> None:
        """Replace the object whole (see the module docstring)."""
        target = self.path(name)
        if self.remote:
            with self.errors():
                self.fs.pipe_file(target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_atomic(target, data)

    def create(self, name: str, data: bytes) -> bool:
        """Create the object only if it does not exist; False when it already does."""
        target = self.path(name)
        if self.remote:
            with self.errors():
                return _create_remote(self.fs, target, data)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = temporary_name(target)
        with open(tmp, "wb") as f:  # whole before it gets its name: a reader never sees it empty
            f.write(data)
        try:
            os.link(tmp, target)  # atomic, and fails if the name exists
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def delete(self, name: str) -> None:
        """Remove the object; absent is fine."""
        with self.errors():
            try:
                if self.remote:
                    self.fs.rm_file(self.path(name))
                else:
                    os.unlink(self.path(name))
            except FileNotFoundError:
                pass

    def list(self, folder: str) -> list[str]:
        """Names (not paths) of the objects directly in `folder`, temporary files left out; []
        when it does not exist."""
        with self.errors():
            try:
                if self.remote:
                    names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(folder), detail=False, refresh=True)]
                else:
                    names = os.listdir(self.path(folder))
            except FileNotFoundError:
                return []
        return sorted(name for name in names if not name.endswith(TEMPORARY_SUFFIXES))

    def remove_temporaries(self, older_than: float) -> int:
        """Delete the temporary files (`TEMPORARY_SUFFIXES`) last written before `older_than` (a
        time.time()); how many. A live writer's exist for the milliseconds of one write, so a
        caller passes a time well before now. Object storage has none: a PUT is whole."""
        if self.remote:
            return 0
        removed = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                if not name.endswith(TEMPORARY_SUFFIXES):
                    continue
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
        return removed

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
    temporary folder that is deleted afterwards (decord reads only local files). A missing remote
    file raises FileNotFoundError, any other failure to fetch it `StorageError`."""
    if not is_url(location):
        yield Path(location)
        return
    fs, path = filesystem(location)
    folder = tempfile.mkdtemp(prefix="vidcache-")
    try:
        local = Path(folder) / path.rsplit("/", 1)[-1]
        with storage_errors(location, passing=(FileNotFoundError,)):
            fs.get_file(path, str(local))
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)
