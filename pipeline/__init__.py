"""Extraction: decode (decord), encode (open_clip), the feature store, and the jobs that fill it."""

from torch_guard import guard_torch

guard_torch()
