"""Build or grow a manifest (DESIGN §3.1) from an instruction file and a video folder.

Rows are stable. The first build sorts the taken videos by id; a later build into the same
folder keeps every existing line of videos.jsonl and samples.jsonl byte for byte and appends
what is new, so shards are never renumbered. The split is a function of (seed, video_id) alone
(a hash threshold), so a video keeps its split as the corpus grows and never appears in both.

The video root may be an fsspec URL (`s3://bucket/videos`): it is listed once (sizes from the
listing) and each new video's cheap fingerprint is two ranged reads, so rows equal those of the
same files on a local disk; growth needs the same URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests.formats import Problem, Record, read_instructions, video_id_of
from manifests.manifest import (
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ManifestError,
    Sample,
    VideoEntry,
    cheap_fingerprint,
    entry_record,
    jsonl_line,
    sha256_file,
    video_root_of,
)
from pipeline.atomic import write_atomic
from pipeline.errors import StorageError
from pipeline.storage import filesystem, is_url, storage_errors

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 64
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 0
REMOTE_READERS = 16  # concurrent fingerprint reads on a remote video root


@dataclass
class ManifestConfig:
    """What `run_extract.py manifest` builds. None means: the value recorded in an existing
    manifest at `out`, else the default."""

    instructions: Path
    videos: Path | str  # a folder or an fsspec URL
    out: Path
    shard_size: int | None = None
    val_fraction: float | None = None
    seed: int | None = None
    max_videos: int | None = None
    format: str = "auto"


@dataclass
class ManifestSummary:
    out: Path
    format: str
    videos: int
    new_videos: int
    samples: int
    new_samples: int
    shards: int
    train: int
    val: int
    problems: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        lines = [
            f"manifest {self.out} ({self.format})",
            f"  videos  {self.videos} ({self.new_videos} new), train {self.train}, val {self.val}",
            f"  samples {self.samples} ({self.new_samples} new)",
            f"  shards  {self.shards}",
        ]
        problems = ", ".join(f"{kind} {n}" for kind, n in sorted(self.problems.items())) or "none"
        lines.append(f"  problems {sum(self.problems.values())}: {problems} (see problems.jsonl)")
        return lines


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) for the given parts."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(video_id: str, seed: int, val_fraction: float) -> str:
    return "val" if _unit_hash(seed, "split", video_id) < val_fraction else "train"


def _unsafe(video_id: str) -> str:
    """Why `video_id` may not name a file under the root (absolute, `..`), or ""."""
    if not video_id or Path(video_id).is_absolute() or ".." in Path(video_id).parts or "\\" in video_id:
        return f"unsafe video id {video_id!r}: absolute or escapes the video root"
    return ""


def _not_found(video_id: str) -> str:
    return f"no file {video_id}.{{{','.join(e[1:] for e in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}}} under the video root"


def find_video(root: Path, video_id: str) -> tuple[Path | None, str]:
    """The file for `video_id` under `root`, or (None, reason). Refuses ids and files that would
    escape the root: absolute ids, `..` parts, and symlinks that point outside."""
    if reason := _unsafe(video_id):
        return None, reason
    for ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        candidate = root / f"{video_id}{ext}"
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(root):
                return None, f"{candidate.relative_to(root)} points outside the video root"
            return candidate, ""
    return None, _not_found(video_id)


def find_remote_video(listing: dict[str, int], video_id: str) -> tuple[str | None, str]:
    """`find_video` over a remote root's listing ({relative path: size}): the relative path of
    the file for `video_id`, or (None, reason)."""
    if reason := _unsafe(video_id):
        return None, reason
    for ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        if f"{video_id}{ext}" in listing:
            return f"{video_id}{ext}", ""
    return None, _not_found(video_id)


class _Videos:
    """The video root being indexed: find a video id's file, then its size and fingerprint."""

    def __init__(self, root: Path | str) -> None:
        self.root = root
        self.remote = is_url(root)
        if not self.remote:
            if not Path(root).is_dir():
                raise ManifestError(f"video folder not found: {root}")
            return
        with _manifest_errors(str(root)):
            self.fs, base = filesystem(str(root))
            found = self.fs.find(base, detail=True)
        self.base = base.rstrip("/")
        prefix, suffixes = self.base + "/", VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
        # {relative path: size} of the video and image files (one listing, sizes included)
        self.listing = {name[len(prefix):]: int(info["size"]) for name, info in found.items()
                        if info.get("type", "file") == "file" and name.startswith(prefix)
                        and name.lower().endswith(suffixes)}
        if not self.listing:
            raise ManifestError(f"no video or image files under {root} (is the URL right?)")

    def find(self, video_id: str) -> tuple[str | None, str]:
        """The file's path relative to the root (POSIX), or (None, reason)."""
        if self.remote:
            return find_remote_video(self.listing, video_id)
        path, reason = find_video(Path(self.root), video_id)
        return (None, reason) if path is None else (path.relative_to(self.root).as_posix(), "")

    def size_and_fingerprint(self, relative: str) -> tuple[int, str]:
        if not self.remote:
            path = Path(self.root) / relative
            return path.stat().st_size, cheap_fingerprint(path)
        size = self.listing[relative]
        with _manifest_errors(f"{self.root}/{relative}"):
            return size, cheap_fingerprint(f"{self.base}/{relative}", fs=self.fs, size=size)


