"""Tokenizer and chat template.

The tokenizer is a byte-level BPE (Hugging Face ``tokenizers``) trained by the project on the
manifest's training text in a few seconds, or any ``tokenizer.json`` (or a directory holding
one, e.g. MiniMind's or a Hugging Face model's). Four special tokens matter:

    <|endoftext|>  padding (any id other than the video token would do; it never gets a loss)
    <|im_start|>   start of a turn   } MiniMind's ChatML template; a loaded tokenizer must have both
    <|im_end|>     end of a turn     }
    <|video|>      one video placeholder; a prompt holds ``n_video_tokens`` of them in a row

A tokenizer without the video token gets it added as a special token (one more id), unless
``video_token`` names a token it already has (MiniMind-V uses "@"); a sample whose own text
produces the video token's id is then refused by the dataset, so placeholder runs are exact.

The template (MiniMind's, so a MiniMind LM starts from a format it knows):

    <|im_start|>system\\n{system}<|im_end|>\\n          (only with a system prompt)
    <|im_start|>user\\n<|video|>*N\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    ... more turns ...

The video's ``<video>`` marker (the manifest puts it at the start of the first user turn) is
removed from the text and the placeholder run stands at the start of that turn instead. A
conversation about several videos holds one marker per video, and each marker is replaced where
it stands by a run and a newline: the k-th run takes the k-th video. The
loss covers each assistant answer and the ``<|im_end|>`` that closes it, in every assistant
turn; nothing else. Pieces are tokenised separately, so the mask boundary is exact, and text
never turns into special tokens (``<|im_end|>`` typed by a user is plain text).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.loss import IGNORE
from pipeline.atomic import atomic_path
from manifests.formats import MARKER_PATTERN, count_markers
from trainer.errors import TrainerError

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VIDEO_TOKEN = "<|video|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VIDEO_TOKEN)  # ids 0..3 of a trained tokenizer
DEFAULT_VOCAB_SIZE = 6400  # MiniMind's
ROLES = ("system", "user", "assistant")

Conversation = Sequence[dict[str, str]]


def conversation_texts(conversation: Conversation) -> Iterator[str]:
    """The plain text of every turn, video markers removed (what the BPE is trained on)."""
    for turn in conversation:
        yield MARKER_PATTERN.sub(" ", turn["content"]).strip()


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE over ``texts`` with the special tokens at ids 0..3. The vocabulary stops
    short of ``vocab_size`` when the text has no more merges to offer."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TrainerError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    role_lines = [f"{role}\n" for role in ROLES]
    tok.train_from_iterator(_chain(role_lines, texts), trainer=trainer)
    return tok


def _chain(first: Iterable[str], rest: Iterable[str]) -> Iterator[str]:
    yield from first
    yield from rest


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` for a directory; a one-line error otherwise."""
    path = Path(path).expanduser()
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        where = f"{path} has no tokenizer.json" if path.is_dir() else f"no such tokenizer file: {path}"
        raise TrainerError(where)
    return candidate


