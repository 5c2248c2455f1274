"""The manifest on disk (DESIGN §3.1): a directory of plain JSON files readable without this project.

    MANIFEST/manifest.json   format version, video root, shard size, split settings, counts,
                             source sha256s, a stable manifest id and a content fingerprint
    MANIFEST/videos.jsonl    one line per video, in row order
    MANIFEST/samples.jsonl   one line per conversation
    MANIFEST/problems.jsonl  every input record or video that was not taken, with the reason

Two identities: `manifest_id` is fixed when the manifest is first built and kept when it grows,
so a feature store can tell "the same manifest, grown" from "another manifest"; `fingerprint`
changes with any change of content.

The video root is a local folder (recorded as an absolute path) or an fsspec URL
(`s3://bucket/videos`, recorded as given). A row's `bytes` and `fingerprint` do not depend on
where the file lies, so a corpus copied to object storage gives the same rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from pipeline.storage import is_url, normalize

FORMAT_VERSION = 1
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ManifestError(ValueError):
    """A user-facing problem with a manifest or its inputs; the message is one line."""


@dataclass(frozen=True)
class VideoEntry:
    """One row of videos.jsonl. `kind` is "video" or "image" (an image is a one-frame video)."""

    row: int
    video_id: str
    path: str  # relative to the video root, POSIX separators
    bytes: int
    fingerprint: str
    shard: int
    split: str  # "train" | "val"
    kind: str = "video"


@dataclass(frozen=True)
class Sample:
    """One conversation (a line of samples.jsonl) about one video, `{"video_id": id, ...}`, or
    about several, `{"video_ids": [id, ...], ...}` in the order of its `<video>` markers."""

    video_ids: tuple[str, ...]
    conversations: list[dict[str, str]]  # [{"role": "user"|"assistant", "content": str}, ...]

    @property
    def key(self) -> str:
        """The video id, or the ids joined by "+" (how a labels file names the conversation's videos)."""
        return "+".join(self.video_ids)

    def record(self) -> dict[str, Any]:
        """The samples.jsonl line's fields (a one-video sample's line is as it always was)."""
        ids = {"video_id": self.video_ids[0]} if len(self.video_ids) == 1 else {"video_ids": list(self.video_ids)}
        return {**ids, "conversations": self.conversations}

    def split(self, videos: dict[str, VideoEntry]) -> str | None:
        """"val" when any of its videos is in the validation split (a val video is never trained
        on), else "train"; None when a video is not in `videos` (id -> row)."""
        entries = [videos.get(vid) for vid in self.video_ids]
        if any(e is None for e in entries):
            return None
        return "val" if any(e.split == "val" for e in entries) else "train"  # type: ignore[union-attr]


@dataclass
class Manifest:
    """A manifest loaded from disk; `video_root` is an absolute path or an fsspec URL (a str)."""

    dir: Path
    video_root: Path | str
    shard_size: int
    manifest_id: str
    fingerprint: str
    videos: list[VideoEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return -(-len(self.videos) // self.shard_size)

    def shard_rows(self, shard: int) -> list[VideoEntry]:
        """The videos of one shard, in row order."""
        return self.videos[shard * self.shard_size : (shard + 1) * self.shard_size]

    def abs_path(self, entry: VideoEntry) -> Path | str:
        """Where the row's file is: a local path, or a URL under a remote root."""
        return video_location(self.video_root, entry.path)

    def samples(self) -> Iterator[Sample]:
        """Stream samples.jsonl (it can hold ~100k conversations; not kept in memory)."""
        for rec in read_jsonl(self.dir / "samples.jsonl"):
            yield Sample(tuple(rec["video_ids"]) if "video_ids" in rec else (rec["video_id"],), rec["conversations"])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class UnsafePath(ValueError):
    """A manifest path that would leave the video root (a hand-edited or hostile videos.jsonl)."""


def video_location(root: Path | str, relative: str) -> Path | str:
    """The file `relative` (POSIX) under a video root: a Path under a folder, a URL under a URL.
    A path that would leave the root (absolute, `..`, or under a folder a symlink pointing
    outside) raises `UnsafePath`: rows are checked when built, and again here when read."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or ".." in pure.parts or "\\" in relative:
        raise UnsafePath(f"path {relative!r} escapes the video root")
    if is_url(root):
        return f"{str(root).rstrip('/')}/{relative}"
    path = Path(root) / relative
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise UnsafePath(f"{relative} points outside the video root")
    return path


def cheap_fingerprint(path: str | os.PathLike[str], edge: int = 1 << 16, fs: Any = None,
                      size: int | None = None) -> str:
    """sha256 of size + first and last 64 KiB: catches a replaced or truncated file without
    reading 180 GB of video. `path` is a local file, or with `fs` (an fsspec filesystem) a path
    in it, read with two ranged reads (`size` from a listing saves asking for it). The same
    bytes give the same fingerprint wherever they lie."""
    if fs is None:
        size = os.stat(path).st_size
    elif size is None:
        size = int(fs.size(path))
    ranges = [(0, min(edge, size))] + ([(max(edge, size - edge), size)] if size > edge else [])
    ranges = [(start, end) for start, end in ranges if end > start]
    h = hashlib.sha256(str(size).encode())
    if fs is None:
        with open(path, "rb") as f:
            for start, end in ranges:
                f.seek(start)
                h.update(f.read(end - start))
    else:
        for start, end in ranges:
            h.update(fs.cat_file(path, start=start, end=end))  # keywords: s3fs takes version_id second
    return h.hexdigest()[:32]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def jsonl_line(record: dict[str, Any]) -> str:
    """The one serialisation used for every manifest line, so rewriting a row is byte-identical."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def read_manifest_meta(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(the manifest's folder, its manifest.json), checked; the rows are not read."""
    mdir = Path(path).expanduser().resolve()
    meta_path = mdir / "manifest.json"
    if not meta_path.is_file():
        raise ManifestError(f"{mdir} is not a manifest: no manifest.json (build one with `run_extract.py manifest`)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{meta_path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return mdir, meta


def iter_shards(manifest_dir: Path, shard_size: int) -> Iterator[tuple[int, list[VideoEntry]]]:
    """(shard, its rows) in order, read lazily from videos.jsonl: one shard in memory at a time."""
    rows: list[VideoEntry] = []
    for rec in read_jsonl(Path(manifest_dir) / "videos.jsonl"):
        rows.append(VideoEntry(**rec))
        if len(rows) == shard_size:
            yield rows[0].shard, rows
            rows = []
    if rows:
        yield rows[0].shard, rows


def load_manifest(path: str | os.PathLike[str], video_root: str | os.PathLike[str] | None = None) -> Manifest:
    """Load a manifest directory. `video_root` (a path or a URL) overrides the recorded root (a
    moved corpus)."""
    mdir, meta = read_manifest_meta(path)
    videos = [VideoEntry(**rec) for rec in read_jsonl(mdir / "videos.jsonl")]
    recorded = meta["video_root"]
    root = video_root_of(video_root) if video_root else recorded if is_url(recorded) else Path(recorded)
    return Manifest(
        dir=mdir,
        video_root=root,
        shard_size=int(meta["shard_size"]),
        manifest_id=meta["manifest_id"],
        fingerprint=meta["fingerprint"],
        videos=videos,
        meta=meta,
    )


def video_root_of(location: str | os.PathLike[str]) -> Path | str:
    """A video root as given by a user: an absolute Path, or a URL (never made a Path)."""
    location = normalize(location)
    return location if is_url(location) else Path(location)


def entry_record(entry: VideoEntry) -> dict[str, Any]:
    return asdict(entry)
