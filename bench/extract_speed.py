"""Benchmark: end-to-end time of the extraction job vs a serial Video-ChatGPT-style script and vs
the decode-only limit of this machine.

What it measures. Every row is one subprocess, timed from outside (`time.perf_counter` around
`subprocess.run`): process start to process exit, imports, Ray start-up, model loading and
writing included. All rows read the same corpus and the same manifest rows, encode with the
project's tiny tower `demo-tiny` (seeded random weights, `--pretrained none`, fp32) and sample
F=8 frames per video uniformly (`pipeline.sampling.uniform_indices`):

1. serial (Video-ChatGPT style): a plain script (`_serial` below), one process, one video at a
   time, as Video-ChatGPT's feature script does it: decord `VideoReader` at full resolution
   (decord's default threads), `get_batch` of the same 8 indices the job decodes, each frame
   resized with PIL bicubic so its short side is the encoder's input size and centre-cropped
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
import multiprocessing
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the hidden subcommands import the project without an install

from report import emit, print_checks  # bench/report.py (bench/ is on sys.path when run as a script)  # noqa: E402

ENCODER = "demo-tiny"
FRAMES = 8
WIDTH, HEIGHT, FPS, GOP = 640, 360, 25, 250
X264_OPTIONS = {"preset": "veryfast", "bf": "3", "g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0",
                "threads": "1"}
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


class BenchError(RuntimeError):
    """A subprocess of the benchmark failed; the message carries its output's tail."""


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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- corpus -------------------------------------------------------------------------------------

