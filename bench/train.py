"""Benchmark: training throughput from the feature store, the RAM and GPU caches, tensors already
in memory (the limit) and Cinego's way, side by side.

What it measures. Optimizer steps per second and samples per second of the project's own
training step (`trainer.train.train_step`: forward, the trainer's token loss, backward,
gradient clipping, the trainer's AdamW with its parameter groups) on the same model
(`trainer.config.model_config`: exactly what `run_train.py train --preset P` builds for this store and
tokenizer), the same batch size and the same samples in the same order (`trainer.batching.BatchPlan`,
seed 0). Only where the video features come from differs:

1. `disk`: the trainer's `--feature-cache disk` path: `DiskFeatures` reads each batch's rows from
   the Zarr store (float16; each run of consecutive rows one slice, the runs at once) inside the
   trainer's `BatchStream` DataLoader (`--workers` processes, default the trainer's 2,
   forkserver, prefetch 4, pinned on CUDA; a batch comes back by value), and `make_batch` pads
   each batch to its longest sample. The
   store is on local disk and, after the first pass, in the page cache (as a store that fits
   in RAM is in practice): the row measures the store's read + decompress path, not the disk.
2. `ram`: `--feature-cache ram`: `RamFeatures` (rows loaded once, untimed; pinned on CUDA), a
   batch is `make_batch` + `index_select` in the training process, as the trainer does it.
3. `gpu`: `--feature-cache gpu`: `GpuFeatures`, the rows resident on the GPU (CUDA only; on a
   machine without one the row says "not measured: no GPU").
4. `memory` (the limit): the very `Batch` objects of the timed steps, made before timing (with
   `RamFeatures`) and already on the device: no data path at all, only the step.
5. `cinego`: Cinego's way, re-implemented here (github.com/forXuyx/Cinego, model/dataset.py and
   train_sft.py, use_feature=True): one float32 `.npy` of (F, T, D) tokens per video, written
   once (untimed) and loaded with `np.load` for every sample of every step by a `Dataset`
   in a DataLoader (same number of workers as `disk`, default collate, pinned on CUDA); every
   sample's ids padded to the fixed `--max-len` (Cinego pads to max_length, 512 by default in
   its dataset); the video tokens spliced into the token embeddings by a Python loop over the
   samples of the batch that scans each prompt for its placeholder run and `torch.cat`s the
   pieces (Cinego's / MiniMind-V's `count_vision_proj`), instead of this project's one
   vectorised gather + where over the batch (`model.video_lm.splice_video_tokens`). Same model
   weights otherwise, same loss (labels ignored on padding), same optimizer, same step.
6. `decode+clip` (`--decode-clip`, on by default except with `--quick`): Cinego without cached
   features (use_feature=False): every step PyAV decodes every frame of each video of the
   batch, F are picked uniformly, open_clip's PIL eval transform preprocesses them, the
   ViT-B-16 tower (`--pretrained none`: random weights, the cost does not depend on them;
   fp16 on CUDA) encodes them. Its (197, 768) tokens are then dropped and the batch carries the
   cached tokens of the same rows, so that the step is the `ram` row's step on the same model:
   the row costs decode + encode + that step (a lower bound: a summary over 197 x 768 tokens
   per frame would cost more than over demo-tiny's 37 x 64). Fewer steps (`--decode-steps`).
   This row replaces bench/train_from_cache.py (README: its H100 figures).

Timing: each row has its own model and optimizer (seed 0) and batch iterator, all built first.
Each row runs `--warmup` untimed steps (DataLoader workers start, caches, allocator); then the
rows take turns for `--rounds` rounds, the order reversed every other round, so that load from
elsewhere on the machine hits all rows alike: in a round each row with a DataLoader (disk,
Cinego's way) first runs as many untimed steps as its queue holds (its prefetch depth: 4 per
worker for the trainer's loader, torch's default 2 for Cinego's; a row whose
workers kept reading while the others ran starts its turn with a full queue, and the lead-in
drains that head start), then every row runs `--steps` timed ones. Many short rounds rather than
a few long ones: on the project's VM the rate of a row drifts by up to 20% from one second to the
next, and a median over 12 pairs is steadier than one over 5. A step is what the trainer's loop does: the next batch, `.to(device)`,
`train_step` (which ends with the loss's `.item()`, a device sync); the clock is `time.perf_counter`
around the timed steps. A row's rate is its timed steps over their summed time; the JSON keeps
each round's rate. A ratio is the median over rounds of the two rows' rates in that round (the
rows of a round run back to back, so a burst of load from elsewhere skews a pair less often
than two totals); the ratio of the totals is shown beside it. Rows 1, 2 (3) and 4 train on the same batches from the same weights, so
their losses must match bit for bit: the bench checks it (a data path that served other
tensors would fail). Ratios of samples/s: disk / memory (bar 0.95), ram / memory (bar 0.98),
disk / cinego (bar 3).

CPU threads: the training process uses `--threads` torch threads, by default on the CPU the
cores less the DataLoader workers (1 on the 2-core box; `run_train.py train --threads`), so
that the loader workers have a core of their own. This flatters the ratio, not the throughput:
on the 2-core box with 2 threads (torch's default) the limit itself is faster (B=16: 181
samples/s against 121 with 1 thread) and so is disk (140 against 119), but disk is then only
0.66-0.84 of the limit over B=2..64 (a full run of an earlier session, before batches crossed
from the workers by value; its JSON was not kept), because the workers preempt torch's OpenMP
threads. Under a load of 3-4 from elsewhere, 2 threads also made round-to-round rates vary 10x.

Model FLOPs utilisation (MFU) of the limit row (4) and the GPU cache row (3): the FLOPs of a
training step's forward and backward, counted (bench/flops.py) on the first batch of the run
and scaled to every timed batch by its padded size B x L (the step computes the padding too),
over the row's time, against the matmul rate measured in the same run in the step's precision
(bf16 on CUDA, fp32 on the CPU). On CUDA, `--max-batch` also finds the largest batch of the
longest samples whose step fits in GPU memory (doubling from 16 until the allocator fails).

Scaling (`bench/results/train_scaling.png`): samples/s of rows 1, 2 and 5 (and the limit,
dashed) against the batch size (`--scaling-batches`), four rounds per batch size, about
`--scaling-samples` timed samples per row and batch size.

Data, made untimed inside --work with the project's own API and reused when present: the demo
corpus (`manifests.demo_corpus.make_demo_corpus`, `--videos` videos, 2-12 s, 320x240 to
640x360), an instruction file in VideoInstruct-100K's format holding each video's four demo
questions twice (the second copy with " Answer briefly." appended: 8 samples per video, as
VideoInstruct-100K has about 7.5), a manifest (`manifests.build.build_manifest`, 64-video
shards, no validation split), and the store (`pipeline.extract.extract`, `demo-tiny`,
`--pretrained none`, F=8: 8 x 37 x 64 float16 tokens per video). Tokenizer: a byte-level BPE
trained on the training text (`trainer.tokenization.train_bpe`, the trainer's default size).
Model: `--preset` (default `tiny`, which fits a 2-core CPU: a step at B=16 takes about 0.14 s, so this is
the hardest case for a data path, whose cost is a larger share of a short step; use `small` on
a GPU), the trainer's other defaults (full VideoSummary, 32 queries, MLP projector),
`--max-len` 512.

Reproduce (the full run: bench/results/train_cpu.json and train_scaling.png are its output on
the project's 2-core CPU box; train_cpu_quick.json is `--quick` there):

    .venv/bin/python bench/train.py --work /tmp/vidcache-bench-train --json bench/results/train_cpu.json \
        --plot bench/results/train_scaling.png

`--quick` (96 videos, 6 rounds of 6 steps, batch sizes 4, 16, 32 for the plot, no
decode+clip row) finishes in about 3 minutes (the first run also makes the corpus: +1 min).
On a GPU machine add `--device cuda --preset small`. Output: a JSON object on stdout (and in
--json if given), then a Markdown table; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from flops import count_flops, matmul_flops_per_s  # noqa: E402  (bench/flops.py)
from report import emit  # noqa: E402  (bench/report.py)

ROWS = ("disk", "ram", "gpu", "memory", "cinego", "decode+clip")
LABELS = {
    "disk": "1. Zarr store on disk (`--feature-cache disk`)",
    "ram": "2. RAM cache (`--feature-cache ram`)",
    "gpu": "3. GPU cache (`--feature-cache gpu`)",
    "memory": "4. tensors already in memory (limit)",
    "cinego": "5. Cinego's way (float32 .npy, fixed padding, per-sample splice)",
    "decode+clip": "6. Cinego without features: decode + CLIP per step",
}
BARS = {"disk/memory": 0.95, "ram/memory": 0.98, "disk/cinego": 3.0}
FRAMES = 8
SHARD_SIZE = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/vidcache-bench-train"),
                   help="corpus, manifest, store and .npy files (reused when present)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--plot", type=Path, default=None, help="samples/s against batch size (PNG)")
    p.add_argument("--quick", action="store_true", help="a smaller run of about 3 minutes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="tiny", help="LM preset (default tiny; small on a GPU)")
    p.add_argument("--batch-size", type=int, default=16, help="of the main table (default 16)")
    p.add_argument("--max-len", type=int, default=512, help="the trainer's cut and Cinego's fixed padding")
    p.add_argument("--videos", type=int, default=None, help="demo videos (default 160; quick 96)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row and round (default 10; quick 6)")
    p.add_argument("--rounds", type=int, default=None, help="rounds in which the rows take turns (default 12; quick 6)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per row first (default 8)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the training process (the trainer's --threads; default on the CPU: "
                        "the cores less the DataLoader workers, at least 1)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of rows 1 and 5 (the trainer's default 2)")
    p.add_argument("--scaling-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the plot (default 2 4 8 16 32 64; quick 4 16 48)")
    p.add_argument("--scaling-samples", type=int, default=None, help="timed samples per plot point (default 640; quick 320)")
    p.add_argument("--decode-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="measure row 6 (default: on, off with --quick)")
    p.add_argument("--decode-steps", type=int, default=3, help="timed steps of row 6 (default 3)")
    p.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, find the largest batch that fits (default on)")
    args = p.parse_args(argv)
    q = args.quick
    args.videos = args.videos or (96 if q else 160)
    args.steps = args.steps or (6 if q else 10)
    args.rounds = args.rounds or (6 if q else 12)
    args.scaling_batches = args.scaling_batches if args.scaling_batches is not None else ([4, 16, 32] if q else [2, 4, 8, 16, 32, 64])
    args.scaling_samples = args.scaling_samples or (256 if q else 640)
    args.decode_clip = (not q) if args.decode_clip is None else args.decode_clip
    return args


# --- data, made once ------------------------------------------------------------------------------


def prepare(work: Path, n_videos: int) -> tuple[Path, Path]:
    """The demo corpus, an 8-samples-per-video instruction file, the manifest and the store."""
    from manifests.build import ManifestConfig, build_manifest
    from manifests.demo_corpus import make_demo_corpus
    from pipeline.extract import ExtractConfig, extract

    work = work / f"v{n_videos}"
    corpus = work / "corpus"
    if not (corpus / "labels.json").is_file():
        log(f"making {n_videos} demo videos in {corpus}")
        make_demo_corpus(corpus, n_videos=n_videos, seed=0, workers=os.cpu_count() or 1)
    instructions = work / "instructions.json"
    if not instructions.is_file():
        records = json.loads((corpus / "instructions.json").read_text())
        twice = records + [{**r, "q": r["q"] + " Answer briefly."} for r in records]
        instructions.write_text(json.dumps(twice))
    manifest = work / "manifest"
    if not (manifest / "videos.jsonl").is_file():
        build_manifest(ManifestConfig(instructions=instructions, videos=corpus / "videos", out=manifest,
                                      shard_size=SHARD_SIZE, val_fraction=0.0, seed=0))
    store = work / "store.zarr"
    summary = extract(ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none",
                                    frames=FRAMES))
    if summary.failed:
        raise SystemExit(f"extraction failed for {summary.failed} videos: {summary}")
    return manifest, store


def write_npy(store: Path, rows: list[int], folder: Path) -> Path:
    """Cinego's per-video float32 feature files, written once from the store."""
    import zarr

    folder.mkdir(parents=True, exist_ok=True)
    tokens = zarr.open_group(str(store), mode="r")["tokens"]
    for row in rows:
        path = folder / f"{row:06d}.npy"
        if not path.is_file():
            np.save(path, tokens[row].astype(np.float32))
    return folder


