"""Shared builders of the store tests (tests/test_curate.py, tests/test_store_lies.py): a demo
corpus with one broken video file, its instruction file and manifest, ready to extract."""

from __future__ import annotations

import json
from pathlib import Path

from manifests.build import ManifestConfig, build_manifest
from manifests.demo_corpus import make_demo_corpus

BROKEN_BYTES = b"not a video at all" * 100  # what videos/broken.mp4 holds: no decoder reads it


def write_instructions(path: Path, ids: list[str]) -> Path:
    """An instruction file at `path`: one question about each video id, in order."""
    path.write_text(json.dumps([{"q": "What is it?", "a": "A thing.", "video_id": v} for v in ids]))
    return path


def corpus_with_a_broken_file(root: Path, *, seed: int, shard_size: int, val_fraction: float | None = None) -> Path:
    """5 demo videos (`make_demo_corpus` with `seed`) under root/videos plus videos/broken.mp4
    (BROKEN_BYTES), an instruction file root/i.json over all 6 ids, and the manifest built from
    them at root/manifest (`shard_size`, `val_fraction`; None: the default). Returns the manifest.
    The rows follow the sorted ids, so "broken" is row 0."""
    make_demo_corpus(root, n_videos=5, seed=seed)
    ids = sorted(json.loads((root / "labels.json").read_text()))
    (root / "videos" / "broken.mp4").write_bytes(BROKEN_BYTES)
    build_manifest(ManifestConfig(write_instructions(root / "i.json", [*ids, "broken"]), root / "videos",
                                  root / "manifest", shard_size=shard_size, val_fraction=val_fraction))
    return root / "manifest"
