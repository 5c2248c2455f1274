"""The feature store's format (DESIGN §3.3) in one place: array names, attribute keys, the
commit-record schema, the done rule and the fingerprints. It imports neither torch nor Ray, so
`status`, `verify`, the trainer and the extraction job all read a store by the same rules.

    STORE.zarr/
      zarr.json             group attributes (`store_attrs`): format_version, encoder (spec,
                            weights sha256, preprocessing, T, D), encoder_fingerprint, frames,
                            sampling, token_layout, tokens_per_frame, width, manifest_id,
                            manifest_fingerprint, shard_size, n_rows
      tokens/               (N, F, T, D) float16; inner chunk one video, shard S videos
      frame_index/          (N, F) int32, source frame numbers decoded
      n_frames/             (N,) int32, frames the source really has (< F: repeats)
      status/               (N,) uint8, PENDING 0 / OK 1 / FAILED 2
      commits/shard-000007.json   the shard's commit record (`make_commit`), one object
      leases/shard-000007.3.json  a job's lease on shard 7 (generation 3), see pipeline.lease

The done rule (`is_done`): a shard is done when its commit record exists, is whole and that
shard's (`load_commit`), and agrees with the store's attributes: their encoder fingerprint, their
spec hash, the shard's row range (and, when a manifest is at hand, the sha256 of the shard's
manifest rows) (`commit_problems`). A commit record is withdrawn before a shard's arrays are
rewritten and written again only after they are complete, so a shard whose arrays are half old,
half new never counts as done.

Stores get edited by hand, copied half-way and damaged; nothing here trusts what it reads.
`attrs_problems`, `encoder_problems` and `array_problems` say how attributes are malformed,
contradict themselves or disagree with the arrays' real shapes, `load_commit` why a commit record is not whole, `commit_problems` why a whole
record does not make its shard done. `verify` lists all of them, `extract` and the trainer refuse
a store with the first two and treat a shard with the last two as not done: one definition each.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np

from manifests.manifest import VideoEntry, entry_record, jsonl_line

FORMAT_VERSION = 1
PENDING, OK, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", OK: "ok", FAILED: "failed"}
ARRAYS = ("tokens", "frame_index", "n_frames", "status")  # the per-row arrays, checksum order
TOKEN_LAYOUT = "cls+patches"
COMMITS = "commits"
LEASES = "leases"
# what must agree between a store and a request to extend it (the manifest is checked apart)
SPEC_KEYS = ("encoder_fingerprint", "frames", "sampling")
# attributes that fix what the tokens mean; each commit records their hash (growth changes none)
MEANING_KEYS = ("format_version", "encoder", "encoder_fingerprint", "frames", "sampling", "token_layout",
                "tokens_per_frame", "width", "manifest_id", "shard_size")
# what a model trained on a store depends on; a run records these and refuses other stores
SIGNATURE_KEYS = ("encoder", "frames", "sampling", "token_layout", "tokens_per_frame", "width")
COMMIT_KEYS = ("shard", "rows", "ok", "failed", "failures", "data_sha256", "encoder_fingerprint", "spec_sha256",
               "rows_sha256", "node")
# the type of each attribute that code reads (the arrays' shapes depend on them)
ATTR_TYPES = {"format_version": int, "encoder": dict, "encoder_fingerprint": str, "frames": int, "sampling": str,
              "token_layout": str, "tokens_per_frame": int, "width": int, "manifest_id": str,
              "manifest_fingerprint": str, "shard_size": int, "n_rows": int}
# each array's dtype and, per dimension, the attribute giving its size (`array_problems`)
ARRAY_LAYOUT = {"tokens": ("float16", ("n_rows", "frames", "tokens_per_frame", "width")),
                "frame_index": ("int32", ("n_rows", "frames")), "n_frames": ("int32", ("n_rows",)),
                "status": ("uint8", ("n_rows",))}


def store_attrs(encoder_attrs: dict[str, Any], frames: int, sampling: str, manifest_id: str,
                manifest_fingerprint: str, shard_size: int, n_rows: int) -> dict[str, Any]:
    """The group attributes of a store made with this encoder, sampling and manifest."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_attrs,
        "encoder_fingerprint": encoder_fingerprint(encoder_attrs),
        "frames": frames,
        "sampling": sampling,
        "token_layout": TOKEN_LAYOUT,
        "tokens_per_frame": encoder_attrs["tokens_per_frame"],
        "width": encoder_attrs["width"],
        "manifest_id": manifest_id,
        "manifest_fingerprint": manifest_fingerprint,
        "shard_size": shard_size,
        "n_rows": n_rows,
    }


