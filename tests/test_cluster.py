"""Extraction on a real multi-node Ray cluster on this machine (issue 11, point 7).

1. `ray.cluster_utils.Cluster` with two nodes, in a fresh Python process (the session's own Ray
   cluster lives in this one): shards are written by both nodes, and the store's arrays equal,
   byte for byte, those of a store made on this machine without Ray from the same manifest.
2. tests/cluster_recipe.sh, the README's cluster recipe as a user runs it (`ray start --head`, a
   second `ray start --address`, `ray job submit ... -- python run_extract.py extract ...
   --ray-address auto`, `ray stop`, then `verify` and `status`), in its own PID namespace
   (`unshare --pid --fork --mount-proc`) so that its `ray stop` sees only its own processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import zarr

from manifests.build import ManifestConfig, build_manifest
from manifests.demo_corpus import make_demo_corpus
from manifests.manifest import load_manifest
from pipeline.extract import ExtractConfig, extract
from pipeline.store_format import ARRAYS, OK

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "cluster_recipe.sh"
FRAMES = 2
VIDEOS, SHARD_SIZE = 4, 1  # four shards: two run at once on a 2-CPU cluster, spread over the nodes
EXTRACT_FLAGS = ["--encoder", "demo-tiny", "--pretrained", "none", "--frames", str(FRAMES), "--batch-size", "16"]

pytestmark = pytest.mark.slow

# Run in a fresh interpreter: a two-node cluster (head and one more node, one CPU each, temp files
# under a short directory: Ray's socket paths must stay under 107 bytes), the job run on it
# in-process (`extract` with its address reuses the Ray session it finds), then both shut down.
TWO_NODE_JOB = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from pipeline.extract import ExtractConfig, extract

manifest, store, temp_dir, frames = sys.argv[1:5]
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=1, include_dashboard=False, temp_dir=temp_dir, dashboard_agent_listen_port=0))
try:
    cluster.add_node(num_cpus=1, dashboard_agent_listen_port=0)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = [f"{n['NodeManagerAddress']}/{n['NodeID']}" for n in ray.nodes() if n["Alive"]]
        summary = extract(ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none",
                                        frames=int(frames), batch_size=16, ray_address=cluster.address))
        print("RESULT " + json.dumps({"nodes": nodes, "written": summary.shards_written,
                                      "ok": summary.ok, "failed": summary.failed, "left": summary.left_pending}))
    finally:
        ray.shutdown()
finally:
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A demo corpus of VIDEOS videos and its manifest in shards of SHARD_SIZE; returns the manifest."""
    root = tmp_path_factory.mktemp("cluster_corpus")
    make_demo_corpus(root / "corpus", n_videos=VIDEOS, seed=5, workers=2)
    manifest = root / "manifest"
    build_manifest(ManifestConfig(root / "corpus" / "instructions.json", root / "corpus" / "videos", manifest,
                                  shard_size=SHARD_SIZE))
    assert load_manifest(manifest).n_shards == -(-VIDEOS // SHARD_SIZE)
    return manifest


@pytest.fixture(scope="module")
def reference_store(corpus, tmp_path_factory) -> Path:
    """The same manifest extracted on this machine without Ray (the default distributor)."""
    store = tmp_path_factory.mktemp("cluster_ref") / "ref.zarr"
    summary = extract(ExtractConfig(manifest=corpus, store=store, encoder="demo-tiny", pretrained="none",
                                    frames=FRAMES, batch_size=16))
    assert summary.shards_written == summary.shards_total and not summary.left_pending
    return store


@pytest.fixture
def short_tmp():
    """A short temporary directory for Ray's session files (socket paths have a length limit)."""
    path = Path(tempfile.mkdtemp(prefix="vc-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _commit_nodes(store: Path) -> dict[int, str]:
    commits = [json.loads(p.read_text()) for p in sorted((store / "commits").glob("shard-*.json"))]
    return {c["shard"]: c.get("node", "") for c in commits}


def _assert_same_arrays(store: Path, reference: Path) -> None:
    a, b = zarr.open_group(store, mode="r"), zarr.open_group(reference, mode="r")
    for name in ARRAYS:  # tokens, frame_index, n_frames, status
        x, y = a[name][:], b[name][:]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), f"{name} differs from the one-node store's"
    assert (a["status"][:] == OK).all()


def test_two_node_cluster_writes_shards_on_both_nodes(corpus, reference_store, short_tmp, tmp_path):
    store = tmp_path / "two_node.zarr"
    proc = subprocess.run([sys.executable, "-c", TWO_NODE_JOB, str(corpus), str(store), str(short_tmp), str(FRAMES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    n_shards = -(-VIDEOS // SHARD_SIZE)
    assert len(result["nodes"]) == 2
    assert (result["written"], result["ok"], result["failed"], result["left"]) == (n_shards, VIDEOS, 0, [])

    nodes = _commit_nodes(store)
    assert sorted(nodes) == list(range(n_shards))
    assert set(nodes.values()) <= set(result["nodes"]), nodes  # each names a node of this cluster ("IP/node-id")
    assert len(set(nodes.values())) == 2, f"every shard was written by one node: {nodes}"
    _assert_same_arrays(store, reference_store)


def _unshare_problem() -> str | None:
    """Why a private PID namespace cannot be made here, or None."""
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux) to run the recipe's `ray stop` in a private PID namespace"
    try:
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`unshare --pid --fork --mount-proc` cannot run here: {err}"
    if probe.returncode != 0:
        return (f"`unshare --pid --fork --mount-proc` is not permitted here (needs root or CAP_SYS_ADMIN): "
                f"{probe.stderr.strip()}")
    return None


def _processes_with_env(marker: str) -> list[str]:
    """The processes on this machine whose environment holds `marker`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {cmdline[:200]}")
        except OSError:
            continue
    return found


def test_cluster_recipe_script(corpus, reference_store, ray_cluster, short_tmp, tmp_path):
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    store = tmp_path / "recipe.zarr"
    marker = f"recipe-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python`, `ray`
        "RAY_TMPDIR": str(short_tmp),  # `ray stop` clears $RAY_TMPDIR/ray/ray_current_cluster, not /tmp/ray's
        "VIDCACHE_RECIPE_RUN": marker,  # inherited by every process the script starts
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)  # the script sets up its own cluster and token
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", str(RECIPE), str(short_tmp / "ray"),
                           str(corpus), str(store), *EXTRACT_FLAGS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = f"rc {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert "s recipe ok" in proc.stdout, log
    assert f"{store}: intact" in proc.stdout, log
    left = _processes_with_env(marker)
    assert not left, f"processes of the recipe outlived it: {left}"

    # the namespaced `ray stop` left the session's own cluster (outside the namespace) alone
    import ray

    assert ray.get(ray.remote(lambda: 41).remote()) + 1 == 42

    n_shards = -(-VIDEOS // SHARD_SIZE)
    nodes = _commit_nodes(store)
    assert sorted(nodes) == list(range(n_shards)) and all(nodes.values()), nodes
    assert len(set(nodes.values())) == 2, f"every shard was written by one node: {nodes}"
    _assert_same_arrays(store, reference_store)
