"""Shared fixtures of the trainer tests: a tiny manifest over dummy files and a feature store
written directly with zarr (the store contract of DESIGN §3.3), so the trainer is tested without
decoding or encoding anything."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import zarr

from manifests.build import ManifestConfig, build_manifest
from manifests.manifest import load_manifest
from pipeline.storage import StoreLocation
from pipeline.store_format import commit_name, encoder_fingerprint, make_commit, rows_sha256

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun script runs


def subprocess_env(*paths: Path, **extra: str) -> dict[str, str]:
    """os.environ with ``paths`` and the repository put first on PYTHONPATH."""
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(REPO), *([old] if old else [])]), **extra}

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")

# tiny dims: F frames, T tokens per frame, D width
F, T, D = 3, 5, 32


def make_manifest(root: Path, n_videos: int = 12, val_fraction: float = 0.25, seed: int = 0, shard_size: int = 4) -> Path:
    """A manifest of ``n_videos`` dummy files, each with a colour and a shape question (one
    conversation each) and, for every third video, one two-turn conversation."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_videos):
        vid = f"v_{i:03d}"
        (videos / f"{vid}.mp4").write_bytes(f"dummy {vid}".encode())
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        records.append({"id": f"{vid}-c", "video": f"{vid}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat colour is the moving object?"},
            {"from": "gpt", "value": f"The object is {colour}."}]})
        records.append({"id": f"{vid}-s", "video": f"{vid}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat shape is the moving object?"},
            {"from": "gpt", "value": f"It is a {shape}."}]})
        if i % 3 == 0:
            records.append({"id": f"{vid}-m", "video": f"{vid}.mp4", "conversations": [
                {"from": "human", "value": "<video>\nWhat colour is the moving object?"},
                {"from": "gpt", "value": f"The object is {colour}."},
                {"from": "human", "value": "And its shape?"},
                {"from": "gpt", "value": f"It is a {shape}."}]})
    instructions = root / "instructions.json"
    instructions.write_text(json.dumps(records))
    out = root / "manifest"
    build_manifest(ManifestConfig(instructions=instructions, videos=videos, out=out, shard_size=shard_size,
                                  val_fraction=val_fraction, seed=seed))
    return out


def make_store(path: Path, manifest_dir: Path, frames: int = F, tokens: int = T, width: int = D,
               status: dict[int, int] | None = None, seed: int = 0, encoder_model: str = "test-tiny",
               encoder: dict | None = None) -> Path:
    """A feature store for the manifest: random float16 tokens (each video's colour added to a
    few channels so there is something to learn), every row ok unless ``status`` says otherwise."""
    manifest = load_manifest(manifest_dir)
    n = len(manifest.videos)
    shard = manifest.shard_size
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, frames, tokens, width)).astype(np.float16)
    for row in range(n):
        data[row, :, :, row % len(COLOURS)] += 3.0
    group = zarr.create_group(store=str(path), zarr_format=3)
    arr = group.create_array("tokens", shape=data.shape, chunks=(1, frames, tokens, width),
                             shards=(shard, frames, tokens, width), dtype="float16")
    arr[:] = data
    group.create_array("frame_index", shape=(n, frames), dtype="int32")[:] = np.tile(np.arange(frames, dtype=np.int32), (n, 1))
    group.create_array("n_frames", shape=(n,), dtype="int32")[:] = np.full(n, frames, dtype=np.int32)
    st = np.ones(n, dtype=np.uint8)
    for row, value in (status or {}).items():
        st[row] = value
    group.create_array("status", shape=(n,), dtype="uint8")[:] = st
    encoder = encoder or {"model": encoder_model, "pretrained": "none", "weights_sha256": None, "image_size": 32,
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                          "resize_mode": "shortest", "precision": "fp32", "layer": -1}
    attrs = {
        "format_version": 1, "encoder": encoder, "encoder_fingerprint": encoder_fingerprint(encoder),
        "frames": frames, "sampling": "uniform", "tokens_per_frame": tokens, "width": width,
        "token_layout": "cls+patches", "manifest_id": manifest.manifest_id,
        "manifest_fingerprint": manifest.fingerprint, "shard_size": shard, "n_rows": n,
    }
    group.attrs.update(attrs)
    location = StoreLocation(path)
    for index in range(manifest.n_shards):  # every shard committed, as an extraction would leave it
        rows = slice(index * shard, (index + 1) * shard)
        commit = make_commit(attrs, index, data[rows], group["frame_index"][rows], group["n_frames"][rows], st[rows],
                             [], rows_sha256(manifest.shard_rows(index)), "test")
        location.write(commit_name(index), json.dumps(commit).encode())
    return path


def tiny_train_args(manifest: Path, store: Path, out: Path, **overrides) -> dict:
    """TrainConfig keywords for a tiny, fast CPU run."""
    args = dict(manifest=manifest, store=store, out=out, preset="tiny", vocab_size=320, queries=4,
                summary_layers=1, summary_heads=4, batch_size=4, steps=4, lr=2e-3, warmup=1,
                feature_cache="ram", workers=0, seed=0, max_len=128, device="cpu", threads=1)
    args.update(overrides)
    return args


def cli_args(**kwargs) -> list[str]:
    """``run_train.py train`` flags for TrainConfig keywords."""
    flags = []
    for key, value in kwargs.items():
        if key == "train_parts":
            flags += ["--train", ",".join(value)]
        elif value is True:
            flags.append("--" + key.replace("_", "-"))
        elif value is not None and value is not False:
            flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
