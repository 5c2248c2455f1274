"""Conversations about several videos: imported from LLaVA records naming a list of videos, kept in
samples.jsonl as `video_ids`, tokenised with a placeholder run per marker, spliced (one gather
per batch) with each run's own video, trained on, evaluated and asked in chat."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F_

from manifests.build import ManifestConfig, build_manifest
from manifests.demo_corpus import DIRECTIONS, PAIR_TYPE, pair_records, plan_pairs, plan_videos
from manifests.formats import read_instructions
from manifests.manifest import load_manifest
from model.video_lm import splice_video_tokens
from trainer import TrainConfig, train
from trainer.batching import make_batch
from trainer.chat import ChatConfig, open_chat
from trainer.evaluate import EvalConfig, evaluate
from trainer.examples import build_examples
from trainer.features import make_features
from trainer.run import load_run
from trainer.store import check_store_matches_manifest, open_store
from trainer.tokenization import IGNORE, ChatTokenizer, train_bpe
from trainer_helpers import make_manifest, make_store, tiny_train_args

PAIR_QUESTION = "Do both objects have the same colour?"


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def _pair(a: str, b: str, answer: str, question: str = PAIR_QUESTION) -> dict:
    return {"video": [f"{a}.mp4", f"{b}.mp4"], "conversations": [
        {"from": "human", "value": f"<video>\n<video>\n{question}"}, {"from": "gpt", "value": answer}]}


# --- import --------------------------------------------------------------------------------------


def test_llava_records_with_several_videos_keep_a_marker_per_video_where_it_stands(tmp_path):
    records = [
        {"video": ["a.mp4", "b.mp4"], "conversations": [
            {"from": "human", "value": "First <image> then <video>. Same?\nQA_GT_caption_based_noisy"},
            {"from": "gpt", "value": "No."}]},
        {"image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
            {"from": "human", "value": "Which one is red?"}, {"from": "gpt", "value": "The second."}]},
        {"video": ["a.mp4", "b.mp4"], "conversations": [
            {"from": "human", "value": "<video> Same?"}, {"from": "gpt", "value": "Yes."}]},
        {"image": "c.jpg", "conversations": [
            {"from": "human", "value": "What is <image> this?"}, {"from": "gpt", "value": "A cat."}]},
    ]
    got, problems, fmt = read_instructions(_write(tmp_path / "in.json", records))
    assert fmt == "llava"
    assert [(r.video_refs, r.conversations[0]["content"]) for r in got] == [
        (("a.mp4", "b.mp4"), "First\n<video>\nthen\n<video>\n. Same?"),
        (("a.jpg", "b.jpg", "c.jpg"), "<video>\n<video>\n<video>\nWhich one is red?"),
        (("c.jpg",), "<video>\nWhat is this?"),  # one video: the marker moves to the front, as always
    ]
    assert [(p.kind, p.index, p.reason) for p in problems] == [
        ("bad_conversation", 2, "2 videos but 1 <video>/<image> markers")]


@pytest.fixture
def paired(tmp_path) -> dict:
    """make_manifest's 12 dummy videos, grown with a pairs file (one pair names a missing video),
    and a store for it."""
    manifest = make_manifest(tmp_path)
    before = (manifest / "samples.jsonl").read_bytes()
    pairs = [_pair("v_000", "v_004", "Yes, both are red."), _pair("v_001", "v_002", "No."),
             _pair("v_005", "v_009", "No."), _pair("v_002", "v_001", "No."), _pair("v_001", "v_gone", "No.")]
    build_manifest(ManifestConfig(_write(tmp_path / "pairs.json", pairs), tmp_path / "videos", manifest))
    store = make_store(tmp_path / "store.zarr", manifest)
    return {"root": tmp_path, "manifest": manifest, "store": store, "before": before}


def test_a_grown_manifest_keeps_its_lines_and_adds_the_pairs_in_marker_order(paired):
    manifest = paired["manifest"]
    lines = (manifest / "samples.jsonl").read_bytes()
    assert lines.startswith(paired["before"])
    added = [json.loads(line) for line in lines[len(paired["before"]):].decode().splitlines()]
    assert [r["video_ids"] for r in added] == [["v_000", "v_004"], ["v_001", "v_002"], ["v_005", "v_009"], ["v_002", "v_001"]]
    assert all("video_id" not in r for r in added)
    problems = [json.loads(line) for line in (manifest / "problems.jsonl").read_text().splitlines()]
    assert [(p["kind"], p["video_id"]) for p in problems] == [("missing_video", "v_gone")]


def test_a_pair_is_in_val_when_either_video_is(paired):
    videos = {json.loads(line)["video_id"]: json.loads(line) for line in (paired["manifest"] / "videos.jsonl").read_text().splitlines()}
    store = open_store(paired["store"])
    tok = ChatTokenizer(train_bpe(["What colour is it? Yes, both are red. No."], 300))
    manifest = load_manifest(paired["manifest"])
    seen = {}
    for split in ("train", "val"):
        for e in build_examples(manifest, store, tok, split, 4, 128, keep_conversations=True).items:
            seen.setdefault(split, []).append(e.rows)
    for ids in (["v_000", "v_004"], ["v_001", "v_002"], ["v_005", "v_009"], ["v_002", "v_001"]):
        want = "val" if any(videos[v]["split"] == "val" for v in ids) else "train"
        rows = tuple(videos[v]["row"] for v in ids)
        assert rows in seen[want] and rows not in seen[{"train": "val", "val": "train"}[want]]
    firsts = {(videos[a]["split"], videos[b]["split"]) for a, b in (["v_000", "v_004"], ["v_005", "v_009"])}
    assert firsts == {("val", "train"), ("train", "val")}  # a val video first, and second


def test_a_manifest_grown_with_conversations_only_is_no_warning(caplog):
    """A store of the same videos as a manifest grown with conversations: said at INFO; a store
    lacking videos of the manifest: a warning with how many."""
    store = SimpleNamespace(attrs={"manifest_id": "m", "manifest_fingerprint": "old"}, n_rows=12, path="s.zarr")
    grown = SimpleNamespace(manifest_id="m", fingerprint="new", videos=[None] * 12, dir="manifest")
    with caplog.at_level(logging.INFO, logger="trainer"):
        check_store_matches_manifest(store, grown)
        assert [(r.levelno, "changed since store" in r.getMessage()) for r in caplog.records] == [(logging.INFO, True)]
        caplog.clear()
        check_store_matches_manifest(store, SimpleNamespace(**{**vars(grown), "videos": [None] * 15}))
        assert [(r.levelno, "the other 3 are skipped" in r.getMessage()) for r in caplog.records] == [(logging.WARNING, True)]
        caplog.clear()
        check_store_matches_manifest(store, SimpleNamespace(**{**vars(grown), "fingerprint": "old"}))
        assert not caplog.records


# --- tokenisation and splice ---------------------------------------------------------------------


def test_each_marker_becomes_a_run_where_it_stands():
    tok = ChatTokenizer(train_bpe(["First then Same? Yes. user assistant"], 300))
    conversation = [{"role": "user", "content": "First\n<video>\nthen\n<video>\n. Same?"},
                    {"role": "assistant", "content": "Yes."}]
    enc = tok.encode_conversation(conversation, 3)
    t, run = tok.encode_text, [tok.video_id] * 3 + tok.encode_text("\n")
    user = [tok.im_start_id] + t("user\n") + t("First") + run + t("then") + run + t(". Same?") + [tok.im_end_id] + t("\n")
    answer = t("Yes.") + [tok.im_end_id]
    head = [tok.im_start_id] + t("assistant\n")
    assert enc.input_ids == user + head + answer + t("\n")
    assert enc.labels == [IGNORE] * len(user + head) + answer + [IGNORE] * len(t("\n"))
    # one marker (or none): the run opens the first user turn, as before
    one = tok.encode_conversation([{"role": "user", "content": "<video>\nSame?"}, {"role": "assistant", "content": "Yes."}], 3)
    assert one.input_ids[: len(t("user\n")) + 1 + len(run)] == [tok.im_start_id] + t("user\n") + run


def test_the_splice_gives_each_run_its_own_video_in_order():
    g = torch.Generator().manual_seed(0)
    counts = [2, 0, 1, 3]
    B, L, N, dim = len(counts), 40, 3, 5
    embeddings = torch.randn(B, L, dim, generator=g)
    videos = torch.randn(sum(counts), N, dim, generator=g)
    placeholder = torch.zeros(B, L, dtype=torch.bool)
    for b, k in enumerate(counts):  # runs at seeded places, one after another
        start = 1
        for _ in range(k):
            start += int(torch.randint(0, 4, (1,), generator=g))
            placeholder[b, start : start + N] = True
            start += N
    got = splice_video_tokens(embeddings, placeholder, videos, torch.tensor(counts))
    # the reference: a loop over samples, taking its videos' tokens one by one
    expected = embeddings.numpy().copy()
    flat, first = videos.numpy().reshape(-1, dim), np.cumsum([0] + counts[:-1]) * N
    for b in range(B):
        for k, position in enumerate(np.flatnonzero(placeholder[b].numpy())):
            expected[b, position] = flat[first[b] + k]
    np.testing.assert_array_equal(got.numpy(), expected)
    one_each = splice_video_tokens(embeddings[:1], placeholder[:1, :], videos[:2].reshape(1, 2 * N, dim))
    np.testing.assert_array_equal(one_each.numpy(), expected[:1])  # counts None: one video per sample
    with pytest.raises(ValueError, match="per video"):
        splice_video_tokens(embeddings, placeholder, videos, torch.tensor([1, 0, 1, 3]))


def test_a_batch_with_pairs_has_the_loss_of_each_sample_spliced_by_hand(paired):
    manifest, store = load_manifest(paired["manifest"]), open_store(paired["store"])
    run = paired["root"] / "run"
    train(TrainConfig(**tiny_train_args(paired["manifest"], paired["store"], run, steps=2)))
    loaded = load_run(run, torch.device("cpu"))
    model, tok = loaded.model.eval(), loaded.tok
    N = model.cfg.n_video_tokens
    items = build_examples(manifest, store, tok, "train", N, 128).items
    pair = next(e for e in items if len(e.rows) == 2)
    single = next(e for e in items if len(e.rows) == 1)
    features = make_features("disk", store.path, [], torch.device("cpu"))
    batch = make_batch([pair, single, pair], features, tok.pad_id)
    assert batch.rows.tolist() == [*pair.rows, *single.rows, *pair.rows] and batch.video_counts.tolist() == [2, 1, 2]
    with torch.no_grad():
        _, loss = model(batch.input_ids, batch.attention_mask, batch.video, batch.labels, batch.video_counts)
        total, targets = 0.0, 0
        for example in (pair, single, pair):
            ids = torch.as_tensor(example.input_ids)[None]
            h = model.lm.tok_embeddings(ids)[0].clone()
            runs = np.flatnonzero(example.input_ids == tok.video_id).reshape(len(example.rows), N)
            for positions, row in zip(runs, example.rows):  # the k-th run takes the k-th video
                video = torch.from_numpy(np.asarray(features.fetch([row]))).float()
                h[torch.as_tensor(positions)] = model.projector(model.summary(video))[0]
            logits = model.lm(embeddings=h[None])[0]
            labels = torch.as_tensor(example.labels)
            total += float(F_.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum"))
            targets += int((labels[1:] != IGNORE).sum())
        assert float(loss) == pytest.approx(total / targets, rel=1e-5)
        swapped = batch.video.clone()
        swapped[[0, 1]] = batch.video[[1, 0]]
        _, other = model(batch.input_ids, batch.attention_mask, swapped, batch.labels, batch.video_counts)
        assert float(other) != pytest.approx(float(loss), rel=1e-6)  # which video fills which run matters


def test_eval_and_chat_take_the_pairs(paired, tmp_path):
    run = paired["root"] / "run"
    train(TrainConfig(**tiny_train_args(paired["manifest"], paired["store"], run, steps=2)))
    videos = {json.loads(line)["video_id"]: json.loads(line) for line in (paired["manifest"] / "videos.jsonl").read_text().splitlines()}
    pairs = [("v_000", "v_004", "yes"), ("v_001", "v_002", "no"), ("v_005", "v_009", "no"), ("v_002", "v_001", "no")]
    labels = {f"{a}+{b}": {"same colour": {"question": PAIR_QUESTION, "answer": answer}} for a, b, answer in pairs}
    labels_path = _write(tmp_path / "labels.json", labels)  # type: ignore[arg-type]
    report = evaluate(EvalConfig(run=run, labels=labels_path, threads=1, max_new_tokens=4))
    val_pairs = sum(any(videos[v]["split"] == "val" for v in (a, b)) for a, b, _ in pairs)
    assert val_pairs and report["by_type"]["same colour"]["n"] == val_pairs
    assert report["by_type"]["same colour"]["chance"] == 0.5

    session = open_chat(ChatConfig(run=run, store=paired["store"], row=[videos["v_003"]["row"], videos["v_001"]["row"]],
                                   max_new_tokens=3, threads=1))
    tokens = open_store(paired["store"])
    import zarr

    stored = zarr.open_group(str(tokens.path), mode="r")["tokens"]
    expected = np.stack([stored[videos["v_003"]["row"]], stored[videos["v_001"]["row"]]])
    np.testing.assert_array_equal(session.video.numpy(), expected)
    session.answer(PAIR_QUESTION)
    prompt = session.history[0]["content"]
    assert prompt == f"<video>\n<video>\n{PAIR_QUESTION}"


# --- the demo's two-video question ---------------------------------------------------------------


def test_demo_pairs_are_balanced_and_labelled_from_the_directions(tmp_path):
    videos = plan_videos(40, 0)
    pairs = plan_pairs(videos, 0)
    records, labels = pair_records(videos, pairs)
    direction = {v.video_id: v.direction for v in videos}
    assert [i for i, _, _ in pairs] == list(range(0, 40, 2))  # every other video opens a pair
    asked = []
    for (key, entry), record in zip(labels.items(), records):
        a, b = key.split("+")
        assert record["video"] == [f"{a}.mp4", f"{b}.mp4"] and a != b
        assert entry[PAIR_TYPE]["answer"] == ("yes" if direction[a] == direction[b] else "no")
        asked.append((entry[PAIR_TYPE]["question"], entry[PAIR_TYPE]["answer"]))
    # half "yes", and each phrasing as often with either answer: the words do not give it away
    assert [a for _, a in asked].count("yes") == 10
    assert {combo: asked.count(combo) for combo in set(asked)} == {
        (q, a): 5 for q in {q for q, _ in asked} for a in ("yes", "no")}
    assert set(direction.values()) == set(DIRECTIONS)
    parsed, problems, _ = read_instructions(_write(tmp_path / "pairs.json", records))
    assert not problems and all(len(r.video_refs) == 2 and r.conversations[0]["content"].count("<video>") == 2 for r in parsed)
