"""Tokenised samples: each conversation of a split encoded once per run (not per step).

`build_examples` keeps a sample whose video rows are all ok in the store and counts, by reason,
each one it leaves out: a video pending, failed or beyond the store, an empty answer, a
conversation that cannot be encoded, text that produces the video placeholder id, a prompt
longer than ``max_len``. Longer samples are cut to ``max_len``. `add_text_only` appends
text-only copies of a share of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from manifests.formats import count_markers
from pipeline.store_format import OK as STATUS_OK
from pipeline.store_format import STATUS_NAMES
from trainer.store import StoreInfo
from trainer.tokenization import IGNORE, ChatTokenizer


@dataclass(frozen=True)
class Example:
    """One tokenised conversation and the store rows of its videos, in the order of its
    placeholder runs (a text-only copy keeps its source's rows and has no run)."""

    rows: tuple[int, ...]
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, IGNORE where no loss
    sample: int = -1  # line of samples.jsonl


@dataclass
class Examples:
    """The tokenised samples of one split and why others were left out."""

    items: list[Example]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    conversations: dict[int, tuple[str, list[dict[str, str]]]] = field(default_factory=dict)  # sample -> (Sample.key, turns)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.items]

    @property
    def rows(self) -> list[int]:
        return sorted({row for e in self.items for row in e.rows})

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"{len(self.items)} samples, skipped {sum(self.skipped.values())} ({skipped}), truncated {self.truncated}"


def build_examples(
    manifest: object,
    store: StoreInfo,
    tok: ChatTokenizer,
    split: str,
    n_video_tokens: int,
    max_len: int,
    system: str | None = None,
    keep_conversations: bool = False,
) -> Examples:
    """Tokenise every sample of ``split`` ("train" or "val", `Sample.split`) whose video rows are
    ok in the store (``keep_conversations``: also keep their text, for evaluation)."""
    videos = {v.video_id: v for v in manifest.videos}  # type: ignore[attr-defined]
    out = Examples(items=[])
    for index, sample in enumerate(manifest.samples()):  # type: ignore[attr-defined]
        if sample.split(videos) != split:
            continue
        rows = tuple(videos[vid].row for vid in sample.video_ids)
        if why := _unusable(rows, store):
            out.skipped[why] += 1
            continue
        if any(turn.get("role") == "assistant" and not str(turn.get("content", "")).strip()
               for turn in sample.conversations if isinstance(turn, dict)):
            out.skipped["empty answer"] += 1  # as the manifest builder refuses it: it would teach silence
            continue
        markers = count_markers(sample.conversations)
        if max(markers, len(rows)) > 1 and markers != len(rows):
            out.skipped["markers and videos differ"] += 1
            continue
        try:
            enc = tok.encode_conversation(sample.conversations, n_video_tokens, system)
        except (KeyError, ValueError, TypeError):
            out.skipped["malformed conversation"] += 1
            continue
        ids, labels = enc.input_ids, enc.labels
        placeholders = n_video_tokens * len(rows)
        if ids.count(tok.video_id) != placeholders:
            out.skipped["text holds the video token"] += 1
            continue
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if ids.count(tok.video_id) != placeholders:
                out.skipped["prompt longer than max_len"] += 1
                continue
            out.truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            out.skipped["no answer to learn"] += 1
            continue
        out.items.append(Example(rows, np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), index))
        if keep_conversations:
            out.conversations[index] = (sample.key, sample.conversations)
    return out


def _unusable(rows: tuple[int, ...], store: StoreInfo) -> str:
    """Why a sample with videos at ``rows`` cannot be trained on (the first video that fails), or ""."""
    for row in rows:
        if row >= store.n_rows:
            return "video not in store"
        status = int(store.status[row])
        if status != STATUS_OK:
            return f"video {STATUS_NAMES.get(status, f'status {status}')}"
    return ""


def add_text_only(examples: Examples, tok: ChatTokenizer, fraction: float, seed: int, max_len: int,
                  system: str | None = None) -> int:
    """Append text-only copies (no video placeholders) of a seeded ``fraction`` of the samples,
    which must have been built with ``keep_conversations``. A model that has seen text-only
    prompts answers them from the language prior alone, which is what `eval --ablate no-video`
    means to measure; one that has not meets an input it was never trained on. Returns how many
    were added."""
    if examples.items and not examples.conversations:
        raise ValueError("add_text_only needs examples built with keep_conversations=True")
    n = round(fraction * len(examples.items))
    picked = np.random.default_rng([seed, 1]).choice(len(examples.items), size=n, replace=False)
    added = 0
    for index in sorted(picked.tolist()):
        example = examples.items[index]
        enc = tok.encode_conversation(examples.conversations[example.sample][1], 0, system)
        if len(enc.input_ids) <= max_len:
            ids, labels = (np.asarray(x, dtype=np.int64) for x in (enc.input_ids, enc.labels))
            examples.items.append(Example(example.rows, ids, labels, example.sample))
            added += 1
    return added

