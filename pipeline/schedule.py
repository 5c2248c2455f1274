"""The driver's loop, whatever runs the shards: keep enough shards in flight, read their
outcomes, retry what failed, come back later to shards another job holds.

A distributor (`pipeline.distributed` for Ray, `pipeline.local` for this machine's processes)
hands `run_shards` a `submit` function that starts one shard's `pipeline.shard.take_shard`
somewhere and returns a `concurrent.futures.Future` of its `ShardOutcome`. The driver holds the
manifest rows of the shards in flight only, so its memory does not grow with the corpus; a
failed shard is data (a one-line reason in `RunTotals.left`), never a traceback. One kind of
failure is the job's, not the shard's: a store with no space left (or a read-only one) fails
every shard alike, so the first such failure stops the job (`RunTotals.stopped`): no new shard
starts, the ones in flight end, and what was committed stays.
"""

from __future__ import annotations

import errno
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from manifests.manifest import VideoEntry
from pipeline.shard import ShardJob, ShardOutcome

log = logging.getLogger(__name__)

POLL_S = 0.2
SHARD_RETRIES = 2  # a shard whose task failed (not its videos: the task) is tried this often again
HELD_RETRY_S = 5.0  # a shard leased by another job is looked at again after this long
RETRY_PAUSE_S = 5.0  # a failed shard is tried again after this long (times the tries so far)

Task = tuple[int, list[VideoEntry], str]  # (shard, its manifest rows, their sha256)


@dataclass
class RunTotals:
    shards: int = 0
    shards_by_others: int = 0  # committed meanwhile by another job on the same store
    ok: int = 0
    failed: int = 0
    left: list[str] = field(default_factory=list)  # one line per shard left pending
    stopped: str | None = None  # why the job stopped early (`stops_the_job`)


# the store cannot take a write from anyone: no space, over quota, read-only
_STORE_REFUSES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def stops_the_job(err: BaseException) -> bool:
    """Is `err` (or what caused it; a Ray task error carries it as `cause`) the store refusing
    every write, rather than this shard failing?"""
    seen = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORE_REFUSES:
            return True
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return False


def make_job(template: dict[str, Any], slots: int) -> tuple[ShardJob, int]:
    """The run's `ShardJob` for `slots` concurrent decodes, and how many shards to keep open:
    enough to fill every slot, plus one whose decodes start while another writes."""
    per_shard = max(1, min(slots, template["shard_size"]))
    job = ShardJob(**{k: v for k, v in template.items() if k != "shard_size"}, decodes_per_shard=per_shard,
                   job_id=uuid.uuid4().hex[:12])
    return job, max(2, -(-slots // per_shard) + 1)


def one_line_reason(err: BaseException) -> str:
    """One line for a failed shard: the innermost error's type and message (for a remote task,
    the last "...Error: message" line of its traceback, else the first line)."""
    cause = getattr(err, "cause", None) or err
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(cause).splitlines()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    if raised:
        kind, message = raised[-1].split(": ", 1)
        return f"{kind.rsplit('.', 1)[-1]}: {message[:200]}"
    return f"{type(cause).__name__}: {next((line for line in lines if line), '')[:200]}"


def run_shards(submit: Callable[[Task], Future], shards: Iterable[Task], n_videos: int, max_open: int,
               committed_elsewhere: Callable[[int, str], bool]) -> RunTotals:
    """Run `shards` (read lazily, in order), at most `max_open` at a time. A shard another job
    holds is looked at again later and dropped once `committed_elsewhere`."""
    stream = iter(shards)
    exhausted = False
    later: list[tuple[float, Task, int]] = []  # (not before, task, tries so far)
    running: dict[Future, tuple[Task, int]] = {}
    totals = RunTotals()
    bar = tqdm(total=n_videos, desc="extract", unit="video", dynamic_ncols=True)

    def next_task() -> tuple[Task, int] | None:
        nonlocal exhausted
        if totals.stopped:
            return None
        due = [item for item in later if item[0] <= time.monotonic()]
        if due:
            later.remove(due[0])
            return due[0][1:]
        task = None if exhausted else next(stream, None)
        exhausted = task is None
        return None if task is None else (task, 0)

    while True:
        while len(running) < max_open and (item := next_task()) is not None:
            running[submit(item[0])] = item
        if not running:
            if not later or totals.stopped:
                break
            time.sleep(POLL_S)
            continue
        ready, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
        for future in ready:
            task, tries = running.pop(future)
            shard, rows, sha = task
            try:
                outcome: ShardOutcome = future.result()
            except Exception as err:  # noqa: BLE001 - a failed shard is data: retried, then one line
                reason = one_line_reason(err)
                if stops_the_job(err):
                    totals.stopped = totals.stopped or reason
                    continue
                if tries < SHARD_RETRIES:  # after a pause: a dead actor takes a while to restart
                    log.warning("shard %d failed (%s); trying it again", shard, reason)
                    later.append((time.monotonic() + RETRY_PAUSE_S * (tries + 1), task, tries + 1))
                else:
                    totals.left.append(f"shard {shard}: left pending after {tries + 1} tries: {reason}")
                continue
            if outcome.done_elsewhere or (outcome.held_by is not None and committed_elsewhere(shard, sha)):
                totals.shards_by_others += 1
                bar.update(len(rows))
                continue
            if outcome.held_by is not None:  # not committed by its holder yet: look again later
                later.append((time.monotonic() + HELD_RETRY_S, task, tries))
                bar.set_postfix_str(f"shard {shard} held by {outcome.held_by}")
                continue
            totals.shards += 1
            totals.ok += outcome.ok
            totals.failed += outcome.failed
            bar.update(outcome.ok + outcome.failed)
            bar.set_postfix(failed=totals.failed)
    bar.close()
    return totals
