"""A decoder process of the one-machine distributor (`pipeline.local`).

Started by the job as `python -m pipeline.decoder_process FD`: a fresh interpreter (nothing of
the job's state, no torch, no re-run of the caller's script as a multiprocessing child would
do), which answers each decode request arriving on the socket FD with a `DecodedVideo` or a
failure reason, one at a time, until the socket closes. Linux kills it when the job dies, so a
killed job leaves no decoder behind, not even one stuck in native code.

It hides the `nvidia` pip packages (which torch installs) from itself before importing decord:
decord2 dlopens every library under them at import, all of CUDA, for its GPU builds; in a CPU
decoder that cost 380 MiB of private memory per process (700 MiB resident instead of 47 MiB),
one process per core.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import os
import signal
import sys
from multiprocessing.connection import Connection

PR_SET_PDEATHSIG = 1  # prctl(2)
READY = "ready"  # the first message of a decoder process


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent, the job, dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: an idle decoder still ends when its socket closes
        return
    if os.getppid() != parent:  # the job died before the request took effect
        os._exit(1)


class HideCudaLibraries(importlib.abc.MetaPathFinder):
    """An import finder for which the `nvidia` packages do not exist (see the module docstring;
    decord2 looks them up with `importlib.util.find_spec` inside a try)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name == "nvidia" or name.startswith("nvidia."):
            raise ModuleNotFoundError(f"{name} is hidden from decoder processes", name=name)
        return None


def serve(conn: Connection) -> None:
    sys.meta_path.insert(0, HideCudaLibraries())
    from pipeline.shard import decode_entry  # imports decord

    conn.send(READY)  # imports done (decord alone takes seconds): deadlines start after this
    while True:
        try:
            request = conn.recv()  # (video root, VideoEntry, DecodeSpec)
        except (EOFError, OSError):  # the job closed the pool
            return
        try:
            outcome = decode_entry(*request)
        except Exception as err:  # noqa: BLE001 - an unforeseen decoder failure is this row's reason
            outcome = f"decoder error: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        conn.send(outcome)


if __name__ == "__main__":
    die_with_parent()
    serve(Connection(int(sys.argv[1])))
