"""Benchmark: frames per second of the encode stage at each precision, side by side.

What it measures. `pipeline.encoder.Encoder.encode` (uint8 frames in, float16 tokens out:
normalisation on the device, the tower cast to the precision, `forward_intermediates` to block
`--layer`, the final LayerNorm, the copy back to the host) on random uint8 frames, for fp32,
fp16 and bf16 in one run, interleaved per repeat. It reports frames/s per precision, the ratio
to fp32, and how close each precision's tokens are to fp32's (mean cosine per token), since the
store keeps float16 tokens whatever the compute precision. And against the arithmetic ceiling
(bench/flops.py): the tower's FLOPs per frame, counted, and the device's matmul rate in that
precision, measured in the same run; ceiling = rate / FLOPs per frame, and the fraction of it
reached (issue 13's bar: bf16 >= 35% on an H100/H200). Decoding is not part of it: on a GPU
machine the decoders run on the CPUs beside the encoder (see `keyframe_speed.py` for decoding).

Reproduce (the README's numbers were measured on one H100 with random ViT-B-16 weights):

    python bench/encode_throughput.py --device cuda --encoder ViT-B-16 --frames 2048 --out encode.json

On a CPU, use e.g. `--device cpu --frames 64 --precisions fp32`.
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flops import count_flops, matmul_flops_per_s  # noqa: E402  (bench/flops.py)
from pipeline.encoder import EncoderSpec, load_encoder  # noqa: E402


def _time(encoder, frames: np.ndarray, batch: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    encoder.encode(frames, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="ViT-B-16", help="open_clip model name or demo-tiny (default: ViT-B-16)")
    p.add_argument("--pretrained", default="none", help="weights: tag, file or none (default: none)")
    p.add_argument("--layer", type=int, default=-1, help="block whose tokens are taken (default: -1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--frames", type=int, default=2048, help="frames encoded per timed repeat (default: 2048)")
    p.add_argument("--batch-size", type=int, default=256, help="frames per forward (default: 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per precision (default: 3)")
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="comma-separated (default: fp32,fp16,bf16)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()

    precisions = args.precisions.split(",")
    encoders = {pr: load_encoder(EncoderSpec(args.encoder, args.pretrained, args.layer, pr), args.device)
                for pr in precisions}
    size = encoders[precisions[0]].image_size
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, size, size, 3), dtype=np.uint8)
    for enc in encoders.values():  # warm-up: kernels, allocator
        enc.encode(frames[: args.batch_size], args.batch_size)
    seconds: dict[str, list[float]] = {pr: [] for pr in precisions}
    for _ in range(args.repeats):
        for pr in precisions:
            seconds[pr].append(_time(encoders[pr], frames, args.batch_size, args.device))
    probe = frames[: min(64, len(frames))]
    reference = torch.from_numpy(encoders[precisions[0]].encode(probe).astype(np.float32))
    rows = []
    for pr in precisions:
        tokens = torch.from_numpy(encoders[pr].encode(probe).astype(np.float32))
        cosine = torch.nn.functional.cosine_similarity(tokens, reference, dim=-1).mean().item()
        fps = args.frames / float(np.median(seconds[pr]))
        rows.append({"precision": pr, "frames_per_s": round(fps, 1), "cosine_vs_first": round(cosine, 5)})
    base = rows[0]["frames_per_s"]
    first = encoders[precisions[0]]
    flops_per_frame = count_flops(lambda: first.tokens(torch.zeros(1, 3, size, size, device=first.device,
                                                                    dtype=first.dtype)))
    for row in rows:
        row["speedup_vs_first"] = round(row["frames_per_s"] / base, 2)
        rate = matmul_flops_per_s(torch.device(args.device), encoders[row["precision"]].dtype)
        row["matmul_tflops"] = round(rate / 1e12, 2)
        row["ceiling_frames_per_s"] = round(rate / flops_per_frame, 1)
        row["of_ceiling"] = round(row["frames_per_s"] / row["ceiling_frames_per_s"], 3)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"benchmark": "encode_throughput", "encoder": args.encoder, "device": device,
              "tokens_per_frame": encoders[precisions[0]].attrs["tokens_per_frame"],
              "gflops_per_frame": round(flops_per_frame / 1e9, 3),
              "batch_size": args.batch_size, "frames": args.frames, "results": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(f"\n| precision | frames/s | vs {precisions[0]} | token cosine vs {precisions[0]} | matmul TFLOP/s "
          f"| ceiling frames/s ({result['gflops_per_frame']} GFLOPs a frame) | of ceiling |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['precision']} | {row['frames_per_s']} | {row['speedup_vs_first']}x | {row['cosine_vs_first']} "
              f"| {row['matmul_tflops']} | {row['ceiling_frames_per_s']} | {row['of_ceiling']:.1%} |")


if __name__ == "__main__":
    main()