def make_video(job: tuple) -> int:
    """Write one H.264 video (see the module docstring) of `seconds` to `path`; returns its bytes.
    `job` is (path, seconds, seed) or (path, seconds, seed, width, height, fps) (bench/extract.py's
    mixed corpus). Runs in a spawned worker: PyAV here never shares a process with decord."""
    import av

    path, seconds, seed, *size = job
    width, height, fps = size or (WIDTH, HEIGHT, FPS)
    rng = np.random.default_rng(seed)
    # A smooth texture twice the frame size (scrolled diagonally), a square and a disc on
    # Lissajous paths with changing colours, and low-bit grain cycling through 7 fields.
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
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.codec_context.time_base = Fraction(1, fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(X264_OPTIONS)
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
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path.stat().st_size


def ensure_corpus(work: Path, n: int, seconds: float) -> tuple[Path, list[Path], float]:
    """Generate the missing videos (spawned workers, one per core); return the video folder, the
    N videos and the seconds spent generating."""
    videos = work / f"videos_{seconds:g}s_{WIDTH}x{HEIGHT}_{FPS}fps_g{GOP}"
    videos.mkdir(parents=True, exist_ok=True)
    paths = [videos / f"v_bench{i:05d}.mp4" for i in range(n)]
    jobs = [(path, seconds, i) for i, path in enumerate(paths) if not path.exists()]
    if not jobs:
        return videos, paths, 0.0
    workers = min(len(jobs), len(os.sched_getaffinity(0)))
    log(f"generating {len(jobs)} videos of {seconds:g} s in {workers} processes into {videos}")
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(make_video, job): job[0] for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            log(f"  {done}/{len(jobs)} {futures[future].name} ({future.result() / 1e6:.1f} MB)")
    return videos, paths, time.perf_counter() - start


def write_instructions(path: Path, video_ids: list[str]) -> None:
    """Two VideoInstruct-100K flat records per video."""
    records = []
    for video_id in video_ids:
        records.append({"video_id": video_id, "q": "What moves in the video?",
                        "a": "A square and a disc move over a scrolling texture."})
        records.append({"video_id": video_id, "q": "Describe the video.\nQA_GT_caption_based_noisy",
                        "a": "Two shapes cross a textured background that scrolls diagonally."})
    path.write_text(json.dumps(records), encoding="utf-8")


def encoder_image_size() -> int:
    """demo-tiny's input size, from its open_clip config (no torch import needed)."""
    config = json.loads((REPO / "pipeline" / "encoder_configs" / f"{ENCODER}.json").read_text(encoding="utf-8"))
    return int(config["vision_cfg"]["image_size"])


# --- subprocesses -------------------------------------------------------------------------------

def cpu_of_children() -> float:
    """CPU seconds (user + system) of the finished, reaped subprocesses and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], logs: Path, name: str, cpu: list[float] | None = None) -> tuple[float, str]:
    """Run `cmd` in the repository root with stdout and stderr to logs/NAME.{out,err}; return
    (seconds from start to exit, stdout), and append its CPU seconds (all its processes that
    were reaped) to `cpu`. A non-zero exit raises BenchError with the tail."""
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        start, cpu_start = time.perf_counter(), cpu_of_children()
        proc = subprocess.run(cmd, cwd=REPO, stdout=stdout, stderr=stderr)
        elapsed = time.perf_counter() - start
        if cpu is not None:
            cpu.append(cpu_of_children() - cpu_start)
    if proc.returncode:
        tail = "\n".join((out.read_text() + err.read_text()).splitlines()[-30:])
        raise BenchError(f"`{' '.join(cmd)}` exited with {proc.returncode}; the end of its output:\n{tail}")
    return elapsed, out.read_text()


def store_status(python: str, store: Path, logs: Path, name: str) -> dict:
    """`run_extract.py status --json` of a store, reduced to what the completeness check needs."""
    _, text = run([python, "run_extract.py", "status", "--store", str(store), "--json"], logs, name)
    status = json.loads(text)
    keys = ("rows", "ok", "failed", "pending", "shards_done", "shards_total", "failures_by_reason")
    return {**{k: status[k] for k in keys}, "image_size": status["encoder"]["image_size"]}


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

def bench(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    tmpdir = None
    if args.work is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="vidcache-bench-extract-")
        work = Path(tmpdir.name)
    else:
        work = args.work.expanduser().resolve()
    try:
        return measure(args, work, started)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


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
        "serial": [py, str(Path(__file__).resolve()), "_serial", "--manifest", str(manifests[64]),
                   "--out", str(serial_out)],
        "job64": [*extract, "--manifest", str(manifests[64]), "--store", str(stores["job64"])],
        "job8": [*extract, "--manifest", str(manifests[8]), "--store", str(stores["job8"])],
        "ray64": [*extract, "--manifest", str(manifests[64]), "--store", str(stores["ray64"]), "--ray-address", "local"],
        "limit": [py, str(Path(__file__).resolve()), "_decode_only", "--manifest", str(manifests[64]),
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
        "x264_options": X264_OPTIONS,
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


def check(label: str, value: float, op: str, bar: float) -> dict:
    passed = {">=": value >= bar, "<=": value <= bar, "<": value < bar}[op]
    return {"label": label, "value": round(value, 3), "bar": f"{op} {bar:g}", "pass": passed}


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


# --- hidden subcommands (the rows that are not the project's CLI) -------------------------------

def clip_preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """A CLIP image processor's geometry on one full-resolution frame: PIL bicubic resize of the
    short side to `size`, then a centre crop of size x size (uint8 in, uint8 out)."""
    from PIL import Image

    height, width = frame.shape[:2]
    scale = size / min(width, height)
    new_w, new_h = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


def serial_main(argv: list[str]) -> int:
    """Row 1: Video-ChatGPT's way, one process, one video at a time (see the module docstring)."""
    p = argparse.ArgumentParser(prog="extract_speed.py _serial",
                                description="Extract features serially, one pickle per video (benchmark row 1).")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder whose videos to extract, in row order")
    p.add_argument("--out", type=Path, required=True, help="folder for the <video_id>.pkl files")
    p.add_argument("--indices", choices=("job", "linspace"), default="job",
                   help="job: the job's uniform indices (a fair ratio decodes the same frames); linspace: "
                        "Video-ChatGPT's own np.linspace(0, n - 1, F), whose first frame is a free keyframe")
    args = p.parse_args(argv)
    import torch  # noqa: F401  before decord: with decord loaded first, torch's attention segfaults on CPU
    import decord

    from manifests.manifest import load_manifest
    from pipeline.encoder import EncoderSpec, load_encoder
    from pipeline.sampling import uniform_indices

    encoder = load_encoder(EncoderSpec(ENCODER, "none", -1, "fp32"))
    manifest = load_manifest(args.manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    for entry in manifest.videos:
        reader = decord.VideoReader(str(manifest.abs_path(entry)), ctx=decord.cpu(0))
        indices = uniform_indices(len(reader), FRAMES) if args.indices == "job" \
            else np.linspace(0, len(reader) - 1, FRAMES).astype(int).tolist()
        frames = reader.get_batch(indices).asnumpy()
        tokens = encoder.encode(np.stack([clip_preprocess(frame, encoder.image_size) for frame in frames]))
        with (args.out / f"{entry.video_id}.pkl").open("wb") as fh:
            pickle.dump({"video_id": entry.video_id, "frame_index": np.asarray(indices, dtype=np.int32),
                         "tokens": tokens}, fh)
    print(json.dumps({"videos": len(manifest.videos)}))
    return 0


def decode_one(job: tuple[str, str, int]) -> str | None:
    """Decode one manifest entry as the job does (in a pool worker); its failure reason or None."""
    from pipeline.decode import DecodeSpec, decode_file
    from pipeline.errors import DecodeError

    path, kind, image_size = job
    try:
        decode_file(Path(path), kind, DecodeSpec(FRAMES, "uniform", image_size, "shortest"))
    except DecodeError as err:
        return f"{path}: {err}"
    return None


def decode_only_main(argv: list[str]) -> int:
    """Row 5: every video through the project's decoder, one spawn worker per usable core."""
    p = argparse.ArgumentParser(prog="extract_speed.py _decode_only",
                                description="Decode every video of a manifest, nothing else (benchmark row 5).")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder whose videos to decode")
    p.add_argument("--image-size", type=int, required=True, help="the encoder's input size the decoder resizes to")
    args = p.parse_args(argv)
    from manifests.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    jobs = [(str(manifest.abs_path(e)), e.kind, args.image_size) for e in manifest.videos]
    workers = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = [e for e in pool.map(decode_one, jobs) if e]
    print(json.dumps({"videos": len(jobs), "failed": len(errors), "workers": workers}))
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hidden = {"_serial": serial_main, "_decode_only": decode_only_main}
    if argv and argv[0] in hidden:
        return hidden[argv[0]](argv[1:])
    args = parse_args(argv)
    try:
        result = bench(args)
    except BenchError as err:
        log(f"error: {err}")
        return 1
    emit(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
