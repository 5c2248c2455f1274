"""run_train.py's commands on a tiny trained run: eval (with labels and ablations), chat, describe,
tokenizer, and one-line errors with non-zero exit codes for user mistakes."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import run_train
from manifests.manifest import load_manifest
from model import GenerationConfig, generate
from trainer.chat import ChatConfig, chat, markdown_table, open_chat
from trainer.evaluate import EvalConfig, evaluate, label_correct, normalise, question_type, question_types
from trainer.run import load_run
from trainer.train import TrainConfig, train
from trainer_helpers import COLOURS, PYTHON, REPO, SHAPES, make_manifest, make_store, subprocess_env, tiny_train_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    manifest = make_manifest(root, n_videos=12)
    store = make_store(root / "store.zarr", manifest)
    run = root / "run"
    train(TrainConfig(**tiny_train_args(manifest, store, run, steps=4)))
    labels = {f"v_{i:03d}": {"colour": COLOURS[i % 4], "shape": SHAPES[i % 3]} for i in range(12)}
    (root / "labels.json").write_text(json.dumps(labels))
    return {"root": root, "manifest": manifest, "store": store, "run": run, "labels": root / "labels.json"}


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = run_train.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_question_types_by_set_and_by_keyword():
    from manifests.demo_corpus import COLOUR_QUESTIONS, DIRECTION_QUESTIONS, SHAPE_QUESTIONS

    known = question_types()
    for kind, questions in (("colour", COLOUR_QUESTIONS), ("shape", SHAPE_QUESTIONS), ("direction", DIRECTION_QUESTIONS)):
        for q in questions:
            assert question_type(q, known) == kind and question_type(q, None) == kind
    assert question_type("Describe the video.", known) is None and question_type("Describe the video.", None) is None


def test_answer_normalisation_and_label_matching():
    assert normalise("The object is  RED.") == "object is red"
    assert label_correct("The object is red.", "red", COLOURS)
    assert not label_correct("It is red or blue.", "red", COLOURS)
    assert not label_correct("It is a circle.", "red", COLOURS)
    assert not label_correct("It is reddish.", "red", COLOURS)


def test_eval_reports_loss_accuracy_and_accuracy_by_type(trained):
    manifest = load_manifest(trained["manifest"])
    val_ids = {v.video_id for v in manifest.videos if v.split == "val"}
    val_samples = [s for s in manifest.samples() if s.video_id in val_ids]
    assistant_turns = sum(1 for s in val_samples for t in s.conversations if t["role"] == "assistant")
    colour_questions = sum(1 for s in val_samples for t in s.conversations if t["content"].endswith("What colour is the moving object?"))

    report = evaluate(EvalConfig(run=trained["run"], threads=1, labels=trained["labels"], max_new_tokens=8))
    assert report["samples"] == len(val_samples) and report["answers"] == assistant_turns
    assert math.isfinite(report["val_loss"]) and 0 <= report["accuracy"] <= 1
    assert report["by_type"]["colour"]["n"] == colour_questions
    assert report["by_type"]["colour"]["chance"] == pytest.approx(1 / 4)
    assert report["by_type"]["shape"]["chance"] == pytest.approx(1 / 3)
    assert report["by_type"]["direction"] == {"accuracy": None, "chance": None, "n": 0}
    assert report["examples"][0]["reference"]

    zero = evaluate(EvalConfig(run=trained["run"], threads=1, ablate="zero-video", max_new_tokens=4, max_samples=4))
    text_only = evaluate(EvalConfig(run=trained["run"], threads=1, ablate="no-video", max_new_tokens=4, max_samples=4))
    full = evaluate(EvalConfig(run=trained["run"], threads=1, max_new_tokens=4, max_samples=4))
    assert len({zero["val_loss"], text_only["val_loss"], full["val_loss"]}) == 3
    assert zero["ablate"] == "zero-video" and text_only["samples"] == 4


def test_eval_cli_prints_json(trained, capsys):
    code, out, _ = cli("eval", "--run", str(trained["run"]), "--max-samples", "2", "--max-new-tokens", "4", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    assert report["samples"] == 2 and report["step"] == 4


def test_chat_streams_the_greedy_answer_and_keeps_the_conversation(trained):
    pieces: list[str] = []
    cfg = ChatConfig(run=trained["run"], threads=1, store=trained["store"], row=0, question="What colour is the moving object?",
                     max_new_tokens=12)
    ((question, answer),) = chat(cfg, on_text=pieces.append)
    assert answer == "".join(pieces).strip()
    # the same answer as batched greedy generation on the template's prompt
    loaded = load_run(trained["run"], torch.device("cpu"))
    import zarr

    video = torch.from_numpy(zarr.open_group(str(trained["store"]), mode="r")["tokens"][0])[None]
    prompt = loaded.tok.encode_prompt([{"role": "user", "content": "<video>\n" + question}], loaded.model.cfg.n_video_tokens)
    (ids,) = generate(loaded.model, [prompt], video, GenerationConfig(max_new_tokens=12, stop_ids=loaded.tok.stop_ids))
    assert answer == loaded.tok.decode(ids).strip()

    questions = iter(["What colour is the moving object?", "And its shape?", None])
    turns = chat(ChatConfig(run=trained["run"], threads=1, store=trained["store"], row=0, max_new_tokens=6),
                 read_question=lambda: next(questions))
    assert [q for q, _ in turns] == ["What colour is the moving object?", "And its shape?"]
    session = open_chat(ChatConfig(run=trained["run"], threads=1, store=trained["store"], row=0, max_new_tokens=6))
    first = session.answer("What colour is the moving object?")
    session.answer("And its shape?")
    assert [t["role"] for t in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[0]["content"].startswith("<video>\n") and session.history[1]["content"] == first


def test_tokenizer_command(trained, capsys):
    out_dir = trained["root"] / "tok"
    code, out, _ = cli("tokenizer", "--manifest", str(trained["manifest"]), "--out", str(out_dir), "--vocab-size", "300", capsys=capsys)
    assert code == 0 and Path(out.strip()) == out_dir / "tokenizer.json"
    assert json.loads((out_dir / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_user_mistakes_are_one_line_errors(trained, tmp_path, capsys):
    run, store, manifest = str(trained["run"]), str(trained["store"]), str(trained["manifest"])
    other = make_store(tmp_path / "wide.zarr", trained["manifest"], width=16)
    cases = [
        (["eval", "--run", str(tmp_path / "nope")], "no such run directory"),
        (["eval", "--run", str(tmp_path)], "is not a training run"),
        (["train", "--manifest", manifest, "--store", store, "--out", run, "--preset", "tiny"], "already holds a run"),
        (["train", "--manifest", manifest, "--store", store, "--out", str(tmp_path / "r"), "--train", "lm,clip"], "--train takes"),
        (["train", "--manifest", manifest, "--store", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "r")], "no such feature store"),
        (["train", "--manifest", str(tmp_path), "--store", store, "--out", str(tmp_path / "r")], "is not a manifest"),
        (["chat", "--run", run, "--row", "0", "--question", "hi"], "--store"),
        (["chat", "--run", run, "--store", str(other), "--row", "0", "--question", "hi"], "does not match run"),
        (["chat", "--run", run, "--store", store, "--row", "99", "--question", "hi"], "outside store"),
        (["eval", "--run", run, "--labels", str(tmp_path / "labels.json")], "no such labels file"),
        (["describe", "--run", run, "--videos", str(tmp_path / "none")], "no such folder"),
    ]
    for argv, message in cases:
        code, _, err = cli(*argv, capsys=capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)
        assert "Traceback" not in err
    # and the real exit status of the script
    proc = subprocess.run([PYTHON, "run_train.py", "eval", "--run", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: no such run directory: {tmp_path / 'nope'}"]


def test_markdown_table():
    assert markdown_table([("a.mp4", "A red | circle.\nMoves.")]) == (
        "| video | answer |\n| --- | --- |\n| a.mp4 | A red \\| circle. Moves. |")


def test_chat_and_describe_videos_that_are_not_in_the_store(tmp_path, capsys):
    pytest.importorskip("open_clip")
    pytest.importorskip("decord")
    from manifests.demo_corpus import make_demo_corpus
    from pipeline.encoder import EncoderSpec, load_encoder

    encoder = load_encoder(EncoderSpec("demo-tiny", "none", -1, "fp32")).attrs  # as the pipeline records it
    manifest = make_manifest(tmp_path, n_videos=6)
    store = make_store(tmp_path / "store.zarr", manifest, frames=2, tokens=encoder["tokens_per_frame"],
                       width=encoder["width"], encoder=encoder)
    run = tmp_path / "run"
    train(TrainConfig(**tiny_train_args(manifest, store, run, steps=2, summary_heads=4)))
    make_demo_corpus(tmp_path / "new", n_videos=2, seed=11)
    videos = tmp_path / "new" / "videos"

    code, out, err = cli("chat", "--run", str(run), "--video", str(sorted(videos.iterdir())[0]),
                         "--question", "What colour is the moving object?", "--max-new-tokens", "5", capsys=capsys)
    assert code == 0 and out.endswith("\n"), err  # a 2-step model may well answer with its end token at once
    code, out, err = cli("describe", "--run", str(run), "--videos", str(videos), "--max-new-tokens", "5", capsys=capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[:2] == ["| video | answer |", "| --- | --- |"] and len(lines) == 4
    assert all(line.split("|")[1].strip().endswith(".mp4") and "could not read" not in line for line in lines[2:])
