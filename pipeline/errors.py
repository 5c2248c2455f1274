"""Errors of the extraction pipeline.

`ExtractError` is a mistake the user can fix (bad flag, incompatible store, unknown encoder,
weights not available offline); its message is one line and the CLI prints it without a
traceback; `StorageError` is the one for object storage or a remote filesystem that fails (no
credentials, an unreachable endpoint, no such bucket, access denied). `DecodeError` is one bad
video; it never escapes the pipeline, it becomes the reason recorded for that row.
"""

from __future__ import annotations


class ExtractError(ValueError):
    """A user-facing problem with an extraction request; the message is one line."""


class DecodeError(Exception):
    """A video or image that cannot be decoded; `str(err)` is the reason stored for its row."""


class StorageError(ExtractError):
    """A store or video location that cannot be reached or used; one line, never a credential."""
