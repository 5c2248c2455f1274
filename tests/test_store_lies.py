"""A store edited to lie (issue 12, bad inputs): attributes, array metadata or commit records
changed by hand. `verify` names each lie in one line, `extract` refuses the store (one line,
exit 2) or redoes the shards whose record does not hold, and the trainer refuses the store or
reads the shard as not done: the same rule as `extract`.

One store of 6 rows in 3 shards of 2 (frames F = 4; row 0 a broken file) is extracted once;
each test lies in a copy of it. The expected lines are written out here from what was edited,
not from the code's own output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr

import run_extract
from corpus_helpers import corpus_with_a_broken_file
from pipeline.extract import ExtractConfig, extract
from pipeline.inspect import status, verify
from pipeline.store_format import PENDING, encoder_fingerprint
from trainer.errors import TrainerError
from trainer.store import open_store

F = 4
DAMAGED = "the store was edited or is damaged"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("lies")
    store = root / "store.zarr"
    _extract(corpus_with_a_broken_file(root, seed=3, shard_size=2), store)
    assert verify(store, root / "manifest") == []
    group = zarr.open_group(store, mode="r")
    assert group["tokens"].shape[:2] == (6, F) and group["status"][:].tolist() == [2, 1, 1, 1, 1, 1]
    return root, store


def _extract(manifest: Path, store: Path):
    return extract(ExtractConfig(manifest=manifest, store=store, encoder="demo-tiny", pretrained="none", frames=F,
                                 batch_size=16))


@pytest.fixture
def lie(made, tmp_path):
    """A fresh copy of the store and a way to edit one of its JSON files in place."""
    root, store = made
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)

    def edit(name: str, change) -> None:  # noqa: ANN001 - change(dict) edits in place, or returns a new value
        path = copy / name
        if change is None:  # deleted
            shutil.rmtree(path)
            return
        data = json.loads(path.read_text())
        changed = change(data)
        path.write_text(json.dumps(data if changed is None else changed))

    return root, copy, edit


def _cli(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """run_extract.py in this process: exit code, stdout lines, stderr lines (no traceback escapes)."""
    capsys.readouterr()
    code = run_extract.main(list(args))
    out = capsys.readouterr()
    return code, out.out.splitlines(), [line for line in out.err.splitlines() if not line.startswith("WARNING")]


def _cli_extract(capsys, root: Path, store: Path, *extra: str) -> tuple[int, list[str], list[str]]:
    return _cli(capsys, "extract", "--manifest", str(root / "manifest"), "--store", str(store), "--encoder",
                "demo-tiny", "--pretrained", "none", "--frames", str(F), "--batch-size", "16", *extra)


def _attrs(change):  # noqa: ANN001, ANN202
    """An edit of the group's attributes (in zarr.json)."""
    def edit(meta: dict) -> None:
        changed = change(meta["attributes"])
        if changed is not None:
            meta["attributes"] = changed
    return edit


def _set(**values):  # noqa: ANN202
    return _attrs(lambda a: a.update(values))


def _width_everywhere(attrs: dict) -> None:
    """A careful liar: width changed in the encoder record too, and its fingerprint recomputed."""
    attrs["width"] = attrs["encoder"]["width"] = 2 * attrs["width"]
    attrs["encoder_fingerprint"] = encoder_fingerprint(attrs["encoder"])


def _t(made) -> int:  # noqa: ANN001
    return zarr.open_group(made[1], mode="r")["tokens"].shape[2]


# (what was edited, the file, the edit, what every command must say); {T} and {D}: the real sizes
ATTR_LIES = [
    ("frames", "zarr.json", _set(frames=8), ["attributes say frames 8 but array tokens has 4",
                                            "attributes say frames 8 but array frame_index has 4"]),
    ("tokens_per_frame", "zarr.json", _attrs(lambda a: a.update(tokens_per_frame=a["tokens_per_frame"] + 1)),
     ["attributes say tokens_per_frame {T+1} but array tokens has {T}",
      "attribute tokens_per_frame is {T+1} but the encoder record says {T}"]),
    ("width", "zarr.json", _attrs(_width_everywhere), ["attributes say width {2D} but array tokens has {D}"]),
    ("more rows", "zarr.json", _set(n_rows=8), ["attributes say n_rows 8 but array tokens has 6"]),
    ("fewer rows", "zarr.json", _set(n_rows=4), ["attributes say n_rows 4 but array tokens has 6"]),
    ("shard size", "zarr.json", _set(shard_size=3),
     ["attributes say shard_size 3 but array tokens holds 2 rows per shard object"]),
    ("encoder name", "zarr.json", _attrs(lambda a: a["encoder"].update(model="ViT-L-14")),
     ["the encoder record does not match encoder_fingerprint"]),
    ("not an object", "zarr.json", _attrs(lambda a: "frames=4"), ["the attributes are a str, not an object"]),
    ("key missing", "zarr.json", _attrs(lambda a: a.pop("frames") and None), ["attributes missing: frames"]),
    ("string for int", "zarr.json", _set(shard_size="2"), ["attribute shard_size is '2' (str), expected int"]),
    ("format version", "zarr.json", _set(format_version=7), ["store format 7, this version reads 1"]),
    ("tokens dtype", "tokens/zarr.json", lambda m: m.update(data_type="float32"),
     ["array tokens is float32, the format says float16"]),
    ("tokens rows", "tokens/zarr.json", lambda m: m["shape"].__setitem__(0, 4),
     ["attributes say n_rows 6 but array tokens has 4"]),
    ("status shape", "status/zarr.json", lambda m: m.update(shape="big"), ["array status has unreadable metadata"]),
    ("status deleted", "status", None, ["array status is missing"]),
    ("status a group", "status/zarr.json", lambda m: {"zarr_format": 3, "node_type": "group", "attributes": {}},
     ["array status is missing"]),
]


