"""Benchmark: peak memory of the extraction job's driver on a small and a large manifest.

What it measures. Issue 11, point 2: the driver only schedules shards and reads commit records,
so its memory must not grow with the corpus: its peak RSS on manifests of 1k and 100k rows must
be within 20% of each other. Each size is one real `pipeline.extract.extract` run in its own
subprocess (the hidden `_driver` subcommand below), which starts its own local Ray cluster
(`--ray-address local`: never one that another job on the machine started) and extracts every row
into a fresh store. The driver's memory is its own process only (Ray's raylet, object store and
worker processes are other processes): `/proc/self/status` VmHWM at exit (the peak, and the
bar), `getrusage(RUSAGE_SELF).ru_maxrss` (shown, not judged: Linux carries into it the peak of
the process image before `exec`, i.e. of this benchmark's own process at the fork, which holds
the manifest it just built: 456 MiB for 100k rows while the driver's own peak was 138 MiB),
plus VmRSS sampled every 0.5 s by a thread and read once more right after the
shard loop (`pipeline.distributed.RayDistributor.run`) returns, inside the cluster. The last figure is the one
that growth would show first: the peak can be set before the loop, while the driver loads the
encoder once to learn the attributes of a new store.

Stand-in input, so that the run is about the driver and not about decoding: one tiny PNG image
(32x24) hard-linked once per row (`images/v_dm0000000.png` ...; a copy per 50k links), an instruction file in
VideoInstruct-100K's flat format (`[{"video_id", "q", "a"}]`), a manifest from
`manifests.build.build_manifest` (shard size 64), the `demo-tiny` tower with `--pretrained none`,
F=1 frame, fp32 on the CPU. Every run is checked complete with `pipeline.inspect.status` (all
rows ok, all shards done).

Also reported per size: wall time of the driver subprocess from start to exit and of the
`extract` call alone, rows/s over the `extract` call, and the time to build the manifest. With
`--tracemalloc` the driver subprocess also traces Python allocations and reports the 15 source
lines whose live allocations changed most between the first committed shard and the end of the
shard loop, and the net change of all traced memory
(a separate diagnostic: tracing slows the run, and its RSS is not the measured one).

Reproduce (bench/results/driver_memory_cpu.json is this command's output on the project's
2-core CPU box):

    .venv/bin/python bench/driver_memory.py --work /tmp/vidcache-bench-driver-memory \
        --json bench/results/driver_memory_cpu.json

`--quick` compares 1k with 10k rows. `--rows A B ...` picks the sizes (the ratio is max / min of
their peaks). Output: a JSON object on stdout (and in --json if given), then a Markdown table;
progress lines go to stderr. The exit code is 0 unless a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the hidden subcommand imports the project without an install

from report import emit, print_rows  # bench/report.py (bench/ is on sys.path when run as a script)  # noqa: E402
from runner import work_dir  # noqa: E402

ENCODER = "demo-tiny"
FRAMES = 1
SHARD_SIZE = 64
BAR = 1.20  # peak RSS of the largest run / of the smallest
DEFAULT_ROWS = [1_000, 100_000]
QUICK_ROWS = [1_000, 10_000]
SAMPLE_S = 0.5
LINKS_PER_FILE = 50_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None,
                   help="directory for the stand-in corpus (reused when present), manifests, stores and logs "
                        "(default: a temp dir, deleted at exit)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help=f"manifest sizes to run, in this order (default {' '.join(map(str, DEFAULT_ROWS))}; "
                        f"{' '.join(map(str, QUICK_ROWS))} with --quick)")
    p.add_argument("--quick", action="store_true", help="1k vs 10k rows (explicit --rows still wins)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also run each size once more with tracemalloc in the driver and report the allocations "
                        "that grew during the shard loop")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this path")
    p.add_argument("--python", default=sys.executable,
                   help="Python that runs the driver, with the project installed (default: this one)")
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = QUICK_ROWS if args.quick else DEFAULT_ROWS
    if min(args.rows) < 1:
        p.error("--rows must be at least 1")
    return args


# --- stand-in corpus ----------------------------------------------------------------------------

def video_id(row: int) -> str:
    return f"v_dm{row:07d}"


def ensure_corpus(work: Path, n: int) -> Path:
    """The image folder with (at least) `n` hard links of one tiny PNG (one copy of it per
    LINKS_PER_FILE rows: ext4 allows 65,000 links to a file); returns the folder."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for row in range(n):
        path = folder / f"{video_id(row)}.png"
        if not path.exists():
            source = work / f"frame_{row // LINKS_PER_FILE}.png"
            if not source.exists():
                Image.fromarray(pixels).save(source)
            os.link(source, path)
    return folder


