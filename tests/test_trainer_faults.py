"""Training faults (issue 12): a SIGKILL during a checkpoint write, damaged or hostile checkpoint
files, resuming on data that changed, `--resume` alone, a torchrun RAM cache shared per node, and
samples with a 100k-character or an empty answer."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

import run_train
from trainer.checkpoint import list_checkpoints
from trainer.features import SharedRamFeatures
from trainer.distributed import Dist
from trainer.errors import TrainerError
from trainer.run import load_run, read_run_config
from trainer.config import TrainConfig
from trainer.resume import resume_config
from trainer.train import train
from trainer_helpers import (KILL_MOMENTS, REPO, TORCHRUN, cli_args, make_manifest, make_store, read_metrics,
                             run_killed, subprocess_env, tiny_train_args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    manifest = make_manifest(root, n_videos=12)
    store = make_store(root / "store.zarr", manifest)
    return {"root": root, "manifest": manifest, "store": store}


def run_args(corpus: dict, name: str, **overrides) -> dict:
    return tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / name, **overrides)


def final_tensors(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ckpt = list_checkpoints(run)[-1]
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "optimizer.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


# --- SIGKILL during a checkpoint write --------------------------------------------------------------

KILL_ARGS = dict(steps=6, save_every=2, keep=1)
# the nth arrival at the moment: the second checkpoint (step 4), with step 2 complete before it
NTH = {"an old checkpoint half deleted": 1, "config.json half written": 1, "metrics line half written": 5}


@pytest.fixture(scope="module")
def uninterrupted(corpus) -> dict:
    args = run_args(corpus, "uninterrupted", **KILL_ARGS)
    train(TrainConfig(**args))
    return args


def killed_args(corpus: dict, moment: str) -> dict:
    return run_args(corpus, "killed-" + moment.replace(" ", "-").replace(".", "-"), **KILL_ARGS)


@pytest.fixture(scope="module")
def killed(corpus) -> dict[str, int]:
    """Every moment's run, killed there (one launcher for all: see `run_killed`)."""
    moments = list(KILL_MOMENTS)
    statuses = run_killed([(m, NTH.get(m, 2), cli_args(**killed_args(corpus, m))) for m in moments], at_once=2)
    return dict(zip(moments, statuses))


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_sigkill_during_a_write_then_resume_continues_bit_for_bit(corpus, uninterrupted, killed, moment):
    args = killed_args(corpus, moment)
    assert killed[moment] == -9
    for ckpt in list_checkpoints(args["out"]):  # what counts as a checkpoint is whole
        assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]

    result = train(TrainConfig(**args, resume=True))
    assert result.step == 6
    model, optimizer = final_tensors(args["out"])
    ref_model, ref_optimizer = final_tensors(uninterrupted["out"])
    assert_same_tensors(model, ref_model)
    assert_same_tensors(optimizer, ref_optimizer)
    assert losses(args["out"]) == losses(uninterrupted["out"])
    assert [p.name for p in (args["out"] / "checkpoints").iterdir()] == ["step-00000006"]  # leftovers gone


# --- damaged and hostile checkpoint files ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(corpus) -> dict:
    args = run_args(corpus, "two", steps=6, save_every=2, keep=2, stop_after=4)
    train(TrainConfig(**args))
    assert [p.name for p in list_checkpoints(args["out"])] == ["step-00000002", "step-00000004"]
    return args


