#!/usr/bin/env python3
"""Build the corpus side: demo corpus, manifest, feature extraction.

Thin by design: each subcommand parses its flags into a config dataclass and calls one library
function with the same name (manifests.build.build_manifest, pipeline.extract.extract, ...).
Heavy modules (torch, ray, open_clip) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable


def cmd_demo_corpus(args: argparse.Namespace) -> None:
    from manifests.demo_corpus import make_demo_corpus

    make_demo_corpus(args.out, n_videos=args.videos, seed=args.seed)  # logs its own summary


def cmd_manifest(args: argparse.Namespace) -> None:
    from manifests.build import ManifestConfig, build_manifest

    cfg = ManifestConfig(
        instructions=args.instructions,
        videos=args.videos,
        out=args.out,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_videos=args.max_videos,
        format=args.format,
    )
    print("\n".join(build_manifest(cfg).lines()))


def cmd_extract(args: argparse.Namespace) -> None:
    from pipeline.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        manifest=args.manifest,
        store=args.store,
        encoder=args.encoder,
        pretrained=args.pretrained,
        frames=args.frames,
        sampling=args.sampling,
        layer=args.layer,
        batch_size=args.batch_size,
        ray_address=args.ray_address,
        decoders=args.decoders,
        precision=args.precision,
        decode_timeout_s=args.decode_timeout,
    )
    print(extract(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_extract.py",
        description="Decode a video corpus once, cache per-frame CLIP features in a sharded Zarr store.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-corpus", help="write a small synthetic corpus in the VideoInstruct-100K layout",
                       description="Write DIR/videos/<id>.mp4, DIR/instructions.json (VideoInstruct-100K format) "
                                   "and DIR/labels.json (each video's colour, shape, direction, size, fps, frames).")
    p.add_argument("--out", type=Path, required=True, help="folder to write the corpus into")
    p.add_argument("--videos", type=int, default=96, help="number of videos (default: 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the corpus is a function of it (default: 0)")
    p.set_defaults(func=cmd_demo_corpus)

    p = sub.add_parser("manifest", help="build (or grow) a manifest from an instruction file and a video folder",
                       description="Build MANIFEST_DIR (manifest.json, videos.jsonl, samples.jsonl, problems.jsonl). "
                                   "Run again with the same --out over a grown corpus: existing rows are kept and "
                                   "new videos appended as new rows and shards.")
    p.add_argument("--instructions", type=Path, required=True,
                   help="VideoInstruct-100K JSON ({q, a, video_id} records) or LLaVA/Video-ChatGPT JSON "
                        "({video, conversations}); a JSON list or JSON Lines")
    p.add_argument("--videos", type=Path, required=True,
                   help="video root: videos are found as ROOT/<video_id>.{mp4,mkv,webm,avi,mov} "
                        "(images .jpg/.jpeg/.png/.webp are taken as one-frame videos)")
    p.add_argument("--out", type=Path, required=True, help="manifest folder to write or grow")
    p.add_argument("--shard-size", type=int, default=None,
                   help="videos per shard, the unit of extraction, retry and rebuild (default: 64; "
                        "a grown manifest keeps its own)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of videos in the val split, assigned per video (default: 0.05)")
    p.add_argument("--seed", type=int, default=None, help="seed of the train/val split and of --max-videos (default: 0)")
    p.add_argument("--max-videos", type=int, default=None,
                   help="keep a deterministic subset of N videos with all their samples")
    p.add_argument("--format", choices=("auto", "videoinstruct", "llava"), default="auto",
                   help="input format (default: detected from the first record)")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("extract", help="decode + encode every video of a manifest into a Zarr feature store",
                       description="Turn a manifest into a feature store on this machine or a Ray cluster. "
                                   "Resumable: committed shards are skipped, the rest redone.")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder")
    p.add_argument("--store", type=Path, required=True, help="feature store to create or complete (e.g. store.zarr)")
    p.add_argument("--encoder", default="ViT-B-16",
                   help="open_clip model name, or demo-tiny (a tiny tower for demos and tests) (default: ViT-B-16)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a local checkpoint file, or none (seeded random weights) "
                        "(default: openai)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video, F (default: 8)")
    p.add_argument("--sampling", choices=("uniform", "keyframe"), default="uniform",
                   help="uniform: centre of F equal segments, exact; keyframe: the keyframe nearest each of those "
                        "(faster, approximate timing) (default: uniform)")
    p.add_argument("--layer", type=int, default=-1,
                   help="transformer block whose tokens are stored: -1 last, -2 penultimate (LLaVA) (default: -1)")
    p.add_argument("--batch-size", type=int, default=256, help="frames per encoder forward, across videos (default: 256)")
    p.add_argument("--ray-address", default=None,
                   help="join a Ray cluster: auto or HOST:PORT (default: start a local cluster sized to this machine)")
    p.add_argument("--decoders", type=int, default=None,
                   help="concurrent decode tasks (default: the cluster's CPUs minus those the encoders use)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="encoder precision (default: fp16 on GPU, fp32 on CPU); tokens are always stored as float16")
    p.add_argument("--decode-timeout", type=float, default=120.0,
                   help="seconds before a video's decode is killed and recorded as a hang (default: 120)")
    p.set_defaults(func=cmd_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for package in ("manifests", "pipeline"):  # our progress lines; third-party chatter stays at WARNING
        logging.getLogger(package).setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
