"""Instruction files in, conversations out.

Two formats are read, detected from the first record (or forced):
- VideoInstruct-100K: flat `{"q", "a", "video_id"}` records, several per video; each becomes a
  one-turn conversation.
- LLaVA / Video-ChatGPT training format: `{"id", "video", "conversations": [{"from": "human" |
  "gpt", "value"}, ...]}`, multi-turn kept as multi-turn.
Either may be a JSON list or JSON Lines. Every conversation comes out in one normal form: the
`<video>` marker (wherever it stood, and LLaVA's `<image>`) removed and put back as a
`<video>\\n` prefix of the first user turn; VideoInstruct's `\\nQA_GT_caption_based_noisy`-style
suffixes stripped. Records that cannot be taken are returned as problems, never raised.

A LLaVA record may name several videos or images (`"video": ["a.mp4", "b.mp4"]`, as LLaVA's
interleaved data and MiniMind-V's multi-image samples do). Its conversation then needs one marker
per video, in the order of the list, and the markers stay where they stand (each normalised to
`<video>` on a line of its own): "the first video" is the first marker's. A record with no
marker at all gets them as a prefix of its first user turn; any other count is a problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.manifest import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ManifestError

VIDEO_MARKER = "<video>"
MARKER_PATTERN = re.compile(r"\s*<(?:video|image)>\s*")  # a marker with the space around it, wherever it stands
_NOISY_SUFFIX = re.compile(r"\s*\bQA_GT_\w*\s*$")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("auto", "videoinstruct", "llava")


@dataclass(frozen=True)
class Record:
    """One conversation read from an instruction file, before its video is looked up."""

    index: int  # position in the input file (record or line number, from 0)
    video_refs: tuple[str, ...]  # the ids or file names the record names, in marker order
    conversations: list[dict[str, str]]


@dataclass(frozen=True)
class Problem:
    kind: str  # bad_json_line | empty_text | bad_conversation | duplicate_record | unsafe_path | missing_video
    reason: str
    index: int | None = None
    video_id: str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def clean_text(text: str) -> str:
    """Strip the video marker and VideoInstruct's noisy-caption suffix."""
    return _NOISY_SUFFIX.sub("", MARKER_PATTERN.sub(" ", text)).strip()


def marked_text(text: str) -> str:
    """`clean_text` that keeps each marker where it stands, as `<video>` on a line of its own
    (the normal form of a turn of a several-video conversation)."""
    first, *rest = (clean_text(piece) for piece in MARKER_PATTERN.split(text))
    lines = [first] if first else []
    for piece in rest:
        lines += [VIDEO_MARKER, piece] if piece else [VIDEO_MARKER]
    return "\n".join(lines)


def count_markers(conversation: list[dict[str, str]]) -> int:
    """How many `<video>` / `<image>` markers the turns hold."""
    return sum(len(MARKER_PATTERN.findall(turn["content"])) for turn in conversation)


def video_id_of(ref: str) -> str:
    """`v_abc.mp4` and `v_abc` name the same video; the id is the name without a known extension."""
    suffix = Path(ref).suffix.lower()
    return ref[: -len(suffix)] if suffix in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS else ref


