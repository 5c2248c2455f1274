"""Benchmark: fidelity of the pipeline's decoder-side resize vs open_clip's own PIL eval transform.

What it measures. The extraction pipeline (DESIGN §3.2) does not run open_clip's eval transform
on full-resolution frames: decord decodes each sampled frame already scaled so that the short
side is the encoder's input size (FFmpeg swscale, bicubic), the frame is centre-cropped on uint8,
and normalised on the encoder's device. The reference is what open_clip users do: decode the
frame at full resolution, `PIL.Image.fromarray`, open_clip's eval transform (PIL bicubic resize
with antialiasing, centre crop, ToTensor, Normalize) built from the encoder's own preprocess
settings. Both inputs go through the same vision tower, with the same `forward_intermediates`
call as `pipeline.encoder.Encoder.encode`; only the preprocessing differs.

For every video and each of its F uniformly sampled frames (`pipeline.sampling.uniform_indices`)
it reports the cosine similarity between corresponding tokens (per token, over the width D):
per video the mean and the minimum, overall the mean and the minimum. The acceptance bar for the
pipeline is an overall mean >= 0.98. For scale it also reports (a) the same token cosine between
each sampled frame and the next frame of the video, both through the reference path (how much
one frame of motion changes the tokens), (b) the token cosine between frames of two different
videos (what an unrelated input scores with this tower), and (c) pixel-level agreement of the two preprocessed
inputs (mean absolute difference in uint8 levels and PSNR, on the cropped S x S frames).

The encoder weights are random (`--pretrained none`, open_clip's init under the pipeline's fixed
seed) unless a checkpoint file is given: nothing is downloaded. Random weights are a stand-in;
trained CLIP weights may amplify or damp input differences differently.

Reproduce (the numbers in the README were measured with exactly these, on a 2-core CPU box):

    .venv/bin/python bench/fidelity.py --work /tmp/vidcache-bench-fidelity --out fidelity.json
    .venv/bin/python bench/fidelity.py --work /tmp/vidcache-bench-fidelity --encoder demo-tiny --out fidelity_tiny.json

Output: a JSON object on stdout (and in --out if given), then a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from pipeline.decode import DecodeSpec, decode_video  # noqa: E402
from pipeline.encoder import Encoder, EncoderSpec, load_encoder  # noqa: E402
from pipeline.sampling import UNIFORM, uniform_indices  # noqa: E402
from report import emit, print_rows  # bench/report.py (bench/ is on sys.path when run as a script)

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None,
                   help="directory for the generated demo corpus; reused when present (default: a temp dir, "
                        "deleted at exit). Ignored with --videos")
    p.add_argument("--videos", type=Path, default=None,
                   help="measure the video files in this directory instead of a generated demo corpus")
    p.add_argument("--n-videos", type=int, default=4,
                   help="videos to use: the demo corpus size, or the first N (sorted) of --videos (default 4)")
    p.add_argument("--encoder", nargs="+", default=["ViT-B-16"],
                   help="open_clip model name(s) to measure, e.g. ViT-B-16 demo-tiny (default ViT-B-16)")
    p.add_argument("--pretrained", default="none",
                   help="weights: 'none' for random weights (default; nothing is downloaded) or a checkpoint file")
    p.add_argument("--layer", type=int, default=-1, help="block whose tokens are compared (default -1, the last)")
    p.add_argument("--frames", type=int, default=8, help="F, frames sampled per video (default 8)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this path")
    return p.parse_args(argv)


def corpus_videos(args: argparse.Namespace, scratch: Path) -> list[Path]:
    if args.videos is not None:
        paths = sorted(p for p in args.videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not paths:
            raise SystemExit(f"no video files in {args.videos}")
        return paths[: args.n_videos]
    from manifests.demo_corpus import make_demo_corpus, plan_videos

    root = (args.work or scratch) / f"demo_corpus_{args.n_videos}_seed0"
    planned = [root / "videos" / f"{v.video_id}.mp4" for v in plan_videos(args.n_videos, seed=0)]
    if not all(p.exists() for p in planned) or not (root / "labels.json").exists():
        make_demo_corpus(root, n_videos=args.n_videos, seed=0)
    return planned


@torch.inference_mode()
def tower_tokens(encoder: Encoder, x: torch.Tensor) -> np.ndarray:
    """Normalised (N, 3, S, S) float input -> (N, T, D) float16 tokens, through `Encoder.tokens`,
    the tower call of `Encoder.encode` (which takes uint8 frames instead)."""
    return encoder.tokens(x.to(encoder.device, encoder.dtype)).to(torch.float16).cpu().numpy()


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, T, D) x (N, T, D) -> (N, T) cosine similarity per token, computed in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def reference_inputs(path: Path, indices: list[int], transform) -> torch.Tensor:
    """decord at full resolution -> PIL -> open_clip's eval transform, for each index."""
    import decord
    from PIL import Image

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    frames = reader.get_batch(indices).asnumpy()  # (n, H, W, 3) uint8, full resolution
    return torch.stack([transform(Image.fromarray(frame)) for frame in frames])


