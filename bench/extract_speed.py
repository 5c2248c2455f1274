"""Benchmark: end-to-end time of the extraction job vs a serial Video-ChatGPT-style script and vs
the decode-only limit of this machine.

What it measures. Every row is one subprocess, timed from outside (`time.perf_counter` around
`subprocess.run`): process start to process exit, imports, Ray start-up, model loading and
writing included. All rows read the same corpus and the same manifest rows, encode with the
project's tiny tower `demo-tiny` (seeded random weights, `--pretrained none`, fp32) and sample
F=8 frames per video uniformly (`pipeline.sampling.uniform_indices`):

1. serial (Video-ChatGPT style): a plain script (`bench/extraction_rows.py _serial`), one
   process, one video at a time, as Video-ChatGPT's feature script does it: decord
   `VideoReader` at full resolution (decord's default threads), `get_batch` of the same 8
   indices the job decodes, each frame resized with PIL bicubic so its short side is the encoder's input size and centre-cropped
   (as a CLIP image processor does), normalised and encoded by the same open_clip tower
   (`pipeline.encoder.load_encoder(...).encode`), one pickle per video.
2. job, 64-video shards: `run_extract.py extract` into a fresh store (manifest with
   `--shard-size 64`): the default, one-machine distributor (`pipeline.local`).
3. job, 8-video shards: the same with a `--shard-size 8` manifest.
3b. job on Ray: row 2 with `--ray-address local` (a Ray cluster of this machine, started by the
   job): what the Ray distributor costs on one small machine. No bar; reported for honesty.
4. rerun, nothing to do: row 2's command again on its finished store (run once, at the end).
5. limit: decode only, all cores: the project's decoder (`pipeline.decode.decode_file`, the
   same `DecodeSpec` the job uses) over every video in a spawn process pool of one worker per
   usable core; no encoding, no writing. Encoding with demo-tiny costs little, so this is about
   the fastest any extraction of this corpus can be on this machine.

Rows 1, 2, 3, 3b and 5 run `--repeats` times, interleaved round-robin with the order reversed on
every other pass, so that load from elsewhere on the machine hits all alike; the table shows
the median and the minimum seconds, videos/s at the median, and the median CPU seconds of all
the row's processes (user + system, from `getrusage(RUSAGE_CHILDREN)`: steadier than wall time
on a shared VM, and it shows what a row costs beyond decoding; not for the Ray row, whose
daemons and workers are not the job's children). The ratios (of medians) and
their bars: serial / job64 ("speedup vs serial") >= 1.5, limit / job64 ("fraction of the
limit") >= 0.85, job8 / job64 ("8-video shards slowdown") <= 1.10, and the rerun < 3 s. So that a
fast but broken job cannot look good, every job store is checked with `run_extract.py status
--json` (all rows ok, none failed or pending, all shards done), and the last 64-video store is
compared with the serial script's pickles: the same frame indices for every video, and the
mean token cosine (decoder-side resize vs PIL resize; 0.997-0.999 with demo-tiny, see
bench/fidelity.py). A failed bar or check is reported, not fatal: the exit code is 0 unless a
subprocess failed (then 1, with the tail of its output).

Corpus: N one-minute 640x360 H.264 videos (libx264 preset veryfast, 3 B-frames, GOP exactly
250 frames: keyint = min-keyint = 250, scene-cut detection off), 25 fps, with moving content
(a scrolling texture, two moving shapes and a cycling grain, so that P and B frames carry real
residuals). They are generated once into --work (reused when present) by spawned worker
processes, one per core: never in a process that has imported decord, whose bundled FFmpeg
PyAV would otherwise run on. Then an instruction file in VideoInstruct-100K's flat format
(`[{"video_id", "q", "a"}, ...]`) and the two manifests, made with `run_extract.py manifest`.

Reproduce (bench/results/extract_speed_cpu.json is this command with `--repeats 3` on the project's
2-core CPU box; extract_speed_cpu_before.json is its output at commit 07c357e, before the
extraction job was reworked, without the Ray row and the CPU column):

    .venv/bin/python bench/extract_speed.py --work /tmp/vidcache-bench-extract --json extract_speed.json

`--quick` (24 videos of 20 s, one repeat) finishes in a few minutes. Output: a JSON object on
stdout (and in --json if given), then a Markdown table; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from corpus import ENCODER, FRAMES, GOP, WEB_X264, encoder_image_size, generate_videos, write_instructions
from report import check, print_checks
from runner import bench_main, log, run, store_status, work_dir

ROWS_SCRIPT = str(Path(__file__).resolve().parent / "extraction_rows.py")
WIDTH, HEIGHT, FPS = 640, 360, 25
QUICK = {"videos": 24, "seconds": 20.0, "repeats": 1}
DEFAULTS = {"videos": 96, "seconds": 60.0, "repeats": 2}
ROWS = {  # key: label; the timed rows in their round-robin order
    "serial": "serial (Video-ChatGPT style)",
    "job64": "job, 64-video shards",
    "job8": "job, 8-video shards",
    "ray64": "job on Ray (--ray-address local), 64-video shards",
    "limit": "limit: decode only, all cores",
}
RERUN_LABEL = "rerun, nothing to do"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None,
                   help="directory for the corpus (reused when present), manifests, stores and logs "
                        "(default: a temp dir, deleted at exit)")
    p.add_argument("--videos", type=int, default=None, help="N, videos in the corpus (default 96; 24 with --quick)")
    p.add_argument("--seconds", type=float, default=None,
                   help="length of each video in seconds (default 60; 20 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs of each repeated row, interleaved (default 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a small trial: 24 videos of 20 s, one repeat (explicit flags still win)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this path")
    p.add_argument("--python", default=sys.executable,
                   help="Python that runs every row, with the project installed (default: this one)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.videos < 1 or args.seconds <= 0 or args.repeats < 1:
        p.error("--videos and --repeats must be at least 1 and --seconds positive")
    return args


def ensure_corpus(work: Path, n: int, seconds: float) -> tuple[Path, list[Path], float]:
    """Generate the missing videos; return the video folder, the
    N videos and the seconds spent generating."""
    videos = work / f"videos_{seconds:g}s_{WIDTH}x{HEIGHT}_{FPS}fps_g{GOP}"
    videos.mkdir(parents=True, exist_ok=True)
    paths = [videos / f"v_bench{i:05d}.mp4" for i in range(n)]
    generation_s = generate_videos([(path, seconds, i, WIDTH, HEIGHT, FPS) for i, path in enumerate(paths)])
    return videos, paths, generation_s


def compare_with_serial(serial_out: Path, manifest: Path, store: Path) -> dict:
    """Frame indices and mean token cosine of the serial pickles vs the job's store, per video."""
    import zarr

    group = zarr.open_group(store, mode="r")
    frame_index, tokens = group["frame_index"][:], group["tokens"][:].astype(np.float32)
    same, cosines = 0, []
    with (manifest / "videos.jsonl").open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    for row in rows:
        with (serial_out / f"{row['video_id']}.pkl").open("rb") as fh:
            ref = pickle.load(fh)
        same += int(np.array_equal(ref["frame_index"], frame_index[row["row"]]))
        a, b = ref["tokens"].astype(np.float32), tokens[row["row"]]
        cosines.append(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).mean())
    return {"videos": len(rows), "same_frame_indices": same, "token_cosine_mean": round(float(np.mean(cosines)), 4),
            "token_cosine_min_video": round(float(np.min(cosines)), 4)}


