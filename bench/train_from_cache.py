"""Benchmark: a training step from cached features vs a step that decodes and runs CLIP (Cinego).

What it measures, side by side in one run, per optimizer step of the same VideoLM (same batch,
same text, same model, same optimizer):
- `cached-disk`: the batch's (B, F, T, D) float16 tokens read from a Zarr feature store on disk,
  copied to the device, then forward + backward + AdamW step;
- `cached-ram`: the same tokens already in host memory (the trainer's `--feature-cache ram`);
- `decode+clip`: what Cinego does on every step: PyAV decodes every frame of each video of the
  batch, F frames are picked uniformly, open_clip's own PIL eval transform preprocesses them, the
  CLIP vision tower encodes them (no grad, fp16 on GPU), then the same training step.
It reports the median seconds per step of each and the ratio to `decode+clip`.

The store is made first (not timed) from a demo corpus generated into --work. Random ViT-B-16 weights: the cost does not depend on them.

Reproduce (the README's numbers: one H100, the `small` preset, B=8, F=8, ViT-B-16):

    python bench/train_from_cache.py --device cuda --work /tmp/bench-train --out train_from_cache.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import av
import numpy as np
import open_clip
import torch
import zarr
from PIL import Image

from manifests.demo_corpus import make_demo_corpus
from model import SummaryConfig, VideoLM, VideoLMConfig, lm_preset
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.sampling import uniform_indices


def make_store(work: Path, n_videos: int, frames: int, device: str, preprocess) -> tuple[list[Path], Path, object]:
    """Demo videos and a Zarr array of their tokens (one video per chunk), made once, untimed.
    The tokens come from the baseline path itself, so this script needs PyAV but not decord
    (the timing of a read does not depend on how the tokens were made)."""
    corpus = work / "corpus"
    if not (corpus / "labels.json").is_file():
        make_demo_corpus(corpus, n_videos=n_videos, seed=0)
    videos = sorted((corpus / "videos").glob("*.mp4"))[:n_videos]
    precision = "fp16" if device == "cuda" else "fp32"
    encoder = load_encoder(EncoderSpec("ViT-B-16", "none", -1, precision), device)
    store = work / "store.zarr"
    if not store.exists():
        tokens = np.concatenate([decode_and_encode([v], frames, preprocess, encoder, device).cpu().numpy()
                                 for v in videos])
        zarr.create_group(store).create_array("tokens", data=tokens, chunks=(1, *tokens.shape[1:]))
    return videos, store, encoder


def decode_and_encode(paths: list[Path], frames: int, preprocess, encoder, device: str) -> torch.Tensor:
    """Cinego's per-step path: every frame decoded with PyAV, F picked, PIL transform, CLIP."""
    batch = []
    for path in paths:
        with av.open(str(path)) as container:
            all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        picked = [all_frames[i] for i in uniform_indices(len(all_frames), frames)]
        batch.append(torch.stack([preprocess(Image.fromarray(f)) for f in picked]))
    x = torch.cat(batch).to(device, encoder.dtype)  # (B*F, 3, 224, 224)
    with torch.inference_mode():
        out = encoder.visual.forward_intermediates(x, indices=[encoder.block], stop_early=True,
                                                   normalize_intermediates=True, intermediates_only=True,
                                                   output_fmt="NLC", output_extra_tokens=True)
    tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    return tokens.view(len(paths), frames, *tokens.shape[1:]).to(torch.float16).clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/vidcache-bench-train"), help="corpus + store folder")
    p.add_argument("--preset", default="small", help="LM preset (default: small)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--text-len", type=int, default=256, help="tokens per sample")
    p.add_argument("--steps", type=int, default=6, help="timed steps per path (default: 6)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dev = args.device
    n_videos = args.batch_size * 2
    preprocess = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    videos, store, encoder = make_store(args.work, n_videos, args.frames, dev, preprocess)
    tokens_disk = zarr.open_group(store, mode="r")["tokens"]
    tokens_ram = tokens_disk[:]

    cfg = VideoLMConfig(lm=lm_preset(args.preset), summary=SummaryConfig(vision_dim=768, n_frames=args.frames),
                        video_token_id=3)
    model = VideoLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.lm.vocab_size, (args.batch_size, args.text_len), generator=gen)
    ids[:, 4 : 4 + cfg.n_video_tokens] = cfg.video_token_id
    ids = ids.to(dev)
    labels = ids.masked_fill(ids == cfg.video_token_id, -100)

    def step(video: torch.Tensor) -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
            _, loss = model(ids, video=video.to(dev, non_blocking=True), labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rows(i: int) -> slice:
        start = (i * args.batch_size) % n_videos
        return slice(start, start + args.batch_size)

    paths = {
        "cached-disk": lambda i: torch.from_numpy(tokens_disk[rows(i)]),
        "cached-ram": lambda i: torch.from_numpy(tokens_ram[rows(i)]),
        "decode+clip": lambda i: decode_and_encode(videos[rows(i)], args.frames, preprocess, encoder, dev),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for name, fetch in paths.items():  # warm-up
        step(fetch(0))
    for i in range(args.steps):
        for name, fetch in paths.items():
            if dev == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(fetch(i))
            if dev == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    base = median["decode+clip"]
    result = {"benchmark": "train_from_cache", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "preset": args.preset, "batch_size": args.batch_size, "frames": args.frames, "text_len": args.text_len,
              "encoder": "ViT-B-16", "s_per_step": {k: round(v, 4) for k, v in median.items()},
              "speedup_vs_decode_clip": {k: round(base / v, 1) for k, v in median.items()},
              "samples_s": {k: [round(x, 4) for x in v] for k, v in seconds.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print("\n| path | s / step | speedup vs decode+clip |\n|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.4f} | {base / value:.1f}x |")


if __name__ == "__main__":
    main()
