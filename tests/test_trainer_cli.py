"""run_train.py's commands on a tiny trained run: eval, chat, describe, tokenizer, and one-line
errors with non-zero exit codes for user mistakes; chat and describe on video files against a
store extracted from those files. (Evaluation itself: tests/test_trainer_eval.py.)"""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import run_train
from manifests.manifest import load_manifest
from model import GenerationConfig, generate
from trainer.chat import ChatConfig, chat, markdown_table, open_chat
from trainer.config import TrainConfig
from trainer.run import load_run
from trainer.train import train
from trainer_helpers import PYTHON, REPO, make_manifest, make_store, subprocess_env, tiny_train_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    manifest = make_manifest(root, n_videos=12)
    store = make_store(root / "store.zarr", manifest)
    run = root / "run"
    train(TrainConfig(**tiny_train_args(manifest, store, run, steps=4)))
    return {"root": root, "manifest": manifest, "store": store, "run": run}


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = run_train.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


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
    old_labels = tmp_path / "old_labels.json"  # the format before labels named their questions
    old_labels.write_text(json.dumps({"v_000": {"colour": "red", "shape": "circle"}}))
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
        (["eval", "--run", run, "--labels", str(old_labels)], 'expected {video_id: {type: {"question"'),
        (["chat", "--run", run, "--video", str(tmp_path / "none.mp4"), "--question", "hi"], "no such video file"),
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


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict:
    """Three demo videos, a store extracted from them by the pipeline (demo-tiny, 2 frames) and a
    2-step run on that store: what chat and describe compute for the files must be the store's."""
    pytest.importorskip("open_clip")
    pytest.importorskip("decord")
    from manifests.build import ManifestConfig, build_manifest
    from manifests.demo_corpus import make_demo_corpus
    from pipeline.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("files")
    make_demo_corpus(root / "corpus", n_videos=3, seed=11)
    videos, manifest, store, run = root / "corpus" / "videos", root / "manifest", root / "store.zarr", root / "run"
    build_manifest(ManifestConfig(root / "corpus" / "instructions.json", videos, manifest))
    extract(ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none", frames=2,
                          decoders=1, encoder_threads=1))
    train(TrainConfig(**tiny_train_args(manifest, store, run, steps=2, summary_heads=4)))
    rows = {f"{v.video_id}.mp4": v.row for v in load_manifest(manifest).videos}
    return {"videos": videos, "store": store, "run": run, "rows": rows}


QUESTION = "What colour is the moving object?"


def test_chat_about_a_file_reads_the_features_the_store_holds_for_it(extracted):
    tokens = zarr.open_group(str(extracted["store"]), mode="r")["tokens"]
    for name, row in extracted["rows"].items():
        session = open_chat(ChatConfig(run=extracted["run"], video=extracted["videos"] / name, threads=1))
        assert torch.equal(session.video[0].cpu(), torch.from_numpy(tokens[row])), name


def test_chat_about_two_files_takes_them_in_the_order_given(extracted, capsys):
    (first, row_a), (second, row_b) = sorted(extracted["rows"].items())[:2]
    files = [extracted["videos"] / second, extracted["videos"] / first]
    tokens = zarr.open_group(str(extracted["store"]), mode="r")["tokens"]
    session = open_chat(ChatConfig(run=extracted["run"], video=files, threads=1))
    assert torch.equal(session.video.cpu(), torch.from_numpy(np.stack([tokens[row_b], tokens[row_a]])))
    question = "Do the two objects move the same way?"
    code, out, err = cli("chat", "--run", str(extracted["run"]), "--video", str(files[0]), "--video", str(files[1]),
                         "--question", question, "--max-new-tokens", "6", "--threads", "1", capsys=capsys)
    assert code == 0, err
    # the same greedy answer as generation on a prompt with two runs, the stored rows in that order
    loaded = load_run(extracted["run"], torch.device("cpu"))
    prompt = loaded.tok.encode_prompt([{"role": "user", "content": "<video>\n<video>\n" + question}],
                                      loaded.model.cfg.n_video_tokens)
    assert prompt.count(loaded.tok.video_id) == 2 * loaded.model.cfg.n_video_tokens
    video = torch.from_numpy(np.stack([tokens[row_b], tokens[row_a]]))
    (ids,) = generate(loaded.model, [prompt], video, GenerationConfig(max_new_tokens=6, stop_ids=loaded.tok.stop_ids),
                      video_counts=torch.tensor([2]))
    assert ids and out.strip() == loaded.tok.decode(ids).strip()