# --- the benchmark ------------------------------------------------------------------------------

def measure(args: argparse.Namespace, work: Path, started: float) -> dict:
    py, n = args.python, args.videos
    videos, paths, generation_s = ensure_corpus(work, n, args.seconds)
    run_dir = work / f"run_{n}x{args.seconds:g}s"
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    instructions = run_dir / "instructions.json"
    write_instructions(instructions, [path.stem for path in paths])
    manifests = {size: run_dir / f"manifest{size}" for size in (64, 8)}
    for size, manifest in manifests.items():
        run([py, "run_extract.py", "manifest", "--instructions", str(instructions), "--videos", str(videos),
             "--out", str(manifest), "--shard-size", str(size)], logs, f"manifest{size}")
    image_size = encoder_image_size()
    serial_out = run_dir / "serial_out"
    stores = {"job64": run_dir / "store64.zarr", "job8": run_dir / "store8.zarr", "ray64": run_dir / "ray64.zarr"}
    extract = [py, "run_extract.py", "extract", "--encoder", ENCODER, "--pretrained", "none",
               "--frames", str(FRAMES)]
    commands = {
        "serial": [py, ROWS_SCRIPT, "_serial", "--manifest", str(manifests[64]),
                   "--out", str(serial_out)],
        "job64": [*extract, "--manifest", str(manifests[64]), "--store", str(stores["job64"])],
        "job8": [*extract, "--manifest", str(manifests[8]), "--store", str(stores["job8"])],
        "ray64": [*extract, "--manifest", str(manifests[64]), "--store", str(stores["ray64"]), "--ray-address", "local"],
        "limit": [py, ROWS_SCRIPT, "_decode_only", "--manifest", str(manifests[64]),
                  "--image-size", str(image_size)],
    }
    fresh = {"serial": serial_out, **stores}  # outputs removed before each timed run

    samples: dict[str, list[float]] = {key: [] for key in ROWS}
    cpu_samples: dict[str, list[float]] = {key: [] for key in ROWS}
    statuses = []
    for repeat in range(args.repeats):
        order = list(ROWS) if repeat % 2 == 0 else list(reversed(ROWS))
        for key in order:
            if key in fresh:
                shutil.rmtree(fresh[key], ignore_errors=True)
            seconds, _ = run(commands[key], logs, f"{key}-{repeat}", cpu_samples[key])
            samples[key].append(seconds)
            log(f"[repeat {repeat + 1}/{args.repeats}] {ROWS[key]}: {seconds:.1f} s ({n / seconds:.2f} videos/s)")
            if key in stores:
                statuses.append({"row": key, "repeat": repeat,
                                 **store_status(py, stores[key], logs, f"status-{key}-{repeat}")})
    rerun_s, rerun_stdout = run(commands["job64"], logs, "rerun")
    log(f"{RERUN_LABEL}: {rerun_s:.1f} s")
    statuses.append({"row": "rerun", "repeat": 0, **store_status(py, stores["job64"], logs, "status-rerun")})
    agreement = compare_with_serial(serial_out, manifests[64], stores["job64"])

    median = {key: statistics.median(values) for key, values in samples.items()}
    for s in statuses:
        s["complete"] = (s["ok"] == n and s["failed"] == 0 and s["pending"] == 0
                         and s["shards_done"] == s["shards_total"] and s["image_size"] == image_size)
    complete = sum(s["complete"] for s in statuses)
    checks = {
        "speedup_vs_serial": check("speedup vs serial (serial / job64)", median["serial"] / median["job64"], ">=", 1.5),
        "fraction_of_limit": check("fraction of the limit (limit / job64)", median["limit"] / median["job64"],
                                   ">=", 0.85),
        "shard8_slowdown": check("8-video shards slowdown (job8 / job64)", median["job8"] / median["job64"],
                                 "<=", 1.10),
        "rerun_s": check("rerun seconds", rerun_s, "<", 3.0),
        "stores_complete": {"label": "job stores complete (status --json)", "bar": "every store",
                            "value": f"{complete}/{len(statuses)} stores: {n} ok, 0 failed, 0 pending, all shards, "
                                     f"{image_size} px", "pass": complete == len(statuses)},
        "same_frames_as_serial": {"label": "same frames as serial (last job64 store)", "bar": "every video",
                                  "value": f"{agreement['same_frame_indices']}/{n} videos "
                                           f"(token cosine {agreement['token_cosine_mean']:.4f})",
                                  "pass": agreement["same_frame_indices"] == n},
    }
    return {
        "benchmark": "extract_speed",
        "videos": n,
        "seconds_per_video": args.seconds,
        "fps": FPS,
        "resolution": f"{WIDTH}x{HEIGHT}",
        "gop": GOP,
        "x264_options": WEB_X264,
        "corpus_mb": round(sum(path.stat().st_size for path in paths) / 1e6, 1),
        "encoder": ENCODER,
        "pretrained": "none",
        "frames": FRAMES,
        "image_size": image_size,
        "cpus": len(os.sched_getaffinity(0)),
        "repeats": args.repeats,
        "rows": {key: {"label": label, "median_s": round(median[key], 2), "min_s": round(min(samples[key]), 2),
                       "videos_per_s": round(n / median[key], 3), "samples_s": [round(v, 2) for v in samples[key]],
                       "cpu_s_median": round(statistics.median(cpu_samples[key]), 1),
                       "command": " ".join(commands[key])}
                 for key, label in ROWS.items()},
        "rerun": {"label": RERUN_LABEL, "seconds": round(rerun_s, 2), "stdout": rerun_stdout.strip()},
        "checks": checks,
        "stores": statuses,
        "serial_vs_job": agreement,
        "all_pass": all(c["pass"] for c in checks.values()),
        "generation_s": round(generation_s, 1),
        "total_runtime_s": round(time.perf_counter() - started, 1),
    }


def print_table(result: dict) -> None:
    rows, n = result["rows"], result["videos"]
    print("| row | median s | min s | videos/s (median) | CPU s (median) | runs |")
    print("|---|---|---|---|---|---|")
    for key, row in rows.items():
        cpu = "n/a" if key == "ray64" else f"{row['cpu_s_median']:.1f}"  # Ray's daemons are not its children
        print(f"| {row['label']} | {row['median_s']:.1f} | {row['min_s']:.1f} | {row['videos_per_s']:.2f} "
              f"| {cpu} | {len(row['samples_s'])} |")
    print(f"| {result['rerun']['label']} | {result['rerun']['seconds']:.1f} | | | | 1 |")
    print()
    print_checks(result["checks"])
    print(f"\n{n} videos x {result['seconds_per_video']:g} s, {result['resolution']} @ {result['fps']} fps, "
          f"x264 {result['x264_options']['preset']} with B-frames, GOP {result['gop']}; {result['encoder']} "
          f"(random weights) at {result['image_size']} px, F={result['frames']}; {result['cpus']} CPUs")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with work_dir(args.work, "vidcache-bench-extract-") as work:
        return bench_main(lambda: measure(args, work, time.perf_counter()), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
