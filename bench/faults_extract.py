"""Extraction and store faults for `bench/faults.py` (issue 12): each fault injected into real
`run_extract.py` jobs, each try judged against an uninterrupted run of the same job.

The corpus: demo videos (`manifests.demo_corpus`), each hard-linked under several ids so that a
job has many small shards (4 videos each) and a kill lands among commits, not only in the
start-up. The reference: one undisturbed `extract` of it. A try "survives" when the job (or its
rerun) ends with exit status 0 and a store whose arrays (tokens, frame_index, n_frames, status)
equal the reference's byte for byte; "lost" names anything that did not. Between a kill and the
rerun every try also checks the store as a reader would find it: a shard with a commit record
holds exactly the reference's rows (no shard without a valid commit is ever read as done), and no
process of the killed job is still alive.

Faults (`run` returns one row per fault):
- the driver SIGKILLed at spread moments of `extract` and of `rebuild` (before the store exists,
  right after it is created, after k of n shards are committed or rewritten, each with a random
  delay); stale temporary files of both kinds are planted before each rerun, which must remove
  them (`StoreLocation.remove_temporaries`);
- a decoder process SIGKILLed mid-job (the row fails with a reason; `rebuild --failed` recovers it),
  and on Ray a decode task's worker and the encoder actor;
- a node removed mid-job from a two-node `ray.cluster_utils.Cluster`;
- hanging decodes (FIFOs, which block the reader in native code): recorded as timeouts, the job
  goes on, and no decoder of the job is alive afterwards;
- two jobs started at once on one store, on local disk and on an S3 endpoint (moto's server);
- the disk filling up (a tmpfs smaller than the store; skipped where `mount` is not allowed);
- the S3 endpoint stopped mid-job for a while and started again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from manifests.build import ManifestConfig, build_manifest  # noqa: E402
from manifests.demo_corpus import make_demo_corpus  # noqa: E402

ARRAYS = ("tokens", "frame_index", "n_frames", "status")
FRAMES, SHARD_SIZE, LEASE_S = 4, 4, 3
TEMPORARY = (".tmp", ".partial")


@dataclass
class Corpus:
    videos: Path
    instructions: Path
    manifest: Path
    reference: Path
    n_shards: int
    arrays: dict[str, np.ndarray]  # the reference store's arrays


def log(text: str) -> None:
    print(f"[faults] {text}", file=sys.stderr, flush=True)


def extract_cmd(manifest: Path, store: str | Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_extract.py"), "extract", "--manifest", str(manifest),
            "--store", str(store), "--encoder", "demo-tiny", "--pretrained", "none", "--frames", str(FRAMES),
            "--batch-size", "32", "--lease-expiry", str(LEASE_S), *extra]


def rebuild_cmd(manifest: Path, store: str | Path, shards: list[int], *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_extract.py"), "rebuild", "--manifest", str(manifest),
            "--store", str(store), "--shards", ",".join(map(str, shards)), "--batch-size", "32",
            "--lease-expiry", str(LEASE_S), *extra]


def run_job(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, done.stdout + done.stderr


def make_corpus(work: Path, base_videos: int, copies: int) -> Corpus:
    """`base_videos` demo videos, each under `copies` ids, a manifest of 4-video shards, and the
    reference store made by one undisturbed job."""
    root = work / "corpus"
    if root.exists():
        shutil.rmtree(root)
    make_demo_corpus(root, n_videos=base_videos, seed=7, workers=2)
    videos = root / "videos"
    ids = []
    for original in sorted(videos.glob("*.mp4")):
        for c in range(copies):
            target = videos / f"{original.stem}-{c}.mp4"
            os.link(original, target)
            ids.append(target.stem)
        original.unlink()
    instructions = root / "instructions.json"
    instructions.write_text(json.dumps([{"q": "What moves?", "a": "An object.", "video_id": v} for v in ids]))
    manifest = root / "manifest"
    build_manifest(ManifestConfig(instructions, videos, manifest, shard_size=SHARD_SIZE))
    reference = root / "reference.zarr"
    rc, out = run_job(extract_cmd(manifest, reference))
    if rc != 0:
        raise RuntimeError(f"the reference extraction failed:\n{out}")
    return Corpus(videos, instructions, manifest, reference, -(-len(ids) // SHARD_SIZE), read_arrays(reference))


def read_arrays(store: str | Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def differences(corpus: Corpus, store: str | Path, read=read_arrays) -> list[str]:  # noqa: ANN001
    """The arrays of `store` (read by `read`) that are not byte-equal to the reference's."""
    try:
        have = read(store)
    except Exception as err:  # noqa: BLE001 - a store that cannot be read is a difference
        return [f"unreadable: {type(err).__name__}: {err}"]
    return [name for name in ARRAYS if have[name].tobytes() != corpus.arrays[name].tobytes()]


