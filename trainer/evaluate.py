"""Evaluation of a run on the manifest's validation split.

`evaluate` reports, as one JSON-able dict:
- ``val_loss``: the mean next-token loss over every answer token of the val samples (the
  training objective, token-weighted);
- ``accuracy``: the share of answers the model generates (greedy, every assistant turn, the
  earlier turns given as reference) that equal the reference after normalisation (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed);
- with ``labels`` (a ``labels.json``, below): ``by_type``, the accuracy per question type, with
  the chance level of a uniform guess among that type's answers seen in the labels file beside it;
- ``ablate``: ``zero-video`` replaces the video features by zeros, ``no-video`` drops the video
  placeholders from the prompts (a text-only model); both for the loss and the answers;
- with a mixture-of-experts LM, ``expert_load``: per layer, the share of the routed choices
  (top-k of every real token of the loss's forward) that went to each expert (each row sums to
  1; an even load is 1/experts each).

A labels file names, for each video, its closed-form answer per question type and the question
that asks it (the types and their answers are the corpus's own; nothing here knows them)::

    {"v_abc": {"count": {"question": "How many people are there?", "answer": "two"},
               "place": {"question": "Is it indoors or outdoors?", "answer": "outdoors"}},
     "v_def": {...},
     "v_abc+v_def": {"same": {"question": "Do they show the same place?", "answer": "no"}}}

(a conversation about several videos is named by their ids joined by "+", in marker order).
A generated answer to a question the manifest asks of that video (compared after normalisation)
counts for the type; it is right when, of all the answers the type has in the file, it names
exactly the labelled one (whole words, after normalisation). Questions no label names are left out.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manifests.formats import clean_text
from model import GenerationConfig, generate
from trainer.batching import make_batch
from trainer.examples import Example, build_examples
from trainer.features import Features, make_features
from trainer.errors import TrainerError
from trainer.loss import autocast, token_loss_sum
from trainer.store import check_same_signature, open_store

ABLATIONS = ("zero-video", "no-video")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


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
    expert_counts: torch.Tensor | None = None,
) -> float:
    """Token-weighted mean next-token loss over ``examples`` (nan when there are none).
    ``expert_counts`` (MoE layers, experts), if given, gets the routing of every real token added
    (`MiniMindLM.expert_counts`)."""
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = make_batch(chunk, None if ablate == "no-video" else features, pad_id).to(device)
        video = _video(batch.video, ablate)
        with autocast(device):
            logits, _ = model(batch.input_ids, video=video, video_counts=batch.video_counts)
            total += float(token_loss_sum(logits, batch.labels))
        if expert_counts is not None:
            expert_counts += model.lm.expert_counts(batch.attention_mask).to(expert_counts.device)
        count += batch.n_target_tokens
    return total / count if count else float("nan")


def _video(video: torch.Tensor, ablate: str | None) -> torch.Tensor | None:
    if ablate == "no-video":
        return None
    if ablate == "zero-video":
        return torch.zeros_like(video)
    return video


# --- question types from labels.json ------------------------------------------------------------

LABELS_FORMAT = '{video_id: {type: {"question": ..., "answer": ...}}}'


@dataclass(frozen=True)
class Labels:
    """A labels file, read: what each (video, question) asks, and each type's answers."""

    asked: dict[tuple[str, str], tuple[str, str]]  # (video_id, normalised question) -> (type, answer)
    values: dict[str, list[str]]  # type -> its answers in the file, sorted; types in file order


def read_labels(path: str | Path) -> Labels:
    """The labels file at ``path`` (format in the module docstring); one-line errors otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TrainerError(f"no such labels file: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainerError(f"{path}: not UTF-8 JSON ({err})") from err
    if not isinstance(data, dict):
        raise TrainerError(f"{path}: expected {LABELS_FORMAT}")
    asked: dict[tuple[str, str], tuple[str, str]] = {}
    values: dict[str, set[str]] = {}
    for video_id, types in data.items():
        if not isinstance(types, dict):
            raise TrainerError(f"{path}: video {video_id} holds {json.dumps(types)[:60]}; expected {LABELS_FORMAT}")
        for kind, entry in types.items():
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) and entry[k].strip()
                                                    for k in ("question", "answer"))):
                raise TrainerError(f"{path}: video {video_id}, type {kind} holds {json.dumps(entry)[:60]}; "
                                   f"expected {LABELS_FORMAT}")
            key = (video_id, normalise(entry["question"]))
            if key in asked:
                raise TrainerError(f"{path}: video {video_id} names {entry['question']!r} for two types")
            asked[key] = (kind, entry["answer"])
            values.setdefault(kind, set()).add(entry["answer"])
    return Labels(asked, {kind: sorted(answers) for kind, answers in values.items()})


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
    video_id: str  # `Sample.key`: the ids joined by "+" for several videos
    rows: tuple[int, ...]
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
    moe = model.cfg.lm.moe
    counts = torch.zeros(len(model.lm.moe_layers()), moe.n_experts, dtype=torch.long) if moe is not None else None
    val_loss = validation_loss(model, data.items, features, tok.pad_id, cfg.batch_size, device, cfg.ablate, counts)

    questions = []
    for index, example in enumerate(data.items):
        video_id, conversation = data.conversations[example.sample]
        for turn, message in enumerate(conversation):
            if message["role"] == "assistant" and turn > 0:
                history = conversation[:turn]
                prompt = tok.encode_prompt(history, n_video, loaded.system)
                question = clean_text(history[-1]["content"])
                questions.append(Question(index, video_id, example.rows, question, message["content"], prompt))
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
    if counts is not None:
        shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        report["expert_load"] = [[round(share, 4) for share in layer] for layer in shares.tolist()]
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
        video, counts = None, torch.tensor([len(questions[i].rows) for i in chunk])
        if cfg.ablate != "no-video":
            video = _video(features.fetch([row for i in chunk for row in questions[i].rows]).to(device), cfg.ablate)
        with autocast(device):
            outputs = generate(model, [questions[i].prompt for i in chunk], video, gen, video_counts=counts)
        for i, ids in zip(chunk, outputs):
            answers[i] = tok.decode(ids).strip()
    return answers


def _by_type(questions: Sequence[Question], answers: Sequence[str], labels: Labels) -> dict[str, dict[str, Any]]:
    hits: dict[str, list[bool]] = {kind: [] for kind in labels.values}
    for q, answer in zip(questions, answers):
        found = labels.asked.get((q.video_id, normalise(q.question)))
        if found is not None:
            kind, label = found
            hits[kind].append(label_correct(answer, label, labels.values[kind]))
    return {
        kind: {
            "accuracy": sum(right) / len(right) if right else None,
            "chance": 1 / len(labels.values[kind]),
            "n": len(right),
        }
        for kind, right in hits.items()
    }