@contextlib.contextmanager
def _manifest_errors(where: str) -> Iterator[None]:
    """`storage_errors`, raised as a ManifestError (the builder's one-line error)."""
    try:
        with storage_errors(where):
            yield
    except StorageError as err:
        raise ManifestError(str(err)) from err


def _existing(out: Path) -> tuple[dict[str, Any] | None, str, str]:
    """(manifest.json, videos.jsonl text, samples.jsonl text) of a manifest at `out`, if any."""
    meta_path = out / "manifest.json"
    if not meta_path.is_file():
        return None, "", ""
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta, (out / "videos.jsonl").read_text(encoding="utf-8"), (out / "samples.jsonl").read_text(encoding="utf-8")


def _same_root(recorded: str, root: Path | str) -> bool:
    if is_url(recorded) or is_url(root):
        return recorded.rstrip("/") == str(root)
    return Path(recorded) == root


def _settings(cfg: ManifestConfig, meta: dict[str, Any] | None, root: Path | str) -> tuple[int, float, int]:
    """Shard size, val fraction and seed: given, recorded, or default; a conflict is an error."""
    chosen = {"shard_size": cfg.shard_size, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    defaults = {"shard_size": DEFAULT_SHARD_SIZE, "val_fraction": DEFAULT_VAL_FRACTION, "seed": DEFAULT_SEED}
    if meta is not None:
        if not _same_root(meta["video_root"], root):
            raise ManifestError(f"{cfg.out} was built over {meta['video_root']}, not {root}; growth needs the same --videos")
        recorded = {"shard_size": meta["shard_size"], "val_fraction": meta["val_fraction"], "seed": meta["split_seed"]}
        for name, value in chosen.items():
            if value is not None and value != recorded[name]:
                raise ManifestError(f"{cfg.out} has {name} {recorded[name]}; a grown manifest keeps it (got {value})")
        return recorded["shard_size"], recorded["val_fraction"], recorded["seed"]
    shard_size, val_fraction, seed = (defaults[k] if v is None else v for k, v in chosen.items())
    if shard_size < 1:
        raise ManifestError(f"--shard-size must be at least 1, got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise ManifestError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    return shard_size, val_fraction, seed


def build_manifest(cfg: ManifestConfig) -> ManifestSummary:
    """Build the manifest at `cfg.out`, or grow the one that is there."""
    root = video_root_of(cfg.videos)
    out = Path(cfg.out).expanduser().resolve()
    instructions = Path(cfg.instructions).expanduser().resolve()
    videos = _Videos(root)
    if cfg.max_videos is not None and cfg.max_videos < 1:
        raise ManifestError(f"--max-videos must be at least 1, got {cfg.max_videos}")
    meta, old_videos_text, old_samples_text = _existing(out)
    shard_size, val_fraction, seed = _settings(cfg, meta, root)
    records, problems, fmt = read_instructions(instructions, cfg.format)

    old_entries = [VideoEntry(**json.loads(line)) for line in old_videos_text.splitlines() if line.strip()]
    known = {e.video_id for e in old_entries}

    # Look every referenced video up once; drop records whose video cannot be taken.
    found: dict[str, tuple[str, str]] = {}  # video id -> (path relative to the root, kind)
    refused: set[str] = set()
    by_video: dict[str, list[Record]] = {}
    for r in records:
        for ref in dict.fromkeys(r.video_refs):
            by_video.setdefault(video_id_of(ref), []).append(r)
    for vid, recs in by_video.items():
        if vid in known:
            continue
        path, reason = videos.find(vid)
        if path is None:
            kind = "missing_video" if reason.startswith("no file") else "unsafe_path"
            problems.append(Problem(kind, f"{reason} ({len(recs)} records dropped)", video_id=vid))
            refused.add(vid)
        else:
            found[vid] = (path, "image" if Path(path).suffix.lower() in IMAGE_EXTENSIONS else "video")

    new_ids = sorted(found)
    if cfg.max_videos is not None:
        room = max(0, cfg.max_videos - len(old_entries))
        new_ids = sorted(sorted(new_ids, key=lambda v: _unit_hash(seed, "subset", v))[:room])
    with ThreadPoolExecutor(REMOTE_READERS if videos.remote else 1) as pool:
        stats = list(pool.map(videos.size_and_fingerprint, [found[vid][0] for vid in new_ids]))
    new_entries = []
    for row, (vid, (size, fingerprint)) in enumerate(zip(new_ids, stats), start=len(old_entries)):
        path, kind = found[vid]
        new_entries.append(
            VideoEntry(
                row=row,
                video_id=vid,
                path=path,
                bytes=size,
                fingerprint=fingerprint,
                shard=row // shard_size,
                split=split_of(vid, seed, val_fraction),
                kind=kind,
            )
        )

    # Samples already in the manifest stay as they are (a grown corpus's file repeats them);
    # a conversation this file holds twice is a duplicate.
    taken = known | set(new_ids)
    in_manifest = set(old_samples_text.splitlines(keepends=True))
    seen: set[str] = set()
    new_sample_lines: list[str] = []
    for r in records:
        sample = Sample(tuple(video_id_of(ref) for ref in r.video_refs), r.conversations)
        if not taken.issuperset(sample.video_ids):
            continue
        line = jsonl_line(sample.record())
        if line in seen:
            problems.append(Problem("duplicate_record", "same conversation as an earlier record", index=r.index, video_id=sample.key))
            continue
        seen.add(line)
        if line not in in_manifest:
            new_sample_lines.append(line)

    out.mkdir(parents=True, exist_ok=True)
    videos_text = old_videos_text + "".join(jsonl_line(entry_record(e)) for e in new_entries)
    samples_text = old_samples_text + "".join(new_sample_lines)
    write_atomic(out / "videos.jsonl", videos_text)
    write_atomic(out / "samples.jsonl", samples_text)
    write_atomic(out / "problems.jsonl", "".join(jsonl_line(p.record()) for p in problems))

    entries = old_entries + new_entries
    fingerprint = hashlib.sha256(f"{shard_size}\n{videos_text}\n{samples_text}".encode()).hexdigest()[:32]
    sources = [s for s in (meta or {}).get("sources", []) if s["path"] != str(instructions)]
    sources.append({"path": str(instructions), "sha256": sha256_file(instructions)})
    split_counts = Counter(e.split for e in entries)
    n_samples = samples_text.count("\n")
    manifest = {
        "format_version": FORMAT_VERSION,
        "video_root": str(root),
        "shard_size": shard_size,
        "val_fraction": val_fraction,
        "split_seed": seed,
        "counts": {
            "videos": len(entries),
            "samples": n_samples,
            "shards": -(-len(entries) // shard_size),
            "train": split_counts["train"],
            "val": split_counts["val"],
            "problems": len(problems),
        },
        "sources": sources,
        "manifest_id": (meta or {}).get("manifest_id", fingerprint),
        "fingerprint": fingerprint,
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log.info("manifest written to %s", out)
    return ManifestSummary(
        out=out,
        format=fmt,
        videos=len(entries),
        new_videos=len(new_entries),
        samples=n_samples,
        new_samples=len(new_sample_lines),
        shards=manifest["counts"]["shards"],
        train=split_counts["train"],
        val=split_counts["val"],
        problems=Counter(p.kind for p in problems),
    )

