"""`show`: a contact sheet of the F frames the encoder saw for one video.

The frames are decoded again at the store's recorded frame indices, resized and cropped exactly
as extraction did (same decode path), so the curator sees the encoder's input, not a guess.

Layout (documented so that tools and tests can read the tiles back): a white header of
`HEADER` px with the video id, status and failure reason; then the F tiles of S x S pixels
(S = the encoder's input size) in rows of `COLUMNS`, each followed by a `LABEL` px strip with
"#index  t=seconds", with `GAP` px between tiles. Tile i's top-left corner is
(GAP + (i % COLUMNS) * (S + GAP), HEADER + (i // COLUMNS) * (S + LABEL + GAP)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from manifests.manifest import load_manifest
from pipeline.decode import DecodeSpec, decode_image, decode_video
from pipeline.errors import DecodeError, ExtractError
from pipeline.inspect import open_store
from pipeline.storage import local_copy
from pipeline.store import read_commit
from pipeline.store_format import FAILED, OK, STATUS_NAMES

HEADER, LABEL, GAP, COLUMNS = 36, 16, 4, 4


def tile_origin(i: int, size: int) -> tuple[int, int]:
    """(x, y) of tile i's top-left pixel (see the module docstring)."""
    return GAP + (i % COLUMNS) * (size + GAP), HEADER + (i // COLUMNS) * (size + LABEL + GAP)


def show(store: str | Path, manifest_dir: Path, video_id: str, out: Path) -> Path:
    """Write the contact sheet of `video_id` to `out` (PNG) and return its path."""
    sheet = contact_sheet(store, manifest_dir, video_id)
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def contact_sheet(store: str | Path, manifest_dir: Path, video_id: str) -> Image.Image:
    """The contact sheet of `video_id` (the frames at the store's recorded indices)."""
    location, g = open_store(store)
    attrs = dict(g.attrs)
    manifest = load_manifest(manifest_dir)
    entry = next((e for e in manifest.videos if e.video_id == video_id), None)
    if entry is None:
        raise ExtractError(f"video {video_id!r} is not in the manifest {manifest_dir}")
    if entry.row >= attrs["n_rows"]:
        raise ExtractError(f"video {video_id!r} (row {entry.row}) is not in the store yet; run extract")
    state = int(g["status"][entry.row])
    indices = g["frame_index"][entry.row].tolist()
    header = f"{video_id}  row {entry.row}  shard {entry.shard}  status {STATUS_NAMES.get(state, state)}"
    frames = np.zeros((0,))
    seconds: list[float] = []
    reason = ""
    if state == FAILED:
        commit = read_commit(location, entry.shard) or {"failures": []}
        reason = next((f["reason"] for f in commit["failures"] if f["row"] == entry.row), "unknown reason")
    elif state == OK:
        enc = attrs["encoder"]
        spec = DecodeSpec(attrs["frames"], attrs["sampling"], enc["image_size"], enc["resize_mode"])
        with local_copy(str(manifest.abs_path(entry))) as path:
            try:
                decoded = decode_image(path, spec) if entry.kind == "image" else decode_video(path, spec, indices)
            except DecodeError as err:
                reason = f"cannot decode the file again: {err}"
            else:
                frames = decoded.frames
                seconds = _timestamps(path, indices) if len(frames) and entry.kind == "video" else []
    labels = [f"#{index}  t={t:.2f}s" for index, t in zip(indices, seconds)] if seconds else [f"#{i}" for i in indices]
    return render_sheet(header, frames, labels, reason)


def render_sheet(header: str, frames: np.ndarray, labels: list[str], reason: str = "") -> Image.Image:
    """The sheet's image (layout in the module docstring): ``frames`` (n, S, S, 3) uint8, one
    label per frame; ``reason`` in red under the header. The web page draws uploads with it too."""
    size = frames.shape[1] if len(frames) else 0
    n = len(frames)
    rows = -(-n // COLUMNS) if n else 0
    width = max(GAP + min(max(n, 1), COLUMNS) * (size + GAP), 480)
    sheet = Image.new("RGB", (width, HEADER + rows * (size + LABEL + GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 4), header, fill="black")
    if reason:
        draw.text((GAP, 20), f"reason: {reason}", fill=(180, 0, 0))
    for i, frame in enumerate(frames):
        x, y = tile_origin(i, size)
        sheet.paste(Image.fromarray(frame), (x, y))
        draw.text((x, y + size + 2), labels[i], fill="black")
    return sheet


def _timestamps(path: Path, indices: list[int]) -> list[float]:
    """Presentation time in seconds of each frame index (container timestamps, no decoding)."""
    import decord

    return decord.VideoReader(str(path)).get_frame_timestamp(indices)[:, 0].tolist()
