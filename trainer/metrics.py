"""Training metrics: ``RUN/metrics.jsonl`` (one JSON object per line) and ``RUN/loss.png``.

Lines with a ``loss`` are optimizer steps (``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``,
``tokens``, ``tokens_per_s``, ``elapsed_s``); lines with a ``val_loss`` are evaluations. A resumed
run first drops the lines written after its checkpoint, so the file always tells one history.

The curve is drawn with Pillow (already a dependency) by a small routine rather than matplotlib:
raw training loss, its exponential moving average, and validation points, on a log axis when
the loss spans more than a decade.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont


class MetricsLog:
    """Append-only JSONL metrics of one run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line cut short (the machine died while it was appended) is left
        out, as the resumed run that follows rewrites what came after its checkpoint anyway."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            try:
                json.loads(lines[-1])
            except ValueError:
                lines.pop()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Keep only what was logged up to ``step`` (a resumed run repeats what came after)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def ema(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased (no pull towards the first value)."""
    out, level = [], 0.0
    for k, v in enumerate(values, start=1):
        level = weight * level + (1 - weight) * v
        out.append(level / (1 - weight**k))
    return out


def plot_loss(records: Sequence[dict[str, Any]], out: Path, size: tuple[int, int] = (800, 480)) -> None:
    """Draw the loss curve of ``records`` (metrics.jsonl lines) into the PNG ``out``."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
    W, H = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 8), "loss (grey: per step, blue: moving average, orange: validation)", fill="black", font=font)
    points = train + val
    if points:
        x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
        y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
        log_y = y_lo > 0 and y_hi / y_lo > 10
        f = math.log10 if log_y else (lambda v: v)
        a, b = f(y_lo), f(y_hi)
        if b - a < 1e-12:
            a, b = a - 0.5, b + 0.5
        if x1 == x0:
            x1 = x0 + 1

        def xy(step: float, value: float) -> tuple[float, float]:
            px = left + (step - x0) / (x1 - x0) * (W - left - right)
            py = top + (b - f(value)) / (b - a) * (H - top - bottom)
            return px, py

        for i in range(6):  # grid and tick labels
            frac = i / 5
            gy = top + frac * (H - top - bottom)
            value = b - frac * (b - a)
            label = f"{10**value:.3g}" if log_y else f"{value:.3g}"
            draw.line([(left, gy), (W - right, gy)], fill=(230, 230, 230))
            draw.text((4, gy - 6), label, fill="black", font=font)
            gx = left + frac * (W - left - right)
            draw.line([(gx, H - bottom), (gx, H - bottom + 4)], fill="black")
            draw.text((gx - 10, H - bottom + 8), f"{x0 + frac * (x1 - x0):.0f}", fill="black", font=font)
        draw.text((W // 2 - 15, H - 18), "step", fill="black", font=font)
        if len(train) > 1:
            draw.line([xy(s, v) for s, v in train], fill=(190, 190, 190), width=1)
            draw.line([xy(s, v) for (s, _), v in zip(train, ema([v for _, v in train]))], fill=(30, 80, 200), width=2)
        elif train:
            px, py = xy(*train[0])
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(30, 80, 200))
        for s, v in val:
            px, py = xy(s, v)
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(240, 140, 20))
        if len(val) > 1:
            draw.line([xy(s, v) for s, v in val], fill=(240, 140, 20), width=1)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, out)