def n_shards(attrs: dict[str, Any]) -> int:
    return -(-attrs["n_rows"] // attrs["shard_size"])


def shard_rows(attrs: dict[str, Any], shard: int) -> tuple[int, int]:
    """[start, stop) of the shard's rows."""
    size = attrs["shard_size"]
    return shard * size, min((shard + 1) * size, attrs["n_rows"])


def encoder_fingerprint(encoder_attrs: dict[str, Any]) -> str:
    """A short id of everything that determines the tokens (spec, weights, preprocessing)."""
    return hashlib.sha256(json.dumps(encoder_attrs, sort_keys=True).encode()).hexdigest()[:16]


def rows_sha256(entries: Iterable[VideoEntry]) -> str:
    """Fingerprint of a shard's manifest rows: changes when a row's file or id changes."""
    return hashlib.sha256("".join(jsonl_line(entry_record(e)) for e in entries).encode()).hexdigest()


def spec_sha256(attrs: dict[str, Any]) -> str:
    """Hash of the attributes that fix what the tokens mean (`MEANING_KEYS`)."""
    meaning = {k: attrs.get(k) for k in MEANING_KEYS}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()


def data_sha256(tokens: np.ndarray, frame_index: np.ndarray, n_frames: np.ndarray, status: np.ndarray) -> str:
    """Checksum of a shard's arrays, in this order, C-order bytes."""
    h = hashlib.sha256()
    for array in (tokens, frame_index, n_frames, status):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def commit_name(shard: int) -> str:
    return f"{COMMITS}/shard-{shard:06d}.json"


def make_commit(attrs: dict[str, Any], shard: int, tokens: np.ndarray, frame_index: np.ndarray,
                n_frames: np.ndarray, status: np.ndarray, failures: list[dict[str, Any]], rows_sha: str,
                node: str) -> dict[str, Any]:
    """The commit record of a shard whose arrays are these; `node` names who wrote it."""
    start, stop = shard_rows(attrs, shard)
    return {
        "shard": shard,
        "rows": [start, stop],
        "ok": int((status == OK).sum()),
        "failed": int((status == FAILED).sum()),
        "failures": failures,  # [{"row", "video_id", "reason"}], in row order
        "data_sha256": data_sha256(tokens, frame_index, n_frames, status),
        "encoder_fingerprint": attrs["encoder_fingerprint"],
        "spec_sha256": spec_sha256(attrs),
        "rows_sha256": rows_sha,
        "node": node,
    }


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is(value: Any, kind: type) -> bool:
    """isinstance, but a bool is no int (JSON true is not a frame count)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def attrs_problems(attrs: Any) -> list[str]:
    """Why these group attributes are not a whole store description: not an object, another
    format version, keys missing, values of the wrong type or range (each problem one line; []
    when whole). Every later check reads these keys, so they come first."""
    if not isinstance(attrs, dict):
        return [f"the attributes are a {_type_name(attrs)}, not an object"]
    if attrs.get("format_version") != FORMAT_VERSION:
        return [f"store format {attrs.get('format_version')!r}, this version reads {FORMAT_VERSION}"]
    missing = [key for key in ATTR_TYPES if key not in attrs]
    if missing:
        return [f"attributes missing: {', '.join(missing)}"]
    problems = [f"attribute {key} is {attrs[key]!r} ({_type_name(attrs[key])}), expected {kind.__name__}"
                for key, kind in ATTR_TYPES.items() if not _is(attrs[key], kind)]
    if problems:
        return problems
    problems += [f"attribute {key} is {attrs[key]}, expected at least 1"
                 for key in ("frames", "tokens_per_frame", "width", "shard_size") if attrs[key] < 1]
    if attrs["n_rows"] < 0:
        problems.append(f"attribute n_rows is {attrs['n_rows']}, expected at least 0")
    return problems


def encoder_problems(attrs: dict[str, Any]) -> list[str]:
    """Where attributes (which `attrs_problems` passed) contradict themselves: the encoder record
    against its fingerprint and against the token sizes (where the record holds them: stores
    written by other tools, such as the trainer tests' stand-ins, may not), the token layout."""
    problems = []
    if attrs["token_layout"] != TOKEN_LAYOUT:
        problems.append(f"token_layout {attrs['token_layout']!r}, this version reads {TOKEN_LAYOUT!r}")
    encoder = attrs["encoder"]
    if encoder_fingerprint(encoder) != attrs["encoder_fingerprint"]:
        problems.append(f"the encoder record does not match encoder_fingerprint {attrs['encoder_fingerprint']} "
                        f"(it hashes to {encoder_fingerprint(encoder)})")
    problems += [f"attribute {key} is {attrs[key]} but the encoder record says {encoder[key]!r}"
                 for key in ("tokens_per_frame", "width") if key in encoder and encoder[key] != attrs[key]]
    return problems


def array_problems(attrs: dict[str, Any], arrays: dict[str, tuple[tuple[int, ...], str, int]],
                   max_rows: int | None = None) -> list[str]:
    """Where the arrays (name -> (shape, dtype, rows per zarr shard object)) disagree with the
    attributes (which `attrs_problems` passed). Arrays may hold up to `max_rows` rows (a growth
    cut short between resizing the arrays and updating the attributes); None: exactly n_rows.
    The tokens' zarr shard must be the manifest shard: commit records and single writers rely on it."""
    problems = []
    for name, (dtype, dims) in ARRAY_LAYOUT.items():
        if name not in arrays:
            problems.append(f"array {name} is missing")
            continue
        shape, have_dtype, rows_per_object = arrays[name]
        want = tuple(attrs[key] for key in dims)
        if len(shape) != len(want):
            problems.append(f"array {name} has shape {shape}, the attributes say {want}")
            continue
        if have_dtype != dtype:
            problems.append(f"array {name} is {have_dtype}, the format says {dtype}")
        rows, top = shape[0], attrs["n_rows"] if max_rows is None else max(max_rows, attrs["n_rows"])
        if not attrs["n_rows"] <= rows <= top:
            grown = " (a growth cut short? extract with the grown manifest finishes it)" if rows > attrs["n_rows"] else ""
            problems.append(f"attributes say n_rows {attrs['n_rows']} but array {name} has {rows}{grown}")
        problems += [f"attributes say {key} {attrs[key]} but array {name} has {size}"
                     for key, size in zip(dims[1:], shape[1:]) if size != attrs[key]]
        if name == "tokens" and rows_per_object != attrs["shard_size"]:
            problems.append(f"attributes say shard_size {attrs['shard_size']} but array tokens holds "
                            f"{rows_per_object} rows per shard object")
    return problems


class CommitError(ValueError):
    """Why some bytes are not a whole commit record of a shard (one line, after "commit record ")."""


def load_commit(data: bytes, shard: int) -> dict[str, Any]:
    """The commit record of `shard` from its bytes; `CommitError` when they are not a whole
    record (torn or truncated, keys missing, a field of the wrong type) or name another shard.
    Every field that readers use is checked here, so none of them fails on an edited record."""
    try:
        commit = json.loads(data)
    except ValueError:
        raise CommitError("is not valid JSON (truncated or torn?)") from None
    if not isinstance(commit, dict):
        raise CommitError(f"is a JSON {_type_name(commit)}, not an object")
    missing = [key for key in COMMIT_KEYS if key != "node" and key not in commit]
    if missing:
        raise CommitError(f"lacks {', '.join(missing)}")
    for key in ("shard", "ok", "failed"):
        if not _is(commit[key], int) or commit[key] < 0:
            raise CommitError(f"field {key} is {commit[key]!r}, expected a count")
    rows = commit["rows"]
    if not (isinstance(rows, list) and len(rows) == 2 and all(_is(r, int) for r in rows) and 0 <= rows[0] <= rows[1]):
        raise CommitError(f"field rows is {rows!r}, expected [start, stop]")
    for key in ("data_sha256", "encoder_fingerprint", "spec_sha256", "rows_sha256"):
        if not isinstance(commit[key], str):
            raise CommitError(f"field {key} is {commit[key]!r}, expected a string")
    failures = commit["failures"]
    if not isinstance(failures, list) or not all(
            isinstance(f, dict) and _is(f.get("row"), int) and isinstance(f.get("video_id"), str)
            and isinstance(f.get("reason"), str) for f in failures):
        raise CommitError("field failures is not a list of {row, video_id, reason}")
    if commit["shard"] != shard:
        raise CommitError(f"names shard {commit['shard']}, but it is shard {shard}'s file")
    return commit


def parse_commit(data: bytes | None, shard: int) -> dict[str, Any] | None:
    """The commit record of `shard` from its bytes; None when absent or not whole (`load_commit`)."""
    if data is None:
        return None
    try:
        return load_commit(data, shard)
    except CommitError:
        return None


def commit_problems(commit: dict[str, Any], attrs: dict[str, Any], rows_sha: str | None = None) -> list[str]:
    """Why a whole commit record does not make its shard done under these attributes ([]: done);
    `rows_sha` None skips the manifest check."""
    shard, total = commit["shard"], n_shards(attrs)
    if shard >= total:
        return [f"a record for shard {shard}, but the attributes give {total} shards"]
    problems = []
    start, stop = shard_rows(attrs, shard)
    if commit["rows"] != [start, stop]:
        problems.append(f"the record covers rows {commit['rows']}, the attributes give shard {shard} "
                        f"rows {[start, stop]}")
    if commit["encoder_fingerprint"] != attrs["encoder_fingerprint"]:
        problems.append(f"committed with encoder {commit['encoder_fingerprint']}, the store's is "
                        f"{attrs['encoder_fingerprint']}")
    spec = spec_sha256(attrs)
    if commit["spec_sha256"] != spec:
        problems.append(f"the store's attributes changed since this shard was committed (edited?): spec_sha256 "
                        f"{commit['spec_sha256'][:12]}, the attributes give {spec[:12]}")
    if rows_sha is not None and commit["rows_sha256"] != rows_sha:
        problems.append("committed for other manifest rows (rebuild it)")
    return problems


def is_done(commit: dict[str, Any] | None, attrs: dict[str, Any], rows_sha: str | None = None) -> bool:
    """The done rule (module docstring): a whole record (`parse_commit`) with no `commit_problems`."""
    return commit is not None and not commit_problems(commit, attrs, rows_sha)
