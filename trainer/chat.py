"""Chatting with a trained run about one video or several, and describing a folder of videos.

The videos come from the feature store (``store`` + ``row``: no decoding at all) or from
video files (``video``; either may name several, asked about in the order given), each which is decoded and encoded exactly as the run's store was made (encoder spec,
frames, sampling, layer) by `FileFeatures`: the store's encoder, loaded once per command
(`pipeline.extract.FileEncoder`: decord and open_clip imported only then, Ray never).
A conversation is multi-turn: each question is asked with the earlier questions and answers in
the prompt, and the answer is streamed as it is generated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from manifests.formats import VIDEO_MARKER
from manifests.manifest import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from model import STOPPED, GenerationConfig, stream_generate
from trainer.errors import TrainerError
from trainer.loss import autocast
from trainer.run import LoadedRun, cpu_threads, load_run, pick_device
from pipeline.store_format import OK as STATUS_OK
from pipeline.store_format import STATUS_NAMES
from trainer.store import check_same_signature, open_store

log = logging.getLogger(__name__)

DESCRIBE_QUESTION = "Describe the video."
VIDEO_PREFIX = f"{VIDEO_MARKER}\n"  # opens a conversation's first question, as in the manifest's normal form


class VideoError(TrainerError):
    """A video file that cannot be decoded or encoded as the run's store was."""


@dataclass
class GenerationFlags:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    threads: int | None = None  # CPU threads of torch (None: its default)

    def generation_config(self, stop_ids: tuple[int, ...]) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise TrainerError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise TrainerError("--temperature must be >= 0 and --top-p in (0, 1]")
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, stop_ids=stop_ids,
        )


# --- video features ------------------------------------------------------------------------------


def store_features(loaded: LoadedRun, store_path: str | Path, row: int) -> Tensor:
    """(F, T, D) float16 features of one store row, checked against the run."""
    store = open_store(store_path)
    check_same_signature(loaded.store_signature, store, f"run {loaded.run}")
    if not 0 <= row < store.n_rows:
        raise TrainerError(f"--row {row} is outside store {store.path} (rows 0..{store.n_rows - 1})")
    status = int(store.status[row])
    if status != STATUS_OK:
        raise TrainerError(f"row {row} of {store.path} has no features (status {STATUS_NAMES.get(status, status)})")
    import zarr

    tokens = zarr.open_group(str(store.path), mode="r")["tokens"]
    return torch.from_numpy(tokens[row])


class FileFeatures:
    """Video files encoded as the run's store was made (encoder, weights, frames, sampling, layer)
    by the store's encoder, loaded here once: loading it takes seconds, so a command loads it once,
    not once per file."""

    def __init__(self, loaded: LoadedRun, store_attrs: dict[str, Any] | None = None) -> None:
        attrs = store_attrs or loaded.config["store"].get("attrs") or loaded.store_signature
        try:
            from pipeline.errors import ExtractError
            from pipeline.extract import FileEncoder  # decord + open_clip: never in training
        except ImportError as err:
            raise TrainerError(f"--video needs the extraction pipeline ({err}); use --store and --row") from err
        try:
            self.encoder = FileEncoder(attrs, loaded.device.type)
        except ExtractError as err:
            raise TrainerError(str(err)) from err
        self.shape = (attrs["frames"], attrs["tokens_per_frame"], attrs["width"])

    def __call__(self, video: Path) -> Tensor:
        """(F, T, D) float16 features of one file; `VideoError` when it cannot be decoded."""
        from pipeline.errors import ExtractError

        try:
            features = torch.from_numpy(self.encoder.encode(video)[0])
        except ExtractError as err:
            raise VideoError(str(err)) from err
        if tuple(features.shape) != self.shape:
            raise TrainerError(f"{video}: encoded to {tuple(features.shape)}, the run expects {self.shape}")
        return features


# --- a conversation ------------------------------------------------------------------------------


class ChatSession:
    """A multi-turn conversation about some videos, each (F, T, D) (none: text only). The first
    question opens with one `<video>` marker per video, as a several-video sample of the manifest."""

    def __init__(self, loaded: LoadedRun, videos: Sequence[Tensor], gen: GenerationConfig, seed: int = 0) -> None:
        self.loaded = loaded
        self.video = torch.stack(list(videos)).to(loaded.device) if videos else None  # (V, F, T, D)
        self.video_counts = torch.tensor([len(videos)])
        self.gen = gen
        self.generator = torch.Generator(device=loaded.device).manual_seed(seed)
        self.history: list[dict[str, str]] = []

    def ask(self, question: str) -> Iterator[str]:
        """Stream the answer to ``question`` as text pieces; the turn joins the history at the end."""
        question = question.strip()
        if not question:
            raise TrainerError("empty question")
        markers = 0 if self.video is None or self.history else len(self.video)
        content = VIDEO_PREFIX * markers + question
        turns = self.history + [{"role": "user", "content": content}]
        n_video = self.loaded.model.cfg.n_video_tokens if self.video is not None else 0
        tok = self.loaded.tok
        prompt = tok.encode_prompt(turns, n_video, self.loaded.system)
        room = self.loaded.model.cfg.lm.max_seq_len - len(prompt)
        if room < 1:
            raise TrainerError(f"the conversation is longer than the model's {self.loaded.model.cfg.lm.max_seq_len} tokens")
        gen = dataclasses.replace(self.gen, max_new_tokens=min(self.gen.max_new_tokens, room))
        ids: list[int] = []
        shown = ""
        with autocast(self.loaded.device):
            for step in stream_generate(self.loaded.model, [prompt], self.video, gen, self.generator, self.video_counts):
                token = int(step[0])
                if token == STOPPED:
                    break
                ids.append(token)
                text = tok.decode(ids)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                if len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
        answer = tok.decode(ids)
        if len(answer) > len(shown):
            yield answer[len(shown) :]
        self.history = turns + [{"role": "assistant", "content": answer.strip()}]

    def answer(self, question: str) -> str:
        return "".join(self.ask(question)).strip()