# --- Cinego's way ---------------------------------------------------------------------------------


class CinegoDataset(Dataset):
    """Per sample: ids and labels padded to a fixed length, the video's float32 .npy loaded."""

    def __init__(self, examples, folder: Path, max_len: int, pad_id: int) -> None:  # noqa: ANN001
        self.examples, self.folder, self.max_len, self.pad_id = list(examples), folder, max_len, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):  # noqa: ANN204
        from trainer.tokenization import IGNORE

        e = self.examples[index]
        n = len(e.input_ids)
        ids = np.full(self.max_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.max_len, IGNORE, dtype=np.int64)
        ids[:n], labels[:n] = e.input_ids, e.labels
        mask = np.zeros(self.max_len, dtype=bool)
        mask[:n] = True
        (row,) = e.rows  # the bench's samples are about one video each
        video = torch.tensor(np.load(self.folder / f"{row:06d}.npy"), dtype=torch.float32)
        return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask), video, row


def cinego_model(cfg):  # noqa: ANN001, ANN201
    """`VideoLM` whose splice is Cinego's per-sample Python loop (same parameters, same init)."""
    from model import VideoLM

    class CinegoVideoLM(VideoLM):
        def embed(self, input_ids, video, attention_mask=None, video_counts=None):  # noqa: ANN001, ANN201
            h = self.lm.tok_embeddings(input_ids)
            if video is None:
                return h
            vision = self.projector(self.summary(video.to(self.lm.tok_embeddings.weight.dtype)))
            marker, seqlen = self.cfg.video_token_id, input_ids.shape[1]
            out = []
            for b in range(h.size(0)):  # count_vision_proj: scan the prompt, cat the pieces
                hb, seq, i = h[b], input_ids[b].tolist(), 0
                while i < len(seq):
                    if seq[i] == marker:
                        start = i
                        while i < len(seq) and seq[i] == marker:
                            i += 1
                        hb = torch.cat((hb[:start], vision[b][: i - start].to(hb.dtype), hb[i:]), dim=0)[:seqlen]
                    else:
                        i += 1
                out.append(hb)
            return torch.stack(out)

    return CinegoVideoLM(cfg)


