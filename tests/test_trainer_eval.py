"""Evaluation: the labels file, and accuracy (exact match and by question type) checked against
an independent count of right answers, for a model whose every answer is known beforehand."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from manifests.manifest import load_manifest
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.eval_table import accuracy_table
from trainer.evaluate import EvalConfig, evaluate, label_correct, normalise, read_labels
from trainer.run import load_run
from trainer.train import train
from trainer_helpers import COLOURS, SHAPES, make_manifest, make_store, tiny_train_args

COLOUR_Q, SHAPE_Q, FOLLOW_UP = "What colour is the moving object?", "What shape is the moving object?", "And its shape?"
N_VIDEOS = 12


def _labels() -> dict:
    """Labels for make_manifest's videos, made so that every rule of the count matters: a few
    colours labelled wrong, odd videos' shape asked by a question the manifest never asks
    (left out), video 0's shape by its follow-up turn, and a type no question asks."""
    labels = {}
    for i in range(N_VIDEOS):
        shape_q = FOLLOW_UP if i == 0 else SHAPE_Q if i % 2 == 0 else "Which shape is it?"
        labels[f"v_{i:03d}"] = {
            "colour": {"question": COLOUR_Q, "answer": COLOURS[(i + (i % 5 == 1)) % 4]},
            "shape": {"question": shape_q, "answer": SHAPES[i % 3]},
            "motion": {"question": "Does it move?", "answer": "yes" if i % 2 else "no"},
        }
    return labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    manifest = make_manifest(root, n_videos=N_VIDEOS)
    store = make_store(root / "store.zarr", manifest)
    run = root / "run"
    train(TrainConfig(**tiny_train_args(manifest, store, run, steps=2)))
    (root / "labels.json").write_text(json.dumps(_labels()))
    return {"root": root, "manifest": manifest, "run": run, "labels": root / "labels.json"}


# --- a model whose answers are known -------------------------------------------------------------


def _known_answer(question: str, video: torch.Tensor | None) -> str:
    """Colour questions: the colour whose channel the video lifts (make_store adds 3 to channel
    row % 4 of every token; zeroed features name the first), or no colour without a video.
    Shape questions: always a circle, in words that are never the reference answer."""
    if "shape" in question:
        return "It is a circle, I think."
    if video is None:
        return "I cannot see it."
    return f"The object is {COLOURS[int(video.float().mean(dim=(0, 1))[:4].argmax())]}."


@pytest.fixture
def known_model(setup, monkeypatch):
    """`trainer.evaluate.generate` replaced by `_known_answer`, given each prompt's last question."""
    tok = load_run(setup["run"], torch.device("cpu")).tok

    def generate(model, prompts, video, gen, video_counts=None):
        answers = []
        for i, prompt in enumerate(prompts):
            *_, user, assistant = [j for j, t in enumerate(prompt) if t == tok.im_start_id]  # the last two turns
            question = tok.decode(prompt[user:assistant])
            answers.append(tok.encode_text(_known_answer(question, None if video is None else video[i])))
        return answers

    # the module itself: the package `trainer` exports a function of the same name
    monkeypatch.setattr(importlib.import_module("trainer.evaluate"), "generate", generate)


def _expected(manifest_dir: Path, ablate: str | None) -> dict:
    """The report's counts, worked out in plain Python from the manifest and the labels."""
    manifest = load_manifest(manifest_dir)
    rows = {v.video_id: v.row for v in manifest.videos if v.split == "val"}
    labels = _labels()
    right, answers = 0, 0
    by_type = {kind: [] for kind in ("colour", "shape", "motion")}
    for sample in manifest.samples():
        if sample.key not in rows:
            continue
        turns = sample.conversations
        for question, reference in zip(turns[::2], turns[1::2]):
            question = question["content"].removeprefix("<video>\n")
            if "shape" in question:
                named = "circle"
            else:
                named = {None: COLOURS[rows[sample.key] % 4], "zero-video": COLOURS[0], "no-video": None}[ablate]
            answer = "It is a circle, I think." if "shape" in question else f"The object is {named}." if named else "I cannot see it."
            answers += 1
            right += answer.lower() == reference["content"].lower()
            for kind, label in labels[sample.key].items():
                if label["question"] == question:
                    by_type[kind].append(named == label["answer"])
    values = {kind: {v[kind]["answer"] for v in labels.values()} for kind in by_type}
    return {
        "answers": answers,
        "accuracy": right / answers,
        "by_type": {kind: {"accuracy": sum(hits) / len(hits) if hits else None, "chance": 1 / len(values[kind]),
                           "n": len(hits)} for kind, hits in by_type.items()},
    }