def measure_encoder(model: str, args: argparse.Namespace, videos: list[Path]) -> dict:
    import decord
    import open_clip

    started = time.perf_counter()
    encoder = load_encoder(EncoderSpec(model, args.pretrained, layer=args.layer))
    attrs = encoder.attrs
    size = encoder.image_size
    transform = open_clip.image_transform(
        size, is_train=False, mean=tuple(attrs["mean"]), std=tuple(attrs["std"]),
        resize_mode=attrs["resize_mode"], interpolation=attrs["interpolation"],
    )
    mean = torch.tensor(attrs["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(attrs["std"]).view(1, 3, 1, 1)
    spec = DecodeSpec(frames=args.frames, sampling=UNIFORM, image_size=size, resize_mode=attrs["resize_mode"])

    per_video, all_cos, all_next, all_ref = [], [], [], []
    for path in videos:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n_frames = len(reader)
        width, height = reader[0].shape[1], reader[0].shape[0]
        del reader
        indices = uniform_indices(n_frames, args.frames)

        decoded = decode_video(path, spec)  # (a) the pipeline
        assert list(decoded.frame_index) == indices, (decoded.frame_index, indices)
        pipeline_tokens = encoder.encode(decoded.frames)

        ref_x = reference_inputs(path, indices, transform)  # (b) open_clip's PIL eval transform
        reference_tokens = tower_tokens(encoder, ref_x)
        cos = token_cosine(pipeline_tokens, reference_tokens)  # (F, T)

        next_indices = [min(i + 1, n_frames - 1) for i in indices]  # scale: one frame of motion
        next_tokens = tower_tokens(encoder, reference_inputs(path, next_indices, transform))
        cos_next = token_cosine(reference_tokens, next_tokens)

        ref_u8 = ((ref_x * std + mean) * 255.0).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
        diff = decoded.frames.astype(np.float64) - ref_u8
        mse = float((diff**2).mean())
        per_video.append({
            "video": path.name,
            "source_size": f"{width}x{height}",
            "n_frames": n_frames,
            "frame_index": indices,
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "cosine_cls_mean": round(float(cos[:, 0].mean()), 5),
            "next_frame_cosine_mean": round(float(cos_next.mean()), 5),
            "pixel_mae_uint8": round(float(np.abs(diff).mean()), 3),
            "pixel_psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else None,
        })
        all_cos.append(cos.ravel())
        all_next.append(cos_next.ravel())
        all_ref.append(reference_tokens)

    # Scale, other end: tokens of unrelated frames (video i vs video i+1, same frame slot).
    other = [token_cosine(all_ref[i], all_ref[(i + 1) % len(all_ref)]).ravel() for i in range(len(all_ref))]
    other_mean = float(np.concatenate(other).mean()) if len(all_ref) > 1 else float("nan")

    cos = np.concatenate(all_cos)
    nxt = np.concatenate(all_next)
    return {
        "encoder": model,
        "pretrained": args.pretrained,
        "layer": args.layer,
        "image_size": size,
        "tokens_per_frame": attrs["tokens_per_frame"],
        "width": attrs["width"],
        "interpolation": attrs["interpolation"],
        "resize_mode": attrs["resize_mode"],
        "videos": len(videos),
        "frames_per_video": args.frames,
        "cosine_mean": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "cosine_p01": round(float(np.quantile(cos, 0.01)), 5),
        "next_frame_cosine_mean": round(float(nxt.mean()), 5),
        "other_video_cosine_mean": round(other_mean, 5),
        "pixel_mae_uint8": round(float(np.mean([v["pixel_mae_uint8"] for v in per_video])), 3),
        "meets_0.98": bool(cos.mean() >= 0.98),
        "per_video": per_video,
        "runtime_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vidcache-bench-fidelity-") as scratch:
        videos = corpus_videos(args, Path(scratch))
        results = [measure_encoder(model, args, videos) for model in args.encoder]
    result = {
        "benchmark": "fidelity",
        "pipeline": "decord scaled decode (swscale bicubic) -> centre crop -> Encoder.encode",
        "reference": "decord full-res decode -> PIL -> open_clip.image_transform(is_train=False) -> same tower",
        "results": results,
        "total_runtime_s": round(time.perf_counter() - started, 1),
    }
    emit(result, args.out, print_table)
    return result



def print_table(result: dict) -> None:
    print_rows(["encoder", "weights", "videos x frames", "token cosine mean", "min", "next-frame cosine",
                "other-video cosine", "pixel MAE (uint8)", ">= 0.98"],
               [[f"{r['encoder']} ({r['image_size']} px)", r["pretrained"], f"{r['videos']} x {r['frames_per_video']}",
                 f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}", f"{r['next_frame_cosine_mean']:.4f}",
                 f"{r['other_video_cosine_mean']:.4f}", f"{r['pixel_mae_uint8']:.2f}", "yes" if r["meets_0.98"] else "no"]
                for r in result["results"]])

if __name__ == "__main__":
    main()
