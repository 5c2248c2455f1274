#!/usr/bin/env python3
"""Build the corpus side: demo corpus, manifest, feature extraction.

Thin by design: each subcommand parses its flags into a config dataclass and calls one library
function with the same name (manifests.build.build_manifest, pipeline.extract.extract, ...).
Heavy modules (torch, ray, open_clip) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import errno
import atexit
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable


def cmd_demo_corpus(args: argparse.Namespace) -> None:
    from manifests.demo_corpus import make_demo_corpus

    make_demo_corpus(args.out, n_videos=args.videos, seed=args.seed, workers=args.workers, pairs=args.pairs)  # logs its own summary


def _config(cls: type, args: argparse.Namespace) -> object:
    """The config dataclass `cls` filled from the flags of the same names."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def cmd_manifest(args: argparse.Namespace) -> None:
    from manifests.build import ManifestConfig, build_manifest

    print("\n".join(build_manifest(_config(ManifestConfig, args)).lines()))


# exit status of extract and rebuild when the job ended but left shards pending (each printed
# with its reason): a batch scheduler must not take it for done; a rerun retries them
INCOMPLETE = 3


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract import ExtractConfig, extract

    summary = extract(_config(ExtractConfig, args))
    print(summary)
    return INCOMPLETE if summary.left_pending else 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shard numbers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_rebuild(args: argparse.Namespace) -> int:
    from pipeline.extract import RebuildConfig, rebuild

    summary = rebuild(_config(RebuildConfig, args))
    print(summary)
    return INCOMPLETE if summary.left_pending else 0