@pytest.mark.parametrize("name,file,change,says", ATTR_LIES, ids=[lie[0] for lie in ATTR_LIES])
def test_attributes_that_disagree_with_the_arrays_are_named_and_refused(lie, made, capsys, name, file, change, says):
    root, store, edit = lie
    T, D = _t(made), zarr.open_group(made[1], mode="r")["tokens"].shape[3]
    says = [s.replace("{T+1}", str(T + 1)).replace("{T}", str(T)).replace("{2D}", str(2 * D)).replace("{D}", str(D))
            for s in says]
    edit(file, change)

    problems = verify(store)
    for line in says:
        assert any(p.startswith(f"store: {line}") for p in problems), problems
    assert all(p.startswith("store: ") for p in problems), problems
    code, out, err = _cli(capsys, "verify", "--store", str(store))
    assert code == 1 and out == [*problems, f"{store}: {len(problems)} problem(s)"]

    code, out, err = _cli_extract(capsys, root, store)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {store}: ") and err[0].endswith(DAMAGED), err
    assert all(line in err[0] for line in says), err

    with pytest.raises(TrainerError) as refused:
        open_store(store)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"store {store}: ") and message.endswith(DAMAGED)
    assert all(line in message for line in says), message


def test_a_consistently_renamed_encoder_leaves_no_shard_done(lie, capsys):
    """The attributes agree with themselves and the arrays, but no commit record names this encoder."""
    root, store, edit = lie

    def rename(attrs: dict) -> None:
        attrs["encoder"]["model"] = "ViT-L-14"
        attrs["encoder_fingerprint"] = encoder_fingerprint(attrs["encoder"])

    edit("zarr.json", _attrs(rename))
    fingerprint = json.loads((store / "zarr.json").read_text())["attributes"]["encoder_fingerprint"]
    problems = verify(store)
    for shard, rows in ((0, "0-1"), (1, "2-3"), (2, "4-5")):
        assert any(p.startswith(f"shard {shard} (rows {rows}): committed with encoder ")
                   and p.endswith(f", the store's is {fingerprint}") for p in problems), problems
    assert (open_store(store).status == PENDING).all()
    code, out, err = _cli_extract(capsys, root, store)
    assert code == 2 and len(err) == 1 and "was made with another encoder: model 'ViT-L-14'" in err[0], err


def test_edited_sampling_leaves_no_shard_done_and_extract_refuses(lie, capsys):
    root, store, edit = lie
    edit("zarr.json", _set(sampling="keyframe"))
    problems = verify(store)
    assert len(problems) == 3 and all("the store's attributes changed since this shard was committed" in p
                                      for p in problems), problems
    assert (open_store(store).status == PENDING).all(), "the trainer must not read rows committed under other attributes"
    assert status(store).shards_done == 0
    code, out, err = _cli_extract(capsys, root, store)
    assert code == 2 and err == [f"error: {store} was made with sampling 'keyframe', asked for 'uniform'; use the "
                                 "store's settings or a new --store"], err


def test_an_edited_manifest_id_is_named(lie, capsys):
    root, store, edit = lie
    edit("zarr.json", _set(manifest_id="someone-else"))
    real = json.loads((root / "manifest" / "manifest.json").read_text())["manifest_id"]
    assert verify(store, root / "manifest")[0] == f"store: made from manifest someone-else, not {real}"
    assert (open_store(store).status == PENDING).all()
    code, out, err = _cli_extract(capsys, root, store)
    assert code == 2 and len(err) == 1 and "was made from another manifest (id someone-else" in err[0], err


