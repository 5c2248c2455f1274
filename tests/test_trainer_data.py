"""Datasets over the feature store: skipped rows, disk vs ram features, the batch plan."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import zarr

from manifests.manifest import load_manifest
from trainer.batching import BatchDataset, BatchPlan, BatchStream, make_batch
from trainer.examples import add_text_only, build_examples
from trainer.features import DiskFeatures, RamFeatures
from trainer.errors import TrainerError
from trainer.store import check_store_matches_manifest, open_store
from trainer.tokenization import IGNORE, ChatTokenizer, conversation_texts, train_bpe
from trainer_helpers import F, T, D, make_manifest, make_store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    manifest_dir = make_manifest(root, n_videos=12)
    manifest = load_manifest(manifest_dir)
    # row 1 failed, row 2 pending
    store = open_store(make_store(root / "store.zarr", manifest_dir, status={1: 2, 2: 0}))
    texts = [t for s in manifest.samples() for t in conversation_texts(s.conversations)]
    tok = ChatTokenizer(train_bpe(texts, vocab_size=320))
    return {"root": root, "manifest": manifest, "store": store, "tok": tok}


def test_rows_that_are_not_ok_are_skipped_and_counted(corpus):
    manifest, store, tok = corpus["manifest"], corpus["store"], corpus["tok"]
    split = {v.row: v.split for v in manifest.videos}
    per_row = Counter(manifest.videos[[v.video_id for v in manifest.videos].index(s.key)].row for s in manifest.samples())
    for name in ("train", "val"):
        ex = build_examples(manifest, store, tok, name, n_video_tokens=4, max_len=128)
        ok_rows = [r for r in per_row if split[r] == name and r not in (1, 2)]
        assert len(ex) == sum(per_row[r] for r in ok_rows)
        expected_skips = Counter()
        for row, why in ((1, "video failed"), (2, "video pending")):
            if split[row] == name:
                expected_skips[why] = per_row[row]
        assert ex.skipped == expected_skips
        assert {e.rows for e in ex.items} == {(row,) for row in ok_rows}
        for e in ex.items:  # every sample holds one placeholder run and learns something
            assert (e.input_ids == tok.video_id).sum() == 4
            assert (e.labels != IGNORE).any()


def test_long_samples_are_cut_and_prompts_that_do_not_fit_skipped(corpus):
    manifest, store, tok = corpus["manifest"], corpus["store"], corpus["tok"]
    full = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=1000)
    longest = max(full.lengths)
    cut = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=longest - 2)
    assert max(cut.lengths) == longest - 2 and cut.truncated >= 1 and len(cut) == len(full)
    tiny = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=5)
    assert len(tiny) == 0 and tiny.skipped["prompt longer than max_len"] == len(full)


def test_text_only_copies_drop_the_video_and_keep_the_answers(corpus):
    manifest, store, tok = corpus["manifest"], corpus["store"], corpus["tok"]
    ex = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=1000, keep_conversations=True)
    with_video = list(ex.items)
    added = add_text_only(ex, tok, 0.5, seed=3, max_len=1000)
    assert added == round(0.5 * len(with_video)) and ex.items[: len(with_video)] == with_video
    copies = ex.items[len(with_video):]
    assert len({c.sample for c in copies}) == added  # distinct samples
    by_sample = {e.sample: e for e in with_video}
    for copy in copies:
        original = by_sample[copy.sample]
        assert copy.rows == original.rows and not (copy.input_ids == tok.video_id).any()
        # the same text once the placeholder run and the line break after it are gone, the same answers learnt
        ids = original.input_ids.tolist()
        start, gap = ids.index(tok.video_id), 4 + len(tok.encode_text("\n"))
        assert copy.input_ids.tolist() == ids[:start] + ids[start + gap:]
        assert copy.labels[copy.labels != IGNORE].tolist() == original.labels[original.labels != IGNORE].tolist()
    again = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=1000, keep_conversations=True)
    add_text_only(again, tok, 0.5, seed=3, max_len=1000)
    assert [c.sample for c in again.items[len(with_video):]] == [c.sample for c in copies]  # a function of the seed


def test_disk_and_ram_features_give_identical_batches(corpus):
    manifest, store, tok = corpus["manifest"], corpus["store"], corpus["tok"]
    ex = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=128)
    plan = BatchPlan(ex.lengths, batch_size=3, grad_accum=2, seed=5)
    disk = BatchStream(BatchDataset(ex.items, DiskFeatures(store.path), tok.pad_id), plan, workers=2)
    assert disk.loader is not None  # worker processes, each opening the store itself
    ram = BatchStream(BatchDataset(ex.items, RamFeatures(store.path, ex.rows), tok.pad_id), plan, workers=2)
    assert ram.loader is None
    raw = zarr.open_group(str(store.path), mode="r")["tokens"][:]
    for epoch in (0, 1):
        disk_batches, ram_batches = list(disk.epoch(epoch)), list(ram.epoch(epoch))
        assert len(disk_batches) == len(ram_batches) == plan.steps_per_epoch * 2
        for a, b in zip(disk_batches, ram_batches):
            for name in ("input_ids", "labels", "attention_mask", "video", "rows"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert a.video.dtype == torch.float16 and a.video.shape[1:] == (F, T, D)
            np.testing.assert_array_equal(a.video.numpy(), raw[a.rows.numpy()])  # the store's own values
    # a resumed epoch starts mid-way with exactly the remaining batches
    assert [b.rows.tolist() for b in disk.epoch(1, start_step=1)] == [b.rows.tolist() for b in ram_batches[2:]]


def test_disk_reads_any_rows_as_the_store_holds_them(corpus):
    store = corpus["store"]
    raw = zarr.open_group(str(store.path), mode="r")["tokens"][:]  # the whole array, read plainly
    features = DiskFeatures(store.path)
    # runs within a shard (4 rows a shard), a run across shards (3, 4, 5), repeats, any order
    for rows in ([7, 3, 4, 5, 3, 11, 0], [11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 9, 2]):
        got = features.fetch(rows)
        assert got.dtype == torch.float16
        np.testing.assert_array_equal(got.numpy(), raw[rows])
    assert tuple(features.fetch([]).shape) == (0, F, T, D)


def test_a_batch_crosses_to_the_training_process_by_value(corpus):
    """One message on the worker's queue holding the tensors' bytes, not a shared-memory file per
    tensor (whose descriptors the receiver fetches one connection each)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions, as a DataLoader worker has them

    manifest, store, tok = corpus["manifest"], corpus["store"], corpus["tok"]
    ex = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=128)
    batch = make_batch(ex.items[:3], DiskFeatures(store.path), tok.pad_id)
    message = bytes(ForkingPickler.dumps(batch))
    assert len(message) > batch.video.numel() * 2 + batch.input_ids.numel() * 8
    again = pickle.loads(message)
    for name in ("input_ids", "labels", "attention_mask", "video", "rows", "video_counts"):
        want, got = getattr(batch, name), getattr(again, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_batches_pad_to_the_longest_sample(corpus):
    manifest, store, tok = corpus["manifest"], corpus["store"], corpus["tok"]
    ex = build_examples(manifest, store, tok, "train", n_video_tokens=4, max_len=128)
    items = sorted(ex.items, key=lambda e: len(e.input_ids))
    chosen = [items[0], items[-1]]
    batch = make_batch(chosen, DiskFeatures(store.path), tok.pad_id)
    assert batch.input_ids.shape == (2, len(items[-1].input_ids))
    n = len(items[0].input_ids)
    assert batch.attention_mask[0].tolist() == [True] * n + [False] * (batch.input_ids.shape[1] - n)
    assert (batch.input_ids[0, n:] == tok.pad_id).all() and (batch.labels[0, n:] == IGNORE).all()
    assert tok.pad_id != tok.video_id


def test_batch_plan_is_a_distributed_sampler_reshuffled_per_epoch():
    lengths = [5 + (i * 7) % 11 for i in range(23)]
    single = BatchPlan(lengths, batch_size=4, grad_accum=1, world=1, seed=3)
    ranks = [BatchPlan(lengths, batch_size=2, grad_accum=1, world=2, rank=r, seed=3) for r in (0, 1)]
    accum = BatchPlan(lengths, batch_size=2, grad_accum=2, world=1, seed=3)
    assert single.steps_per_epoch == 6 == ranks[0].steps_per_epoch
    for epoch in (0, 1):
        for step in range(single.steps_per_epoch):
            (whole,) = single.step_batches(epoch, step)
            split = ranks[0].step_batches(epoch, step)[0] + ranks[1].step_batches(epoch, step)[0]
            assert sorted(whole) == sorted(split)  # two processes see the same global batch
            assert sorted(whole) == sorted(sum(accum.step_batches(epoch, step), []))
            assert not set(ranks[0].step_batches(epoch, step)[0]) & set(ranks[1].step_batches(epoch, step)[0])
        seen = [i for step in range(single.steps_per_epoch) for i in single.step_batches(epoch, step)[0]]
        assert set(seen) == set(range(23)) and len(seen) == 24  # all samples; the last batch filled up
    order = lambda e: [i for s in range(6) for i in single.step_batches(e, s)[0]]  # noqa: E731
    assert order(0) != order(1)  # reshuffled per epoch
    assert order(1) == order(1)


def test_store_from_another_manifest_is_refused(corpus, tmp_path):
    other = make_manifest(tmp_path / "other", n_videos=5, seed=9)
    # a different manifest id (its content differs)
    store = open_store(make_store(tmp_path / "other.zarr", other))
    with pytest.raises(TrainerError, match="was extracted from manifest"):
        check_store_matches_manifest(store, corpus["manifest"])
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(TrainerError, match="not a Zarr feature store|format version"):
        open_store(tmp_path / "empty.zarr")
    with pytest.raises(TrainerError, match="no such feature store"):
        open_store(tmp_path / "missing.zarr")