def _raw_records(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """(index, parsed JSON) pairs from a JSON list or a JSON Lines file. A JSON Lines file loses
    only its bad lines (not JSON, or not UTF-8: recorded as problems); a JSON list that is not
    UTF-8 throughout is refused with the byte where it breaks."""
    data = path.read_bytes()
    try:
        whole = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        if data.lstrip()[:1] == b"[":
            raise ManifestError(f"{path}: not UTF-8 at byte {err.start}: a JSON list must be valid UTF-8 "
                                "throughout (in a JSON Lines file only the bad lines are dropped)") from err
        whole = None
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return list(enumerate(whole)), []
    if isinstance(whole, dict):
        return [(0, whole)], []
    records, problems = [], []
    for index, raw in enumerate(data.splitlines()):
        if not raw.strip():
            continue
        try:
            records.append((index, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError as e:
            problems.append(Problem("bad_json_line", f"line {index + 1}: not UTF-8 at byte {e.start}", index=index))
        except json.JSONDecodeError as e:
            problems.append(Problem("bad_json_line", f"line {index + 1}: {e.msg}", index=index))
    return records, problems


def detect_format(first: Any, path: Path) -> str:
    if isinstance(first, dict) and "conversations" in first:
        return "llava"
    if isinstance(first, dict) and {"q", "a", "video_id"} <= first.keys():
        return "videoinstruct"
    raise ManifestError(
        f"{path}: neither VideoInstruct-100K ({{q, a, video_id}} records) nor LLaVA/Video-ChatGPT "
        "({video, conversations} records); use --format to force one"
    )


def _from_videoinstruct(index: int, raw: dict[str, Any]) -> Record | Problem:
    video = str(raw.get("video_id") or "")
    q, a = clean_text(str(raw.get("q") or "")), clean_text(str(raw.get("a") or ""))
    if not video:
        return Problem("bad_conversation", "record has no video_id", index=index)
    if not q or not a:
        return Problem("empty_text", "empty question" if not q else "empty answer", index=index, video_id=video)
    turns = [{"role": "user", "content": f"{VIDEO_MARKER}\n{q}"}, {"role": "assistant", "content": a}]
    return Record(index, (video,), turns)


def _video_refs(raw: dict[str, Any]) -> list[str]:
    """The video (or image) names a LLaVA record gives: one string, or a list of them."""
    named = raw.get("video") or raw.get("image") or raw.get("video_id") or ""
    names = named if isinstance(named, list) else [named]
    return [str(name) for name in names if isinstance(name, str) and name]


def _from_llava(index: int, raw: dict[str, Any]) -> Record | Problem:
    refs = _video_refs(raw)
    video = refs[0] if refs else ""
    turns_in = raw.get("conversations")
    if not refs:
        return Problem("bad_conversation", "record has no video", index=index)
    if not isinstance(turns_in, list) or not turns_in or len(turns_in) % 2:
        return Problem("bad_conversation", "conversations must be user/assistant pairs", index=index, video_id=video)
    several = len(refs) > 1
    turns = []
    for position, turn in enumerate(turns_in):
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) if isinstance(turn, dict) else None
        if role != ("user" if position % 2 == 0 else "assistant"):
            return Problem("bad_conversation", f"turn {position} is not a {'user' if position % 2 == 0 else 'assistant'} turn", index=index, video_id=video)
        raw_text = str(turn.get("value", turn.get("content", "")) or "")
        content = (marked_text if several else clean_text)(raw_text)
        if not clean_text(content):
            return Problem("empty_text", f"empty {'question' if role == 'user' else 'answer'} in turn {position}", index=index, video_id=video)
        turns.append({"role": role, "content": content})
    markers = count_markers(turns)
    if several and markers not in (0, len(refs)):
        return Problem("bad_conversation", f"{len(refs)} videos but {markers} <video>/<image> markers", index=index, video_id=video)
    if not several or not markers:
        turns[0]["content"] = f"{VIDEO_MARKER}\n" * len(refs) + turns[0]["content"]
    return Record(index, tuple(refs), turns)


def read_instructions(path: Path, fmt: str = "auto") -> tuple[list[Record], list[Problem], str]:
    """Parse an instruction file: (records, problems, the format used)."""
    if fmt not in FORMATS:
        raise ManifestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ManifestError(f"instruction file not found: {path}")
    raws, problems = _raw_records(path)
    if not raws:
        raise ManifestError(f"{path}: no JSON records found")
    if fmt == "auto":
        fmt = detect_format(raws[0][1], path)
    parse = _from_llava if fmt == "llava" else _from_videoinstruct
    records = []
    for index, raw in raws:
        item = parse(index, raw) if isinstance(raw, dict) else Problem("bad_conversation", "record is not a JSON object", index=index)
        (records if isinstance(item, Record) else problems).append(item)
    return records, problems, fmt
