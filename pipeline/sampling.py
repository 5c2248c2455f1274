"""Which frames of a video are decoded (DESIGN §3.2).

For a video of N frames and F samples, sample i (0 <= i < F) sits at the centre of the i-th of
F equal segments:

    uniform(i)  = floor((i + 0.5) * N / F)
    keyframe(i) = the keyframe index k minimising |k - uniform(i)|; on a tie the earlier one

`uniform` is exact in time; `keyframe` moves each sample to a keyframe, so that decoding it
needs no run of frames from the previous keyframe (several times faster on long GOPs). With
N < F the uniform formula repeats frames; the store records N next to the indices.
"""

from __future__ import annotations

import bisect
from typing import Sequence

UNIFORM = "uniform"
KEYFRAME = "keyframe"
SAMPLING_POLICIES = (UNIFORM, KEYFRAME)


def uniform_indices(n_frames: int, frames: int) -> list[int]:
    """The centre frame of each of `frames` equal segments of `n_frames` frames."""
    if n_frames < 1 or frames < 1:
        raise ValueError(f"need at least one frame and one sample, got n_frames={n_frames}, frames={frames}")
    return [((2 * i + 1) * n_frames) // (2 * frames) for i in range(frames)]


def nearest_keyframes(positions: Sequence[int], key_indices: Sequence[int]) -> list[int]:
    """For each position, the nearest of the sorted `key_indices` (the earlier one on a tie)."""
    if not key_indices:
        raise ValueError("a video without keyframes cannot be sampled by keyframe")
    nearest = []
    for position in positions:
        after = bisect.bisect_left(key_indices, position)
        candidates = key_indices[max(after - 1, 0) : after + 1]
        nearest.append(min(candidates, key=lambda k: (abs(k - position), k)))
    return nearest


def sample_indices(policy: str, n_frames: int, frames: int, key_indices: Sequence[int] = ()) -> list[int]:
    """The frame indices to decode under `policy` (see the module docstring)."""
    positions = uniform_indices(n_frames, frames)
    if policy == UNIFORM:
        return positions
    if policy == KEYFRAME:
        return nearest_keyframes(positions, sorted(key_indices))
    raise ValueError(f"unknown sampling policy {policy!r}; choose one of {', '.join(SAMPLING_POLICIES)}")
