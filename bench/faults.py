"""Fault injection (issue 12): faults injected into real extraction and training runs, and inputs
of every awkward kind, each judged against an undisturbed run; one table of what was tried, how
often, what survived and what was lost.

Sections (each a module beside this one, each returning rows
`{"fault", "where", "tried", "survived", "lost", "detail"}`):
- `faults_extract`: the driver SIGKILLed at spread moments of `extract` and `rebuild`, decoders,
  Ray workers and a Ray node killed, hanging decodes, two jobs on one store (disk and S3), a full
  disk, an S3 endpoint that goes away;
- `faults_training`: SIGKILL during checkpoint writes, damaged checkpoints, resumes on changed data;
- `faults_videos`: videos of every awkward kind through the real decoder process, with its peak memory.

A try survives when the run (or its rerun) ends well and what it made equals the undisturbed
run's byte for byte (bit for bit for weights); "lost" must read "nothing" on every row.

Reproduce (the README's table is this command's output on the project's 2-core CPU box):

    .venv/bin/python bench/faults.py --work /tmp/vidcache-faults --json bench/results/faults_cpu.json

`--quick` (about 3 minutes) tries each fault fewer times and skips the Ray-only faults;
`--only extract,training,videos` picks sections. Output: JSON on stdout (and in --json), then the
Markdown table; progress on stderr. Exit status 1 when anything was lost.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import emit  # noqa: E402

SECTIONS = ("extract", "training", "videos")


def print_table(result: dict) -> None:
    print("| fault or input | where | tried | survived | lost | detail |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        detail = row.get("detail", "").replace("|", "/")
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        print(f"| {row['fault']} | {row['where']} | {row['tried']} | {row['survived']} | {row['lost']} | {detail} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vidcache-faults"), help="scratch folder")
    parser.add_argument("--quick", action="store_true", help="fewer tries, no Ray-only faults (~3 min)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated ({', '.join(SECTIONS)})")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()
    sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    rows, seconds = [], {}
    for section in sections:
        started = time.monotonic()
        rows.extend(importlib.import_module(f"faults_{section}").run(args.work / section, args.quick))
        seconds[section] = round(time.monotonic() - started, 1)
    result = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
              "quick": args.quick, "seconds": seconds, "rows": rows}
    emit(result, args.json, print_table)
    sys.exit(1 if any(row["lost"] != "nothing" for row in rows) else 0)


if __name__ == "__main__":
    main()
