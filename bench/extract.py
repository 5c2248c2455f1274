"""Benchmark: extraction against what users would run instead, and against the job's own limit
(issue 13), on a realistic corpus.

Corpus (generated once into --work, reused): N H.264 videos as web encoders make them (libx264
veryfast, 3 B-frames, a keyframe every 250 frames, no scene-cut keyframes), lengths cycling
30, 60, 90, 120, 150, 180 s (ActivityNet averages about 2 minutes), 640x360 at 25 fps and
1280x720 at 30 fps alternately, with moving content (bench/corpus.py).
Same tower for every row (`demo-tiny`, random weights, fp32: the data path dominates, as it does
on a GPU node; `--encoder ViT-B-16` for the full-size tower), same F=8. Every row is one
subprocess timed from outside, start to exit (the rows that are not the project's CLI are
hidden subcommands of bench/extraction_rows.py):

1. cinego: Cinego's way, re-implemented (`_cinego`): PyAV decodes every frame of the video
   into a PIL image, F are picked (the job's uniform indices), each is PIL-resized (short side,
   bicubic), centre-cropped and normalised, encoded, and saved as one float32 `.npy` per video;
   one video at a time. Only the picked images are kept (Cinego keeps the list of all: 15 GB
   for three minutes of 720p); the decoding and conversion of every frame, the cost, is the same.
2. vchatgpt: Video-ChatGPT's way (`_serial`): decord at full resolution,
   `get_batch` of the job's F indices, PIL resize + crop, one pickle per video, one at a time;
   2b. the same with Video-ChatGPT's own `np.linspace(0, n-1, F)` indices (their first frame is a
   free keyframe: which frames are sampled changes the decode cost; the fair ratio is row 2's);
3. job: `run_extract.py extract --sampling uniform` (this machine's decoders and encoder, the
   store, commit records);
4. job keyframe: the same with `--sampling keyframe`;
5. decode only: the project's decoder over every video, one process per core, nothing else
   (`_decode_only`);
6. encode only: the job's encoder (one `BatchingEncoder`, torch threads = cores) over N x F
   frames already in memory (`_encode_only`), model loading included.
The job's limit is the slower of 5 and 6. Reported: seconds, videos/s and frames/s per row
(median of --repeats interleaved runs), ratios 3/1, 3/2, 4/1, 3/limit, and the store's bytes
per video against the raw float16 tensor bytes (F x T x D x 2). Targets (issue 13, 2-core
CPU): 3 >= 5x 1, 3 >= 1.5x 2, 4 >= 20x 1, 3 >= 0.85 of the limit, storage overhead <= 2%.
Every job store is checked complete (`status --json`).

As the work grows (`--scaling`): one 640x360 25 fps video per length (15 s, 1, 4 and 15 min;
`--lengths` to choose), and for rows 1, 3 and 4 the marginal seconds per video: each row runs on
a manifest of that video alone and with copies (hard links), and the difference is the copies'
cost with the start-up (imports, model loading) taken out: Cinego's way runs on 1 and 2 copies,
the job on 1 and 9 (its cost per video is small next to the start-up), divided by the copies
added; the median over --repeats such differences. Plotted with the driver's peak memory
against corpus size, one line per bench/driver_memory.py JSON (`--driver-memory`, by default
its 1k/100k run and its `--quick` 1k/10k run), into `bench/results/extract_scaling.png`.
`--replot JSON` draws the plot again from an earlier `--scaling` JSON's seconds per video and
the driver-memory JSONs, without running anything.

Reproduce:

    .venv/bin/python bench/extract.py --work /tmp/vidcache-bench-extract2 \
        --json bench/results/extract_cpu.json
    .venv/bin/python bench/extract.py --work /tmp/vidcache-bench-extract2 --scaling \
        --json bench/results/extract_scaling.json
    .venv/bin/python bench/extract.py --work /tmp/unused --replot bench/results/extract_scaling.json \
        --json bench/results/extract_scaling.json

`--quick` (12 videos of 10-30 s, one repeat) is a smoke run of a few minutes. Output: JSON on
stdout (and in --json), then the Markdown table; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpus import ENCODER, FRAMES, encoder_image_size, generate_videos, write_instructions  # noqa: E402
from report import check, print_checks  # noqa: E402
from runner import bench_main, log, run, store_status  # noqa: E402

ROWS_SCRIPT = str(HERE / "extraction_rows.py")
LENGTHS = (30, 60, 90, 120, 150, 180)
QUICK_LENGTHS = (10, 20, 30)
SIZES = ((640, 360, 25), (1280, 720, 30))
ROWS = {
    "cinego": "1. Cinego's way: PyAV decodes every frame to PIL, one .npy per video",
    "vchatgpt": "2. Video-ChatGPT's way: decord full resolution, same F indices, one pickle per video",
    "vchatgpt_linspace": "2b. the same with its own linspace indices (first frame a free keyframe)",
    "job": "3. this job, --sampling uniform",
    "job_keyframe": "4. this job, --sampling keyframe",
    "decode_only": "5. decode only, all cores",
    "encode_only": "6. encode only, frames in memory",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="corpus (reused), manifests, stores and logs")
    p.add_argument("--videos", type=int, default=None, help="N (default 24; 12 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved runs per row (default 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="12 videos of 10-30 s, one repeat")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--encoder", default=ENCODER,
                   help=f"the open_clip tower of every row, random weights (default {ENCODER}; ViT-B-16 for the "
                        "full-size tower, on a few videos)")
    p.add_argument("--scaling", action="store_true", help="seconds per video against video length (module docstring)")
    p.add_argument("--lengths", default="15,60,240,900", help="--scaling's video lengths in seconds")
    p.add_argument("--driver-memory", type=Path, nargs="+",
                   default=[HERE / "results" / "driver_memory_cpu.json", HERE / "results" / "driver_memory_quick_cpu.json"],
                   help="bench/driver_memory.py JSONs whose peaks --scaling plots, a line each")
    p.add_argument("--replot", type=Path, default=None,
                   help="an earlier --scaling JSON: plot its seconds per video again with --driver-memory, run nothing")
    p.add_argument("--plot", type=Path, default=HERE / "results" / "extract_scaling.png", help="--scaling's plot")
    args = p.parse_args(argv)
    args.videos = args.videos or (12 if args.quick else 24)
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


def corpus_plan(n: int, quick: bool) -> list[tuple[str, float, int, int, int]]:
    """(video id, seconds, width, height, fps) of each video: lengths and sizes cycling."""
    lengths = QUICK_LENGTHS if quick else LENGTHS
    return [(f"v_mix{i:04d}", float(lengths[i % len(lengths)]), *SIZES[(i // len(lengths)) % 2 if not quick else i % 2])
            for i in range(n)]


def ensure_corpus(work: Path, plan: list[tuple]) -> tuple[Path, float]:
    folder = work / "videos_mixed"
    folder.mkdir(parents=True, exist_ok=True)
    return folder, generate_videos([(folder / f"{vid}.mp4", seconds, i, w, h, fps)
                                    for i, (vid, seconds, w, h, fps) in enumerate(plan)])


def store_bytes(store: Path) -> int:
    """Bytes of the store's arrays on disk (tokens, frame_index, n_frames, status) and metadata,
    not the commit records and leases."""
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and p.relative_to(store).parts[0]
               not in ("commits", "leases"))


def measure(args: argparse.Namespace) -> dict:
    work = args.work.expanduser().resolve()
    plan = corpus_plan(args.videos, args.quick)
    videos, generation_s = ensure_corpus(work, plan)
    run_dir = work / f"run_{args.videos}{'_quick' if args.quick else ''}_{args.encoder}"
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    py, n = sys.executable, args.videos
    instructions = run_dir / "instructions.json"
    write_instructions(instructions, [video_id for video_id, *_ in plan])
    manifest = run_dir / "manifest"
    run([py, "run_extract.py", "manifest", "--instructions", str(instructions), "--videos", str(videos),
         "--out", str(manifest), "--shard-size", "64"], logs, "manifest")
    image_size = encoder_image_size(args.encoder)
    tower = ["--encoder", args.encoder]
    outs = {"cinego": run_dir / "cinego_out", "vchatgpt": run_dir / "vchatgpt_out",
            "vchatgpt_linspace": run_dir / "vchatgpt_linspace_out", "job": run_dir / "job.zarr",
            "job_keyframe": run_dir / "job_keyframe.zarr"}
    extract = [py, "run_extract.py", "extract", "--manifest", str(manifest), *tower, "--pretrained", "none",
               "--frames", str(FRAMES)]
    commands = {
        "cinego": [py, ROWS_SCRIPT, "_cinego", "--manifest", str(manifest), "--out", str(outs["cinego"]), *tower],
        "vchatgpt": [py, ROWS_SCRIPT, "_serial", "--manifest", str(manifest), "--out", str(outs["vchatgpt"]), *tower],
        "vchatgpt_linspace": [py, ROWS_SCRIPT, "_serial", "--manifest", str(manifest), "--out",
                              str(outs["vchatgpt_linspace"]), "--indices", "linspace", *tower],
        "job": [*extract, "--store", str(outs["job"])],
        "job_keyframe": [*extract, "--store", str(outs["job_keyframe"]), "--sampling", "keyframe"],
        "decode_only": [py, ROWS_SCRIPT, "_decode_only", "--manifest", str(manifest), "--image-size", str(image_size)],
        "encode_only": [py, ROWS_SCRIPT, "_encode_only", "--images", str(n * FRAMES), "--image-size", str(image_size),
                        *tower],
    }
    samples: dict[str, list[float]] = {key: [] for key in ROWS}
    statuses = []
    for repeat in range(args.repeats):
        for key in (list(ROWS) if repeat % 2 == 0 else list(reversed(ROWS))):
            if key in outs:
                shutil.rmtree(outs[key], ignore_errors=True)
            seconds, _ = run(commands[key], logs, f"{key}-{repeat}")
            samples[key].append(seconds)
            log(f"[repeat {repeat + 1}/{args.repeats}] {ROWS[key]}: {seconds:.1f} s")
            if key.startswith("job"):
                statuses.append({"row": key, **store_status(py, outs[key], logs, f"status-{key}-{repeat}")})
    median = {key: statistics.median(v) for key, v in samples.items()}
    limit = max(median["decode_only"], median["encode_only"])
    with (outs["job"] / "zarr.json").open() as f:
        attrs = json.load(f)["attributes"]
    raw = FRAMES * attrs["tokens_per_frame"] * attrs["width"] * 2
    per_video = store_bytes(outs["job"]) / n
    complete = all(s["ok"] == n and s["pending"] == 0 and s["shards_done"] == s["shards_total"] for s in statuses)
    checks = {
        "job_vs_cinego": check("job / Cinego's way (3 vs 1)", median["cinego"] / median["job"], ">=", 5),
        "job_vs_vchatgpt": check("job / Video-ChatGPT's way (3 vs 2)", median["vchatgpt"] / median["job"], ">=", 1.5),
        "keyframe_vs_cinego": check("keyframe job / Cinego's way (4 vs 1)", median["cinego"] / median["job_keyframe"],
                                    ">=", 20),
        "fraction_of_limit": check("job / its limit (slower of 5 and 6)", limit / median["job"], ">=", 0.85),
        "storage_overhead": check("store bytes per video / raw float16 bytes - 1", per_video / raw - 1, "<=", 0.02),
        "stores_complete": {"label": "job stores complete (status --json)", "value": str(complete),
                            "bar": "all", "pass": complete},
    }
    total_frames = n * FRAMES
    return {
        "benchmark": "extract",
        "videos": n,
        "plan": [{"video_id": v, "seconds": s, "size": f"{w}x{h}", "fps": f} for v, s, w, h, f in plan],
        "video_hours": round(sum(s for _, s, *_ in plan) / 3600, 3),
        "encoder": args.encoder, "frames": FRAMES, "image_size": image_size, "cpus": len(os.sched_getaffinity(0)),
        "repeats": args.repeats,
        "rows": {key: {"label": label, "median_s": round(median[key], 2), "samples_s": [round(v, 2) for v in samples[key]],
                       "videos_per_s": round(n / median[key], 3), "frames_per_s": round(total_frames / median[key], 1),
                       "command": " ".join(commands[key])}
                 for key, label in ROWS.items()},
        "limit_s": round(limit, 2),
        "bytes_per_video": round(per_video), "raw_float16_bytes_per_video": raw,
        "checks": checks,
        "stores": statuses,
        "all_pass": all(c["pass"] for c in checks.values()),
        "generation_s": round(generation_s, 1),
    }


SCALING_ROWS = ("cinego", "job", "job_keyframe")
# copies of the video added to the one-video run: enough that their cost stands well above the
# noise of a start-up of several seconds (Cinego's per-video cost is large already)
EXTRA_COPIES = {"cinego": 1, "job": 8, "job_keyframe": 8}


def measure_scaling(args: argparse.Namespace) -> dict:
    work = args.work.expanduser().resolve()
    lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
    folder = work / "videos_scaling"
    folder.mkdir(parents=True, exist_ok=True)
    generate_videos([(folder / f"v_len{int(seconds):05d}.mp4", seconds, 1000 + i, 640, 360, 25)
                     for i, seconds in enumerate(lengths)])
    py = sys.executable
    run_dir = work / "run_scaling"
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    points: dict[str, list[float]] = {key: [] for key in SCALING_ROWS}
    for seconds in lengths:
        source = folder / f"v_len{int(seconds):05d}.mp4"
        manifests = {}
        for copies in sorted({1} | {1 + k for k in EXTRA_COPIES.values()}):
            tag = f"{int(seconds)}_{copies}"
            videos = run_dir / f"videos_{tag}"
            videos.mkdir()
            ids = [f"{source.stem}_{c}" for c in range(copies)]
            for video_id in ids:
                os.link(source, videos / f"{video_id}.mp4")
            write_instructions(run_dir / f"i_{tag}.json", ids)
            manifests[copies] = run_dir / f"manifest_{tag}"
            run([py, "run_extract.py", "manifest", "--instructions", str(run_dir / f"i_{tag}.json"),
                 "--videos", str(videos), "--out", str(manifests[copies])], logs, f"manifest-{tag}")
        for key in SCALING_ROWS:
            differences = []
            for repeat in range(args.repeats):
                timed = [_timed_scaling_run(key, args.encoder, manifests[copies], run_dir, logs,
                                            f"{key}_{int(seconds)}_{copies}_{repeat}")
                         for copies in (1, 1 + EXTRA_COPIES[key])]
                differences.append(max(timed[1] - timed[0], 0.0) / EXTRA_COPIES[key])
            points[key].append(round(statistics.median(differences), 3))
            log(f"{int(seconds)} s video, {ROWS[key]}: {points[key][-1]:.2f} s per video")
    return scaling_result(lengths, points, args)


def scaling_result(lengths: list[float], points: dict[str, list[float]], args: argparse.Namespace) -> dict:
    """The --scaling JSON, with the driver's peaks read from --driver-memory, and its plot."""
    memory = {}
    for source in args.driver_memory:
        runs = json.loads(source.read_text()).get("runs", []) if source.exists() else []
        memory[source.name] = [(r["rows"], round(r["vmhwm_kib"] / 1024, 1)) for r in runs if "vmhwm_kib" in r]
    plot_scaling(lengths, points, memory, args.plot)
    return {"benchmark": "extract_scaling", "lengths_s": lengths, "seconds_per_video": points,
            "driver_peak_mib_by_rows": memory, "plot": str(args.plot), "encoder": args.encoder, "frames": FRAMES,
            "video": "640x360, 25 fps, GOP 250"}