# --- Cinego without features: decode + CLIP per step ---------------------------------------------


class DecodeClip:
    """Per batch: PyAV decodes every frame, F picked, open_clip's PIL transform, ViT-B-16 tokens
    (then thrown away: the batch carries the cached tokens of the same rows, so that the step is
    the `ram` row's step on the same model, and the row costs decode + encode + that step)."""

    def __init__(self, manifest, device: torch.device, cached) -> None:  # noqa: ANN001
        import open_clip

        from pipeline.encoder import EncoderSpec, load_encoder

        self.paths = {v.row: Path(manifest.dir).parent / "corpus" / "videos" / Path(v.path).name for v in manifest.videos}
        self.device, self.cached = device, cached
        self.encoder = load_encoder(EncoderSpec("ViT-B-16", "none", -1, "fp16" if device.type == "cuda" else "fp32"),
                                    str(device))
        self.preprocess = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                                    std=open_clip.OPENAI_DATASET_STD)

    def fetch(self, rows) -> torch.Tensor:  # noqa: ANN001
        import av
        from PIL import Image

        from pipeline.sampling import uniform_indices

        batch = []
        for row in rows:
            with av.open(str(self.paths[int(row)])) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            picked = [frames[i] for i in uniform_indices(len(frames), FRAMES)]
            batch.append(torch.stack([self.preprocess(Image.fromarray(f)) for f in picked]))
        x = torch.cat(batch).to(self.device, self.encoder.dtype)
        with torch.inference_mode():
            tokens = self.encoder.tokens(x)
        tokens.view(len(rows), FRAMES, *tokens.shape[1:]).to(torch.float16).cpu()  # what Cinego would train on
        return self.cached.fetch(rows)  # the store's tokens of these rows: the model is the other rows'



