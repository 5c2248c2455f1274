"""The extraction rows that are not the project's CLI, as hidden subcommands of one script:
`python bench/extraction_rows.py _serial|_cinego|_decode_only|_encode_only ...`, each run as a
subprocess by bench/extract.py and bench/extract_speed.py and timed from outside (their module
docstrings say what each row is and why)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, without an install

from corpus import ENCODER, FRAMES  # noqa: E402  (bench/ is on sys.path when run as a script)


def clip_preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """A CLIP image processor's geometry on one full-resolution frame: PIL bicubic resize of the
    short side to `size`, then a centre crop of size x size (uint8 in, uint8 out)."""
    from PIL import Image

    height, width = frame.shape[:2]
    scale = size / min(width, height)
    new_w, new_h = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


def one_video_at_a_time(prog: str, argv: list[str], writes: str, **indices_flag) -> tuple:
    """The peers' rows' common start: parse --manifest, --out (and --indices when given its
    argparse keywords), load the tower and the manifest, make --out; (args, encoder, manifest)."""
    p = argparse.ArgumentParser(prog=f"extraction_rows.py {prog}")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder whose videos to extract, in row order")
    p.add_argument("--out", type=Path, required=True, help=f"folder for the {writes} files")
    p.add_argument("--encoder", default=ENCODER, help=f"open_clip tower, random weights (default {ENCODER})")
    if indices_flag:
        p.add_argument("--indices", **indices_flag)
    args = p.parse_args(argv)
    from manifests.manifest import load_manifest
    from pipeline.encoder import EncoderSpec, load_encoder

    encoder = load_encoder(EncoderSpec(args.encoder, "none", -1, "fp32"))
    args.out.mkdir(parents=True, exist_ok=True)
    return args, encoder, load_manifest(args.manifest)


def serial_main(argv: list[str]) -> int:
    """Video-ChatGPT's way: decord at full resolution, `get_batch` of F indices, PIL resize and
    centre crop, one pickle per video, one process, one video at a time."""
    args, encoder, manifest = one_video_at_a_time(
        "_serial", argv, "<video_id>.pkl", choices=("job", "linspace"), default="job",
        help="job: the job's uniform indices (a fair ratio decodes the same frames); linspace: "
             "Video-ChatGPT's own np.linspace(0, n - 1, F), whose first frame is a free keyframe")
    import decord  # after torch (loaded with the tower): with decord first, torch's attention segfaults on CPU

    from pipeline.sampling import uniform_indices

    for entry in manifest.videos:
        reader = decord.VideoReader(str(manifest.abs_path(entry)), ctx=decord.cpu(0))
        indices = uniform_indices(len(reader), FRAMES) if args.indices == "job" \
            else np.linspace(0, len(reader) - 1, FRAMES).astype(int).tolist()
        frames = reader.get_batch(indices).asnumpy()
        tokens = encoder.encode(np.stack([clip_preprocess(frame, encoder.image_size) for frame in frames]))
        with (args.out / f"{entry.video_id}.pkl").open("wb") as fh:
            pickle.dump({"video_id": entry.video_id, "frame_index": np.asarray(indices, dtype=np.int32),
                         "tokens": tokens}, fh)
    print(json.dumps({"videos": len(manifest.videos)}))
    return 0


def decode_one(job: tuple[str, str, int]) -> str | None:
    """Decode one manifest entry as the job does (in a pool worker); its failure reason or None."""
    from pipeline.decode import DecodeSpec, decode_file
    from pipeline.errors import DecodeError

    path, kind, image_size = job
    try:
        decode_file(Path(path), kind, DecodeSpec(FRAMES, "uniform", image_size, "shortest"))
    except DecodeError as err:
        return f"{path}: {err}"
    return None


def decode_only_main(argv: list[str]) -> int:
    """Decode only: every video through the project's decoder, one spawn worker per usable core."""
    p = argparse.ArgumentParser(prog="extraction_rows.py _decode_only",
                                description="Decode every video of a manifest, nothing else.")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder whose videos to decode")
    p.add_argument("--image-size", type=int, required=True, help="the encoder's input size the decoder resizes to")
    args = p.parse_args(argv)
    from manifests.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    jobs = [(str(manifest.abs_path(e)), e.kind, args.image_size) for e in manifest.videos]
    workers = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = [e for e in pool.map(decode_one, jobs) if e]
    print(json.dumps({"videos": len(jobs), "failed": len(errors), "workers": workers}))
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


def cinego_main(argv: list[str]) -> int:
    """Cinego's way: every frame decoded to PIL, F picked, PIL preprocessing, one float32 .npy per
    video (bench/extract.py's docstring says what is and is not kept)."""
    args, encoder, manifest = one_video_at_a_time("_cinego", argv, "<video_id>.npy")
    import av

    from pipeline.sampling import uniform_indices

    for entry in manifest.videos:
        with av.open(str(manifest.abs_path(entry))) as container:
            wanted = set(uniform_indices(container.streams.video[0].frames, FRAMES))
            picked = []
            for i, frame in enumerate(container.decode(video=0)):
                image = frame.to_image()  # every frame to PIL, as Cinego; only the picked ones kept
                if i in wanted:
                    picked.append(image)
        frames = np.stack([clip_preprocess(np.asarray(image), encoder.image_size) for image in picked])
        np.save(args.out / f"{entry.video_id}.npy", encoder.encode(frames).astype(np.float32))
    return 0


def encode_only_main(argv: list[str]) -> int:
    """Encode only: the job's CPU encoder over frames already in memory (the content does not change
    the cost), batched as the job batches them."""
    p = argparse.ArgumentParser(prog="extraction_rows.py _encode_only")
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--encoder", default=ENCODER, help=f"open_clip tower, random weights (default {ENCODER})")
    args = p.parse_args(argv)
    import torch

    from pipeline.encoder import BatchingEncoder, EncoderSpec, load_encoder

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    encoder = BatchingEncoder(load_encoder(EncoderSpec(args.encoder, "none", -1, "fp32")), args.batch_size)
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, args.image_size, args.image_size, 3), dtype=np.uint8)
    futures = [encoder.submit([frames]) for _ in range(args.images // FRAMES)]
    for future in futures:
        future.result()
    encoder.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = {"_serial": serial_main, "_cinego": cinego_main, "_decode_only": decode_only_main,
            "_encode_only": encode_only_main}
    if not argv or argv[0] not in rows:
        print(f"usage: extraction_rows.py {{{','.join(rows)}}} ...", file=sys.stderr)
        return 2
    return rows[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