@dataclass(kw_only=True)
class ChatConfig(GenerationFlags):
    """`run_train.py chat`: ``video`` or ``store`` + ``row`` (one, or a list: a conversation about
    several videos); ``question`` None = interactive."""

    run: Path
    video: Path | Sequence[Path] | None = None
    store: Path | str | None = None  # a path or an fsspec URL
    row: int | Sequence[int] | None = None
    question: str | None = None
    device: str | None = None


def _several(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def open_chat(cfg: ChatConfig) -> ChatSession:
    files, rows = [Path(f).expanduser() for f in _several(cfg.video)], _several(cfg.row)
    if not files and (cfg.store is None or not rows):
        raise TrainerError("chat needs --video FILE, or --store STORE and --row N")
    if files and rows:
        raise TrainerError("give --video or --row, not both")
    if missing := next((f for f in files if not f.is_file()), None):
        raise TrainerError(f"no such video file: {missing}")
    loaded = load_run(cfg.run, pick_device(cfg.device))
    gen = cfg.generation_config(loaded.tok.stop_ids)
    if files:
        attrs = None
        if cfg.store is not None:
            store = open_store(cfg.store)
            check_same_signature(loaded.store_signature, store, f"run {cfg.run}")
            attrs = store.attrs
        encode = FileFeatures(loaded, attrs)
        videos = [encode(f) for f in files]
    else:
        videos = [store_features(loaded, cfg.store, row) for row in rows]  # type: ignore[arg-type]
    return ChatSession(loaded, videos, gen, cfg.seed)


def chat(
    cfg: ChatConfig,
    on_text: Callable[[str], None] | None = None,
    read_question: Callable[[], str | None] | None = None,
) -> list[tuple[str, str]]:
    """Answer ``cfg.question``, or every question ``read_question`` returns until it returns None;
    each answer streams through ``on_text`` piece by piece. Returns the (question, answer) turns."""
    with cpu_threads(cfg.threads):
        return _chat(cfg, on_text, read_question)


def _chat(
    cfg: ChatConfig,
    on_text: Callable[[str], None] | None,
    read_question: Callable[[], str | None] | None,
) -> list[tuple[str, str]]:
    session = open_chat(cfg)
    questions: Iterator[str | None]
    if cfg.question is not None:
        questions = iter([cfg.question])
    elif read_question is not None:
        questions = iter(read_question, None)
    else:
        raise TrainerError("chat needs --question, or an interactive terminal")
    turns = []
    for question in questions:
        if question is None:
            break
        if not question.strip():
            continue
        pieces = []
        for piece in session.ask(question):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        turns.append((question, "".join(pieces).strip()))
    return turns


# --- describe a folder ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class DescribeConfig(GenerationFlags):
    """`run_train.py describe`: one question for every video in a folder."""

    run: Path
    videos: Path
    question: str = DESCRIBE_QUESTION
    device: str | None = None
    extensions: tuple[str, ...] = field(default=VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)


def describe(cfg: DescribeConfig, on_answer: Callable[[str, str], None] | None = None) -> list[tuple[str, str]]:
    """(file name, answer) for every video file in ``cfg.videos``, in name order. A video that
    cannot be decoded gets its error as the answer; the others go on."""
    with cpu_threads(cfg.threads):
        return _describe(cfg, on_answer)


def _describe(cfg: DescribeConfig, on_answer: Callable[[str, str], None] | None) -> list[tuple[str, str]]:
    folder = Path(cfg.videos).expanduser()
    if not folder.is_dir():
        raise TrainerError(f"no such folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in cfg.extensions)
    if not files:
        raise TrainerError(f"{folder} holds no video files ({', '.join(cfg.extensions)})")
    loaded = load_run(cfg.run, pick_device(cfg.device))
    gen = cfg.generation_config(loaded.tok.stop_ids)
    encode = FileFeatures(loaded)
    rows = []
    for path in files:
        try:
            video = encode(path)
        except VideoError as err:  # one bad video never stops the table
            answer = f"(could not read: {err})"
            log.warning("%s: %s", path.name, answer)
        else:
            answer = ChatSession(loaded, [video], gen, cfg.seed).answer(cfg.question)
        rows.append((path.name, answer))
        if on_answer is not None:
            on_answer(path.name, answer)
    return rows


def markdown_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("video", "answer")) -> str:
    def cell(text: str) -> str:
        return " ".join(text.replace("|", "\\|").split())

    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {cell(a)} | {cell(b)} |" for a, b in rows]
    return "\n".join(lines)