@dataclass(frozen=True)
class Encoded:
    """One tokenised conversation: ``labels[t]`` is ``input_ids[t]`` where the loss applies,
    else IGNORE (the shift to next-token targets happens in the loss)."""

    input_ids: list[int]
    labels: list[int]


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus the chat template and the special ids it needs."""

    def __init__(self, tok: Tokenizer, video_token: str = VIDEO_TOKEN) -> None:
        self.tok = tok
        self.tok.encode_special_tokens = True  # text never becomes a special token
        self.video_token = video_token
        if tok.token_to_id(video_token) is None:
            tok.add_special_tokens([video_token])
            log.info("tokenizer has no %s token; added it as id %d", video_token, tok.token_to_id(video_token))
        missing = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is None]
        if missing:
            raise TrainerError(
                f"tokenizer has no {' or '.join(missing)} token; the chat template is ChatML "
                "(MiniMind's, Qwen's, SmolLM2's tokenizers have them)"
            )
        self.im_start_id: int = tok.token_to_id(IM_START)
        self.im_end_id: int = tok.token_to_id(IM_END)
        self.video_id: int = tok.token_to_id(video_token)
        pad = tok.token_to_id(PAD_TOKEN)
        self.pad_id: int = pad if pad is not None and pad != self.video_id else self.im_end_id
        self._newline = self.encode_text("\n")
        self._role = {role: self.encode_text(f"{role}\n") for role in ROLES}

    # --- files ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, video_token: str = VIDEO_TOKEN) -> ChatTokenizer:
        """Load a ``tokenizer.json`` file or a directory holding one."""
        file = tokenizer_file(path)
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises plain Exception on a bad file
            raise TrainerError(f"{file}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from err
        return cls(tok, video_token)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (with the video token if it was added) into directory ``path``."""
        out = Path(path) / "tokenizer.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            self.tok.save(str(tmp))
        return out

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation ends at the end of the assistant's turn (or at end-of-text)."""
        pad = self.tok.token_to_id(PAD_TOKEN)
        return (self.im_end_id,) if pad is None or pad in (self.im_end_id, self.video_id) else (self.im_end_id, pad)

    # --- encoding ------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _turns(
        self, conversation: Conversation, n_video_tokens: int, system: str | None
    ) -> Iterator[tuple[str, list[int]]]:
        """(role, content ids) of every turn, the video placeholders in their user turn."""
        if system:
            yield "system", self.encode_text(system)
        users = [i for i, t in enumerate(conversation) if t["role"] == "user"]
        marked = [i for i in users if MARKER_PATTERN.search(conversation[i]["content"])]
        video_turn = (marked or users or [None])[0] if n_video_tokens else None
        several = n_video_tokens > 0 and count_markers(conversation) > 1
        run = [self.video_id] * n_video_tokens + self._newline
        for i, turn in enumerate(conversation):
            role = turn["role"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if several:  # a run where each marker stands
                first, *rest = (self.encode_text(piece.strip()) for piece in MARKER_PATTERN.split(turn["content"]))
                content = first + [t for piece in rest for t in run + piece]
            else:
                content = self.encode_text(MARKER_PATTERN.sub(" ", turn["content"]).strip())
                if i == video_turn:
                    content = run + content
            yield role, content

    def encode_conversation(
        self, conversation: Conversation, n_video_tokens: int, system: str | None = None
    ) -> Encoded:
        """The whole conversation with the loss on every assistant answer and its ``<|im_end|>``.
        ``n_video_tokens`` 0 makes a text-only prompt."""
        ids: list[int] = []
        labels: list[int] = []
        for role, content in self._turns(conversation, n_video_tokens, system):
            head = [self.im_start_id] + self._role[role]
            body = content + [self.im_end_id]
            ids += head + body + self._newline
            trained = role == "assistant"
            labels += [IGNORE] * len(head) + (body if trained else [IGNORE] * len(body)) + [IGNORE] * len(self._newline)
        return Encoded(ids, labels)

    def encode_prompt(
        self, conversation: Conversation, n_video_tokens: int, system: str | None = None
    ) -> list[int]:
        """A generation prompt: the conversation so far (ending with a user turn), then
        ``<|im_start|>assistant\\n``."""
        ids = self.encode_conversation(conversation, n_video_tokens, system).input_ids
        return ids + [self.im_start_id] + self._role["assistant"]


# --- the `tokenizer` command ----------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """`run_train.py tokenizer`: train the byte-level BPE on a manifest's training text."""

    manifest: Path
    out: Path
    vocab_size: int = DEFAULT_VOCAB_SIZE


def training_texts(manifest: Any) -> Iterator[str]:
    """Every turn's text of the (loaded) manifest's training-split samples: what a tokenizer
    trained here learns from."""
    videos = {v.video_id: v for v in manifest.videos}
    for sample in manifest.samples():
        if sample.split(videos) == "train":
            yield from conversation_texts(sample.conversations)


def tokenizer(cfg: TokenizerConfig) -> Path:
    """Train the byte-level BPE (the one `train` makes when it is given no tokenizer) and save
    it as ``cfg.out/tokenizer.json``; returns that path."""
    from manifests.manifest import load_manifest

    tok = ChatTokenizer(train_bpe(training_texts(load_manifest(cfg.manifest)), cfg.vocab_size))
    path = tok.save(cfg.out)
    log.info("tokenizer: %d tokens -> %s", tok.vocab_size, path)
    return path
