"""Shared fixtures of the trainer tests: a tiny manifest over dummy files and a feature store
written directly with zarr (the store contract of DESIGN §3.3), so the trainer is tested without
decoding or encoding anything."""

from __future__ import annotations

import json
import os
import subprocess
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


# --- killing a training process at a chosen moment of a write -------------------------------------

# Each moment: where a training process is killed (SIGKILL, as `kill -9` or the OOM killer would)
# on the nth time it gets there. The patches wrap the library calls the trainer makes; the trainer
# itself has no hook.
KILL_MOMENTS = {
    "model.safetensors written": "after save_model returns",
    "optimizer.safetensors half written": "after save_file, the file cut to half its bytes",
    "before state.json": "when state.json is about to be written",
    "state.json half written": "state.json holding half of its text",
    "renamed, old ones not yet deleted": "right after the checkpoint's rename",
    "an old checkpoint half deleted": "inside the deletion of an old checkpoint, one file gone",
    "config.json half written": "config.json's temporary file holding half of its text",
    "metrics line half written": "metrics.jsonl holding half of a line",
}


def install_kill(moment: str, nth: int) -> None:
    """Patch this process so that it SIGKILLs itself at ``moment`` (a `KILL_MOMENTS` key) the
    ``nth`` time it is reached; for a subprocess that then runs ``run_train.main``."""
    import shutil
    import signal

    import trainer.checkpoint as checkpoint
    import trainer.metrics as metrics

    if moment not in KILL_MOMENTS:
        raise ValueError(f"unknown kill moment {moment!r}")
    count = [0]

    def due() -> bool:
        count[0] += 1
        return count[0] == nth

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def half(path: Path, text: str) -> None:
        Path(path).write_bytes(text.encode()[: len(text.encode()) // 2])

    save_model, save_file, write_text, write_bytes = checkpoint.save_model, checkpoint.save_file, Path.write_text, Path.write_bytes
    replace, rmtree, append = os.replace, shutil.rmtree, metrics.MetricsLog.append

    if moment == "model.safetensors written":
        def patched_save_model(*args, **kwargs):
            save_model(*args, **kwargs)
            if due():
                die()
        checkpoint.save_model = patched_save_model
    elif moment == "optimizer.safetensors half written":
        def patched_save_file(tensors, filename, *args, **kwargs):
            save_file(tensors, filename, *args, **kwargs)
            if due():
                os.truncate(filename, os.path.getsize(filename) // 2)
                die()
        checkpoint.save_file = patched_save_file
    elif moment in ("before state.json", "state.json half written"):
        def patched_write_text(self, data, *args, **kwargs):
            if self.name == "state.json" and due():
                if moment != "before state.json":
                    half(self, data)
                die()
            return write_text(self, data, *args, **kwargs)
        Path.write_text = patched_write_text
    elif moment == "config.json half written":  # its temporary (pipeline.atomic) half written
        def patched_write_bytes(self, data, *args, **kwargs):
            if self.name.startswith("config.json.") and self.name.endswith(".tmp") and due():
                write_bytes(self, data[: len(data) // 2])
                die()
            return write_bytes(self, data, *args, **kwargs)
        Path.write_bytes = patched_write_bytes
    elif moment == "renamed, old ones not yet deleted":
        def patched_replace(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if Path(src).name.startswith(".tmp-step-") and due():
                die()
        os.replace = patched_replace
    elif moment == "an old checkpoint half deleted":
        def patched_rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.parent.name == "checkpoints" and (path / "model.safetensors").is_file() and due():
                (path / "model.safetensors").unlink()
                die()
            return rmtree(path, *args, **kwargs)
        shutil.rmtree = patched_rmtree
    elif moment == "metrics line half written":
        def patched_append(self, record):
            if due():
                with open(self.path, "a") as f:
                    line = json.dumps(record) + "\n"
                    f.write(line[: len(line) // 2])
                die()
            return append(self, record)
        metrics.MetricsLog.append = patched_append


def run_killed(jobs: list[tuple[str, int, list[str]]], timeout: float = 600, at_once: int = 1) -> list[int]:
    """Run ``run_train.py train FLAGS`` once per job ``(moment, nth, FLAGS)``, each killed at its
    moment (`install_kill`); returns each run's exit status (-9: killed), in the order of `jobs`.
    One launcher process imports the trainer once and forks a child per job (nothing has run in
    it yet: no thread, no event loop to inherit), which saves the seconds of importing torch for
    every job. At most `at_once` children run at a time (each job has its own run directory and
    its own process, so they do not meet)."""
    script = ("import json, os, sys, trainer_helpers, run_train, trainer.train\n"
              f"jobs, at_once = {jobs!r}, {int(at_once)!r}\n"
              "statuses, running = [None] * len(jobs), {}\n"
              "def reap():\n"
              "    pid, status = os.wait()\n"
              "    statuses[running.pop(pid)] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)\n"
              "for index, (moment, nth, flags) in enumerate(jobs):\n"
              "    while len(running) >= max(1, at_once):\n"
              "        reap()\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        trainer_helpers.install_kill(moment, nth)\n"
              "        os._exit(run_train.main(['train', *flags]))\n"
              "    running[pid] = index\n"
              "while running:\n"
              "    reap()\n"
              "print(json.dumps(statuses))\n")
    env = subprocess_env(Path(__file__).resolve().parent, OMP_NUM_THREADS="1")
    proc = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the kill launcher failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