def cmd_status(args: argparse.Namespace) -> None:
    from pipeline.inspect import status

    result = status(args.store, args.manifest)
    print(result.to_json() if args.json else "\n".join(result.lines()))


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.inspect import verify

    problems = verify(args.store, args.manifest)
    for line in problems:
        print(line)
    print(f"{args.store}: {'intact' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_export_hdf5(args: argparse.Namespace) -> None:
    from pipeline.hdf5 import export_hdf5

    n = export_hdf5(args.store, args.out, args.split, args.manifest)
    print(f"{args.out}: {n} rows exported")


def cmd_import_hdf5(args: argparse.Namespace) -> None:
    from pipeline.hdf5 import import_hdf5

    n = import_hdf5(args.h5, args.store)
    print(f"{args.store}: {n} rows imported")


def cmd_show(args: argparse.Namespace) -> None:
    from pipeline.contact_sheet import show

    print(show(args.store, args.manifest, args.video, args.out))


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags of how extraction runs (not what it computes): shared by extract and rebuild."""
    p.add_argument("--batch-size", type=int, default=256, help="frames per encoder forward, across videos (default: 256)")
    p.add_argument("--ray-address", default=None,
                   help="run on a Ray cluster: auto or HOST:PORT, or local for a Ray cluster of this machine "
                        "(default: no Ray: decoder processes and encoders on this machine)")
    p.add_argument("--decoders", type=int, default=None,
                   help="concurrent decodes, on this machine or over the cluster (default: every CPU, minus one "
                        "per GPU encoder)")
    p.add_argument("--encoder-threads", type=int, default=None,
                   help="torch threads of each CPU encoder (no GPUs): it reserves no CPU and shares the cores with "
                        "the decoders (default: the node's CPUs)")
    p.add_argument("--lease-expiry", type=float, default=60.0, dest="lease_ttl_s", metavar="SECONDS",
                   help="a shard this job works on is held (renewed every third of this) and stays held this long "
                        "if the job is killed; another job takes it after that (default: 60)")
    p.add_argument("--decode-timeout", type=float, default=120.0, dest="decode_timeout_s", metavar="SECONDS",
                   help="seconds a video's decode may run (from its start) before it is killed and recorded as a "
                        "hang (default: 120)")


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
    p.add_argument("--pairs", action="store_true",
                   help="also DIR/pairs.json: a two-video question per video (LLaVA format, \"video\": [a, b]), "
                        "labelled in labels.json as \"a+b\"")
    p.add_argument("--seed", type=int, default=0, help="random seed; the corpus is a function of it (default: 0)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes writing videos; the corpus does not depend on it (default: one per usable CPU core)")
    p.set_defaults(func=cmd_demo_corpus)

    p = sub.add_parser("manifest", help="build (or grow) a manifest from an instruction file and a video folder",
                       description="Build MANIFEST_DIR (manifest.json, videos.jsonl, samples.jsonl, problems.jsonl). "
                                   "Run again with the same --out over a grown corpus: existing rows are kept and "
                                   "new videos appended as new rows and shards.")
    p.add_argument("--instructions", type=Path, required=True,
                   help="VideoInstruct-100K JSON ({q, a, video_id} records) or LLaVA/Video-ChatGPT JSON "
                        "({video, conversations}); a JSON list or JSON Lines")
    p.add_argument("--videos", required=True, metavar="PATH_OR_URL",
                   help="video root, a folder or an fsspec URL (s3://bucket/videos): videos are found as "
                        "ROOT/<video_id>.{mp4,mkv,webm,avi,mov} (images .jpg/.jpeg/.png/.webp are taken as "
                        "one-frame videos)")
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
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="feature store to create or complete (e.g. store.zarr): a path or an fsspec URL (s3://bucket/store.zarr)")
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
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="encoder precision (default: the store's if it exists, else fp16 on GPU, fp32 on CPU); "
                        "tokens are always stored as float16")
    _add_run_flags(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("rebuild", help="re-extract chosen shards of a store in place",
                       description="Re-extract exactly the chosen shards with the store's own encoder settings and "
                                   "replace their commit records; every other shard's files stay byte-identical.")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder the store was made from")
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="feature store to repair: a path or an fsspec URL (s3://bucket/store.zarr)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--shards", type=_int_list, help="comma-separated shard numbers, e.g. 3,7")
    which.add_argument("--failed", action="store_true", help="every shard holding a failed row")
    which.add_argument("--videos", type=_str_list, help="comma-separated video ids: the shards holding them")
    _add_run_flags(p)
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("status", help="rows ok/failed/pending, shards done, failures by reason, encoder",
                       description="Summarise a feature store: rows by status, shards committed, failures grouped "
                                   "by reason with their video ids, how the store was made, its size on disk.")
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="feature store: a path or an fsspec URL (s3://bucket/store.zarr)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="also count a shard as done only if it was committed for this manifest's current rows")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("verify", help="check every shard against its commit record; non-zero exit on any problem",
                       description="Recompute each shard's checksum against its commit record; check shapes, "
                                   "dtypes, finite values, the status array, the attributes, and (with --manifest) "
                                   "that the store belongs to that manifest. Prints problems shard by shard.")
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="feature store: a path or an fsspec URL (s3://bucket/store.zarr)")
    p.add_argument("--manifest", type=Path, default=None, help="also check the store against this manifest")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export-hdf5", help="write the store (or one split) to one HDF5 file",
                       description="Export arrays, attributes and commit records to one HDF5 file, chunked one "
                                   "video per chunk, for single-file interchange.")
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="feature store: a path or an fsspec URL (s3://bucket/store.zarr)")
    p.add_argument("--out", type=Path, required=True, help="HDF5 file to write (e.g. features.h5)")
    p.add_argument("--split", choices=("train", "val"), default=None,
                   help="only this split's rows (needs --manifest); such a file cannot be imported back")
    p.add_argument("--manifest", type=Path, default=None, help="manifest folder, for --split")
    p.set_defaults(func=cmd_export_hdf5)

    p = sub.add_parser("import-hdf5", help="make a Zarr store from a full HDF5 export",
                       description="Recreate a feature store (arrays, attributes, commit records) from a full "
                                   "export-hdf5 file.")
    p.add_argument("--h5", type=Path, required=True, help="HDF5 file written by export-hdf5")
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="new feature store path to create: a path or an fsspec URL (s3://bucket/store.zarr)")
    p.set_defaults(func=cmd_import_hdf5)

    p = sub.add_parser("show", help="contact sheet PNG of the frames the encoder saw for one video",
                       description="Decode the video again at the stored frame indices, crop as the encoder did, "
                                   "and tile the F frames with index and timestamp; shows the status and, for a "
                                   "failed video, its reason.")
    p.add_argument("--store", required=True, metavar="PATH_OR_URL", help="feature store: a path or an fsspec URL (s3://bucket/store.zarr)")
    p.add_argument("--manifest", type=Path, required=True, help="manifest folder the store was made from")
    p.add_argument("--video", required=True, help="the video id to show (as in videos.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for package in ("manifests", "pipeline"):  # our progress lines; third-party chatter stays at WARNING
        logging.getLogger(package).setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk itself (full, read-only, over quota) outside a shard's write
        if args.debug or e.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        print(f"error: {e}; nothing committed was lost: free space (or make it writable) and rerun",
              file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Exit once the command is over: at-exit handlers run, logs and stdio are flushed, then the
    interpreter's teardown is skipped. Dismantling torch, open_clip and their imports module by
    module takes over a second on a small machine, after every file is written and every
    process stopped."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