# --- one measurement -----------------------------------------------------------------------------


class Bench:
    """Everything the rows share: tokenised samples, model config, feature sources."""

    def __init__(self, args: argparse.Namespace, manifest_dir: Path, store_path: Path) -> None:
        from manifests.manifest import load_manifest
        from trainer.examples import build_examples
        from trainer.store import open_store
        from trainer.tokenization import VIDEO_TOKEN, ChatTokenizer, conversation_texts, train_bpe
        from trainer.config import TrainConfig, model_config

        self.args = args
        self.device = torch.device(args.device)
        self.manifest = load_manifest(manifest_dir)
        self.store = open_store(store_path)
        texts = (t for s in self.manifest.samples() for t in conversation_texts(s.conversations))
        self.tok = ChatTokenizer(train_bpe(texts), VIDEO_TOKEN)
        self.train_cfg = TrainConfig(manifest=manifest_dir, store=store_path, out=args.work / "unused",
                                     preset=args.preset, max_len=args.max_len)
        self.model_cfg = model_config(self.train_cfg, self.tok, self.store, None)
        self.examples = build_examples(self.manifest, self.store, self.tok, "train", self.model_cfg.n_video_tokens,
                                       args.max_len)
        self.rows = self.examples.rows
        self.npy = write_npy(store_path, self.rows, store_path.parent / "cinego_npy")
        self._ram = None
        self._gpu = None
        self._decode = None

    def features(self, kind: str):  # noqa: ANN201
        from trainer.features import DiskFeatures, GpuFeatures, RamFeatures

        if kind == "disk":
            return DiskFeatures(self.store.path)
        if kind in ("ram", "memory"):
            if self._ram is None:
                self._ram = RamFeatures(self.store.path, self.rows)
            return self._ram
        if kind == "gpu":
            if self._gpu is None:
                self._gpu = GpuFeatures(self.store.path, self.rows, self.device)
            return self._gpu
        if kind == "decode+clip":
            if self._decode is None:
                self._decode = DecodeClip(self.manifest, self.device, self.features("ram"))
            return self._decode
        raise ValueError(kind)

    def runner(self, kind: str, batch_size: int, total: int) -> Runner:
        return Runner(self, kind, batch_size, total)


