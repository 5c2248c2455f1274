"""The manifest builder against hand-written expectations (DESIGN §3.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from manifests.build import ManifestConfig, build_manifest
from manifests.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


def touch_videos(root: Path, *names: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded by the manifest builder " + name.encode())


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build(tmp_path: Path, instructions: Path, **kw) -> tuple[Path, object]:
    out = kw.pop("out", tmp_path / "manifest")
    summary = build_manifest(ManifestConfig(instructions=instructions, videos=tmp_path / "videos", out=out, **kw))
    return out, summary


def test_videoinstruct_records_become_one_turn_conversations(tmp_path):
    touch_videos(tmp_path / "videos", "v_a.mp4", "v_b.mkv")
    src = write_json(tmp_path / "vi.json", [
        {"q": "What happens?\nQA_GT_caption_based_noisy", "a": "A dog runs.", "video_id": "v_a"},
        {"q": "Where is it?", "a": "In a park.", "video_id": "v_a"},
        {"q": "<video>\nWho plays?", "a": "Two kids.", "video_id": "v_b"},
    ])
    out, summary = build(tmp_path, src, shard_size=1)
    assert read_lines(out / "samples.jsonl") == [
        {"video_id": "v_a", "conversations": [{"role": "user", "content": "<video>\nWhat happens?"},
                                              {"role": "assistant", "content": "A dog runs."}]},
        {"video_id": "v_a", "conversations": [{"role": "user", "content": "<video>\nWhere is it?"},
                                              {"role": "assistant", "content": "In a park."}]},
        {"video_id": "v_b", "conversations": [{"role": "user", "content": "<video>\nWho plays?"},
                                              {"role": "assistant", "content": "Two kids."}]},
    ]
    videos = read_lines(out / "videos.jsonl")
    assert [(v["row"], v["video_id"], v["path"], v["shard"], v["kind"]) for v in videos] == [
        (0, "v_a", "v_a.mp4", 0, "video"), (1, "v_b", "v_b.mkv", 1, "video")]
    assert videos[0]["bytes"] == (tmp_path / "videos" / "v_a.mp4").stat().st_size
    assert (summary.videos, summary.samples, summary.shards) == (2, 3, 2)
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["counts"]["samples"] == 3 and meta["video_root"] == str((tmp_path / "videos").resolve())
    assert meta["sources"][0]["sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()


def test_llava_and_videoinstruct_give_the_same_samples(tmp_path):
    touch_videos(tmp_path / "videos", "v_a.mp4", "v_b.mp4")
    vi = write_json(tmp_path / "vi.json", [
        {"q": "What happens?", "a": "A dog runs.", "video_id": "v_a"},
        {"q": "Who plays?", "a": "Two kids.", "video_id": "v_b"},
    ])
    llava = write_json(tmp_path / "llava.json", [
        {"id": "1", "video": "v_a.mp4", "conversations": [{"from": "human", "value": "What happens?\n<video>"},
                                                          {"from": "gpt", "value": "A dog runs."}]},
        {"id": "2", "video": "v_b", "conversations": [{"from": "human", "value": "<video>\nWho plays?"},
                                                      {"from": "gpt", "value": "Two kids."}]},
    ])
    out_vi, _ = build(tmp_path, vi, out=tmp_path / "m_vi")
    out_ll, summary = build(tmp_path, llava, out=tmp_path / "m_ll")
    assert summary.format == "llava"
    assert (out_vi / "samples.jsonl").read_bytes() == (out_ll / "samples.jsonl").read_bytes()
    assert (out_vi / "videos.jsonl").read_bytes() == (out_ll / "videos.jsonl").read_bytes()


def test_llava_multi_turn_is_kept(tmp_path):
    touch_videos(tmp_path / "videos", "v_a.mp4")
    src = tmp_path / "llava.jsonl"  # JSON Lines this time
    src.write_text(json.dumps({"video": "v_a", "conversations": [
        {"from": "human", "value": "<video>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Black."}]}) + "\n")
    out, _ = build(tmp_path, src)
    [sample] = read_lines(out / "samples.jsonl")
    assert [t["role"] for t in sample["conversations"]] == ["user", "assistant", "user", "assistant"]
    assert sample["conversations"][0]["content"] == "<video>\nWhat is it?"
    assert sample["conversations"][2]["content"] == "What colour?"


def test_every_problem_kind_is_recorded_and_no_unsafe_path_is_taken(tmp_path):
    root = tmp_path / "videos"
    touch_videos(root, "v_ok.mp4", "sub/v_nested.mp4")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "v_link.mp4")
    records = [
        {"q": "Q1", "a": "A1", "video_id": "v_ok"},
        {"q": "Q1", "a": "A1", "video_id": "v_ok"},  # duplicate
        {"q": "  ", "a": "A", "video_id": "v_ok"},  # empty question
        {"q": "Q", "a": "", "video_id": "v_ok"},  # empty answer
        {"q": "Q", "a": "A", "video_id": "v_missing"},
        {"q": "Q", "a": "A", "video_id": "../outside"},
        {"q": "Q", "a": "A", "video_id": str(outside.with_suffix(""))},  # absolute
        {"q": "Q", "a": "A", "video_id": "v_link"},  # symlink out of the root
        {"q": "Q", "a": "A", "video_id": "sub/v_nested"},  # a subfolder inside the root is fine
    ]
    src = tmp_path / "vi.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    out, summary = build(tmp_path, src)
    problems = read_lines(out / "problems.jsonl")
    kinds = [(p["kind"], p.get("video_id"), p.get("index")) for p in problems]
    assert ("bad_json_line", None, 9) in kinds
    assert ("duplicate_record", "v_ok", 1) in kinds
    assert ("empty_text", "v_ok", 2) in kinds and ("empty_text", "v_ok", 3) in kinds
    assert ("missing_video", "v_missing", None) in kinds
    assert ("unsafe_path", "../outside", None) in kinds
    assert ("unsafe_path", str(outside.with_suffix("")), None) in kinds
    assert ("unsafe_path", "v_link", None) in kinds
    assert len(problems) == 8
    assert all(p["reason"] for p in problems)
    assert dict(summary.problems) == {"bad_json_line": 1, "duplicate_record": 1, "empty_text": 2,
                                      "missing_video": 1, "unsafe_path": 3}
    videos = read_lines(out / "videos.jsonl")
    assert [v["path"] for v in videos] == ["sub/v_nested.mp4", "v_ok.mp4"]
    assert [s["video_id"] for s in read_lines(out / "samples.jsonl")] == ["v_ok", "sub/v_nested"]


def test_images_are_one_frame_videos_and_extensions_are_found(tmp_path):
    touch_videos(tmp_path / "videos", "a.webm", "b.avi", "c.mov", "d.jpg", "e.png", "f.webp", "g.jpeg")
    src = write_json(tmp_path / "vi.json", [{"q": "Q", "a": "A", "video_id": v} for v in "abcdefg"])
    out, _ = build(tmp_path, src)
    assert [(v["path"], v["kind"]) for v in read_lines(out / "videos.jsonl")] == [
        ("a.webm", "video"), ("b.avi", "video"), ("c.mov", "video"),
        ("d.jpg", "image"), ("e.png", "image"), ("f.webp", "image"), ("g.jpeg", "image")]


def test_split_is_per_video_and_deterministic(tmp_path):
    ids = [f"v_{i:03d}" for i in range(200)]
    touch_videos(tmp_path / "videos", *(f"{v}.mp4" for v in ids))
    src = write_json(tmp_path / "vi.json", [{"q": f"Q{k}", "a": "A", "video_id": v} for v in ids for k in range(3)])
    out, summary = build(tmp_path, src, val_fraction=0.25, seed=7)
    split = {v["video_id"]: v["split"] for v in read_lines(out / "videos.jsonl")}
    assert set(split.values()) == {"train", "val"}
    assert 30 <= summary.val <= 70  # a hash threshold, so about 25% of 200
    again, _ = build(tmp_path, src, val_fraction=0.25, seed=7, out=tmp_path / "again")
    assert (out / "videos.jsonl").read_bytes() == (again / "videos.jsonl").read_bytes()
    other, _ = build(tmp_path, src, val_fraction=0.25, seed=8, out=tmp_path / "other")
    assert {v["video_id"]: v["split"] for v in read_lines(other / "videos.jsonl")} != split


def test_growth_keeps_old_rows_byte_identical_and_appends(tmp_path):
    ids = [f"v_{c}" for c in "dbfa"]
    touch_videos(tmp_path / "videos", *(f"{v}.mp4" for v in ids))
    first = write_json(tmp_path / "first.json", [{"q": "Q", "a": "A", "video_id": v} for v in ids])
    out, _ = build(tmp_path, first, shard_size=3, val_fraction=0.3)
    old_videos = (out / "videos.jsonl").read_bytes()
    old_samples = (out / "samples.jsonl").read_bytes()
    old_meta = json.loads((out / "manifest.json").read_text())

    touch_videos(tmp_path / "videos", "v_c.mp4", "v_e.mp4")
    grown_records = [{"q": "Q", "a": "A", "video_id": v} for v in ids + ["v_e", "v_c"]]
    grown_records.append({"q": "Q2", "a": "A2", "video_id": "v_a"})  # a new sample of an old video
    grown = write_json(tmp_path / "grown.json", grown_records)
    _, summary = build(tmp_path, grown)  # shard size and split settings come from the manifest
    videos_bytes = (out / "videos.jsonl").read_bytes()
    assert videos_bytes.startswith(old_videos)
    new_rows = read_lines(out / "videos.jsonl")[len(ids):]
    assert [(v["row"], v["video_id"], v["shard"]) for v in new_rows] == [(4, "v_c", 1), (5, "v_e", 1)]
    assert (out / "samples.jsonl").read_bytes().startswith(old_samples)
    assert summary.new_videos == 2 and summary.new_samples == 3 and not summary.problems
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["manifest_id"] == old_meta["manifest_id"] and meta["fingerprint"] != old_meta["fingerprint"]
    assert load_manifest(out).n_shards == 2

    with pytest.raises(ValueError, match="shard_size"):
        build(tmp_path, grown, shard_size=5)


def test_max_videos_keeps_a_deterministic_subset_with_all_its_samples(tmp_path):
    ids = [f"v_{i:02d}" for i in range(20)]
    touch_videos(tmp_path / "videos", *(f"{v}.mp4" for v in ids))
    src = write_json(tmp_path / "vi.json", [{"q": f"Q{k}", "a": "A", "video_id": v} for v in ids for k in range(2)])
    out1, s1 = build(tmp_path, src, max_videos=5, out=tmp_path / "m1")
    out2, _ = build(tmp_path, src, max_videos=5, out=tmp_path / "m2")
    assert s1.videos == 5 and s1.samples == 10
    assert (out1 / "videos.jsonl").read_bytes() == (out2 / "videos.jsonl").read_bytes()
    kept = {v["video_id"] for v in read_lines(out1 / "videos.jsonl")}
    assert {s["video_id"] for s in read_lines(out1 / "samples.jsonl")} == kept


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_extract.py"), *args], capture_output=True, text=True)


def test_a_file_in_neither_format_is_a_one_line_error(tmp_path):
    touch_videos(tmp_path / "videos", "v_a.mp4")
    src = write_json(tmp_path / "other.json", [{"text": "hello", "label": 1}])
    result = run_cli("manifest", "--instructions", str(src), "--videos", str(tmp_path / "videos"),
                     "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "neither VideoInstruct-100K" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m" / "manifest.json").exists()


@pytest.mark.parametrize("cli", ["run_extract", "run_train"])
def test_every_flag_of_every_subcommand_has_help(cli):
    module = __import__(cli)
    parser = module.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"{cli} {name} {action.option_strings} has no help"
        script = [sys.executable, str(REPO / f"{cli}.py"), name, "--help"]
        assert subprocess.run(script, capture_output=True).returncode == 0


def test_hostile_text_is_taken_or_recorded_never_a_crash(tmp_path):
    """Invalid UTF-8 on one JSON Lines line, a 100k-character answer, `<video>` inside a
    question, a LLaVA conversation with no assistant turn."""
    touch_videos(tmp_path / "videos", "v_a.mp4", "v_b.mp4", "v_c.mp4")
    long_answer = "word " * 20_000
    lines = [json.dumps({"q": "What moves?", "a": "A disc.", "video_id": "v_a"}).encode(),
             b'{"q": "Bad \xff\xfe bytes", "a": "A.", "video_id": "v_b"}',
             json.dumps({"q": "Describe it.", "a": long_answer, "video_id": "v_b"}).encode(),
             json.dumps({"q": "Is <video> here the <video> marker?", "a": "No.", "video_id": "v_c"}).encode()]
    src = tmp_path / "vi.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out, summary = build(tmp_path, src)
    problems = read_lines(out / "problems.jsonl")
    assert [(p["kind"], p["index"]) for p in problems] == [("bad_json_line", 1)]
    assert "not UTF-8" in problems[0]["reason"]
    samples = {s["video_id"]: s for s in read_lines(out / "samples.jsonl") if s["video_id"] != "v_a"}
    assert samples["v_b"]["conversations"][1]["content"] == long_answer.strip()
    question = samples["v_c"]["conversations"][0]["content"]
    assert question.count("<video>") == 1 and question.startswith("<video>\n")

    listed = tmp_path / "vi.json"
    listed.write_bytes(b'[{"q": "Bad \xff", "a": "A.", "video_id": "v_a"}]')
    with pytest.raises(ValueError, match="vi.json: not UTF-8 at byte 12"):
        build(tmp_path, listed, out=tmp_path / "m2")

    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"video": "v_a", "conversations": [{"from": "human", "value": "<video>\nHi?"}]},
                                 {"video": "v_b", "conversations": [{"from": "human", "value": "Q?"},
                                                                    {"from": "gpt", "value": "A."}]}]))
    out3, _ = build(tmp_path, llava, out=tmp_path / "m3")
    assert [(p["kind"], p["video_id"]) for p in read_lines(out3 / "problems.jsonl")] == [("bad_conversation", "v_a")]
    assert [s["video_id"] for s in read_lines(out3 / "samples.jsonl")] == ["v_b"]
