"""Evaluation of a run on the manifest's validation split.

`evaluate` reports, as one JSON-able dict:
- ``val_loss``: the mean next-token loss over every answer token of the val samples (the
  training objective, token-weighted);
- ``accuracy``: the share of answers the model generates (greedy, every assistant turn, the
  earlier turns given as reference) that equal the reference after normalisation (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed);
- with ``labels`` (a ``labels.json``: ``{video_id: {"colour": .., "shape": .., "direction": ..}}``):
  ``by_type``, the accuracy per question type against the labels, with the chance level of a
  uniform guess among that type's values beside it. A question's type is recognised from the
  demo corpus's question sets; an answer is right when, of the type's values, it names exactly
  the labelled one.
- ``ablate``: ``zero-video`` replaces the video features by zeros, ``no-video`` drops the video
  placeholders from the prompts (a text-only model); both for the loss and the answers.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import defaultdict
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import GenerationConfig, generate
from trainer.data import Example, Features, build_examples, make_batch, make_features
from trainer.errors import TrainerError
from trainer.loss import autocast, token_loss_sum
from trainer.store import check_same_signature, open_store

log = logging.getLogger(__name__)

ABLATIONS = ("zero-video", "no-video")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_MARKER = re.compile(r"\s*<(?:video|image)>\s*")


def normalise(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation or articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    examples: Sequence[Example],
    features: Features,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    ablate: str | None = None,
) -> float:
    """Token-weighted mean next-token loss over ``examples`` (nan when there are none)."""
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = make_batch(chunk, None if ablate == "no-video" else features, pad_id).to(device)
        video = _video(batch.video, ablate)
        with autocast(device):
            logits, _ = model(batch.input_ids, video=video)
            total += float(token_loss_sum(logits, batch.labels))
        count += batch.n_target_tokens
    return total / count if count else float("nan")


def _video(video: torch.Tensor, ablate: str | None) -> torch.Tensor | None:
    if ablate == "no-video":
        return None
    if ablate == "zero-video":
        return torch.zeros_like(video)
    return video


# --- question types against labels.json ----------------------------------------------------------

LABEL_KEYS = {"colour": "colour", "shape": "shape", "direction": "direction"}


_TYPE_WORDS = {"colour": ("colour", "color"), "shape": ("shape",), "direction": ("direction", "going", "move", "moving")}


def question_types() -> dict[str, str]:
    """Normalised question text -> its type, from the demo corpus's question sets."""
    from manifests.demo_corpus import COLOUR_QUESTIONS, DIRECTION_QUESTIONS, SHAPE_QUESTIONS

    sets = {"colour": COLOUR_QUESTIONS, "shape": SHAPE_QUESTIONS, "direction": DIRECTION_QUESTIONS}
    return {normalise(q): kind for kind, questions in sets.items() for q in questions}


def question_type(question: str, known: dict[str, str] | None) -> str | None:
    """The demo corpus's type of a question; without its question sets (the module needs PyAV),
    the first type whose keyword the question holds (colour before shape before direction)."""
    text = normalise(question)
    if known is not None:
        return known.get(text)
    words = set(text.split())
    return next((kind for kind, keys in _TYPE_WORDS.items() if words & set(keys)), None)


