"""The demo corpus, read back with decord and checked against labels.json."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest

from manifests.demo_corpus import COLOURS, DIRECTIONS, FRAME_RATES, QUESTION_TYPES, SHAPES, make_demo_corpus, plan_videos

VALUES = {"colour": set(COLOURS), "shape": set(SHAPES), "direction": set(DIRECTIONS)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_corpus(out, n_videos=12, seed=3)
    return out


def _labels(corpus: Path) -> dict[str, dict[str, str]]:
    """labels.json as {video_id: {type: answer}}, its format checked on the way."""
    labels = json.loads((corpus / "labels.json").read_text())
    assert all(set(types) == set(VALUES) and all(set(e) == {"question", "answer"} for e in types.values())
               for types in labels.values())
    return {video_id: {kind: e["answer"] for kind, e in types.items()} for video_id, types in labels.items()}


def test_instructions_are_in_the_videoinstruct_format_and_labels_name_their_questions(corpus):
    records = json.loads((corpus / "instructions.json").read_text())
    labels = json.loads((corpus / "labels.json").read_text())
    assert isinstance(records, list) and len(records) == 4 * len(labels)
    for r in records:
        assert set(r) == {"q", "a", "video_id"}
        assert all(isinstance(v, str) and v for v in r.values())
        assert r["video_id"] in labels
    noisy = [r for r in records if r["q"].endswith("\nQA_GT_caption_based_noisy")]
    assert 0 < len(noisy) < len(records)
    # Each labelled question is asked of its video once, and the answer names the label and
    # nothing else of its type's values; both phrasings of each type are used.
    for video_id, types in labels.items():
        for kind, label in types.items():
            (answer,) = [r["a"] for r in records if r["video_id"] == video_id and r["q"] == label["question"]]
            assert set(answer.lower().replace(".", " ").split()) & VALUES[kind] == {label["answer"]}
    for kind, qtype in QUESTION_TYPES.items():
        assert {types[kind]["question"] for types in labels.values()} == set(qtype.questions)


def test_every_video_decodes_to_its_plan(corpus):
    labels = _labels(corpus)
    assert sorted(p.stem for p in (corpus / "videos").glob("*.mp4")) == sorted(labels)
    for video in plan_videos(12, 3):
        assert labels[video.video_id] == {"colour": video.colour, "shape": video.shape, "direction": video.direction}
        assert video.fps in FRAME_RATES and 2.0 <= video.seconds <= 12.0
        reader = decord.VideoReader(str(corpus / "videos" / f"{video.video_id}.mp4"))
        assert len(reader) == video.frames
        assert reader[0].shape == (video.height, video.width, 3)
        assert reader.get_avg_fps() == pytest.approx(video.fps, rel=1e-3)


def test_the_object_moves_in_the_labelled_direction(corpus):
    """The object's colour centroid, measured on the first and last frames, moves as labelled."""
    for video_id, label in _labels(corpus).items():
        reader = decord.VideoReader(str(corpus / "videos" / f"{video_id}.mp4"))
        target = np.array(COLOURS[label["colour"]], dtype=np.float32)
        centres = []
        for index in (0, len(reader) - 1):
            frame = reader[index].asnumpy().astype(np.float32)
            ys, xs = np.nonzero(np.abs(frame - target).sum(axis=2) < 60)
            assert len(xs) > 100, f"{video_id}: object not found in frame {index}"
            centres.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centres[1], centres[0])
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == label["direction"], video_id


def test_the_corpus_is_a_function_of_the_seed(corpus, tmp_path):
    make_demo_corpus(tmp_path, n_videos=12, seed=3, workers=2)  # the fixture's was written by one process

    def digest(root: Path) -> dict[str, str]:
        files = sorted(root.rglob("*"))
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}

    assert digest(tmp_path) == digest(corpus)


def _write_in_a_fresh_process(out: Path, extra_env: dict[str, str] | None = None) -> bytes:
    """Video 18 of plan_videos(20, 0), written by a new interpreter that imports PyAV alone."""
    script = ("import sys; from pathlib import Path; from manifests.demo_corpus import plan_videos, write_video; "
              "write_video(plan_videos(20, 0)[18], Path(sys.argv[1]), 0)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(extra_env or {})}
    subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, timeout=120)
    return out.read_bytes()


def test_the_mp4_bytes_do_not_depend_on_what_the_heap_held(tmp_path):
    """libx264's macroblock-tree rate control reads memory it never wrote, so a video's bytes (and
    its decoded pixels) could depend on the process's earlier allocations; the corpus turns it off.
    glibc's MALLOC_PERTURB_ fills fresh allocations with a given byte: two values, same file."""
    # video 18 of this plan comes out different under fills 1 and 255 with mbtree on
    files = [_write_in_a_fresh_process(tmp_path / f"fill{fill}.mp4", {"MALLOC_PERTURB_": fill}) for fill in ("1", "255")]
    assert files[0] == files[1]
    assert b"mbtree=0" in files[0]  # x264's settings record: the option was not silently dropped


def test_the_corpus_does_not_depend_on_what_the_calling_process_imported(tmp_path):
    """This test module imported decord first: in its process PyAV would run on decord's own FFmpeg,
    whose x264 writes other bytes. make_demo_corpus writes in fresh processes, so it matches a
    process that never saw decord."""
    make_demo_corpus(tmp_path / "corpus", n_videos=20, seed=0, workers=1)
    video = plan_videos(20, 0)[18]
    written = (tmp_path / "corpus" / "videos" / f"{video.video_id}.mp4").read_bytes()
    assert written == _write_in_a_fresh_process(tmp_path / "fresh.mp4")
