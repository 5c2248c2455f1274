"""Output helpers shared by the benchmark scripts (run as `python bench/NAME.py`)."""

from __future__ import annotations

import json
import re


def compact_json(obj: dict) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
