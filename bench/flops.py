"""Arithmetic ceilings for the benches: a device's measured matmul rate and the FLOPs of the work
done, so that a throughput can be read as a fraction of what the device could do at best
(the encoder's ceiling in `encode_throughput.py`, the trainer's MFU in `train.py`).

FLOPs are counted, not estimated: torch's `FlopCounterMode` over one real call (forward, or
forward and backward), with attention forced onto its math kernel so that its two products are
counted as matmuls (the fused CPU kernel and nn.MultiheadAttention's inference fast path are
invisible to the counter). For ViT-B-16 at 224 px
this gives 35.13 GFLOPs an image, the textbook 2 x 17.56 GMACs. The matmul rate is measured, not
taken from a data sheet: square matmuls of the given dtype, best of a few timed repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of ``call()`` (matmuls and convolutions, 2 per multiply-add), run once under the counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused inference kernel: uncounted
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            call()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return int(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of (n, n) @ (n, n) matmuls in ``dtype`` on ``device`` (best of ``repeats``
    timings of a run of matmuls; n defaults to 8192 on a GPU, 1024 on a CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    per_timing = 20 if device.type == "cuda" else 4

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # kernels chosen, allocator warm
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * per_timing / best