# --- commit records --------------------------------------------------------------------------------


def _commit(shard: int, change):  # noqa: ANN001, ANN202
    return f"commits/shard-{shard:06d}.json", change


COMMIT_LIES = [
    ("rows range", *_commit(1, lambda c: c.update(rows=[2, 5])),
     "the record covers rows [2, 5], the attributes give shard 1 rows [2, 4]"),
    ("shard number", *_commit(1, lambda c: c.update(shard=2)), "commit record names shard 2, but it is shard 1's file"),
    ("spec sha", *_commit(1, lambda c: c.update(spec_sha256="0" * 64)),
     "the store's attributes changed since this shard was committed (edited?): spec_sha256 000000000000"),
    ("encoder fingerprint", *_commit(1, lambda c: c.update(encoder_fingerprint="feedfacefeedface")),
     "committed with encoder feedfacefeedface, the store's is "),
    ("rows as a string", *_commit(1, lambda c: c.update(rows="2-4")),
     "commit record field rows is '2-4', expected [start, stop]"),
    ("failures not a list", *_commit(2, lambda c: c.update(failures="none")),
     "commit record field failures is not a list of {row, video_id, reason}"),
    ("count as a string", *_commit(2, lambda c: c.update(ok="one")), "commit record field ok is 'one', expected a count"),
    ("key missing", *_commit(2, lambda c: c.pop("data_sha256") and None), "commit record lacks data_sha256"),
    ("not an object", *_commit(2, lambda c: [c]), "commit record is a JSON list, not an object"),
]


@pytest.mark.parametrize("name,file,change,says", COMMIT_LIES, ids=[lie[0] for lie in COMMIT_LIES])
def test_a_lying_commit_record_is_named_not_done_and_redone(lie, capsys, name, file, change, says):
    root, store, edit = lie
    shard = int(file[-8:-5])
    rows = f"{2 * shard}-{2 * shard + 1}"
    edit(file, change)
    before = zarr.open_group(store, mode="r")["status"][:]

    problems = verify(store)
    assert len(problems) == 1 and problems[0].startswith(f"shard {shard} (rows {rows}): {says}"), problems
    assert status(store).shards_done == 2
    read = open_store(store).status  # the trainer: the shard is not done, the others are
    expected = before.copy()
    expected[2 * shard: 2 * shard + 2] = PENDING
    assert read.tolist() == expected.tolist()

    summary = _extract(root / "manifest", store)
    assert summary.shards_written == 1, str(summary)
    assert verify(store, root / "manifest") == []
    assert open_store(store).status.tolist() == before.tolist()


def test_a_truncated_commit_record_is_named_and_redone(lie):
    root, store, _ = lie
    path = store / "commits" / "shard-000000.json"
    path.write_bytes(path.read_bytes()[:40])
    assert verify(store) == ["shard 0 (rows 0-1): commit record is not valid JSON (truncated or torn?)"]
    assert open_store(store).status[:2].tolist() == [PENDING, PENDING]
    assert _extract(root / "manifest", store).shards_written == 1
    assert verify(store, root / "manifest") == []


def test_a_data_checksum_that_does_not_match_is_named_by_verify(lie):
    """`extract` and the trainer trust a record whose spec and rows hold (reading every shard to
    check its sum would make a rerun cost a full read); `verify` is the command that reads them."""
    root, store, edit = lie
    edit("commits/shard-000001.json", lambda c: c.update(data_sha256="0" * 64))
    assert verify(store) == ["shard 1 (rows 2-3): data checksum mismatch (the shard's files changed after commit, or "
                             "the record's data_sha256 was edited)"]


def test_counts_that_disagree_with_the_status_array_are_named_by_verify(lie):
    root, store, edit = lie
    edit("commits/shard-000000.json", lambda c: c.update(ok=2, failed=0))
    assert verify(store) == ["shard 0 (rows 0-1): the record counts 2 ok, 0 failed; the status array holds 1 ok, "
                             "1 failed"]


def test_a_commit_record_of_a_shard_that_does_not_exist_is_named(lie, capsys):
    root, store, _ = lie
    shutil.copy(store / "commits" / "shard-000002.json", store / "commits" / "shard-000009.json")
    (store / "commits" / "notes.json").write_text("{}")
    assert verify(store) == ["commits/notes.json: not the commit record of any of the store's 3 shards",
                             "commits/shard-000009.json: not the commit record of any of the store's 3 shards"]
    code, out, err = _cli_extract(capsys, root, store)
    assert code == 0 and out == [f"{store}: all 3 shards already done; nothing to extract"], (out, err)
    assert (open_store(store).status != PENDING).all()
