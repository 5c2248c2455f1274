"""The manifest on disk (DESIGN §3.1): a directory of plain JSON files readable without this project.

    MANIFEST/manifest.json   format version, video root, shard size, split settings, counts,
                             source sha256s, a stable manifest id and a content fingerprint
    MANIFEST/videos.jsonl    one line per video, in row order
    MANIFEST/samples.jsonl   one line per conversation
    MANIFEST/problems.jsonl  every input record or video that was not taken, with the reason

Two identities: `manifest_id` is fixed when the manifest is first built and kept when it grows,
so a feature store can tell "the same manifest, grown" from "another manifest"; `fingerprint`
changes with any change of content.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

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
    """One conversation about one video (samples.jsonl)."""

    video_id: str
    conversations: list[dict[str, str]]  # [{"role": "user"|"assistant", "content": str}, ...]


@dataclass
class Manifest:
    """A manifest loaded from disk; `video_root` is absolute."""

    dir: Path
    video_root: Path
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

    def abs_path(self, entry: VideoEntry) -> Path:
        return self.video_root / entry.path

    def samples(self) -> Iterator[Sample]:
        """Stream samples.jsonl (it can hold ~100k conversations; not kept in memory)."""
        for rec in read_jsonl(self.dir / "samples.jsonl"):
            yield Sample(rec["video_id"], rec["conversations"])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cheap_fingerprint(path: Path, edge: int = 1 << 16) -> str:
    """sha256 of size + first and last 64 KiB: catches a replaced or truncated file without
    reading 180 GB of video."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read(edge))
    return h.hexdigest()[:32]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def jsonl_line(record: dict[str, Any]) -> str:
    """The one serialisation used for every manifest line, so rewriting a row is byte-identical."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(jsonl_line(r) for r in records))


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
    """Load a manifest directory. `video_root` overrides the recorded root (a moved corpus)."""
    mdir, meta = read_manifest_meta(path)
    videos = [VideoEntry(**rec) for rec in read_jsonl(mdir / "videos.jsonl")]
    root = Path(video_root).expanduser().resolve() if video_root else Path(meta["video_root"])
    return Manifest(
        dir=mdir,
        video_root=root,
        shard_size=int(meta["shard_size"]),
        manifest_id=meta["manifest_id"],
        fingerprint=meta["fingerprint"],
        videos=videos,
        meta=meta,
    )


def entry_record(entry: VideoEntry) -> dict[str, Any]:
    return asdict(entry)
