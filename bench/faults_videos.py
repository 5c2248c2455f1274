"""Video kinds for the fault-injection run (`bench/faults.py` imports `run`; tests/test_video_kinds.py
imports the generators and the reference).

Each kind of issue 12's "Videos" list is generated here with PyAV (no ffmpeg binary needed):
3840x2160 H.264, a container whose header over-reports its frame count, a container with packets
that carry no picture (the crafted over-reporting file decord is known to spin on), variable
frame rate, display-matrix rotations, 10-bit and 4:4:4 H.264, VP9/WebM, AV1 (when PyAV has an
AV1 encoder), a one-frame video and an hour-long video. `run` decodes each through the real
decoder-process path (`pipeline.local.DecodePool`: a fresh `pipeline.decoder_process`, its
deadline, kill and replace), compares the frames with an independent PyAV read, reads the
decoder's peak RSS (VmHWM) before the pool closes, and checks that no decoder process is left.

What "correct" means (the reference, `reference_frames`): frame i is the i-th picture in
presentation order, as PyAV decodes it, turned upright as a player shows it (the display
matrix's rotation), scaled by swscale bicubic to the size the pipeline decodes at and centre
cropped; a packet that carries no picture shows the picture before it (a player holds it).
Decoded frames must match it within colour-conversion error (mean |diff| <= MAX_MEAN_DIFF
levels), and every frame must be closer to its own reference than to any other sampled one.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_MEAN_DIFF = 3.0  # uint8 levels: swscale YUV->RGB paths differ by ~0.5 on average
X264 = {"preset": "ultrafast", "threads": "1"}


def content(i: int, width: int, height: int) -> np.ndarray:
    """Frame i (RGB): a gradient tinted by i and a bar whose place and colour depend on i, so
    that any two frames differ by far more than colour-conversion error; smooth, so 4K and
    hour-long videos encode fast and small. Asymmetric, so a wrong rotation shows."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (40 + 150 * x + 0 * y).astype(np.uint8)
    img[..., 1] = (40 + 150 * y + 0 * x).astype(np.uint8)
    img[..., 2] = 30 + (i * 53) % 190
    bar = max(width // 8, 2)
    x0 = (i * 3 * bar // 2) % (width - bar)
    img[: height * 2 // 3, x0 : x0 + bar] = (230, 230 - (i * 29) % 200, 20)
    return img


def write_video(path: Path, n: int, width: int, height: int, codec: str = "libx264", pix_fmt: str = "yuv420p",
                fps: float = 25, options: dict | None = None, pts: list[int] | None = None,
                rotation: int | None = None) -> Path:
    """Encode `n` frames of `content`; `pts` (milliseconds) gives a variable frame rate;
    `rotation` (degrees, counter-clockwise) sets the stream's display matrix."""
    from manifests.video_writer import write_video as encode

    return encode(path, (content(i, width, height) for i in range(n)), fps, codec=codec, pix_fmt=pix_fmt,
                  options=X264 if options is None else options, pts_ms=pts, rotation=rotation)


def overreport_header(path: Path, claimed: int = 2000) -> Path:
    """An MP4 of 20 frames whose sample-to-time table (stts, where FFmpeg reads nb_frames and
    the duration) claims `claimed` frames."""
    tmp = write_video(path.with_suffix(".src.mp4"), 20, 320, 240)
    data = bytearray(tmp.read_bytes())
    tmp.unlink()
    at = data.find(b"stts")
    entries, count = struct.unpack(">II", data[at + 8 : at + 16])
    assert entries == 1 and count == 20, (entries, count)  # one run of 20 equal durations
    data[at + 12 : at + 16] = struct.pack(">I", claimed)
    path.write_bytes(bytes(data))
    return path


def packets_without_pictures(path: Path, real: int = 20, empty: int = 10) -> Path:
    """An MP4 of `real` H.264 frames followed by `empty` packets that hold only an end-of-sequence
    NAL unit: the container lists real + empty samples (decord's frame count), the decoder makes
    `real` pictures. This is the over-reporting file of dmlc/decord#373 (decord 0.6 spins on it)."""
    import av

    tmp = write_video(path.with_suffix(".src.mp4"), real, 320, 240)
    with av.open(str(tmp)) as src, av.open(str(path), mode="w") as dst:
        source = src.streams.video[0]
        stream = dst.add_stream_from_template(source)
        last_pts = duration = 0
        for packet in src.demux(source):
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            last_pts, duration = packet.pts, packet.duration
            packet.stream = stream
            dst.mux(packet)
        for j in range(1, empty + 1):
            packet = av.Packet(struct.pack(">I", 1) + b"\x0a")  # one NAL: end of sequence
            packet.stream = stream
            packet.time_base = source.time_base
            packet.pts = packet.dts = last_pts + j * duration
            packet.duration = duration
            dst.mux(packet)
    tmp.unlink()
    return path


def av1_encoder() -> str | None:
    """An AV1 encoder PyAV has here, or None."""
    import av

    for name in ("libsvtav1", "libaom-av1", "librav1e"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises UnknownCodecError or ValueError by version
            continue
    return None


@dataclass(frozen=True)
class Kind:
    """One video kind: `make(folder, full)` writes it (`full`: the bench's full size, else the
    test's small variant) and returns its path."""

    name: str
    label: str
    make: Callable[[Path, bool], Path]


def _av1(folder: Path, full: bool) -> Path:
    name = av1_encoder()
    if name is None:
        raise RuntimeError("PyAV has no AV1 encoder here")
    options = {"preset": "12"} if name == "libsvtav1" else {"cpu-used": "8"}
    return write_video(folder / "av1.mp4", 10, 320, 240, codec=name, options=options)


def _hour(folder: Path, full: bool) -> Path:
    """3600 s of video: 25 fps 320x180 for the bench (90,000 frames), 1 fps 160x120 for the test."""
    fps, size = (25, (320, 180)) if full else (1, (160, 120))
    return write_video(folder / "hour.mp4", 3600 * fps, *size, fps=fps)


KINDS = [
    Kind("4k", "3840x2160 H.264",
         lambda d, full: write_video(d / "4k.mp4", 50 if full else 4, 3840, 2160)),
    Kind("overreport_header", "container header over-reports its frame count (claims 2000 of 20)",
         lambda d, full: overreport_header(d / "overreport_header.mp4")),
    Kind("overreport_packets", "container lists 30 frames, 10 of them packets without a picture",
         lambda d, full: packets_without_pictures(d / "overreport_packets.mp4")),
    Kind("vfr", "variable frame rate",
         lambda d, full: write_video(d / "vfr.mp4", 12, 320, 240,
                                     pts=[0, 40, 80, 200, 210, 220, 600, 640, 1000, 1040, 2000, 2010])),
    Kind("rotate90", "rotated 90 degrees (display matrix)",
         lambda d, full: write_video(d / "rotate90.mp4", 10, 320, 240, rotation=90)),
    Kind("rotate270", "rotated 270 degrees (display matrix)",
         lambda d, full: write_video(d / "rotate270.mp4", 10, 320, 240, rotation=-90)),
    Kind("rotate180", "rotated 180 degrees (display matrix)",
         lambda d, full: write_video(d / "rotate180.mp4", 10, 320, 240, rotation=180)),
    Kind("h264_10bit", "10-bit H.264 (High 10)",
         lambda d, full: write_video(d / "h264_10bit.mp4", 10, 320, 240, pix_fmt="yuv420p10le")),
    Kind("h264_444", "4:4:4 H.264 (High 4:4:4)",
         lambda d, full: write_video(d / "h264_444.mp4", 10, 320, 240, pix_fmt="yuv444p")),
    Kind("vp9", "VP9 in WebM",
         lambda d, full: write_video(d / "vp9.webm", 10, 320, 240, codec="libvpx-vp9",
                                     options={"deadline": "realtime", "cpu-used": "8", "threads": "1"})),
    Kind("av1", "AV1", _av1),
    Kind("one_frame", "a video with 1 frame",
         lambda d, full: write_video(d / "one_frame.mp4", 1, 320, 240)),
    Kind("hour", "an hour-long video", _hour),
]


def decode_size(width: int, height: int, rotation: int, size: int) -> tuple[int, int]:
    """(width, height) the pipeline decodes at, from the coded size and the rotation, written
    out independently of `pipeline.preprocess`: the upright short side becomes `size`, the long
    side `int(size * long / short)` (torchvision `Resize`)."""
    if rotation % 180:
        width, height = height, width
    short, long = min(width, height), max(width, height)
    return (size, int(size * long / short)) if width <= height else (int(size * long / short), size)


def reference_frames(path: Path, indices: list[int], size: int) -> np.ndarray:
    """The frames `indices` of `path` as the pipeline must produce them (module docstring): an
    independent PyAV read, (len(indices), size, size, 3) uint8. Frame i is the packet with the
    i-th smallest pts; it shows the last picture whose pts is not after its own."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = sorted(p.pts for p in container.demux(stream) if p.size)
    targets = sorted((times[index], k) for k, index in enumerate(indices))  # (pts shown at, output slot)
    out: list[np.ndarray | None] = [None] * len(indices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        previous = None
        for frame in _decode_tolerant(container, stream):  # presentation order
            while targets and previous is not None and targets[0][0] < frame.pts:
                out[targets.pop(0)[1]] = _upright_crop(previous, size)
            previous = frame
        for _, k in targets:
            out[k] = _upright_crop(previous, size)
    return np.stack(out)


def _upright_crop(frame, size: int) -> np.ndarray:
    """A decoded frame scaled (swscale bicubic) so its upright short side is `size`, turned upright
    by its display matrix (counter-clockwise degrees), centre cropped as torchvision does."""
    width, height = decode_size(frame.width, frame.height, frame.rotation, size)
    coded = (width, height) if frame.rotation % 180 == 0 else (height, width)
    rgb = frame.reformat(width=coded[0], height=coded[1], format="rgb24", interpolation="BICUBIC").to_ndarray()
    picture = np.rot90(rgb, k=(frame.rotation // 90) % 4)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return np.ascontiguousarray(picture[top : top + size, left : left + size])


def _decode_tolerant(container, stream):
    """Every picture of `stream`; a packet the decoder rejects (no picture in it) is skipped."""
    import av

    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def check_frames(frames: np.ndarray, reference: np.ndarray) -> str | None:
    """None when `frames` match `reference` (module docstring), else what is wrong, one line."""
    if frames.shape != reference.shape:
        return f"shape {frames.shape}, expected {reference.shape}"
    diff = np.abs(frames.astype(np.int16)[:, None] - reference.astype(np.int16)[None]).mean(axis=(2, 3, 4))
    own = np.diag(diff)
    if own.max() > MAX_MEAN_DIFF:
        return f"frame {int(own.argmax())} differs from the reference by {own.max():.1f} levels on average"
    for i in range(len(frames)):
        others = [diff[i, j] for j in range(len(frames)) if not np.array_equal(reference[i], reference[j])]
        if others and min(others) <= own[i]:
            return f"frame {i} is as close to another sampled frame as to its own"
    return None


def _peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _decoder_pids() -> set[int]:
    """Live (not zombie) descendants of this process that run pipeline.decoder_process (other
    jobs' decoders on the machine are not ours to count)."""
    parents, decoders = {}, set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parents[int(proc.name)] = int(parent)
                if b"pipeline.decoder_process" in (proc / "cmdline").read_bytes():
                    decoders.add(int(proc.name))
        except (OSError, ValueError):
            continue
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return decoders & found


def run(work: Path, quick: bool, frames: int = 8, image_size: int = 224, timeout_s: float = 120) -> list[dict]:
    """Generate every kind (full size; `quick` shortens the 4K clip to 2 s and the hour to 5 fps),
    decode each in a fresh decoder process of `pipeline.local.DecodePool` (the job's path, with
    its deadline), check the frames against `reference_frames`, and report the decoder's peak
    RSS and that no decoder process outlives its pool. One row per kind for bench/faults.py."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from manifests.manifest import VideoEntry
    from pipeline.decode import DecodeSpec
    from pipeline.local import DecodePool

    work.mkdir(parents=True, exist_ok=True)
    spec = DecodeSpec(frames=frames, sampling="uniform", image_size=image_size)
    rows = []
    for kind in KINDS:
        row = {"fault": f"video: {kind.label}", "where": "extract", "tried": 1, "survived": 0, "lost": "nothing"}
        rows.append(row)
        try:
            start = time.perf_counter()
            path = kind.make(work, not quick) if kind.name not in ("4k", "hour") or not quick else \
                _quick_full(kind.name, work)
            made_s = time.perf_counter() - start
        except RuntimeError as err:  # no encoder for this kind here
            row.update(tried=0, lost="-", detail=f"not tried: {err}")
            continue
        before = _decoder_pids()
        pool = DecodePool(1, timeout_s)
        try:
            entry = VideoEntry(0, kind.name, path.name, path.stat().st_size, "", 0, "train")
            start = time.perf_counter()
            outcome = pool.submit((str(work), entry, spec)).result()
            decode_s = time.perf_counter() - start
            peak = _peak_rss_mib(pool.processes[0].pid)
        finally:
            pool.close()
        left = _decoder_pids() - before
        if isinstance(outcome, str):
            row["detail"] = f"recorded failed: {outcome}; decoder peak {peak:.0f} MiB"
            row["survived"] = 1  # the job goes on; the row says why
        else:
            problem = check_frames(outcome.frames, reference_frames(path, outcome.frame_index.tolist(), image_size))
            row["survived"] = int(problem is None)
            if problem is not None:
                row["lost"] = f"wrong frames: {problem}"
            row["detail"] = (f"{'correct frames' if problem is None else 'WRONG frames'} ({outcome.n_frames} frames "
                             f"listed, indices {outcome.frame_index.tolist()}); decoder peak {peak:.0f} MiB; "
                             f"decode {decode_s:.1f} s; file {path.stat().st_size / 2**20:.1f} MiB made in {made_s:.0f} s")
        if left:
            row["survived"], row["lost"] = 0, f"decoder processes left running: {sorted(left)}"
        if kind.name in ("4k", "hour"):
            row["peak_rss_mib"] = round(peak, 1)
    return rows


def _quick_full(name: str, folder: Path) -> Path:
    """The quick run's 4K clip (2 s at 25 fps) and hour (5 fps, 320x180): full size, less to encode."""
    if name == "4k":
        return write_video(folder / "4k.mp4", 50, 3840, 2160)
    return write_video(folder / "hour.mp4", 3600 * 5, 320, 180, fps=5)


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description="Decode each video kind of issue 12 in a decoder process.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for result in run(args.work or Path(tmp), args.quick):
            print(json.dumps(result))
