"""Benchmark: decode time of `--sampling keyframe` vs `--sampling uniform` on long-GOP videos.

What it measures. DESIGN §3.2 offers two sampling policies: `uniform` decodes the exact centre
frame of each of F segments, which on a long GOP means decoding every frame from the previous
keyframe up to the target; `keyframe` moves each sample to the nearest keyframe, so one decode
per sample suffices. This script times `pipeline.decode.decode_video` (the decode stage the
extraction runs per video: container probe, decord open and index, sampled-frame decode with the
decoder-side resize, centre crop) under both policies, side by side in one run, on long H.264
videos whose GOPs are exactly 250 frames (libx264 g=keyint_min=250, scene-cut detection off).

It reports, per policy, the median seconds per video over all (video, repeat) samples, and the
speedup uniform / keyframe. The two policies are timed interleaved, video by video, in
alternating order, so that neither always runs second and load from elsewhere on the machine
hits both alike. For context it also times what both policies pay regardless of the policy:
decord opening and indexing the file (no decode). It also checks that every index the keyframe
policy decoded is one of decord's `get_key_indices()` (exits non-zero if not).

The videos are generated once into --work (reused on later runs when present) by
bench/corpus.py: moving content, so that P-frames carry real residuals; x264 ultrafast.

Reproduce (the numbers in the README were measured with exactly this, on a 2-core CPU box):

    .venv/bin/python bench/keyframe_speed.py --work /tmp/vidcache-bench-keyframe --out keyframe_speed.json

Output: a JSON object on stdout (and in --out if given), then a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from pipeline.decode import DecodeSpec, decode_video  # noqa: E402
from pipeline.sampling import KEYFRAME, UNIFORM  # noqa: E402
from corpus import GOP, generate_videos  # bench/ (on sys.path when run as a script)  # noqa: E402
from report import emit  # noqa: E402
from runner import work_dir  # noqa: E402

X264_OPTIONS = {"g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0", "preset": "ultrafast", "threads": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None,
                   help="directory for the generated videos; reused when they already exist (default: a temp dir, "
                        "deleted at exit)")
    p.add_argument("--videos", type=int, default=3, help="number of long videos to generate and time (default 3)")
    p.add_argument("--seconds", type=float, default=180.0, help="length of each video in seconds (default 180)")
    p.add_argument("--fps", type=int, default=25, help="frame rate of the generated videos (default 25)")
    p.add_argument("--width", type=int, default=320, help="frame width of the generated videos (default 320)")
    p.add_argument("--height", type=int, default=240, help="frame height of the generated videos (default 240)")
    p.add_argument("--frames", type=int, default=8, help="F, frames sampled per video (default 8)")
    p.add_argument("--image-size", type=int, default=224,
                   help="encoder input size the decoder resizes to (default 224, ViT-B-16)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all videos per policy (default 3)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this path")
    return p.parse_args(argv)


def ensure_videos(work: Path, args: argparse.Namespace) -> tuple[list[Path], float]:
    """Generate the videos that are missing; return their paths and the seconds spent generating."""
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{int(args.seconds)}s_{args.fps}fps_{args.width}x{args.height}_g{GOP}"
    paths = [work / f"moving_{tag}_{i}.mp4" for i in range(args.videos)]
    spent = generate_videos([(path, args.seconds, i, args.width, args.height, args.fps, X264_OPTIONS)
                             for i, path in enumerate(paths)])
    return paths, spent


def check_keyframes(paths: list[Path], spec: DecodeSpec) -> dict:
    """Every keyframe-policy index must be one of decord's key indices; also report the GOPs."""
    import decord

    info = {}
    for path in paths:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        keys = [int(k) for k in reader.get_key_indices()]
        decoded = decode_video(path, spec)
        bad = sorted(set(int(i) for i in decoded.frame_index) - set(keys))
        if bad:
            raise SystemExit(f"{path.name}: keyframe sampling decoded non-key frames {bad} (keys {keys[:10]}...)")
        gops = np.diff(keys)
        info[path.name] = {
            "n_frames": len(reader),
            "n_keyframes": len(keys),
            "gop_min": int(gops.min()) if len(gops) else None,
            "gop_max": int(gops.max()) if len(gops) else None,
            "keyframe_indices": [int(i) for i in decoded.frame_index],
        }
    return info


