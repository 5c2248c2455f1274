"""The resume rules: what `--resume` takes from the run's config.json, what a launch may change,
and whether the data is still the data the run started on.

- `resume_config`: the run's own settings with the retyped flags on top (nothing needs retyping).
- `prepare_out`: refuses to overwrite a run, and refuses a retyped setting that differs from the
  run's unless it is in `RESUMABLE_CHANGES` (it does not change what is computed).
- `data_identity` / `data_changes`: the manifest's files and the store's shard checksums; a grown
  manifest or a rebuilt store changes what "continue bit for bit" means, so `train` refuses it,
  naming what changed, unless ``--allow-data-change`` says to go on.
- `update_run_config`: records in config.json what this launch changed, so a later plain
  `--resume` continues with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from trainer.checkpoint import latest_checkpoint
from trainer.config import PARTS, PATH_SETTINGS, PER_LAUNCH, RESUMABLE_CHANGES, SETTINGS_BEFORE_THEY_EXISTED, TrainConfig
from trainer.errors import TrainerError
from trainer.run import config_path, read_run_config, write_run_config
from trainer.store import StoreInfo

log = logging.getLogger(__name__)


def resume_config(out: Path, **given: Any) -> TrainConfig:
    """`run_train.py train --out RUN --resume [flags]`: the run's own settings (its config.json)
    with the ``given`` flags on top, so that nothing needs retyping; `train` then refuses a given
    flag that differs from the run's and is not in `RESUMABLE_CHANGES`. Settings of one launch
    (`PER_LAUNCH`, e.g. ``--stop-after``) are never taken from the run. A run whose first launch
    died before writing config.json starts again from the given flags."""
    if not (Path(out) / "config.json").is_file():
        if "manifest" not in given or "store" not in given:
            raise TrainerError(f"{out} has no config.json yet (its first launch died early): "
                               "pass --manifest and --store (and the other settings) again")
        return TrainConfig(**{**given, "out": Path(out), "resume": True})
    saved = read_run_config(out)["train"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in {**SETTINGS_BEFORE_THEY_EXISTED, **saved}.items():
        if key in names and key not in PER_LAUNCH:
            values[key] = Path(value) if key in PATH_SETTINGS and value is not None else value
    values["train_parts"] = tuple(values.get("train_parts", PARTS))
    if "steps" in given or "epochs" in given:  # a new length replaces the run's, whichever way given
        values.pop("steps", None)
        values.pop("epochs", None)
    return TrainConfig(**{**values, **given, "out": Path(out), "resume": True})


def data_identity(manifest: Any, store: StoreInfo) -> dict[str, Any]:
    """What the run's data is, to tell on resume whether it changed: the manifest's files (sha256
    and counts of videos.jsonl and samples.jsonl, read as they are, so a hand edit counts) and the
    store's done shards with their commit checksums (a rebuilt shard with other data has another)."""
    files: dict[str, Any] = {"manifest_id": manifest.manifest_id, "fingerprint": manifest.fingerprint}
    for name in ("videos", "samples"):
        h, lines = hashlib.sha256(), 0
        with open(Path(manifest.dir) / f"{name}.jsonl", "rb") as f:
            for line in f:
                h.update(line)
                lines += 1
        files[name] = lines
        files[f"{name}_sha256"] = h.hexdigest()
    return {"manifest": files, "store_shards": {str(k): v for k, v in sorted(store.shard_data.items())}}


def data_changes(before: dict[str, Any], now: dict[str, Any], manifest_path: Any, store_path: str) -> list[str]:
    """What differs between two `data_identity` records, one phrase each (empty: nothing)."""
    changes = []
    old, new = before["manifest"], now["manifest"]
    if old.get("manifest_id") != new["manifest_id"]:
        changes.append(f"manifest {manifest_path} is another manifest (id {new['manifest_id']}, the run's was {old.get('manifest_id')})")
    elif "videos_sha256" in old and (old["videos_sha256"], old["samples_sha256"]) != (new["videos_sha256"], new["samples_sha256"]):
        changes.append(f"manifest {manifest_path} changed: {old['videos']} videos and {old['samples']} samples "
                       f"when the run started, {new['videos']} and {new['samples']} now")
    elif old.get("fingerprint") != new["fingerprint"]:  # a run made before the files were recorded
        changes.append(f"manifest {manifest_path} changed (fingerprint {old.get('fingerprint')}, now {new['fingerprint']})")
    if "store_shards" in before:  # runs made before it was recorded are checked by signature only
        was, is_ = before["store_shards"], now["store_shards"]
        for what, shards in (("hold other data (rebuilt)", [k for k in is_ if k in was and is_[k] != was[k]]),
                             ("were extracted since", [k for k in is_ if k not in was]),
                             ("are no longer done", [k for k in was if k not in is_])):
            if shards:
                changes.append(f"store {store_path}: shards {', '.join(shards[:8])}{' ...' if len(shards) > 8 else ''} {what}")
    return changes


def prepare_out(cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's own earlier config when resuming, else None; refuses to overwrite a run. A run
    whose first launch died before writing its config.json (and so has no checkpoint) resumes by
    starting."""
    out = Path(cfg.out)
    if cfg.resume and not config_path(out).is_file() and out.is_dir() and latest_checkpoint(out) is None:
        log.info("%s has no config.json: its first launch stopped before writing it; starting it", out)
        return None
    if cfg.resume:
        saved = read_run_config(out)
        old = {**SETTINGS_BEFORE_THEY_EXISTED, **saved["train"]}
        new = cfg.record()
        changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
        if changed:
            k = changed[0]
            raise TrainerError(f"{out} was trained with --{k.replace('_', '-')} {old.get(k)}, not {new[k]}; resume with the run's settings")
        if (old.get("steps"), old.get("epochs")) != (cfg.steps, cfg.epochs):
            log.warning("resuming with a different length: the learning-rate schedule changes from here on")
        return saved
    if (out / "config.json").exists() or latest_checkpoint(out) is not None:
        raise TrainerError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    return None


def update_run_config(out: Path, saved: dict[str, Any], cfg: TrainConfig, total: int, data: dict[str, Any],
                       changed: list[str], resume_ckpt: Path | None) -> None:
    """On resume, record the settings this launch changed (a longer ``--steps``, another
    ``--feature-cache``) so that a later plain ``--resume`` continues with them, and data changes
    that ``--allow-data-change`` accepted, with the step they took effect at (``data``: the
    manifest, store, data and data_identity records of this launch)."""
    before = {k: v for k, v in saved.items() if k != "format_version"}
    config = {**before, "train": cfg.record(), "total_steps": total}
    if changed:
        at = int(resume_ckpt.name.split("-")[-1]) if resume_ckpt is not None else 0
        config.update(data, data_changes=[*saved.get("data_changes", []), {"step": at, "changes": changed}])
    elif "data_identity" not in saved:  # a run made before it was recorded: from now on it is
        config["data_identity"] = data["data_identity"]
    if config != before:
        write_run_config(out, config)

