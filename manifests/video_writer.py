"""Encode RGB frames into a video file with PyAV: the one writer behind the demo corpus, the
benchmarks' corpora and the tests' videos, so that timestamps and flushing are done one way."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(path: Path, frames: Iterable[np.ndarray], fps: float, *, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
                pts_ms: Sequence[int] | None = None, rotation: int | None = None) -> Path:
    """Write `frames` ((H, W, 3) uint8 RGB, all one size) to `path` at `fps`. Timestamps are
    explicit (frame i at pts i in a 1/fps time base), so the encoder never guesses them; or
    `pts_ms` gives each frame's time in milliseconds (a variable frame rate). `rotation`
    (degrees, counter-clockwise) sets the stream's display matrix."""
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.codec_context.time_base = 1 / rate if pts_ms is None else Fraction(1, 1000)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = dict(options or {})
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, pixels in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index if pts_ms is None else pts_ms[index]
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
