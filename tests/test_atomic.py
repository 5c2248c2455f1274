"""pipeline.atomic: a file appears whole or not at all, and its temporaries are the store's kind."""

from __future__ import annotations

import time

import pytest

from pipeline.atomic import atomic_path, temporary_name, write_atomic
from pipeline.storage import StoreLocation


def test_write_atomic_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "first ü\n")
    assert path.read_bytes() == "first ü\n".encode("utf-8")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.h5"):
        raise RuntimeError("failed before writing anything")
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    path = tmp_path / "config.json"
    with atomic_path(path) as first, atomic_path(path) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert path.read_text() == "first"  # the outer block ends last: its rename wins
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_temporaries_are_what_the_store_skips_and_cleans_up(tmp_path):
    """A writer killed between write and rename leaves a temporary: never listed as an object,
    deleted by `remove_temporaries`."""
    location = StoreLocation(tmp_path)
    location.write("commits/shard-000000.json", b"{}")
    left = tmp_path / "commits" / temporary_name("shard-000001.json")
    assert left.name.startswith("shard-000001.json.") and left.name.endswith(".tmp")
    left.write_bytes(b"{")
    assert location.list("commits") == ["shard-000000.json"]
    assert location.remove_temporaries(older_than=time.time() + 1) == 1
    assert sorted(p.name for p in (tmp_path / "commits").iterdir()) == ["shard-000000.json"]