class Runner:
    """One row at one batch size: its own model (seed 0), optimizer and batch iterator, able to
    run its next ``n`` steps on demand, so that rows can take turns."""

    def __init__(self, bench: Bench, kind: str, batch_size: int, total: int) -> None:
        from model import VideoLM
        from trainer.batching import Batch, BatchDataset, BatchPlan, BatchStream, worker_context
        from trainer.distributed import Dist
        from trainer.config import PARTS
        from trainer.optim import make_optimizer, set_trainable

        args, device = bench.args, bench.device
        self.kind, self.batch_size, self.device, self.cfg = kind, batch_size, device, bench.train_cfg
        torch.manual_seed(0)
        self.model = (cinego_model(bench.model_cfg) if kind == "cinego" else VideoLM(bench.model_cfg)).to(device)
        trainable = set_trainable(self.model, PARTS)
        self.optimizer = make_optimizer(trainable, bench.train_cfg, device)
        self.params = [p for _, p in trainable]
        self.dist = Dist(device=device)
        plan = BatchPlan(bench.examples.lengths, batch_size, seed=0)
        pin = device.type == "cuda"
        self.stream = None

        def planned() -> list[list[int]]:  # the micro-batches of the first `total` steps
            out, epoch = [], 0
            while len(out) < total:
                plan.set_position(epoch)
                out += list(plan)
                epoch += 1
            return out[:total]

        if kind == "memory":
            dataset = BatchDataset(bench.examples.items, bench.features("ram"), bench.tok.pad_id)
            self.planned_batches = [dataset[i].to(device) for i in planned()]
            self.batches = iter(self.planned_batches)
        elif kind == "cinego":
            flat = [i for micro in planned() for i in micro]
            self.loader = DataLoader(CinegoDataset(bench.examples.items, bench.npy, args.max_len, bench.tok.pad_id),
                                     batch_size=batch_size, sampler=flat, num_workers=args.workers, pin_memory=pin,
                                     multiprocessing_context=worker_context() if args.workers else None)

            def cinego_batches():  # noqa: ANN202
                for ids, labels, mask, video, rows in self.loader:
                    yield Batch(ids, labels, mask, video, torch.as_tensor(rows), torch.ones(len(rows), dtype=torch.long))

            self.batches = cinego_batches()
        else:
            dataset = BatchDataset(bench.examples.items, bench.features(kind), bench.tok.pad_id)
            self.stream = BatchStream(dataset, plan, args.workers, pin_memory=pin)

            def stream_batches():  # noqa: ANN202
                epoch = 0
                while True:
                    yield from self.stream.epoch(epoch)
                    epoch += 1

            self.batches = stream_batches()
        self.losses: list[float] = []
        # the batches a DataLoader's workers read ahead while the other rows run
        loader = self.loader if kind == "cinego" else getattr(self.stream, "loader", None)
        self.lead = loader.num_workers * loader.prefetch_factor if loader is not None and loader.num_workers else 0

    def run(self, n: int) -> float:
        """Seconds for the next ``n`` steps, each as the trainer's loop does it: the next batch,
        to the device, `train_step` (which ends with the loss's `.item()`, a device sync)."""
        from trainer.train import train_step

        start = time.perf_counter()
        for _ in range(n):
            batch = next(self.batches).to(self.device)
            stats = train_step(self.model, [batch], self.optimizer, self.params, self.cfg.lr, self.cfg.clip,
                               self.dist, self.device)
            self.losses.append(stats.loss)
        return time.perf_counter() - start

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()  # ends the DataLoader iterators: their workers exit
        if self.stream is not None and self.stream.loader is not None:
            self.stream.loader._iterator = None


