"""Decode stage: one video (or image) file -> the F cropped uint8 frames the encoder will see.

Only the sampled frames are decoded (decord `get_batch` on the sampled indices), already
resized by the decoder so the short side is the encoder's input size. decord's `width` /
`height` scale to exactly that size (FFmpeg `scale=W:H`, bicubic), so both are computed from the
source size, which PyAV reads from the container header. The centre crop happens here, on uint8,
so a decode worker ships 224x224x3 bytes per frame, not floats. A 4K source is never held at full
size in RGB: FFmpeg scales each decoded YUV picture before converting it.

Frames come out upright, as a player shows them: decord turns each picture by the stream's
display matrix (`transpose` before its `scale`), and `width` / `height` are the size after that
turn, so for a 90 or 270 degree rotation the source size is the coded size swapped. The rotation
is read from the first decoded picture's display matrix (PyAV has no stream-level accessor; one
picture costs ~40 ms at 4K), the same side data decord reads. Mirroring matrices are not applied
(decord reads only their rotation).

An image is a one-frame video: PIL decodes and resizes it exactly as open_clip's transform does
(bicubic), and its frame is repeated F times with `n_frames` 1.

Everything that can go wrong with one file becomes a `DecodeError` whose message is the reason
stored for its row. A hang or a crash in native code cannot be caught here; the orchestrator runs
this function where it can be killed (see `pipeline.distributed`).

A container can list more frames than its stream holds pictures (trailing packets with only an
end-of-sequence unit, say): decord2 counts packets and, for a sample on such a packet, repeats
the last picture it returned. When a sample repeats an earlier one byte for byte, PyAV decodes
the last keyframe interval to find the last real picture, and samples past it are taken as
that picture, as a player shows them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DecodeError
from pipeline.preprocess import center_crop, resized_size
from pipeline.sampling import KEYFRAME, sample_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSpec:
    """What the decode stage needs to know about the encoder and the sampling."""

    frames: int  # F, samples per video
    sampling: str  # "uniform" | "keyframe"
    image_size: int  # the encoder's square input size S
    resize_mode: str = "shortest"


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (F, S, S, 3) uint8, cropped
    frame_index: np.ndarray  # (F,) int32, source frame numbers decoded
    n_frames: int  # frames the source really has (1 for an image)


def probe_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first video stream as a player shows it: the coded size from the
    container header, swapped when its display matrix turns it by 90 or 270 degrees."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width > 0 and height > 0 and _rotation(container, stream) % 180:
                width, height = height, width
    except DecodeError:
        raise
    except Exception as err:  # PyAV raises many error types for unreadable containers
        raise DecodeError(f"unreadable container: {_one_line(err)}") from err
    if width <= 0 or height <= 0:
        raise DecodeError(f"video stream has no frame size ({width}x{height})")
    return width, height


def _rotation(container, stream) -> int:
    """Degrees (counter-clockwise) the display matrix turns the pictures, from the first one
    decoded; 0 when none decodes here (decord then gives the real reason)."""
    stream.thread_count = 1
    try:
        for frame in container.decode(stream):
            return int(frame.rotation)
    except Exception:  # noqa: BLE001 - a broken stream is decord's to report, with its own words
        pass
    return 0


def decode_video(path: Path, spec: DecodeSpec, indices: list[int] | None = None) -> DecodedVideo:
    """Decode the sampled frames of one video file (see the module docstring); `indices`
    overrides the sampling (to see again exactly the frames a store recorded)."""
    import decord

    path = Path(path)
    if not path.exists():
        raise DecodeError("file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    width, height = resized_size(*probe_size(path), spec.image_size, spec.resize_mode)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
        n_frames = len(reader)
        if n_frames < 1:
            raise DecodeError("video has no frames")
        if indices is None:
            keys = list(reader.get_key_indices()) if spec.sampling == KEYFRAME else []
            indices = sample_indices(spec.sampling, n_frames, spec.frames, keys)
        frames = reader.get_batch(indices).asnumpy()  # (F, height, width, 3)
        if _repeats_an_earlier_sample(frames, indices):
            last = _last_picture(path, n_frames)
            if max(indices) > last:  # samples fell on packets without a picture: decord repeats a stale one
                frames = reader.get_batch([min(i, last) for i in indices]).asnumpy()
    except DecodeError:
        raise
    except Exception as err:  # decord raises DECORDError and plain RuntimeErrors
        raise DecodeError(f"decoder error: {_one_line(err)}") from err
    if frames.shape != (len(indices), height, width, 3):
        raise DecodeError(f"decoder returned frames of shape {frames.shape}, expected {(len(indices), height, width, 3)}")
    return DecodedVideo(center_crop(frames, spec.image_size), np.asarray(indices, dtype=np.int32), n_frames)


def _repeats_an_earlier_sample(frames: np.ndarray, indices: list[int]) -> bool:
    """Is a sampled frame byte-identical to an earlier one of another index? What decord2 gives
    for a sample on a packet that holds no picture (it repeats the last picture it returned);
    also, rarely, real still content, which `_last_picture` then tells apart."""
    return any(indices[j] != indices[i] and np.array_equal(frames[i], frames[j])
               for i in range(1, len(indices)) for j in range(i))


def _last_picture(path: Path, n_frames: int) -> int:
    """Index of the last of the `n_frames` listed frames (packets, in presentation order) that
    decodes to a picture: a second opinion from PyAV, decoding only the last keyframe interval.
    A player shows that picture for every listed frame after it (packets holding only, say, an
    end-of-sequence unit), so those samples are taken as it."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            end = (stream.start_time or 0) + (stream.duration or 0)
            container.seek(max(end, 0), stream=stream, backward=True)  # to the last keyframe
            listed: list[int] = []
            pictures: set[int] = set()
            for packet in container.demux(stream):
                if packet.pts is not None:
                    listed.append(packet.pts)
                pictures.update(frame.pts for frame in packet.decode())
    except Exception as err:  # noqa: BLE001 - PyAV raises many types; decord read it, so keep decord's frames
        log.debug("%s: no second opinion on its last picture (%s)", path, _one_line(err))
        return n_frames - 1
    listed.sort()
    shown = [i for i, pts in enumerate(listed) if pts in pictures]
    if not shown:
        raise DecodeError("the last keyframe interval decodes to no picture")
    return n_frames - len(listed) + shown[-1]


def decode_image(path: Path, spec: DecodeSpec) -> DecodedVideo:
    """An image as a one-frame video: resized with PIL bicubic (open_clip's eval transform)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except Exception as err:
        raise DecodeError(f"unreadable image: {_one_line(err)}") from err
    size = resized_size(rgb.width, rgb.height, spec.image_size, spec.resize_mode)
    pixels = np.asarray(rgb.resize(size, Image.BICUBIC))[None]  # (1, h, w, 3)
    frame = center_crop(pixels, spec.image_size)
    return DecodedVideo(np.repeat(frame, spec.frames, axis=0), np.zeros(spec.frames, dtype=np.int32), 1)


def decode_file(path: Path, kind: str, spec: DecodeSpec) -> DecodedVideo:
    """Decode one manifest entry; `kind` is the manifest's "video" or "image"."""
    return decode_image(path, spec) if kind == "image" else decode_video(path, spec)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]