def committed(store: Path) -> dict[int, dict]:
    """shard -> its commit record, for every commit record that parses."""
    found = {}
    for path in (store / "commits").glob("shard-*.json"):
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        found[int(record["shard"])] = record
    return found


def falsely_done(corpus: Corpus, store: Path) -> list[int]:
    """Shards with a commit record whose rows differ from the reference's: what a reader that
    trusts commit records would read wrongly."""
    if not (store / "zarr.json").exists():
        return []
    group = zarr.open_group(str(store), mode="r")
    bad = []
    for shard in committed(store):
        rows = slice(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE)
        if any(group[name][rows].tobytes() != corpus.arrays[name][rows].tobytes() for name in ARRAYS):
            bad.append(shard)
    return sorted(bad)


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (a zombie is dead)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def plant_temporaries(store: Path) -> list[Path]:
    """What a writer killed between writing and renaming leaves (ours .tmp, zarr's .partial),
    dated an hour back."""
    planted = [store / "commits" / "shard-000000.json.deadbeef.tmp"]
    chunk = next((p for p in sorted((store / "tokens").rglob("*")) if p.is_file() and "c" in p.parts), None)
    if chunk is not None:
        planted.append(chunk.with_name(chunk.name + ".deadbeef.partial"))
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - 3600,) * 2)
    return planted


def temporaries(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.name.endswith(TEMPORARY)] if store.exists() else []


@dataclass
class Try:
    moment: str
    survived: bool
    detail: str


def _kill_when(proc: subprocess.Popen, ready, delay: float, give_up_s: float = 120) -> tuple[bool, set[int]]:
    """SIGKILL `proc` `delay` seconds after `ready()` first holds; False if it ended before. Also
    returns every process that was its descendant meanwhile (sampled as it runs)."""
    children: set[int] = set()
    deadline = time.monotonic() + give_up_s
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        children |= descendants(proc.pid)
        time.sleep(0.005)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        children |= descendants(proc.pid)
        time.sleep(0.005)
    children |= descendants(proc.pid)
    if proc.poll() is not None:
        return False, children
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True, children


def _commit_times(store: Path) -> dict[str, int]:
    """commit record name -> its modification time, for those present now."""
    times = {}
    for path in (store / "commits").glob("shard-*.json") if store.exists() else ():
        try:
            times[path.name] = path.stat().st_mtime_ns
        except FileNotFoundError:  # withdrawn meanwhile (a rewrite)
            continue
    return times


def driver_kills(corpus: Corpus, work: Path, n_extract: int, n_rebuild: int, rng: random.Random) -> list[dict]:
    """SIGKILL the driver of `extract` and of `rebuild` at spread moments; rerun; compare."""
    rows = []
    for kind, n in (("extract", n_extract), ("rebuild", n_rebuild)):
        tries = []
        for i in range(n):
            store = work / f"kill-{kind}-{i}.zarr"
            if store.exists():
                shutil.rmtree(store)
            if kind == "rebuild":
                shutil.copytree(corpus.reference, store)
                cmd = rebuild_cmd(corpus.manifest, store, list(range(corpus.n_shards)))
            else:
                cmd = extract_cmd(corpus.manifest, store)
            tries.append(_kill_and_rerun(corpus, store, cmd, kind, i, n, rng))
            log(f"driver kill, {kind} {i + 1}/{n}: {tries[-1].moment}: "
                f"{'survived' if tries[-1].survived else 'LOST ' + tries[-1].detail}")
        rows.append(_row(f"driver SIGKILL during {kind}", kind, tries))
    return rows