def step_flops(bench: Bench, batch) -> int:  # noqa: ANN001 - a trainer Batch on the device
    """FLOPs of a training step's forward and backward on ``batch``, counted on a model of its own."""
    from model import VideoLM
    from trainer.loss import autocast, token_loss_sum

    model = VideoLM(bench.model_cfg).to(bench.device)

    def step() -> None:
        with autocast(bench.device):
            logits, _ = model(batch.input_ids, video=batch.video, video_counts=batch.video_counts)
            loss = token_loss_sum(logits, batch.labels)
        loss.backward()

    return count_flops(step)


def model_flops_utilisation(bench: Bench, batches: list, rows: dict[str, dict], steps: int, warmup: int) -> None:
    """Add the MFU to ``rows`` (the memory row and, on CUDA, the GPU cache row), which timed their
    steps on ``batches`` (the memory row's, in its order: `warmup` steps, then `steps` a round;
    rows without a DataLoader have no lead-in). The FLOPs and the matmul rate are found once."""
    per_position = step_flops(bench, batches[0]) / batches[0].input_ids.numel()
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    rate = matmul_flops_per_s(bench.device, dtype)
    for r in rows.values():
        timed = [batches[warmup + i * steps + j] for i in range(len(r["seconds"])) for j in range(steps)]
        flops = per_position * sum(b.input_ids.numel() for b in timed)
        r.update({"model_gflops_per_step": round(flops / len(timed) / 1e9, 4), "matmul_tflops": round(rate / 1e12, 3),
                  "matmul_dtype": str(dtype).removeprefix("torch."), "mfu": round(flops / sum(r["seconds"]) / rate, 4)})


def largest_batch(bench: Bench) -> int:
    """The largest batch of the longest samples (doubling from 16) whose training step fits in GPU memory."""
    from model import VideoLM
    from trainer.batching import make_batch
    from trainer.config import PARTS
    from trainer.optim import make_optimizer, set_trainable
    from trainer.train import train_step
    from trainer.distributed import Dist

    longest = max(bench.examples.items, key=lambda e: len(e.input_ids))
    fits, size = 0, 16
    while size <= 65536:
        model = VideoLM(bench.model_cfg).to(bench.device)
        trainable = set_trainable(model, PARTS)
        optimizer = make_optimizer(trainable, bench.train_cfg, bench.device)
        batch = None
        try:
            batch = make_batch([longest] * size, bench.features("ram"), bench.tok.pad_id).to(bench.device)
            train_step(model, [batch], optimizer, [p for _, p in trainable], 1e-4, 1.0, Dist(device=bench.device),
                       bench.device)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del model, optimizer, trainable, batch  # this size's memory, before the next one's
            torch.cuda.empty_cache()
        fits, size = size, size * 2
    return fits