@pytest.mark.parametrize("ablate", [None, "zero-video", "no-video"])
def test_accuracy_equals_an_independent_count(setup, known_model, ablate):
    report = evaluate(EvalConfig(run=setup["run"], labels=setup["labels"], ablate=ablate, threads=1, batch_size=3))
    expected = _expected(setup["manifest"], ablate)
    assert report["answers"] == expected["answers"]
    assert report["accuracy"] == expected["accuracy"]  # the same shares of the same counts: exactly equal
    assert report["by_type"] == expected["by_type"]
    # the count is not trivial: some answers right, some wrong, some questions left out
    colour = expected["by_type"]["colour"]
    if ablate is None:
        assert 0 < colour["accuracy"] < 1 and 0 < expected["accuracy"] < 1
    assert 0 < expected["by_type"]["shape"]["n"] < colour["n"] and expected["by_type"]["motion"]["n"] == 0


def test_accuracy_table_prints_each_column(setup, known_model):
    table = accuracy_table(EvalConfig(run=setup["run"], labels=setup["labels"], threads=1))
    lines = table.splitlines()
    run = setup["run"].name
    assert lines[0] == f"| question type | n | chance | {run} | {run} (zero-video) | {run} (no-video) |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    columns = [_expected(setup["manifest"], ablate)["by_type"] for ablate in (None, "zero-video", "no-video")]
    # a type that no question of any column asks gets no row
    assert list(rows) == [kind for kind in ("colour", "shape", "motion") if any(c[kind]["n"] for c in columns)]
    assert list(rows) == ["colour", "shape"] and columns[0]["motion"]["n"] == 0
    for kind, line in rows.items():
        cells = [c.strip() for c in line.strip("|").split("|")]
        stats = columns[0][kind]
        shares = ["-" if c[kind]["accuracy"] is None else f"{c[kind]['accuracy']:.0%}" for c in columns]
        assert cells == [kind, str(stats["n"]), f"{stats['chance']:.0%}", *shares]


def test_the_real_model_reports_loss_answers_and_ablations(setup):
    manifest = load_manifest(setup["manifest"])
    val_ids = {v.video_id for v in manifest.videos if v.split == "val"}
    val_samples = [s for s in manifest.samples() if s.key in val_ids]
    report = evaluate(EvalConfig(run=setup["run"], labels=setup["labels"], threads=1, max_new_tokens=4))
    assert report["samples"] == len(val_samples) and report["examples"][0]["reference"]
    assert list(report["by_type"]) == ["colour", "shape", "motion"]
    losses = {evaluate(EvalConfig(run=setup["run"], ablate=ablate, threads=1, max_new_tokens=2, max_samples=4))["val_loss"]
              for ablate in (None, "zero-video", "no-video")}
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_answer_normalisation_and_label_matching():
    assert normalise("The object is  RED.") == "object is red"
    assert label_correct("The object is red.", "red", COLOURS)
    assert not label_correct("It is red or blue.", "red", COLOURS)
    assert not label_correct("It is a circle.", "red", COLOURS)
    assert not label_correct("It is reddish.", "red", COLOURS)


def test_labels_file_is_read_and_bad_ones_are_refused(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"a": {"count": {"question": "How many?", "answer": "two"}},
                                "b": {"count": {"question": "How many birds?", "answer": "one"},
                                      "place": {"question": "Where is it?", "answer": "outdoors"}}}))
    labels = read_labels(path)
    assert labels.values == {"count": ["one", "two"], "place": ["outdoors"]}
    assert labels.asked[("b", "how many birds")] == ("count", "one")

    old = {"a": {"colour": "red", "shape": "circle"}}  # the format before questions were named
    cases = [
        (old, 'video a, type colour holds "red"; expected {video_id: {type: {"question": ..., "answer": ...}}}'),
        ([1, 2], "expected {video_id:"),
        ({"a": "red"}, "video a holds"),
        ({"a": {"colour": {"question": "What colour?"}}}, "video a, type colour holds"),
        ({"a": {"colour": {"question": "What?", "answer": "red"}, "shape": {"question": "what", "answer": "x"}}},
         "video a names 'what' for two types"),
    ]
    for data, message in cases:
        path.write_text(json.dumps(data))
        with pytest.raises(TrainerError, match="^" + str(path).replace(".", r"\.") + ": ") as err:
            read_labels(path)
        assert message in str(err.value) and "\n" not in str(err.value)
    path.write_text("{not json")
    with pytest.raises(TrainerError, match="not UTF-8 JSON"):
        read_labels(path)