def read_labels(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TrainerError(f"no such labels file: {path}")
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrainerError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(labels, dict):
        raise TrainerError(f"{path}: expected {{video_id: {{colour, shape, direction, ...}}}}")
    return labels


def label_correct(answer: str, label: str, values: Sequence[str]) -> bool:
    """Right when the answer names exactly the labelled value among ``values``."""
    words = normalise(answer)
    named = [v for v in values if re.search(rf"\b{re.escape(normalise(v))}\b", words)]
    return named == [label]


# --- the `eval` command --------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """`run_train.py eval`."""

    run: Path
    manifest: Path | None = None  # default: the run's
    store: Path | str | None = None  # default: the run's (a path or an fsspec URL)
    labels: Path | None = None
    ablate: str | None = None  # zero-video | no-video
    split: str = "val"
    batch_size: int = 16
    max_new_tokens: int = 64
    max_samples: int | None = None  # evaluate only the first N samples
    examples: int = 5  # answers to include in the report
    device: str | None = None
    threads: int | None = None  # CPU threads of torch (None: its default)


@dataclass
class Question:
    example: int  # index into the examples
    video_id: str
    row: int
    question: str
    reference: str
    prompt: list[int]


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Validation loss, answer accuracy and (with labels) accuracy by question type; see the module docstring."""
    from trainer.run import cpu_threads

    with cpu_threads(cfg.threads):
        return _evaluate(cfg)


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from manifests.manifest import ManifestError, load_manifest
    from trainer.run import load_run, pick_device

    if cfg.ablate is not None and cfg.ablate not in ABLATIONS:
        raise TrainerError(f"--ablate must be one of {', '.join(ABLATIONS)}, got {cfg.ablate!r}")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise TrainerError("--batch-size and --max-new-tokens must be at least 1")
    labels = read_labels(cfg.labels) if cfg.labels is not None else None
    loaded = load_run(cfg.run, pick_device(cfg.device))
    config = loaded.config
    try:
        manifest = load_manifest(cfg.manifest or config["manifest"]["path"])
    except ManifestError as err:
        raise TrainerError(str(err)) from err
    store = open_store(cfg.store or config["store"]["path"])
    check_same_signature(loaded.store_signature, store, f"run {cfg.run}")
    if store.attrs.get("manifest_id") != manifest.manifest_id:
        raise TrainerError(f"store {store.path} was not extracted from manifest {manifest.dir}")

    model, tok, device = loaded.model, loaded.tok, loaded.device
    n_video = 0 if cfg.ablate == "no-video" else model.cfg.n_video_tokens
    max_len = config["train"]["max_len"]
    data = build_examples(manifest, store, tok, cfg.split, n_video, max_len, loaded.system, keep_conversations=True)
    if cfg.max_samples is not None:
        data.items = data.items[: cfg.max_samples]
    features = make_features("disk", store.path, [], device)
    val_loss = validation_loss(model, data.items, features, tok.pad_id, cfg.batch_size, device, cfg.ablate)

    questions = []
    for index, example in enumerate(data.items):
        video_id, conversation = data.conversations[example.sample]
        for turn, message in enumerate(conversation):
            if message["role"] == "assistant" and turn > 0:
                history = conversation[:turn]
                prompt = tok.encode_prompt(history, n_video, loaded.system)
                question = _MARKER.sub(" ", history[-1]["content"]).strip()
                questions.append(Question(index, video_id, example.row, question, message["content"], prompt))
    answers = _answer_all(model, tok, questions, features, cfg, device)

    right = [normalise(a) == normalise(q.reference) for q, a in zip(questions, answers)]
    report: dict[str, Any] = {
        "run": str(cfg.run),
        "step": loaded.step,
        "split": cfg.split,
        "ablate": cfg.ablate,
        "samples": len(data.items),
        "skipped": dict(data.skipped),
        "val_loss": None if val_loss != val_loss else val_loss,
        "answers": len(questions),
        "accuracy": sum(right) / len(right) if right else None,
    }
    if labels is not None:
        report["by_type"] = _by_type(questions, answers, labels)
    report["examples"] = [
        {"video_id": q.video_id, "question": q.question, "reference": q.reference, "answer": a}
        for q, a in list(zip(questions, answers))[: cfg.examples]
    ]
    return report


@torch.no_grad()
def _answer_all(model: Any, tok: Any, questions: Sequence[Question], features: Features, cfg: EvalConfig, device: torch.device) -> list[str]:
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, stop_ids=tok.stop_ids)
    answers = [""] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: (len(questions[i].prompt), i))
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start : start + cfg.batch_size]
        video = None
        if cfg.ablate != "no-video":
            video = _video(features.fetch([questions[i].row for i in chunk]).to(device), cfg.ablate)
        with autocast(device):
            outputs = generate(model, [questions[i].prompt for i in chunk], video, gen)
        for i, ids in zip(chunk, outputs):
            answers[i] = tok.decode(ids).strip()
    return answers


def _by_type(questions: Sequence[Question], answers: Sequence[str], labels: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    try:
        types: dict[str, str] | None = question_types()
    except ImportError:  # manifests.demo_corpus imports PyAV at module level
        log.warning("demo corpus question sets unavailable; recognising question types by keyword")
        types = None
    values: dict[str, list[str]] = {
        kind: sorted({str(v[key]) for v in labels.values() if isinstance(v, dict) and key in v})
        for kind, key in LABEL_KEYS.items()
    }
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, answer in zip(questions, answers):
        kind = question_type(q.question, types)
        label = labels.get(q.video_id, {}).get(LABEL_KEYS.get(kind, ""))
        if kind is None or label is None:
            continue
        hits[kind].append(label_correct(answer, str(label), values[kind]))
    return {
        kind: {
            "accuracy": sum(hits[kind]) / len(hits[kind]) if hits[kind] else None,
            "chance": 1 / len(values[kind]) if values[kind] else None,
            "n": len(hits[kind]),
        }
        for kind in LABEL_KEYS
    }


# --- the comparison table of the demo ------------------------------------------------------------


def accuracy_table(cfg: EvalConfig, compare: Sequence[Path] = ()) -> str:
    """A Markdown table of accuracy by question type (needs ``cfg.labels``): the run as trained,
    with its video features zeroed and with no video at all, then each run of ``compare`` (e.g.
    the `cinego` summary trained with the same budget), beside the chance level."""
    if cfg.labels is None:
        raise TrainerError("the accuracy table needs --labels")
    columns: dict[str, dict[str, Any]] = {}
    for ablate in (None, "zero-video", "no-video"):
        name = f"{cfg.run.name}" + (f" ({ablate})" if ablate else "")
        columns[name] = evaluate(dataclasses.replace(cfg, ablate=ablate))["by_type"]
    for run in compare:
        columns[Path(run).name] = evaluate(dataclasses.replace(cfg, run=Path(run), ablate=None))["by_type"]
    first = next(iter(columns.values()))
    lines = ["| question type | n | chance | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for qtype, stats in first.items():
        cells = [f"{columns[c][qtype]['accuracy']:.0%}" for c in columns]
        lines.append(f"| {qtype} | {stats['n']} | {stats['chance']:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
