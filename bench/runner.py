"""Running the benchmarks' rows: each row is a subprocess timed from outside, start to exit; a
failed one stops the benchmark with the tail of its output; scratch space is --work or a
temporary folder."""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A subprocess of the benchmark failed; the message carries its output's tail."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    """`run_extract.py status --json` of a store, reduced to what the completeness checks need."""
    _, text = run([python, "run_extract.py", "status", "--store", str(store), "--json"], logs, name)
    status = json.loads(text)
    keys = ("rows", "ok", "failed", "pending", "shards_done", "shards_total", "failures_by_reason")
    return {**{k: status[k] for k in keys}, "image_size": status["encoder"]["image_size"]}


@contextlib.contextmanager
def work_dir(work: Path | None, prefix: str) -> Iterator[Path]:
    """`work` (kept: a generated corpus is reused next time), or a temporary folder deleted at exit."""
    if work is not None:
        yield work.expanduser().resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def bench_main(measure: Callable[[], dict], json_path: Path | None, print_table: Callable[[dict], None]) -> int:
    """Measure, then print the result (and write it to `json_path`); a failed row is exit code 1."""
    try:
        result = measure()
    except BenchError as err:
        log(f"error: {err}")
        return 1
    emit(result, json_path, print_table)
    return 0