def _kill_and_rerun(corpus: Corpus, store: Path, cmd: list[str], kind: str, i: int, n: int,
                    rng: random.Random) -> Try:
    before = _commit_times(store)
    started = time.monotonic()
    # moments spread over the job: k of n shards committed (or rewritten), k from 0 to n-4 (the
    # last few commit faster than a kill lands), each plus a random delay; the first extract try
    # lands before the store exists, the second right after it is created
    k = round(i * (corpus.n_shards - 4) / max(1, n - 1))
    if kind == "extract" and i == 0:
        def ready() -> bool:
            return time.monotonic() - started > rng.uniform(0.5, 3.0)
    elif kind == "extract" and i == 1:
        def ready() -> bool:
            return (store / "zarr.json").exists()
    else:
        def ready() -> bool:
            now = _commit_times(store)
            return sum(1 for name, t in now.items() if before.get(name) != t) >= k
    delay = rng.uniform(0, 0.1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed, children = _kill_when(proc, ready, delay)
    if not killed:
        return Try(f"k={k}", False, "the job ended before the kill")
    now = _commit_times(store)
    moment = (f"{time.monotonic() - started:.1f} s in, "
              f"{sum(1 for name, t in now.items() if before.get(name) != t)}/{corpus.n_shards} shards committed")
    problems = []
    if left := wait_gone(children):
        problems.append(f"{len(left)} processes of the killed job alive")
    if bad := falsely_done(corpus, store):
        problems.append(f"shards {bad} committed with wrong data")
    planted = plant_temporaries(store) if store.exists() else []
    leftover = temporaries(store)
    rc, out = run_job(cmd)
    if rc != 0:
        problems.append(f"rerun exit {rc}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    if diff := differences(corpus, store):
        problems.append(f"arrays differ: {diff}")
    if still := temporaries(store):
        problems.append(f"{len(still)} temporary files left (of {len(leftover)}, {len(planted)} planted)")
    return Try(moment, not problems, "; ".join(problems))


def _row(fault: str, where: str, tries: list[Try], detail: str = "") -> dict:
    lost = [t.detail for t in tries if not t.survived]
    return {"fault": fault, "where": where, "tried": len(tries), "survived": len(tries) - len(lost),
            "lost": "nothing" if not lost else "; ".join(lost),
            "detail": detail or f"{len({t.moment for t in tries})} distinct moments: "
                                + " | ".join(t.moment for t in tries)}


def _first_of(pid: int, title: str) -> int | None:
    """A descendant of `pid` whose command line contains `title`."""
    for child in sorted(descendants(pid)):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title in cmdline:
            return child
    return None


def _n_committed(store: Path) -> int:
    return len(_commit_times(store))


def worker_kills(corpus: Corpus, work: Path, ray: bool) -> dict:
    """SIGKILL processes of a running job at three moments: decoder processes (this machine), or
    a decode task's worker and the encoder actor (Ray). A killed decode is tried once more and a
    killed actor restarted, so the job must end with the reference store."""
    store = work / f"workers-{'ray' if ray else 'local'}.zarr"
    if store.exists():
        shutil.rmtree(store)
    cmd = extract_cmd(corpus.manifest, store, *(["--ray-address", "local"] if ray else []))
    titles = ["ray::_decode", "ray::EncodeActor", "ray::_decode"] if ray else ["pipeline.decoder_process"] * 3
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = []
    for i, title in enumerate(titles):
        target = (i + 1) * corpus.n_shards // (len(titles) + 2)
        while proc.poll() is None and _n_committed(store) < target:
            time.sleep(0.005)
        while proc.poll() is None and (pid := _first_of(proc.pid, title)) is None:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{title} at {_n_committed(store)}/{corpus.n_shards} shards")
    err = proc.communicate(timeout=600)[1]
    problems = [] if proc.returncode == 0 else [f"job exit {proc.returncode}: {err.strip()[-300:]}"]
    if diff := differences(corpus, store):
        failed = [f["reason"] for record in committed(store).values() for f in record["failures"]]
        problems.append(f"arrays differ: {diff}; failed rows: {failed}")
    what = "a decode task's worker and the encoder actor (Ray)" if ray else "decoder processes"
    return _row(f"{what} SIGKILLed mid-job", "extract", [Try(moment, not problems, "; ".join(problems))
                                                         for moment in killed],
                f"killed {', '.join(killed)}; the job completed with the reference store")


NODE_REMOVAL = "node-removal"


def node_removal(corpus: Corpus, work: Path) -> dict:
    """A two-node `ray.cluster_utils.Cluster` (one CPU each) in a fresh interpreter; the second
    node is removed once a third of the shards are committed (`_node_removal_job`)."""
    store = work / "node-removal.zarr"
    if store.exists():
        shutil.rmtree(store)
    temp = Path(tempfile.mkdtemp(prefix="vc-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        rc, out = run_job([sys.executable, __file__, NODE_REMOVAL, str(corpus.manifest), str(store), str(temp),
                           str(corpus.n_shards // 3)])
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    problems = []
    if rc != 0 or result is None:
        problems.append(f"exit {rc}: {out.strip()[-300:]}")
    elif not result["removed_at"]:
        problems.append("the job ended before the node was removed")
    if diff := differences(corpus, store):
        problems.append(f"arrays differ: {diff}")
    moment = f"node removed at {result['removed_at']}/{corpus.n_shards} shards" if result else "?"
    return _row("a node removed mid-job (2-node ray.cluster_utils.Cluster)", "extract",
                [Try(moment, not problems, "; ".join(problems))],
                moment + ("; the job completed with the reference store" if not problems else ""))


def _node_removal_job(manifest: str, store: str, temp_dir: str, at: int) -> None:
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.extract import ExtractConfig, extract

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, include_dashboard=False, temp_dir=temp_dir, dashboard_agent_listen_port=0))
    try:
        worker = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=0)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        result: dict = {"removed_at": None}
        job = threading.Thread(target=lambda: result.update(summary=str(extract(ExtractConfig(
            manifest=Path(manifest), store=store, encoder="demo-tiny", pretrained="none", frames=FRAMES,
            batch_size=32, lease_ttl_s=LEASE_S, ray_address=cluster.address)))))
        job.start()
        while job.is_alive() and _n_committed(Path(store)) < at:
            time.sleep(0.01)
        if job.is_alive():
            cluster.remove_node(worker)
            result["removed_at"] = _n_committed(Path(store))
        job.join()
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


def hanging_decoders(corpus: Corpus, work: Path) -> dict:
    """Two FIFOs among real videos (a FIFO blocks its reader in native code, as a decoder that
    spins would): recorded as timeouts, the job goes on, none of its processes outlives it."""
    root = work / "hang"
    if root.exists():
        shutil.rmtree(root)
    (root / "videos").mkdir(parents=True)
    real = sorted(corpus.videos.glob("*.mp4"))[:6]
    ids = [p.stem for p in real] + ["hangs-a", "hangs-b"]
    for path in real:
        os.link(path, root / "videos" / path.name)
    for name in ids[-2:]:
        (root / "videos" / f"{name}.mp4").write_bytes(b"placeholder")  # the manifest wants a file
    (root / "i.json").write_text(json.dumps([{"q": "q?", "a": "a.", "video_id": v} for v in ids]))
    build_manifest(ManifestConfig(root / "i.json", root / "videos", root / "manifest", shard_size=SHARD_SIZE))
    for name in ids[-2:]:
        (root / "videos" / f"{name}.mp4").unlink()
        os.mkfifo(root / "videos" / f"{name}.mp4")
    store = root / "store.zarr"
    proc = subprocess.Popen(extract_cmd(root / "manifest", store, "--decode-timeout", "3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: set[int] = set()
    while proc.poll() is None:
        children |= descendants(proc.pid)
        time.sleep(0.02)
    out = proc.communicate()[0]
    left = wait_gone(children, timeout=2)
    failures = {f["video_id"]: f["reason"] for r in committed(store).values() for f in r["failures"]}
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {out.strip()[-300:]}")
    if sorted(failures) != ids[-2:] or not all("timed out" in r for r in failures.values()):
        problems.append(f"failures recorded: {failures}")
    if left:
        problems.append(f"{len(left)} of the job's processes still alive after it ended")
    detail = (f"{len(children)} processes seen during the job, {len(left)} alive after; "
              f"reasons: {sorted(set(failures.values()))}")
    return _row("hanging decodes (2 FIFOs among 6 videos, --decode-timeout 3)", "extract",
                [Try("2 hangs", not problems, "; ".join(problems))], detail)


def two_jobs_local(corpus: Corpus, work: Path, tries: int) -> dict:
    """Two jobs started at once on one new store on this disk, `tries` times."""
    results = []
    for i in range(tries):
        store = work / f"two-jobs-{i}.zarr"
        if store.exists():
            shutil.rmtree(store)
        results.append(_two_jobs(corpus, store, None, f"try {i}"))
    return _row("two jobs started at once on one store (local disk)", "extract", results,
                "; ".join(t.moment for t in results))


def _two_jobs(corpus: Corpus, store: str | Path, env: dict[str, str] | None, label: str,
              read=read_arrays) -> Try:  # noqa: ANN001
    cmd = extract_cmd(corpus.manifest, store, "--decoders", "1")
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for _ in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    written = [int(out.split("wrote ")[1].split(" shards")[0]) if "wrote " in out else 0 for out in outputs]
    problems = [f"job exit {job.returncode}: {out.strip()[-200:]}" for job, out in zip(jobs, outputs)
                if job.returncode != 0]
    if sum(written) != corpus.n_shards:
        problems.append(f"shards written {written}, not {corpus.n_shards} in all")
    if diff := differences(corpus, store, read):
        problems.append(f"arrays differ: {diff}")
    return Try(f"{label}: shards written {written[0]} + {written[1]}", not problems, "; ".join(problems))


class S3Endpoint:
    """moto's S3 server on 127.0.0.1 in this process, with a bucket; `stop` and `start` keep its
    objects (moto keeps them in this process). `env` points a job's S3 clients at it."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
                    "AWS_ACCESS_KEY_ID": "faults", "AWS_SECRET_ACCESS_KEY": "faults", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            self.env.pop(name, None)
        self.server = None
        self.start()
        self.fs.mkdir("faults")

    @property
    def fs(self):  # noqa: ANN201 - an s3fs filesystem of this endpoint
        import s3fs

        return s3fs.S3FileSystem(key="faults", secret="faults", client_kwargs={
            "endpoint_url": self.env["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def arrays(self, url: str) -> dict[str, np.ndarray]:
        group = zarr.open_group(zarr.storage.FsspecStore(self.fs, path=url.removeprefix("s3://"), read_only=True),
                                mode="r")
        return {name: group[name][:] for name in ARRAYS}

    def n_committed(self, url: str) -> int:
        try:
            return sum(1 for p in self.fs.ls(f"{url.removeprefix('s3://')}/commits", refresh=True)
                       if p.endswith(".json"))
        except (FileNotFoundError, OSError):
            return 0


def s3_faults(corpus: Corpus, tries: int, outage_s: float) -> list[dict]:
    """Two jobs at once on one S3 store, `tries` times; then the endpoint stopped for `outage_s`
    once a third of the shards are committed and started again."""
    endpoint = S3Endpoint()
    try:
        results = [_two_jobs(corpus, f"s3://faults/two-{i}.zarr", endpoint.env, f"try {i}", endpoint.arrays)
                   for i in range(tries)]
        rows = [_row("two jobs started at once on one store (S3 endpoint)", "extract", results,
                     "; ".join(t.moment for t in results))]

        url = "s3://faults/outage.zarr"
        cmd = extract_cmd(corpus.manifest, url)
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=endpoint.env)
        while job.poll() is None and endpoint.n_committed(url) < corpus.n_shards // 3:
            time.sleep(0.05)
        at = endpoint.n_committed(url)
        endpoint.stop()
        time.sleep(outage_s)
        endpoint.start()
        out = job.communicate(timeout=600)[0]
        first = f"exit {job.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}"
        rc, rerun = run_job(cmd, env=endpoint.env)
        problems = [] if rc == 0 else [f"rerun exit {rc}: {rerun.strip()[-200:]}"]
        if diff := differences(corpus, url, endpoint.arrays):
            problems.append(f"arrays differ: {diff}")
        rows.append(_row(f"S3 endpoint down for {outage_s:g} s mid-job, then back", "extract",
                         [Try(f"stopped at {at}/{corpus.n_shards} shards", not problems, "; ".join(problems))],
                         f"stopped at {at}/{corpus.n_shards} shards; the job: {first[:200]}; then a rerun"))
        return rows
    finally:
        endpoint.stop()


def disk_full(corpus: Corpus, work: Path) -> dict | None:
    """The store on a tmpfs smaller than the store: the job must stop with one clear line (exit
    status 2) and damage no committed shard; after the tmpfs is grown, a rerun completes. None
    where mount is refused."""
    mount = work / "small-disk"
    mount.mkdir(exist_ok=True)
    need = sum(p.stat().st_size for p in corpus.reference.rglob("*") if p.is_file())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need // 2}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        log("disk full: mount -t tmpfs is not allowed here; skipped")
        return None
    try:
        store = mount / "store.zarr"
        rc, out = run_job(extract_cmd(corpus.manifest, store))
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        message = errors[-1] if errors else ""
        problems = []
        if rc != 2 or len(errors) != 1 or "No space left" not in message or "Traceback" in out:
            problems.append(f"not one clear line: exit {rc}, {out.strip()[-300:]!r}")
        if bad := falsely_done(corpus, store):
            problems.append(f"shards {bad} committed with wrong data")
        done_before = len(committed(store))
        subprocess.run(["mount", "-o", f"remount,size={need * 2}", str(mount)], check=True)
        rc2, out2 = run_job(extract_cmd(corpus.manifest, store))
        if rc2 != 0:
            problems.append(f"rerun exit {rc2}: {out2.strip()[-200:]}")
        if diff := differences(corpus, store):
            problems.append(f"arrays differ: {diff}")
        return _row("the disk fills up mid-job (tmpfs of half the store's size)", "extract",
                    [Try("full", not problems, "; ".join(problems))],
                    f"exit {rc}, last line: {message[:200]!r}; {done_before}/{corpus.n_shards} shards committed "
                    "before; the rerun after growing the disk completed")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def run(work: Path, quick: bool) -> list[dict]:
    """Every extraction fault; one row each (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(12)
    corpus = make_corpus(work, base_videos=12, copies=10 if quick else 20)
    log(f"corpus: {corpus.n_shards} shards of {SHARD_SIZE} videos")
    rows = driver_kills(corpus, work, 3 if quick else 12, 2 if quick else 10, rng)
    rows.append(worker_kills(corpus, work, ray=False))
    if not quick:
        rows.append(worker_kills(corpus, work, ray=True))
        rows.append(node_removal(corpus, work))
    rows.append(hanging_decoders(corpus, work))
    rows.append(two_jobs_local(corpus, work, 1 if quick else 3))
    rows.extend(s3_faults(corpus, 1 if quick else 3, outage_s=8))
    if (row := disk_full(corpus, work)) is not None:
        rows.append(row)
    return rows


if __name__ == "__main__" and sys.argv[1:2] == [NODE_REMOVAL]:
    _node_removal_job(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