def ensure_manifest(work: Path, images: Path, n: int) -> tuple[Path, float]:
    """The manifest of the first `n` images (built once, reused); returns it and the build time
    (0 when reused)."""
    from manifests.build import ManifestConfig, build_manifest

    manifest = work / f"manifest_{n}"
    if (manifest / "manifest.json").exists():
        return manifest, 0.0
    instructions = work / f"instructions_{n}.json"
    instructions.write_text(json.dumps([{"video_id": video_id(row), "q": "What is in the picture?",
                                         "a": "Coloured noise."} for row in range(n)]), encoding="utf-8")
    start = time.perf_counter()
    build_manifest(ManifestConfig(instructions, images, manifest, shard_size=SHARD_SIZE))
    return manifest, time.perf_counter() - start


# --- one driver run -----------------------------------------------------------------------------

def run_driver(python: str, manifest: Path, store: Path, logs: Path, name: str, trace: bool) -> dict:
    """The `_driver` subcommand in a subprocess on a fresh store; its JSON plus the wall time
    from start to exit."""
    shutil.rmtree(store, ignore_errors=True)
    out = logs / f"{name}.json"
    cmd = [python, str(Path(__file__).resolve()), "_driver", "--manifest", str(manifest), "--store", str(store),
           "--out", str(out)] + (["--tracemalloc"] if trace else [])
    with (logs / f"{name}.log").open("w") as output:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        elapsed = time.perf_counter() - start
    if proc.returncode:
        tail = "\n".join((logs / f"{name}.log").read_text().splitlines()[-30:])
        raise SystemExit(f"`{' '.join(cmd)}` exited with {proc.returncode}; the end of its output:\n{tail}")
    return {**json.loads(out.read_text()), "process_s": round(elapsed, 1), "command": " ".join(cmd)}


def vm_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def driver_main(argv: list[str]) -> int:
    """Hidden subcommand: one `extract` run in this process; writes the memory figures as JSON."""
    p = argparse.ArgumentParser(prog="driver_memory.py _driver")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracemalloc", action="store_true")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)  # one frame per allocation: deeper tracebacks make the snapshots too slow here
    from pipeline import distributed
    from pipeline.extract import ExtractConfig, extract

    samples: list[tuple[float, int]] = []
    snapshots: dict = {}
    stop = threading.Event()
    commits = args.store / "commits"

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            samples.append((round(time.perf_counter() - started, 1), vm_kib("VmRSS")))
            if args.tracemalloc and "first" not in snapshots and commits.is_dir() and any(commits.iterdir()):
                snapshots["first"] = (tracemalloc.take_snapshot(), vm_kib("VmRSS"))

    after_loop: dict[str, int] = {}
    real_run = distributed.RayDistributor.run

    def run(*a, **k):  # the shard loop, with the memory read as it returns (still inside the cluster)
        loop_start = vm_kib("VmRSS")
        totals = real_run(*a, **k)
        after_loop.update(rss_before_loop_kib=loop_start, rss_after_loop_kib=vm_kib("VmRSS"))
        if args.tracemalloc:
            snapshots["last"] = (tracemalloc.take_snapshot(), vm_kib("VmRSS"))
        return totals

    distributed.RayDistributor.run = run
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = extract(ExtractConfig(manifest=args.manifest, store=args.store, encoder=ENCODER, pretrained="none",
                                    frames=FRAMES, ray_address="local"))  # a Ray cluster of its own
    extract_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    result = {
        "extract_s": round(extract_s, 2),
        "shards_written": summary.shards_written,
        "ok": summary.ok,
        "failed": summary.failed,
        "left_pending": summary.left_pending,
        **after_loop,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vmhwm_kib": vm_kib("VmHWM"),
        "rss_samples_kib": thin(samples, 60),
    }
    if args.tracemalloc and "first" in snapshots and "last" in snapshots:
        (first, rss_first), (last, rss_last) = snapshots["first"], snapshots["last"]
        stats = last.compare_to(first, "lineno")
        result["tracemalloc"] = {
            "rss_first_commit_kib": rss_first,
            "rss_after_loop_kib": rss_last,
            "traced_growth_kib": round(sum(s.size_diff for s in stats) / 1024, 1),
            "largest_changes": [{"size_diff_kib": round(s.size_diff / 1024, 1), "count_diff": s.count_diff,
                            "where": [f"{fr.filename}:{fr.lineno}" for fr in s.traceback]} for s in stats[:15]],
        }
    args.out.write_text(json.dumps(result), encoding="utf-8")
    return 0


def thin(samples: list[tuple[float, int]], keep: int) -> list[list[float]]:
    """At most `keep` of the (seconds, KiB) samples, evenly spaced, the last one included."""
    if len(samples) <= keep:
        return [list(s) for s in samples]
    step = (len(samples) - 1) / (keep - 1)
    return [list(samples[round(i * step)]) for i in range(keep)]


