"""The benchmarks' video corpus: H.264 videos with content that moves every frame, made as web
encoders make them, plus the instruction file and the settings every extraction row shares
(bench/extract.py, bench/extract_speed.py, bench/keyframe_speed.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the project, without an install
ENCODER = "demo-tiny"  # the same tower for every row: random weights, so the data path dominates
FRAMES = 8
GOP = 250
# libx264 as a web encoder runs it: 3 B-frames, a keyframe exactly every GOP frames (no scene-cut
# keyframes), one thread so that generation in a process pool is deterministic per video
WEB_X264 = {"preset": "veryfast", "bf": "3", "g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0",
            "threads": "1"}


def moving_frames(seconds: float, fps: int, width: int, height: int, seed: int):
    """(height, width, 3) uint8 frames: a smooth texture twice the frame size scrolled diagonally,
    a square and a disc on Lissajous paths with changing colours, and low-bit grain cycling
    through 7 fields, so that P and B frames carry real residuals."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(12, 16, 3)).astype(np.float32)
    ys, xs = np.linspace(0, 11, 2 * height), np.linspace(0, 15, 2 * width)
    y0, x0 = ys.astype(int), xs.astype(int)
    y1, x1 = np.minimum(y0 + 1, 11), np.minimum(x0 + 1, 15)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    texture = (coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x1] * wx) * (1 - wy) \
        + (coarse[y1][:, x0] * (1 - wx) + coarse[y1][:, x1] * wx) * wy
    texture = np.clip(texture + rng.normal(0, 8, size=texture.shape[:2] + (1,)), 0, 255).astype(np.uint8)
    grain = rng.integers(0, 8, size=(7, height, width, 3), dtype=np.uint8)
    side = height // 4
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
    phase = rng.uniform(0, 2 * np.pi, size=4)
    for index in range(int(round(seconds * fps))):
        t = index / fps
        oy, ox = (index * 2) % height, (index * 3) % width
        pixels = texture[oy : oy + height, ox : ox + width] ^ grain[index % 7]
        sy = int((height - side) * (0.5 + 0.5 * np.sin(0.7 * t + phase[0])))
        sx = int((width - side) * (0.5 + 0.5 * np.cos(0.45 * t + phase[1])))
        pixels[sy : sy + side, sx : sx + side] = ((index * 7) % 256, 255 - (index * 5) % 256, 128)
        dy = int((height - side) * (0.5 + 0.5 * np.sin(0.5 * t + phase[2])))
        dx = int((width - side) * (0.5 + 0.5 * np.sin(0.9 * t + phase[3])))
        pixels[dy : dy + side, dx : dx + side][disc] = (230, (index * 3) % 256, 40)
        yield pixels


def make_video(job: tuple) -> int:
    """Write one video to `path` whole (a temporary name, then a rename); returns its bytes. `job`
    is (path, seconds, seed, width, height, fps[, x264 options]): a tuple, so that a process pool
    can map it. Run it in a spawned worker: PyAV must not share a process with decord."""
    from manifests.video_writer import write_video

    path, seconds, seed, width, height, fps, *options = job
    tmp = path.with_suffix(".part.mp4")
    write_video(tmp, moving_frames(seconds, fps, width, height, seed), fps, options=options[0] if options else WEB_X264)
    tmp.replace(path)
    return path.stat().st_size


def generate_videos(jobs: list[tuple]) -> float:
    """Make the videos of `jobs` (make_video's tuples) that do not exist yet, in spawned workers,
    one per core, with a progress line each on stderr; returns the seconds it took."""
    jobs = [job for job in jobs if not job[0].exists()]
    if not jobs:
        return 0.0
    workers = min(len(jobs), len(os.sched_getaffinity(0)))
    print(f"generating {len(jobs)} videos in {workers} processes into {jobs[0][0].parent}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(make_video, job): job[0] for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            print(f"  {done}/{len(jobs)} {futures[future].name} ({future.result() / 1e6:.1f} MB)", file=sys.stderr,
                  flush=True)
    return time.perf_counter() - start


def write_instructions(path: Path, video_ids: list[str]) -> None:
    """Two VideoInstruct-100K flat records per video."""
    records = []
    for video_id in video_ids:
        records.append({"video_id": video_id, "q": "What moves in the video?",
                        "a": "A square and a disc move over a scrolling texture."})
        records.append({"video_id": video_id, "q": "Describe the video.\nQA_GT_caption_based_noisy",
                        "a": "Two shapes cross a textured background that scrolls diagonally."})
    path.write_text(json.dumps(records), encoding="utf-8")


def encoder_image_size(encoder: str = ENCODER) -> int:
    """The tower's input size, from its open_clip config (no torch import needed)."""
    from pipeline.encoder import input_geometry

    return input_geometry(encoder)[0]
