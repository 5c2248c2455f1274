"""Training metrics: ``RUN/metrics.jsonl`` (one JSON object per line) and ``RUN/loss.png``.

Lines with a ``loss`` are optimizer steps (``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``,
``tokens``, ``tokens_per_s``, ``elapsed_s``; with a mixture-of-experts LM also ``aux_loss``, the
load-balancing loss the update minimised on top of ``loss``); lines with a ``val_loss`` are
evaluations. A resumed run first drops the lines written after its checkpoint, so the file
always tells one history.

``loss.png`` (matplotlib, redrawn while the run goes): the training loss as logged, a smoothing
of it that keeps up with it (`smooth`: a centred window, so no lag behind a falling loss), the
validation points, and the learning rate on a second axis; a log axis with plain tick labels
(0.1, 0.2, 0.5, 1, ...) when the loss spans more than a decade.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import atomic_path, write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def smooth(steps: Sequence[float], values: Sequence[float], half_width: float | None = None) -> np.ndarray:
    """Each value replaced by a straight line fitted (least squares) to the points within
    ``half_width`` steps either side of it, evaluated at its step. Default half width: 1/40 of
    the steps covered, at least one logging interval. ``steps`` ascending.

    Centred, so it does not lag a falling loss the way a trailing moving average does; a line
    rather than a mean, so it follows a slope, at the ends too (where the window is one-sided).
    Window sums come from cumulative sums: linear in the number of points.
    """
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    span = x[-1] - x[0] if len(x) else 0.0
    if len(x) < 3 or span <= 0:
        return y.copy()
    if half_width is None:
        half_width = max(span / 40, float(np.median(np.diff(x))))
    u, h = (x - x[0]) / span, half_width / span  # steps mapped onto [0, 1]: the sums keep their precision
    lo, hi = np.searchsorted(u, u - h, side="left"), np.searchsorted(u, u + h, side="right")

    def mean(a: np.ndarray) -> np.ndarray:
        total = np.concatenate(([0.0], np.cumsum(a)))
        return (total[hi] - total[lo]) / (hi - lo)

    mean_u, mean_y = mean(u), mean(y)
    var = mean(u * u) - mean_u**2
    slope = np.divide(mean(u * y) - mean_u * mean_y, var, out=np.zeros_like(var), where=var > (1e-6 * h) ** 2)
    return mean_y + slope * (u - mean_u)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records with a finite ``key``, in step order."""
    pairs = sorted((r["step"], r[key]) for r in records
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r)
    steps, values = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
    return steps, values


def loss_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """The loss curve of ``records`` (metrics.jsonl lines) as a matplotlib figure (Agg canvas,
    no pyplot: nothing global is touched, and no figure is kept alive after it is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    steps, loss = _series(records, "loss")
    val_steps, val_loss = _series(records, "val_loss")
    lr_steps, lr = _series(records, "lr")
    fig = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="0.72", linewidth=0.8, label="training loss")
    ax.plot(steps, smooth(steps, loss), color="C0", linewidth=2, label="smoothed")
    ax.plot(val_steps, val_loss, "o-", color="C1", markersize=5, label="validation loss")
    losses = np.concatenate([loss, val_loss])
    if len(losses) and losses.min() > 0 and losses.max() > 10 * losses.min():
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="step", ylabel="loss")
    ax.grid(True, which="major", alpha=0.3)
    lines = list(ax.get_lines())
    if len(lr):
        ax_lr = ax.twinx()
        lines += ax_lr.plot(lr_steps, lr, color="C2", linewidth=1, alpha=0.6, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_ylim(bottom=0)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    drawn = [line for line in lines if len(line.get_xdata())]
    if drawn:  # above the axes, where no curve runs under it
        fig.legend(handles=drawn, loc="outside upper center", ncols=len(drawn), frameon=False)
    return fig


def plot_loss(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Draw `loss_figure` of ``records`` into the PNG ``path``, whole (a reader never sees half)."""
    with atomic_path(path) as tmp:
        loss_figure(records).savefig(tmp, format="png")