class Payload:
    """Unpickling this creates the file ``marker``: code run by a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(range(200, 255)) + bytes(9)
    path.write_bytes(bytes(data))


def _reshape_first(path: Path) -> None:
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if tensors[k].ndim == 2)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(path))


def _pickle_payload(path: Path) -> None:
    path.write_bytes(pickle.dumps({"weights": Payload(path.parent.parent.parent.parent / "pwned")}))


def _torch_save_payload(path: Path) -> None:
    torch.save({"weights": Payload(path.parent.parent.parent.parent / "pwned")}, path)


DAMAGE = {  # (file, how, whether state.json keeps the checksums it recorded, what the message says)
    "model truncated": ("model.safetensors", _truncate, True, "truncated"),
    "model garbage bytes": ("model.safetensors", _garble, True, "sha256"),
    "model truncated, no checksum": ("model.safetensors", _truncate, False, "not a safetensors file"),
    "model wrong shapes": ("model.safetensors", _reshape_first, False, "does not fit this model"),
    "model a pickle": ("model.safetensors", _pickle_payload, False, "not a safetensors file"),
    "model a torch.save zip": ("model.safetensors", _torch_save_payload, False, "not a safetensors file"),
    "optimizer truncated": ("optimizer.safetensors", _truncate, True, "truncated"),
    "optimizer truncated, no checksum": ("optimizer.safetensors", _truncate, False, "not a safetensors file"),
    "optimizer wrong shapes": ("optimizer.safetensors", _reshape_first, False, "has shape"),
    "optimizer a pickle": ("optimizer.safetensors", _pickle_payload, False, "not a safetensors file"),
    "state truncated": ("state.json", _truncate, True, "not readable JSON"),
    "state garbage bytes": ("state.json", lambda p: p.write_bytes(bytes(range(256)) * 4), True, "not readable JSON"),
    "state a pickle": ("state.json", _pickle_payload, True, "not readable JSON"),
    "state without its step": ("state.json", lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != "step"})), True, "without 'step'"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_file_is_one_line_naming_it(corpus, two_checkpoints, kind, tmp_path, capsys):
    name, damage, checksums, says = DAMAGE[kind]
    run = tmp_path / "a" / "run"  # a pickle payload that ran would create tmp_path / "a" / "pwned"
    shutil.copytree(two_checkpoints["out"], run)
    ckpt = run / "checkpoints" / "step-00000004"
    file = ckpt / name
    if not checksums:  # as a checkpoint written before they were recorded: the loaders must refuse the file
        state = json.loads((ckpt / "state.json").read_text())
        del state["files"]
        (ckpt / "state.json").write_text(json.dumps(state))
    damage(file)
    damaged = file.read_bytes()

    with pytest.raises(TrainerError) as err:
        train(TrainConfig(**{**two_checkpoints, "out": run, "stop_after": None}, resume=True))
    message = str(err.value)
    assert str(file) in message and says in message and "\n" not in message, message
    assert f"delete {ckpt} to resume from step-00000002" in message  # how to fall back; never done silently
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert file.read_bytes() == damaged  # nothing was written, nothing deleted

    if name != "optimizer.safetensors":  # chat and eval load the run the same way (not its optimizer)
        with pytest.raises(TrainerError) as err:
            load_run(run, torch.device("cpu"))
        assert str(file) in str(err.value) and "\n" not in str(err.value)
        code = run_train.main(["chat", "--run", str(run), "--store", str(corpus["store"]), "--row", "0",
                               "--question", "What colour?", "--device", "cpu"])
        captured = capsys.readouterr()
        assert code == 2 and captured.err.count("\n") == 1 and str(file) in captured.err, captured.err
    assert not list(tmp_path.rglob("pwned"))  # the pickle payload never ran


def test_a_checksum_recorded_by_the_checkpoint_catches_a_silent_change(two_checkpoints, tmp_path):
    """Garbage bytes that keep the safetensors header valid load without error: only the sha256
    that state.json recorded tells them apart."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints["out"], run)
    file = run / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the last tensor's last values, the header intact
    file.write_bytes(bytes(data))
    assert load_file(str(file))  # safetensors itself takes it
    with pytest.raises(TrainerError, match="sha256 is not the one state.json recorded"):
        load_run(run, torch.device("cpu"))


def latest_step(run: Path) -> int:
    return json.loads((list_checkpoints(run)[-1] / "state.json").read_text())["step"]


# --- resuming on changed data ----------------------------------------------------------------------


def _grown_manifest(corpus: dict, tmp_path: Path) -> Path:
    root = tmp_path / "grown"
    shutil.copytree(corpus["root"] / "videos", root / "videos")
    shutil.copytree(corpus["manifest"], root / "manifest")
    meta = json.loads((root / "manifest" / "manifest.json").read_text())
    (root / "manifest" / "manifest.json").write_text(json.dumps({**meta, "video_root": str(root / "videos")}))
    return make_manifest(root, n_videos=16)  # the same manifest, grown: old rows kept, four videos added


