"""A decoder process of the one-machine distributor (`pipeline.local`).

Started by the job as `python -m pipeline.decoder_process FD`: a fresh interpreter (nothing of
the job's state, no torch, no re-run of the caller's script as a multiprocessing child would
do), which answers each decode request arriving on the socket FD with a `DecodedVideo` or a
failure reason, one at a time, until the socket closes. Linux kills it when the job dies, so a
killed job leaves no decoder behind, not even one stuck in native code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Connection

from pipeline.shard import decode_entry

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


def serve(conn: Connection) -> None:
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
