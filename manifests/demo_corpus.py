"""A small synthetic corpus in the exact VideoInstruct-100K layout, for the demo and the tests.

Each video shows one object (a colour from COLOURS, a shape from SHAPES) crossing a static
textured background in one of DIRECTIONS. Lengths, sizes and frame rates vary so that the
pipeline meets the variety of a real corpus. Answers to the colour, shape and direction
questions are only in the pixels, and the direction only in the order of the frames, which is
what the trained model is later tested on.

    OUT/videos/<video_id>.mp4   H.264 (PyAV / libx264), yuv420p
    OUT/instructions.json       [{"q": ..., "a": ..., "video_id": ...}, ...]  (VideoInstruct-100K)
    OUT/labels.json             {video_id: {"colour" | "shape" | "direction": {"question": the
                                 one its instructions ask, "answer": "red" ...}}}  (what
                                 `run_train.py eval --labels` reads; sizes, rates and lengths
                                 are in `plan_videos(n_videos, seed)`)
    OUT/pairs.json              with `pairs`: a question about two videos for every other video,
                                 "Do the two objects move the same way?", in the LLaVA format
                                 (`"video": [a, b]`), half of them "yes"; labels.json then also
                                 names each pair, "a+b": {"same direction": {...}}
Everything is a function of the seed, the mp4 bytes included (x264 runs single-threaded and
without its macroblock-tree rate control, whose output depended on uninitialised memory).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import string
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from manifests import video_writer

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SIZES = ((320, 240), (426, 240), (480, 270), (480, 360), (640, 360))
FRAME_RATES = (24, 25, 30)
SECONDS = (2.0, 12.0)
OBJECT_SIZE = 0.5  # the object's side as a fraction of the frame's shorter side
NOISY_SUFFIX = "\nQA_GT_caption_based_noisy"

DESCRIBE_QUESTIONS = ("Describe the video.", "What happens in this video?")
PAIR_TYPE = "same direction"
PAIR_QUESTIONS = ("Do the two objects move the same way?", "Do the objects in the two videos move in the same direction?")
PAIR_ANSWERS = {"yes": "Yes, they do.", "no": "No, they do not."}


@dataclass(frozen=True)
class QuestionType:
    """A closed-form question about a `DemoVideo` attribute (named by the type's key)."""

    questions: tuple[str, str]  # asked of the even- and the odd-numbered videos
    answer: str  # the reference answer; {} stands for the attribute's value


QUESTION_TYPES = {
    "colour": QuestionType(("What colour is the moving object?", "What is the color of the shape in the video?"),
                           "The object is {}."),
    "shape": QuestionType(("What shape is the moving object?", "Which shape can be seen in the video?"), "It is a {}."),
    "direction": QuestionType(("In which direction does the object move?", "Where is the object going?"),
                              "It moves {}."),
}


@dataclass(frozen=True)
class DemoVideo:
    video_id: str
    colour: str
    shape: str
    direction: str
    width: int
    height: int
    fps: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def plan_videos(n_videos: int, seed: int) -> list[DemoVideo]:
    """Choose every video's content. Colour, shape and direction cycle through all combinations
    in a shuffled order, so even a small corpus is balanced."""
    rng = np.random.default_rng(seed)
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    alphabet = np.array(list(string.ascii_letters + string.digits + "_-"))
    videos, order = [], []
    for i in range(n_videos):
        if not order:
            order = list(rng.permutation(len(combos)))
        colour, shape, direction = combos[order.pop()]
        width, height = SIZES[rng.integers(len(SIZES))]
        fps = int(FRAME_RATES[rng.integers(len(FRAME_RATES))])
        frames = int(round(rng.uniform(*SECONDS) * fps))
        video_id = "v_" + "".join(rng.choice(alphabet, 11))
        videos.append(DemoVideo(video_id, colour, shape, direction, int(width), int(height), fps, frames))
    return videos


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted, smooth random texture (H, W, 3) uint8: bilinear-upsampled coarse noise plus grain."""
    coarse = rng.uniform(70, 170, size=(7, 9, 3)).astype(np.float32)
    coarse = 0.7 * coarse + 0.3 * coarse.mean(axis=2, keepdims=True)  # desaturate
    ys = np.linspace(0, coarse.shape[0] - 1, height, dtype=np.float32)
    xs = np.linspace(0, coarse.shape[1] - 1, width, dtype=np.float32)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[0] - 1), np.minimum(x0 + 1, coarse.shape[1] - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x1] * wx
    bottom = coarse[y1][:, x0] * (1 - wx) + coarse[y1][:, x1] * wx
    image = top * (1 - wy) + bottom * wy + rng.normal(0, 6, size=(height, width, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of the object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c**2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    # triangle, apex up: inside while |x - c| <= half the base width at that height
    return np.abs(xx - c) <= yy / 2


def _positions(video: DemoVideo, rng: np.random.Generator, size: int) -> np.ndarray:
    """(frames, 2) top-left (x, y) of the object: it crosses from 5% to 95% of the free span."""
    free_x, free_y = video.width - size, video.height - size
    t = np.linspace(0.05, 0.95, video.frames)
    across = rng.uniform(0.25, 0.75)
    if video.direction in ("left", "right"):
        x = t if video.direction == "right" else 1 - t
        xy = np.stack([x * free_x, np.full_like(t, across * free_y)], axis=1)
    else:
        y = t if video.direction == "down" else 1 - t
        xy = np.stack([np.full_like(t, across * free_x), y * free_y], axis=1)
    return np.round(xy).astype(int)


def write_video(video: DemoVideo, path: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, *video.video_id.encode()])
    background = _background(rng, video.width, video.height)
    size = int(OBJECT_SIZE * min(video.width, video.height))
    mask = _shape_mask(video.shape, size)
    colour = np.array(COLOURS[video.colour], dtype=np.uint8)
    # mbtree off: libx264's macroblock-tree rate control reads heap memory it never wrote, which
    # made a few videos' bytes and pixels depend on the process's earlier allocations
    options = {"preset": "veryfast", "crf": "23", "threads": "1", "x264-params": "mbtree=0"}

    def frames():
        for x, y in _positions(video, rng, size):
            pixels = background.copy()
            pixels[y : y + size, x : x + size][mask] = colour
            yield pixels

    video_writer.write_video(path, frames(), video.fps, options=options)


def labels_for(video: DemoVideo, index: int) -> dict[str, dict[str, str]]:
    """The video's labels.json entry: per question type, the question its instructions ask and
    the label (the `index`-th video is asked the `index % 2`-th phrasing)."""
    return {kind: {"question": qtype.questions[index % 2], "answer": getattr(video, kind)}
            for kind, qtype in QUESTION_TYPES.items()}


def instructions_for(video: DemoVideo, index: int) -> list[dict[str, str]]:
    """VideoInstruct-100K records for one video: colour, shape, direction and a description.
    Every fourth video's description carries VideoInstruct's noisy-caption suffix."""
    describe = (
        f"A {video.colour} {video.shape} moves {video.direction} "
        f"across a textured background for {video.seconds:.1f} seconds."
    )
    records = [(label["question"], QUESTION_TYPES[kind].answer.format(label["answer"]))
               for kind, label in labels_for(video, index).items()]
    records.append((DESCRIBE_QUESTIONS[index % 2] + (NOISY_SUFFIX if index % 4 == 0 else ""), describe))
    return [{"q": q, "a": a, "video_id": video.video_id} for q, a in records]


def plan_pairs(videos: list[DemoVideo], seed: int) -> list[tuple[int, int, bool]]:
    """(i, j, same direction): pair n is opened by video i = 2n, with a partner j (chosen by the
    seed) moving the same way for even n and another way for odd n, so the answer is "yes" half
    the time. A video with no such partner opens no pair."""
    rng = np.random.default_rng([seed, 2])
    pairs = []
    for n, i in enumerate(range(0, len(videos), 2)):
        same = n % 2 == 0
        partners = [j for j, other in enumerate(videos) if j != i and (other.direction == videos[i].direction) == same]
        if partners:
            pairs.append((i, partners[rng.integers(len(partners))], same))
    return pairs


def pair_records(videos: list[DemoVideo], pairs: list[tuple[int, int, bool]]) -> tuple[list[dict], dict]:
    """pairs.json's LLaVA records and their labels.json entries."""
    records, labels = [], {}
    for n, (i, j, same) in enumerate(pairs):
        a, b = videos[i].video_id, videos[j].video_id
        # the phrasing alternates every two pairs, the answer every pair: the words do not tell it
        question, answer = PAIR_QUESTIONS[n // 2 % 2], "yes" if same else "no"
        records.append({"id": f"pair_{n}", "video": [f"{a}.mp4", f"{b}.mp4"], "conversations": [
            {"from": "human", "value": f"<video>\n<video>\n{question}"}, {"from": "gpt", "value": PAIR_ANSWERS[answer]}]})
        labels[f"{a}+{b}"] = {PAIR_TYPE: {"question": question, "answer": answer}}
    return records, labels


def make_demo_corpus(out: Path, n_videos: int = 96, seed: int = 0, workers: int = 1, pairs: bool = False) -> list[DemoVideo]:
    """Write the demo corpus under `out` (see the module docstring) with `workers` processes and
    return its plan; `pairs` also writes the two-video questions. Each video is a function of the seed and its id alone, so the corpus does not
    depend on the number of workers. The writers are always fresh (spawned) processes: in a process
    that imported decord before PyAV, PyAV runs on decord's own FFmpeg build, whose x264 writes
    other bytes."""
    if n_videos < 1:
        raise ValueError(f"--videos must be at least 1, got {n_videos}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    out = Path(out).expanduser().resolve()
    (out / "videos").mkdir(parents=True, exist_ok=True)
    videos = plan_videos(n_videos, seed)
    paths = [out / "videos" / f"{video.video_id}.mp4" for video in videos]
    spawn = multiprocessing.get_context("spawn")
    with tqdm(total=len(videos), desc="demo videos", unit="video") as progress, \
            ProcessPoolExecutor(min(workers, len(videos)), mp_context=spawn) as pool:
        try:
            for done in as_completed([pool.submit(write_video, v, p, seed) for v, p in zip(videos, paths)]):
                done.result()  # a failed video fails the corpus
                progress.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    records, labels = [], {}
    for index, video in enumerate(videos):
        records += instructions_for(video, index)
        labels[video.video_id] = labels_for(video, index)
    (out / "instructions.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if pairs:
        two, pair_labels = pair_records(videos, plan_pairs(videos, seed))
        (out / "pairs.json").write_text(json.dumps(two, indent=1) + "\n", encoding="utf-8")
        labels.update(pair_labels)
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")
    log.info("demo corpus: %d videos, %d instructions in %s", len(videos), len(records), out)
    return videos