def _describe_argv(extracted: dict, *extra: str) -> list[str]:
    """describe with sampling (seeded per file): a 2-step model's greedy answer is often empty."""
    return ["describe", "--run", str(extracted["run"]), "--videos", str(extracted["videos"]), "--question", QUESTION,
            "--max-new-tokens", "6", "--temperature", "1", "--threads", "1", *extra]


def test_describe_loads_the_tower_once_and_answers_as_the_store_rows_do(extracted, monkeypatch, capsys):
    import pipeline.extract

    chat_module = importlib.import_module("trainer.chat")  # the package `trainer` exports a function `chat`
    loads, videos = [], []
    load_encoder = pipeline.extract.load_encoder
    monkeypatch.setattr(pipeline.extract, "load_encoder", lambda *a, **k: loads.append(a) or load_encoder(*a, **k))

    class Session(chat_module.ChatSession):
        def __init__(self, loaded, video, *args):
            (one,) = video  # describe asks about one video at a time
            videos.append(one)
            super().__init__(loaded, video, *args)

    monkeypatch.setattr(chat_module, "ChatSession", Session)
    code, out, err = cli(*_describe_argv(extracted), capsys=capsys)
    assert code == 0, err
    assert len(loads) == 1
    tokens = zarr.open_group(str(extracted["store"]), mode="r")["tokens"]
    rows = [row for _, row in sorted(extracted["rows"].items())]
    assert len(videos) == len(rows) and all(torch.equal(v, torch.from_numpy(tokens[r])) for v, r in zip(videos, rows))
    expected = []
    for name, row in sorted(extracted["rows"].items()):
        ((_, answer),) = chat(ChatConfig(run=extracted["run"], store=extracted["store"], row=row, threads=1,
                                         question=QUESTION, max_new_tokens=6, temperature=1.0))
        expected.append((name, answer))
    assert out == markdown_table(expected) + "\n"
    assert all(answer for _, answer in expected)


def test_chat_describe_and_eval_print_only_their_result_and_never_import_ray(extracted, capsys):
    run, video = str(extracted["run"]), str(extracted["videos"] / sorted(extracted["rows"])[0])
    commands = [["chat", "--run", run, "--video", video, "--question", "Where is the object going?",
                 "--max-new-tokens", "6", "--threads", "1"], _describe_argv(extracted)]
    printed = "".join(cli(*argv, capsys=capsys)[1] for argv in commands)
    commands.append(["eval", "--run", run, "--split", "train", "--max-samples", "1", "--max-new-tokens", "2"])
    script = ("import json, sys, run_train\n"
              "codes = [run_train.main(argv) for argv in json.loads(sys.argv[1])]\n"
              "print(json.dumps({'codes': codes, 'ray': 'ray' in sys.modules}))\n")

    def run_train_py(argv: list[list[str]]) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-c", script, json.dumps(argv)], cwd=REPO, capture_output=True, text=True,
                              env=subprocess_env(), timeout=300)

    proc = run_train_py(commands)
    *result, last = proc.stdout.splitlines(keepends=True)
    assert json.loads(last) == {"codes": [0, 0, 0], "ray": False}, proc.stderr
    assert proc.stderr == ""
    assert "".join(result).startswith(printed)
    assert json.loads("".join(result)[len(printed):])["samples"] == 1
    verbose = run_train_py([_describe_argv(extracted, "--verbose")])
    assert verbose.stdout.startswith(printed[printed.index("| video |"):])
    assert "loaded " in verbose.stderr and len(verbose.stderr.splitlines()) >= 2
