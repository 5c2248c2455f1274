"""Training faults for `bench/faults.py` (issue 12): more moments and repeats than the suite's
tests/test_trainer_faults.py, on the same tiny CPU runs.

- SIGKILL during a checkpoint (or config.json / metrics.jsonl) write: every kill moment of
  `trainer_helpers.KILL_MOMENTS` at several arrivals (the first, second and third checkpoint...);
  each killed run is resumed with ``--resume`` and survives only if its final weights and
  optimizer tensors equal an uninterrupted run's exactly and no ``.tmp-*`` leftover remains.
- A damaged checkpoint file (truncated, garbage bytes, a pickle payload; in each of the three
  files): survives if resuming and loading the run for chat both stop with one line naming the
  file, the payload never ran, and nothing of the run was changed.
- `--resume` on changed data (a rebuilt store, a store of other features): survives if refused
  with a line naming what changed, and the run is untouched.

``run(work, quick)`` returns the rows of `bench/faults.py`'s table. It builds its tiny manifest
and store with the suite's helpers (tests/trainer_helpers.py: a store written with zarr by the
store-format contract, no video decoded) and drives training through run_train.py's CLI and
`trainer.train`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from trainer.checkpoint import list_checkpoints  # noqa: E402
from trainer.errors import TrainerError  # noqa: E402
from trainer.run import load_run  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import train  # noqa: E402
from trainer_helpers import KILL_MOMENTS, cli_args, make_manifest, make_store, run_killed, tiny_train_args  # noqa: E402

STEPS, SAVE_EVERY = 6, 2  # checkpoints at steps 2, 4 and 6


def _tensors(run: Path) -> list[dict[str, torch.Tensor]]:
    ckpt = list_checkpoints(run)[-1]
    return [load_file(str(ckpt / name)) for name in ("model.safetensors", "optimizer.safetensors")]


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _arrivals(moment: str, quick: bool) -> list[int]:
    """Which arrivals at ``moment`` to kill: each checkpoint (deletions start at the second),
    config.json once per launch, metrics lines at every step."""
    if moment == "config.json half written":
        return [1]
    if moment == "metrics line half written":
        return [3, 5] if quick else list(range(1, STEPS + 1))
    if moment == "an old checkpoint half deleted":
        return [1] if quick else [1, 2]
    return [2] if quick else [1, 2, 3]


def _sigkill(work: Path, args: dict, reference: list[dict[str, torch.Tensor]], quick: bool) -> dict:
    jobs, outs = [], []
    for moment in KILL_MOMENTS:
        for nth in _arrivals(moment, quick):
            run_dir = work / "killed" / f"{moment.replace(' ', '-').replace('.', '-')}-{nth}"
            shutil.rmtree(run_dir, ignore_errors=True)
            jobs.append((moment, nth, cli_args(**{**args, "out": run_dir})))
            outs.append(run_dir)
    statuses = run_killed(jobs)
    survived, notes = 0, []
    for (moment, nth, _), status, run_dir in zip(jobs, statuses, outs):
        try:
            train(TrainConfig(**{**args, "out": run_dir}, resume=True))
            leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
            ok = status == -9 and _equal(_tensors(run_dir), reference) and not leftovers
        except TrainerError as err:
            ok, leftovers = False, [str(err)]
        survived += ok
        if not ok:
            notes.append(f"{moment} #{nth} (status {status}, leftovers {leftovers})")
    return {"fault": "SIGKILL during a checkpoint, config or metrics write", "where": "training",
            "tried": len(jobs), "survived": survived,
            "lost": "nothing" if not notes else "not bit for bit: " + "; ".join(notes)}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damaged(work: Path, args: dict, store: Path) -> dict:
    base = work / "two"
    shutil.rmtree(base, ignore_errors=True)
    train(TrainConfig(**{**args, "out": base, "keep": 2, "stop_after": 4}))
    marker = work / "pwned"

    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def garble(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 32] = bytes(range(224, 256))
        p.write_bytes(bytes(data))

    def payload(p: Path) -> None:
        p.write_bytes(pickle.dumps(_Payload(marker)))

    tried, survived, notes = 0, 0, []
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        for how, damage in (("truncated", truncate), ("garbage bytes", garble), ("a pickle", payload)):
            run_dir = work / "damaged" / f"{name}-{how.replace(' ', '-')}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(base, run_dir)
            file = run_dir / "checkpoints" / "step-00000004" / name
            damage(file)
            before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
            tried += 1
            messages = []
            for attempt in (lambda: train(TrainConfig(**{**args, "out": run_dir}, resume=True)),
                            lambda: load_run(run_dir, torch.device("cpu"))):
                if name == "optimizer.safetensors" and messages:
                    break  # chat never reads the optimizer
                try:
                    attempt()
                    messages.append(None)
                except TrainerError as err:
                    messages.append(str(err))
            ok = (all(m is not None and str(file) in m and "\n" not in m for m in messages) and not marker.exists()
                  and sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before)
            survived += ok
            if not ok:
                notes.append(f"{name} {how}: {messages}")
    return {"fault": "a truncated, corrupted or pickled checkpoint file", "where": "training",
            "tried": tried, "survived": survived, "lost": "nothing" if not notes else "; ".join(notes)}


def _changed_data(work: Path, args: dict, manifest: Path) -> dict:
    run_dir = work / "changing"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(TrainConfig(**{**args, "out": run_dir, "stop_after": 2}))
    config = (run_dir / "config.json").read_bytes()
    cases = {
        "rebuilt": (make_store(work / "rebuilt.zarr", manifest, seed=1), "hold other data (rebuilt)"),
        "other features": (make_store(work / "other.zarr", manifest, width=16), "width is 16"),
    }
    survived, notes = 0, []
    for what, (store, says) in cases.items():
        try:
            train(TrainConfig(**{**args, "out": run_dir, "store": store}, resume=True))
            notes.append(f"{what}: resumed")
        except TrainerError as err:
            ok = says in str(err) and (run_dir / "config.json").read_bytes() == config
            survived += ok
            if not ok:
                notes.append(f"{what}: {err}")
    return {"fault": "--resume on a rebuilt store or a store of other features", "where": "training",
            "tried": len(cases), "survived": survived, "lost": "nothing" if not notes else "; ".join(notes)}


def run(work: Path, quick: bool) -> list[dict]:
    """The training fault rows; ``quick`` kills each moment once (about a minute on 2 cores)."""
    work = Path(work) / "training"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest = make_manifest(work, n_videos=12)
    store = make_store(work / "store.zarr", manifest)
    args = tiny_train_args(manifest, store, work / "reference", steps=STEPS, save_every=SAVE_EVERY, keep=1)
    train(TrainConfig(**args))
    reference = _tensors(args["out"])
    return [_sigkill(work, args, reference, quick), _damaged(work, args, store), _changed_data(work, args, manifest)]


if __name__ == "__main__":
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/faults-training"))
    parser.add_argument("--quick", action="store_true")
    logging.basicConfig(level=logging.WARNING)
    opts = parser.parse_args()
    started = time.time()
    print(json.dumps(run(opts.work, opts.quick), indent=2))
    print(f"{time.time() - started:.0f} s", file=sys.stderr)
