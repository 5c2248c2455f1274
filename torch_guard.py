"""Keep torch working in a process where decord was imported first.

decord2 (3.4) preloads every shared library of the `nvidia` pip packages (which torch's CUDA
wheels install) with RTLD_GLOBAL, NVBLAS among them: a BLAS that takes over `sgemm_` and
`dgemm_` and, without an NVBLAS configuration naming a CPU BLAS, crashes. libtorch_cpu exports
its own `sgemm_` and binds its calls when it is loaded: loaded after decord, it binds NVBLAS's
and dies (SIGSEGV) in its first CPU matrix product; loaded before, it keeps its own.

`guard_torch` imports torch with RTLD_DEEPBIND (its libraries bind their own symbols first)
when NVBLAS is already in the process and torch is not; otherwise it does nothing. The
packages `pipeline`, `model` and `trainer` call it when imported, and `load_encoder` before
it imports torch, so a script that imports decord first, or decodes with this project before
it encodes, is safe. Plain `import decord; import torch` in a user's own code is not: import
torch first there. A module of its own, outside the packages: `model` imports nothing of
`pipeline`, and `pipeline` must not import torch where it only decodes.
"""

from __future__ import annotations

import os
import sys


def nvblas_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "libnvblas" in maps.read()
    except OSError:  # not Linux
        return False


def guard_torch() -> None:
    """Import torch now, with RTLD_DEEPBIND, if decord already loaded NVBLAS (see above)."""
    if "torch" in sys.modules or not hasattr(os, "RTLD_DEEPBIND") or not nvblas_loaded():
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import torch  # noqa: F401
    finally:
        sys.setdlopenflags(flags)