def time_one(path: Path, spec: DecodeSpec) -> float:
    """Seconds for one `decode_video` call."""
    start = time.perf_counter()
    decoded = decode_video(path, spec)
    elapsed = time.perf_counter() - start
    assert decoded.frames.shape == (spec.frames, spec.image_size, spec.image_size, 3)
    return elapsed


def time_open(path: Path) -> float:
    """Seconds to open and index a video with decord and list its keyframes, decoding nothing:
    the fixed cost that both policies pay (it bounds the keyframe speedup from above)."""
    import decord

    start = time.perf_counter()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    len(reader), reader.get_key_indices()
    elapsed = time.perf_counter() - start
    del reader
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    with work_dir(args.work, "vidcache-bench-keyframe-") as work:
        paths, generation_s = ensure_videos(work, args)
        specs = {policy: DecodeSpec(frames=args.frames, sampling=policy, image_size=args.image_size)
                 for policy in (UNIFORM, KEYFRAME)}
        keyframe_check = check_keyframes(paths, specs[KEYFRAME])  # also warms the page cache
        for path in paths:  # warm-up for the other policy
            time_one(path, specs[UNIFORM])
        # Interleaved per video, order alternating, so that load from elsewhere on the box hits
        # both policies alike; the median is over all (video, repeat) samples.
        runs: dict[str, list[float]] = {UNIFORM: [], KEYFRAME: []}
        opens: list[float] = []
        flip = False
        for _ in range(args.repeats):
            for path in paths:
                for policy in ((KEYFRAME, UNIFORM) if flip else (UNIFORM, KEYFRAME)):
                    runs[policy].append(time_one(path, specs[policy]))
                opens.append(time_open(path))
                flip = not flip
        median = {policy: statistics.median(values) for policy, values in runs.items()}
        open_s = statistics.median(opens)
        result = {
            "benchmark": "keyframe_speed",
            "videos": len(paths),
            "seconds_per_video": args.seconds,
            "fps": args.fps,
            "resolution": f"{args.width}x{args.height}",
            "gop": GOP,
            "x264_options": X264_OPTIONS,
            "frames_sampled": args.frames,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "uniform_s_per_video": round(median[UNIFORM], 4),
            "keyframe_s_per_video": round(median[KEYFRAME], 4),
            "speedup_uniform_over_keyframe": round(median[UNIFORM] / median[KEYFRAME], 2),
            "open_index_s_per_video": round(open_s, 4),
            "samples_s": {k: [round(v, 4) for v in vs] for k, vs in runs.items()},
            "keyframe_indices_subset_of_get_key_indices": True,
            "keyframe_check": keyframe_check,
            "generation_s": round(generation_s, 1),
            "total_runtime_s": round(time.perf_counter() - started, 1),
        }
    emit(result, args.out, print_table)
    return result



def print_table(result: dict) -> None:
    uniform, keyframe = result["uniform_s_per_video"], result["keyframe_s_per_video"]
    print(f"| sampling | s / video (median of {len(result['samples_s'][UNIFORM])}) | speedup |")
    print("|---|---|---|")
    print(f"| uniform | {uniform:.3f} | 1.00x |")
    print(f"| keyframe | {keyframe:.3f} | {uniform / keyframe:.2f}x |")
    print(f"| (open + index only, no decode) | {result['open_index_s_per_video']:.3f} | |")
    print(f"\n{result['videos']} videos x {result['seconds_per_video']:g} s, {result['resolution']} @ {result['fps']} fps, "
          f"GOP {result['gop']}, F={result['frames_sampled']}, resized to short side {result['image_size']}")


if __name__ == "__main__":
    main()