def measure(bench: Bench, kinds: list[str], batch_size: int, steps: int, blocks: int, warmup: int,
            mfu: bool = False) -> dict[str, dict]:
    """The rows take turns: after `warmup` untimed steps each, `blocks` rounds in which every row
    with a DataLoader runs its prefetch depth in untimed steps (one that waited while the others
    ran has its queue full: the lead-in drains that head start) and every row `steps` timed ones; the
    order is reversed every other round. A row's rate is its timed steps over their time; the
    per-round rates are kept too."""
    total = warmup + blocks * (bench.args.workers * 4 + steps)  # at most this many batches a row
    runners = {k: bench.runner(k, batch_size, total) for k in kinds}
    out = {k: {"seconds": [], "first_s": runners[k].run(1)} for k in kinds}
    try:
        for k in kinds:
            runners[k].run(warmup - 1)
        for block in range(blocks):
            for k in (kinds if block % 2 == 0 else kinds[::-1]):
                runners[k].run(runners[k].lead)
                out[k]["seconds"].append(runners[k].run(steps))
    finally:
        for r in runners.values():
            r.close()
    for k in kinds:
        r = out[k]
        r["steps_per_s"] = blocks * steps / sum(r["seconds"])
        r["steps_per_s_blocks"] = [steps / s for s in r["seconds"]]
        r["losses"] = runners[k].losses
        log(f"  {k:12s} B={batch_size:3d}: {r['steps_per_s']:7.2f} steps/s, {r['steps_per_s'] * batch_size:8.1f} "
            f"samples/s (rounds: {' '.join(f'{x:.2f}' for x in r['steps_per_s_blocks'])}; first step {r['first_s']:.2f} s)")
    if mfu:  # the GPU cache row trained on the memory row's batches too
        model_flops_utilisation(bench, runners["memory"].planned_batches,
                                {k: out[k] for k in ("memory", "gpu") if k in out}, steps, warmup)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    manifest_dir, store_path = prepare(args.work, args.videos)
    bench = Bench(args, manifest_dir, store_path)
    if args.threads is None and device.type == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) - args.workers)
    if args.threads:  # after `prepare`: an extraction in this process sets its own encoder threads
        torch.set_num_threads(args.threads)
    log(f"{len(bench.examples)} samples over {len(bench.rows)} videos; store {bench.store.shape}; "
        f"{args.preset} preset, {sum(p.numel() for p in __import__('model').VideoLM(bench.model_cfg).parameters()) / 1e6:.2f}M parameters; "
        f"tokenizer {bench.tok.vocab_size} tokens; setup {time.perf_counter() - t0:.0f} s")

    kinds = ["disk", "ram"] + (["gpu"] if device.type == "cuda" else []) + ["memory", "cinego"]
    log(f"batch {args.batch_size}: {args.rounds} rounds of {args.steps} timed steps per row")
    got = measure(bench, kinds, args.batch_size, args.steps, args.rounds, args.warmup, mfu=True)
    if args.decode_clip:
        log("decode+clip (and the ram row again, beside it)")
        again = measure(bench, ["ram", "decode+clip"], args.batch_size, args.decode_steps, 1, 1)
        got["decode+clip"] = again["decode+clip"]
        got["decode+clip"]["ram_beside_steps_per_s"] = again["ram"]["steps_per_s"]

    rows: dict[str, dict] = {}
    for kind in ROWS:
        if kind not in got:
            why = "not measured: no GPU" if kind == "gpu" else "not measured: --quick (or --no-decode-clip)"
            rows[kind] = {"label": LABELS[kind], "measured": False, "why": why}
            continue
        r = got[kind]
        rate = r["steps_per_s"]
        rows[kind] = {"label": LABELS[kind], "measured": True, "steps_per_s": round(rate, 3),
                      "samples_per_s": round(rate * args.batch_size, 2), "s_per_step": round(1 / rate, 5),
                      "steps_per_s_rounds": [round(x, 3) for x in r["steps_per_s_blocks"]],
                      "first_step_s": round(r["first_s"], 3)}
        if "ram_beside_steps_per_s" in r:
            rows[kind]["ram_beside_steps_per_s"] = round(r["ram_beside_steps_per_s"], 3)
        for key in ("model_gflops_per_step", "matmul_tflops", "matmul_dtype", "mfu"):
            if key in r:
                rows[kind][key] = r[key]
    # rows 1, 2 (3) and 4 trained on the same batches from the same weights: the same losses, step
    # by step (a row with a DataLoader ran more steps: its lead-ins)
    same = all(got[k]["losses"][:n] == got["memory"]["losses"][:n] for k in ("disk", "ram", "gpu") if k in got
               for n in [min(len(got[k]["losses"]), len(got["memory"]["losses"]))])
    ratios = {}
    for name, (a, b) in {"disk/memory": ("disk", "memory"), "ram/memory": ("ram", "memory"),
                         "gpu/memory": ("gpu", "memory"), "disk/cinego": ("disk", "cinego"),
                         "disk/decode+clip": ("disk", "decode+clip")}.items():
        if rows[a]["measured"] and rows[b]["measured"]:
            totals = rows[a]["samples_per_s"] / rows[b]["samples_per_s"]
            ra, rb = rows[a]["steps_per_s_rounds"], rows[b]["steps_per_s_rounds"]
            per_round = [x / y for x, y in zip(ra, rb)] if len(ra) == len(rb) else []
            value = statistics.median(per_round) if per_round else totals
            ratios[name] = {"value": round(value, 3), "of_totals": round(totals, 3),
                            "per_round": [round(x, 3) for x in per_round], "bar": BARS.get(name),
                            "pass": None if name not in BARS else value >= BARS[name]}

    scaling: dict[str, list] = {"batch_sizes": args.scaling_batches}
    if args.scaling_batches:
        log(f"scaling over batch sizes {args.scaling_batches}")
        for kind in ("disk", "ram", "memory", "cinego"):
            scaling[kind] = []
        for b in args.scaling_batches:
            n = max(3, round(args.scaling_samples / b / 4))
            point = measure(bench, ["disk", "ram", "memory", "cinego"], b, n, 4, 4)
            for kind, r in point.items():
                scaling[kind].append(round(r["steps_per_s"] * b, 2))
        if args.plot:
            plot(scaling, args, bench)

    largest = None
    if device.type == "cuda" and args.max_batch:
        log("the largest batch that fits")
        largest = largest_batch(bench)
    result = {
        "benchmark": "train", "quick": args.quick, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "preset": args.preset,
        "parameters_m": round(sum(p.numel() for p in __import__("model").VideoLM(bench.model_cfg).parameters()) / 1e6, 3),
        "batch_size": args.batch_size, "max_len": args.max_len, "frames": FRAMES,
        "tokens_per_frame": bench.store.shape[2], "width": bench.store.shape[3], "encoder": "demo-tiny",
        "videos": len(bench.rows), "samples": len(bench.examples),
        "mean_sample_tokens": round(float(np.mean(bench.examples.lengths)), 1),
        "video_tokens_per_sample": bench.model_cfg.n_video_tokens, "workers": args.workers,
        "warmup_steps": args.warmup, "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows, "ratios": ratios,
        "same_losses_rows_1_2_4": same, "scaling_samples_per_s": scaling,
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "largest_batch_that_fits": largest if largest is not None else
        ("not measured: no GPU" if device.type != "cuda" else "not measured: --no-max-batch"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    emit(result, args.json, print_table)
    return 0


def plot(scaling: dict, args: argparse.Namespace, bench: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = scaling["batch_sizes"]
    for kind, style in (("disk", "o-"), ("ram", "s-"), ("cinego", "^-"), ("memory", "k--")):
        ax.plot(x, scaling[kind], style, label=LABELS[kind].replace("`", ""), linewidth=1.5 if kind != "memory" else 1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(b) for b in x])
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
    ax.set_title(f"training throughput, {args.preset} preset, F={FRAMES} demo-tiny tokens ({where})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    log(f"plot: {args.plot}")


def print_table(result: dict) -> None:
    b = result["batch_size"]
    print(f"| row | steps/s | samples/s (B={b}) | s/step | rounds (steps/s) | MFU |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"].values():
        if not row["measured"]:
            print(f"| {row['label']} | {row['why']} | | | | |")
            continue
        mfu = (f"{row['mfu']:.1%} ({row['model_gflops_per_step']} GFLOPs a step, {row['matmul_dtype']} matmuls "
               f"{row['matmul_tflops']} TFLOP/s)") if "mfu" in row else ""
        print(f"| {row['label']} | {row['steps_per_s']:.2f} | {row['samples_per_s']:.1f} | {row['s_per_step']:.4f} "
              f"| {' '.join(f'{x:.2f}' for x in row['steps_per_s_rounds'])} | {mfu} |")
    print()
    print("| ratio (samples/s) | median of rounds | of totals | per round | bar | result |")
    print("|---|---|---|---|---|---|")
    for name, r in result["ratios"].items():
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        print(f"| {name} | {r['value']:.3f} | {r['of_totals']:.3f} | {' '.join(f'{x:.2f}' for x in r['per_round'])} "
              f"| {'' if r['bar'] is None else '>= ' + str(r['bar'])} | {verdict} |")
    print(f"| rows 1, 2, 4: same losses bit for bit | {result['same_losses_rows_1_2_4']} | | | True | "
          f"{'PASS' if result['same_losses_rows_1_2_4'] else 'FAIL'} |")
    s = result["scaling_samples_per_s"]
    if s.get("batch_sizes"):
        print()
        print("| samples/s at batch size | " + " | ".join(str(x) for x in s["batch_sizes"]) + " |")
        print("|---|" + "---|" * len(s["batch_sizes"]))
        for kind in ("disk", "ram", "memory", "cinego"):
            print(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in s[kind]) + " |")
    print(f"\n{result['preset']} preset ({result['parameters_m']}M parameters), {result['videos']} videos, "
          f"{result['samples']} samples (mean {result['mean_sample_tokens']} tokens, {result['video_tokens_per_sample']} "
          f"of them video), max_len {result['max_len']}, F={result['frames']} x {result['tokens_per_frame']} x "
          f"{result['width']} tokens; {result['device']}, {result['cpus']} CPUs, torch threads "
          f"{result['torch_threads']}, {result['workers']} DataLoader workers; load average "
          f"{result['load_avg_before'][0]} before, {result['load_avg_after'][0]} after")


if __name__ == "__main__":
    raise SystemExit(main())