def replot_scaling(args: argparse.Namespace) -> dict:
    earlier = json.loads(args.replot.read_text())
    args.encoder = earlier["encoder"]
    return scaling_result(earlier["lengths_s"], earlier["seconds_per_video"], args)


def _timed_scaling_run(key: str, encoder: str, manifest: Path, run_dir: Path, logs: Path, tag: str) -> float:
    py = sys.executable
    extract = [py, "run_extract.py", "extract", "--manifest", str(manifest), "--encoder", encoder,
               "--pretrained", "none", "--frames", str(FRAMES), "--store", str(run_dir / f"{tag}.zarr")]
    command = {"cinego": [py, ROWS_SCRIPT, "_cinego", "--manifest", str(manifest), "--out", str(run_dir / tag),
                          "--encoder", encoder],
               "job": extract, "job_keyframe": [*extract, "--sampling", "keyframe"]}[key]
    return run(command, logs, tag)[0]


def plot_scaling(lengths: list[float], points: dict[str, list[float]],
                 memory: dict[str, list[tuple[int, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("cinego", "Cinego's way"), ("job", "this job, uniform"), ("job_keyframe", "this job, keyframe")):
        shown = [(x / 60, y) for x, y in zip(lengths, points[key]) if y > 0]  # 0: below the noise, off a log axis
        left.plot([x for x, _ in shown], [y for _, y in shown], marker="o", label=label)
    left.set(xlabel="video length (minutes)", ylabel="seconds per video (start-up excluded)",
             title="cost per video as videos get longer", xscale="log", yscale="log")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    for source, peaks in memory.items():
        right.plot([rows for rows, _ in peaks], [mib for _, mib in peaks], marker="o", label=source)
    peak = max([mib for peaks in memory.values() for _, mib in peaks], default=1)
    right.set(xlabel="manifest rows", ylabel="driver peak memory, VmHWM (MiB)", title="driver memory as the corpus grows",
              xscale="log", ylim=(0, peak * 1.3))
    if memory:
        right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def print_scaling(result: dict) -> None:
    print("| video length | " + " | ".join(ROWS[k] for k in SCALING_ROWS) + " |")
    print("|---|" + "---|" * len(SCALING_ROWS))
    for i, seconds in enumerate(result["lengths_s"]):
        cells = " | ".join(f"{result['seconds_per_video'][k][i]:.2f} s" for k in SCALING_ROWS)
        print(f"| {seconds:g} s | {cells} |")
    print()
    print("| manifest rows | driver peak MiB | run |")
    print("|---|---|---|")
    for source, peaks in result["driver_peak_mib_by_rows"].items():
        for rows, mib in peaks:
            print(f"| {rows} | {mib} | {source} |")


def print_table(result: dict) -> None:
    print("| row | median s | videos/s | sampled frames/s |")
    print("|---|---|---|---|")
    for row in result["rows"].values():
        print(f"| {row['label']} | {row['median_s']:.1f} | {row['videos_per_s']:.2f} | {row['frames_per_s']:.1f} |")
    print()
    print_checks(result["checks"], 3)
    print(f"\n{result['videos']} videos ({result['video_hours']} h), {result['encoder']} at {result['image_size']} px, "
          f"F={result['frames']}, {result['cpus']} CPUs; store {result['bytes_per_video']} bytes per video, raw "
          f"float16 {result['raw_float16_bytes_per_video']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replot:
        return bench_main(lambda: replot_scaling(args), args.json, print_scaling)
    return bench_main(lambda: measure_scaling(args) if args.scaling else measure(args), args.json,
                      print_scaling if args.scaling else print_table)


if __name__ == "__main__":
    sys.exit(main())
