"""Per-shard leases: two jobs on one store never write the same shard (DESIGN §3.3).

A lease is a small object `leases/shard-000007/<generation>.json` holding its owner (the job),
the node and an expiry time. A shard is free when it has no lease or its newest generation has
expired (or was released). Taking it means creating the generation after the newest one seen,
with an atomic create-if-absent (`StoreLocation.create`): of any number of racing jobs exactly one
wins, and a job whose view is stale loses, because that generation exists already. No
generation is ever deleted (a release rewrites it as expired): a folder listing that races with
a create may miss the new entry, and if older entries could vanish too a job could see an empty
folder and take generation 0 again. So the folder is also the shard's history of takers (one
small object per run that processed the shard). The holder renews its record while it
works (`kept`), so a lease outlives a killed job by at most `ttl_s`. Before committing, the holder
checks it still holds the newest generation, so a job that stalled past its expiry and lost the
shard never commits over the job that took it.

Expiry compares wall clocks of different machines: keep `ttl_s` far above their skew.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.storage import StoreLocation
from pipeline.store_format import LEASES

DEFAULT_TTL_S = 60.0


class LeaseLost(RuntimeError):
    """The shard's lease expired and another job took it; this job must not commit."""


@dataclass
class ShardLease:
    location: StoreLocation
    shard: int
    owner: str  # the job's id
    node: str = ""
    ttl_s: float = DEFAULT_TTL_S
    generation: int | None = None

    @property
    def _folder(self) -> str:
        return f"{LEASES}/shard-{self.shard:06d}"

    def _name(self, generation: int) -> str:
        return f"{self._folder}/{generation}.json"

    def _generations(self) -> list[int]:
        names = self.location.list(self._folder)
        return sorted(int(n[: -len(".json")]) for n in names if n.endswith(".json") and n[: -len(".json")].isdigit())

    def _record(self, expires: float) -> bytes:
        return json.dumps({"owner": self.owner, "node": self.node, "expires": expires}).encode()

    def _holder_of(self, generation: int) -> str | None:
        """Who holds `generation` ("job J on node N (S s left)"), or None when it is free."""
        data = self.location.read(self._name(generation))
        try:
            record = json.loads(data) if data else None
        except ValueError:
            record = None
        if record is None or record.get("expires", 0) <= time.time():
            return None
        return (f"job {record.get('owner')} on node {record.get('node') or '?'} "
                f"({record['expires'] - time.time():.0f} s left on its lease)")

    def acquire(self) -> str | None:
        """Take the shard; None on success, else who holds it."""
        generations = self._generations()
        if generations and (held := self._holder_of(generations[-1])) is not None:
            return held
        generation = generations[-1] + 1 if generations else 0
        if not self.location.create(self._name(generation), self._record(time.time() + self.ttl_s)):
            newest = self._generations()
            return (newest and self._holder_of(newest[-1])) or "another job (it took the shard a moment ago)"
        self.generation = generation
        return None

    def check(self) -> None:
        """Raise `LeaseLost` unless this job still holds the newest generation."""
        generations = self._generations()
        if self.generation is None or not generations or generations[-1] != self.generation:
            raise LeaseLost(f"shard {self.shard}: the lease expired and another job took the shard")

    def renew(self) -> None:
        self.check()
        self.location.write(self._name(self.generation), self._record(time.time() + self.ttl_s))

    def release(self) -> None:
        """Mark this job's generation expired (it stays, so its number is never reused)."""
        if self.generation is not None:
            self.location.write(self._name(self.generation), self._record(0.0))
            self.generation = None

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Renew the lease every third of its lifetime while the body runs, then release it."""
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.ttl_s / 3):
                with contextlib.suppress(Exception):  # a failed renewal shows up in check()
                    self.renew()

        thread = threading.Thread(target=heartbeat, name=f"lease-{self.shard}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release()
