"""Output helpers shared by the benchmark scripts (run as `python bench/NAME.py`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path


def compact_json(obj: dict) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def emit(result: dict, json_path: Path | None, print_table: Callable[[dict], None]) -> None:
    """The result as JSON on stdout (and in `json_path` if given), then its Markdown table."""
    text = compact_json(result)
    print(text)
    if json_path is not None:
        json_path.write_text(text + "\n", encoding="utf-8")
    print()
    print_table(result)


def print_checks(checks: dict, digits: int = 2) -> None:
    """The Markdown table of a result's checks ({label, value, bar, pass} each)."""
    print("| check | value | bar | result |")
    print("|---|---|---|---|")
    for c in checks.values():
        value = f"{c['value']:.{digits}f}" if isinstance(c["value"], float) else c["value"]
        print(f"| {c['label']} | {value} | {c['bar']} | {'PASS' if c['pass'] else 'FAIL'} |")


def check(label: str, value: float, op: str, bar: float) -> dict:
    """One row of a result's checks: `value` against `bar` by `op` (">=", "<=" or "<")."""
    passed = {">=": value >= bar, "<=": value <= bar, "<": value < bar}[op]
    return {"label": label, "value": round(value, 3), "bar": f"{op} {bar:g}", "pass": passed}


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table: the header, its rule, then one line per row of already formatted cells."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