# --- the benchmark ------------------------------------------------------------------------------

def measure(args: argparse.Namespace, work: Path, started: float) -> dict:
    from pipeline.inspect import status

    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    images = ensure_corpus(work, max(args.rows))
    runs = []
    for n in args.rows:
        manifest, manifest_s = ensure_manifest(work, images, n)
        if manifest_s:
            log(f"{n} rows: manifest built in {manifest_s:.1f} s")
        store = work / f"store_{n}.zarr"
        log(f"{n} rows: extracting ...")
        r = run_driver(args.python, manifest, store, logs, f"driver_{n}", trace=False)
        s = status(store)
        complete = (s.ok, s.failed, s.pending, s.shards_done) == (n, 0, 0, s.shards_total)
        entry = {
            "rows": n,
            "shards": s.shards_total,
            "manifest_build_s": round(manifest_s, 1) if manifest_s else None,
            **{k: v for k, v in r.items() if k not in ("rss_samples_kib",)},
            "rows_per_s": round(n / r["extract_s"], 1),
            "peak_rss_mib": round(r["vmhwm_kib"] / 1024, 1),
            "complete": complete,
            "rss_samples_kib": r["rss_samples_kib"],
        }
        if args.tracemalloc:
            log(f"{n} rows: again with tracemalloc ...")
            traced = run_driver(args.python, manifest, store, logs, f"driver_{n}_traced", trace=True)
            entry["tracemalloc_run"] = {k: traced[k] for k in ("extract_s", "ru_maxrss_kib", "rss_before_loop_kib",
                                                               "rss_after_loop_kib", "tracemalloc") if k in traced}
        shutil.rmtree(store, ignore_errors=True)
        log(f"{n} rows: peak RSS {entry['peak_rss_mib']:.0f} MiB, after the shard loop "
            f"{r['rss_after_loop_kib'] / 1024:.0f} MiB, extract {r['extract_s']:.1f} s ({entry['rows_per_s']:.0f} "
            f"rows/s), complete: {complete}")
        runs.append(entry)
    peaks = [r["vmhwm_kib"] for r in runs]
    loops = [r["rss_after_loop_kib"] for r in runs]
    ratio = max(peaks) / min(peaks)
    return {
        "benchmark": "driver_memory",
        "encoder": ENCODER,
        "pretrained": "none",
        "frames": FRAMES,
        "shard_size": SHARD_SIZE,
        "input": "one 32x24 PNG (random pixels) hard-linked once per row",
        "cpus": len(os.sched_getaffinity(0)),
        "runs": runs,
        "peak_ratio": round(ratio, 3),
        "after_loop_ratio": round(max(loops) / min(loops), 3),
        "bar": f"peak ratio (largest / smallest) <= {BAR:g}",
        "pass": ratio <= BAR and all(r["complete"] for r in runs),
        "total_runtime_s": round(time.perf_counter() - started, 1),
    }


def print_table(result: dict) -> None:
    print_rows(["rows", "shards", "peak RSS (VmHWM) MiB", "ru_maxrss MiB", "RSS after shard loop MiB", "extract s",
                "process s", "rows/s", "complete"],
               [[str(r["rows"]), str(r["shards"]), f"{r['peak_rss_mib']:.1f}", f"{r['ru_maxrss_kib'] / 1024:.1f}",
                 f"{r['rss_after_loop_kib'] / 1024:.1f}", f"{r['extract_s']:.1f}", f"{r['process_s']:.1f}",
                 f"{r['rows_per_s']:.0f}", "yes" if r["complete"] else "NO"] for r in result["runs"]])
    print(f"\npeak RSS ratio (largest / smallest): {result['peak_ratio']:.3f} (bar <= {BAR:g}: "
          f"{'PASS' if result['pass'] else 'FAIL'}); RSS after the shard loop, ratio {result['after_loop_ratio']:.3f}")
    print(f"{ENCODER} (random weights), F={FRAMES}, shard size {SHARD_SIZE}, {result['input']}; "
          f"{result['cpus']} CPUs")
    for r in result["runs"]:
        for t in (r.get("tracemalloc_run") or {}).get("tracemalloc", {}).get("largest_changes", [])[:5]:
            print(f"  {r['rows']} rows, traced change {t['size_diff_kib']:+.1f} KiB ({t['count_diff']:+d} blocks): "
                  f"{t['where'][-1]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_driver"]:
        return driver_main(argv[1:])
    args = parse_args(argv)
    started = time.perf_counter()
    with work_dir(args.work, "vidcache-bench-driver-memory-") as work:
        result = measure(args, work, started)
    emit(result, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