def test_resume_on_changed_data_is_refused_naming_what_changed(corpus, tmp_path):
    args = run_args(corpus, "changing", steps=4, stop_after=2)
    train(TrainConfig(**args))
    args["stop_after"] = None
    config_before = (args["out"] / "config.json").read_bytes()

    grown = _grown_manifest(corpus, tmp_path)
    assert read_manifest_id(grown) == read_manifest_id(corpus["manifest"])
    with pytest.raises(TrainerError) as err:
        train(TrainConfig(**{**args, "manifest": grown}, resume=True))
    assert "12 videos and 28 samples when the run started, 16 and 38 now" in str(err.value)
    assert "--allow-data-change" in str(err.value)

    rebuilt = make_store(tmp_path / "rebuilt.zarr", corpus["manifest"], seed=1)  # same features, other data
    with pytest.raises(TrainerError, match=r"store .*rebuilt.zarr: shards 0, 1, 2 hold other data \(rebuilt\)"):
        train(TrainConfig(**{**args, "store": rebuilt}, resume=True))
    other = make_store(tmp_path / "other.zarr", corpus["manifest"], width=16)
    with pytest.raises(TrainerError, match="width is 16, the run was trained on 32"):
        train(TrainConfig(**{**args, "store": other}, resume=True))
    assert (args["out"] / "config.json").read_bytes() == config_before and latest_step(args["out"]) == 2

    # told to go on: it does, and the run records what changed and when
    result = train(TrainConfig(**{**args, "store": rebuilt}, resume=True, allow_data_change=True))
    assert result.step == 4
    config = read_run_config(args["out"])
    assert config["data_changes"] == [{"step": 2, "changes": [f"store {rebuilt}: shards 0, 1, 2 hold other data (rebuilt)"]}]
    assert config["data_identity"]["store_shards"] == {
        str(i): json.loads((rebuilt / "commits" / f"shard-{i:06d}.json").read_text())["data_sha256"] for i in range(3)}


def read_manifest_id(manifest: Path) -> str:
    return json.loads((manifest / "manifest.json").read_text())["manifest_id"]


def test_resume_alone_uses_the_runs_own_config(corpus, capsys):
    reference = run_args(corpus, "alone-ref", steps=6, lr=3e-3, seed=3, batch_size=3)
    train(TrainConfig(**reference))
    args = {**reference, "out": corpus["root"] / "alone"}
    out = str(args["out"])
    assert run_train.main(["train", *cli_args(**args, stop_after=2)]) == 0
    assert run_train.main(["train", "--out", out, "--resume", "--stop-after", "2"]) == 0  # to step 4
    assert latest_step(args["out"]) == 4
    assert run_train.main(["train", "--out", out, "--resume"]) == 0  # the first launch's --stop-after is its own
    assert latest_step(args["out"]) == 6
    assert_same_tensors(final_tensors(args["out"])[0], final_tensors(reference["out"])[0])
    assert losses(args["out"]) == losses(reference["out"])

    capsys.readouterr()
    assert run_train.main(["train", "--out", out, "--resume", "--lr", "0.1"]) == 2
    assert "trained with --lr 0.003, not 0.1" in capsys.readouterr().err
    assert run_train.main(["train", "--out", out]) == 2
    assert "needs --manifest and --store" in capsys.readouterr().err
    # a resumable change given once is the run's from then on
    assert run_train.main(["train", "--out", out, "--resume", "--steps", "7"]) == 0
    assert read_run_config(args["out"])["total_steps"] == 7 and latest_step(args["out"]) == 7
    assert run_train.main(["train", "--out", out, "--resume"]) == 0
    assert "step 7/7" in capsys.readouterr().out
    # a length given as epochs replaces the run's steps; paths are recorded absolute
    assert (resume_config(args["out"], epochs=3.0).steps, resume_config(args["out"], epochs=3.0).epochs) == (None, 3.0)
    assert all(Path(read_run_config(args["out"])["train"][k]).is_absolute() for k in ("manifest", "store", "out"))


def test_resume_of_a_run_whose_first_launch_died_before_its_config(corpus, capsys):
    """No config.json yet: `--resume` with the flags starts the run; without them, one line."""
    args = run_args(corpus, "died-early", steps=2, batch_size=3)
    args["out"].mkdir(parents=True)
    capsys.readouterr()
    assert run_train.main(["train", "--out", str(args["out"]), "--resume"]) == 2
    assert "has no config.json yet" in capsys.readouterr().err
    assert run_train.main(["train", *cli_args(**args), "--resume"]) == 0
    assert latest_step(args["out"]) == 2


# --- a RAM feature cache shared by the processes of a node -------------------------------------------

