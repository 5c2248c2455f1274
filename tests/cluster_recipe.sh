#!/usr/bin/env bash
# The README's "Running on a cluster" recipe, run on one machine as a two-node Ray cluster:
# `ray start --head`, a second `ray start --address`, `ray job submit ... -- python run_extract.py
# extract ... --ray-address auto`, `ray stop`; then the store is checked with `verify` and `status`.
#
#   tests/cluster_recipe.sh TEMP_DIR MANIFEST STORE [extract flags, e.g. --encoder demo-tiny --pretrained none]
#
# TEMP_DIR holds Ray's session files, the head's in TEMP_DIR and the second node's in TEMP_DIR/node2
# (keep it short: Ray's socket paths must stay under 107 bytes).
# `python` and `ray` are taken from PATH (the environment with this package installed), and the
# commands run from the repository root, whose run_extract.py the job runs (`--working-dir .`).
#
# DANGER: `ray stop` stops EVERY Ray process the script can see. Run the script in its own PID
# namespace, where it sees only its own processes (as tests/test_cluster.py does):
#   unshare --pid --fork --mount-proc bash tests/cluster_recipe.sh ...
# Elsewhere it refuses to run unless VIDCACHE_RECIPE_ALLOW_RAY_STOP=1 (a machine of your own).
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 TEMP_DIR MANIFEST STORE [extract flags...]" >&2
    exit 2
fi
if [[ $$ -ne 1 && "${VIDCACHE_RECIPE_ALLOW_RAY_STOP:-}" != 1 ]]; then
    echo "$0: refusing to run: its 'ray stop' would stop every Ray cluster on this machine;" \
         "run it under 'unshare --pid --fork --mount-proc' or set VIDCACHE_RECIPE_ALLOW_RAY_STOP=1" >&2
    exit 2
fi
temp_dir=$(realpath -m "$1")
manifest=$(realpath "$2")   # absolute: the job runs in a copy of the working directory
store=$(realpath -m "$3")
shift 3
cd "$(dirname "$0")/.."
mkdir -p "$temp_dir"

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
dashboard_port=$(free_port)
client_port=$(free_port)

# Token authentication: the same token for every `ray start` and for `ray job submit`.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN

stopped=0
cleanup() { if [[ $stopped == 0 ]]; then ray stop --force >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

echo "== ${SECONDS}s ray start --head (port $port, dashboard $dashboard_port)"
ray start --head --port "$port" --num-cpus 1 \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
    --dashboard-agent-listen-port 0 --ray-client-server-port "$client_port" \
    --temp-dir "$temp_dir" --disable-usage-stats
echo "== ${SECONDS}s ray start --address (a second node)"
# Its own temp dir, as a second machine would have: nodes sharing one would share the job's unpacked
# working directory, and the second node's runtime-env agent replaces it under the running job.
ray start --address "127.0.0.1:$port" --num-cpus 1 --dashboard-agent-listen-port 0 \
    --temp-dir "$temp_dir/node2" --disable-usage-stats

echo "== ${SECONDS}s ray job submit"
ray job submit --address "http://127.0.0.1:$dashboard_port" --working-dir . -- \
    python run_extract.py extract --manifest "$manifest" --store "$store" "$@" --ray-address auto

echo "== ${SECONDS}s ray stop"
ray stop
stopped=1
if [[ $$ -eq 1 ]]; then  # in our own PID namespace: nothing but this script may outlive `ray stop`
    for _ in $(seq 20); do  # the dashboard's forkserver can take a moment to follow it
        left=$(ps -eo pid=,stat=,comm=,args= | awk '$2 !~ /^Z/ && $3 !~ /^(bash|ps|awk|sleep)$/')
        [[ -z $left ]] && break
        sleep 0.5
    done
    if [[ -n $left ]]; then
        echo "ray stop left processes running:" >&2
        echo "$left" >&2
        exit 1
    fi
fi

echo "== ${SECONDS}s checks"
python run_extract.py verify --store "$store" --manifest "$manifest"
python run_extract.py status --store "$store" --manifest "$manifest" --json >"$temp_dir/status.json"
python - "$temp_dir/status.json" "$store" <<'EOF'
import json, sys
from pathlib import Path
status = json.loads(Path(sys.argv[1]).read_text())
if status["pending"] or status["shards_done"] != status["shards_total"]:
    sys.exit(f"not every shard is done: {status['shards_done']}/{status['shards_total']} shards, "
             f"{status['pending']} rows pending")
nodes = {json.loads(p.read_text()).get("node") for p in (Path(sys.argv[2]) / "commits").glob("shard-*.json")}
print(f"{status['shards_done']}/{status['shards_total']} shards done, written by {len(nodes)} node(s)")
EOF
echo "== ${SECONDS}s recipe ok"