RECORDER = """
import importlib, json, os, sys
from pathlib import Path
import run_train

data, setup = importlib.import_module("trainer.features"), importlib.import_module("trainer.setup")

rank = int(os.environ["RANK"])
loads = []
load_rows = data._load_rows
def counting_load_rows(array, rows, out):
    loads.append(len(rows))
    return load_rows(array, rows, out)
data._load_rows = counting_load_rows

make_features = setup.make_features
def recording_make_features(kind, store, rows, device, dist=None):
    before = len(loads)
    features = make_features(kind, store, rows, device, dist)
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if "vidcache-features" in line]
    record = {"rows": len(rows), "shared": dist is not None, "loaded_here": len(loads) - before,
              "mappings": [{"inode": m[4], "bytes": int(m[0].split("-")[1], 16) - int(m[0].split("-")[0], 16),
                            "path": " ".join(m[5:])} for m in maps],
              "cache_bytes": features.cache.numel() * 2}
    with open(Path(os.environ["RECORD_DIR"]) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")
    return features
setup.make_features = recording_make_features
sys.exit(run_train.main(sys.argv[1:]))
"""


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("vidcache-features-*")} if Path("/dev/shm").is_dir() else set()


def test_torchrun_ram_cache_is_loaded_once_per_node_and_shared(corpus, tmp_path):
    args = run_args(corpus, "shared", steps=2, batch_size=2, feature_cache="ram")
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    records = tmp_path / "records"
    records.mkdir()
    before = shm_files()
    env = subprocess_env(OMP_NUM_THREADS="1", RECORD_DIR=str(records))
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), "train", *cli_args(**args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = [json.loads(line) for line in (records / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line) for line in (records / "rank1.jsonl").read_text().splitlines()]
    # the training cache: read from the store by rank 0 only, one file mapped by both
    train0, train1 = rank0[0], rank1[0]
    assert train0["rows"] == train1["rows"] > 0
    assert (train0["loaded_here"], train1["loaded_here"]) == (1, 0)
    assert len(train0["mappings"]) == len(train1["mappings"]) == 1
    assert train0["mappings"][0]["inode"] == train1["mappings"][0]["inode"]
    assert train0["mappings"][0]["path"].endswith("(deleted)")  # unlinked once mapped: nothing to leak
    assert train0["mappings"][0]["bytes"] >= train0["cache_bytes"]
    # the validation cache: only on rank 0, the one that evaluates
    assert len(rank0) == 2 and not rank0[1]["shared"] and len(rank1) == 1
    assert shm_files() == before
    assert latest_step(args["out"]) == 2


def test_a_shared_cache_holds_the_store_rows_and_refuses_before_loading_what_does_not_fit(corpus, tmp_path, monkeypatch):
    import trainer.features

    monkeypatch.setattr(trainer.features, "_shared_folder", lambda: tmp_path)
    rows = [7, 2, 5, 11]
    features = SharedRamFeatures(corpus["store"], rows, Dist())
    expected = zarr.open_group(str(corpus["store"]), mode="r")["tokens"][:][[2, 5, 2, 11]]
    assert np.array_equal(features.fetch([2, 5, 2, 11]).numpy(), expected)
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped

    loads = []
    monkeypatch.setattr(trainer.features, "_load_rows", lambda *a: loads.append(a))
    monkeypatch.setattr(trainer.features, "_available_host_memory", lambda: 1000.0)
    with pytest.raises(TrainerError, match=r"needs 0.00 GiB but only 0.00 GiB of host memory is free; use --feature-cache disk"):
        SharedRamFeatures(corpus["store"], rows, Dist())
    assert loads == [] and list(tmp_path.iterdir()) == []


# --- hostile answer text ---------------------------------------------------------------------------


def test_a_100k_character_answer_and_an_empty_one_do_not_crash_training(tmp_path):
    manifest = make_manifest(tmp_path, n_videos=8)
    samples = manifest / "samples.jsonl"
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    long_answer = ("the object keeps moving " * 5000)[:100_000]
    lines[0]["conversations"][1]["content"] = long_answer
    lines[1]["conversations"][1]["content"] = ""  # a hand-edited samples.jsonl: the builder refuses empty ones
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = make_store(tmp_path / "store.zarr", manifest)
    args = tiny_train_args(manifest, store, tmp_path / "run", steps=2, batch_size=8, max_len=96)
    assert train(TrainConfig(**args)).step == 2
    split = {json.loads(v)["video_id"]: json.loads(v)["split"] for v in (manifest / "videos.jsonl").read_text().splitlines()}
    assert split[lines[0]["video_id"]] == split[lines[1]["video_id"]]  # both of the first video
    data = read_run_config(args["out"])["data"][split[lines[0]["video_id"]]]
    assert data["truncated"] >= 1  # the long one, cut to --max-len
    assert data["skipped"] == {"empty answer": 1}  # the empty one, counted, not learnt as "say nothing"
