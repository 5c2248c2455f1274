"""trainer.metrics: the smoothing of loss.png follows the loss, and the plot is a whole PNG."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from trainer.metrics import loss_figure, plot_loss, smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def trailing_ema(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """What loss.png drew before: a debiased exponential moving average over logged points."""
    out, level = [], 0.0
    for k, v in enumerate(values, start=1):
        level = weight * level + (1 - weight) * v
        out.append(level / (1 - weight**k))
    return np.array(out)


def decay(steps: np.ndarray) -> np.ndarray:
    """A loss like the demo's: 5.3 at step 50, 0.45 near step 650, 0.15 at the end."""
    return 0.15 + 5.15 * np.exp(-(steps - 50) / 210)


def test_smooth_is_a_line_fitted_to_each_centred_window():
    rng = np.random.default_rng(0)
    steps = np.sort(rng.choice(np.arange(1, 2000), size=150, replace=False)).astype(float)
    values = rng.normal(size=150).cumsum()
    half_width = 37.3
    expected = []
    for step in steps:
        window = np.abs(steps - step) <= half_width
        line = np.polyfit(steps[window], values[window], 1) if window.sum() > 1 else [0.0, values[window][0]]
        expected.append(np.polyval(line, step))
    np.testing.assert_allclose(smooth(steps, values, half_width), expected, rtol=1e-7, atol=1e-7)


def test_smooth_follows_an_exponential_decay_that_a_trailing_ema_lags():
    """The demo's logging (a point every 50 steps): at step 650 the loss is ~0.45 and the old
    moving average said ~1.3; the centred line fit stays within 3% everywhere."""
    steps = np.arange(50, 3001, 50, dtype=float)
    truth = decay(steps)
    at_650 = list(steps).index(650)
    assert trailing_ema(truth)[at_650] > 2.5 * truth[at_650]
    assert np.max(np.abs(smooth(steps, truth) / truth - 1)) < 0.03


def test_smooth_averages_out_noise_without_lagging():
    """A point every step with 20% multiplicative noise: the smoothing stays within 10% of the
    true curve, 15% at the ends (where its window is one-sided), and its typical error is a
    fifth of the noise's."""
    rng = np.random.default_rng(1)
    steps = np.arange(1, 3001, dtype=float)
    truth = decay(steps)
    noisy = truth * rng.lognormal(sigma=0.2, size=len(steps))
    error = smooth(steps, noisy) / truth - 1
    window = 3000 // 40
    assert np.max(np.abs(error[window:-window])) < 0.1
    assert np.max(np.abs(error)) < 0.15
    assert np.sqrt(np.mean(error**2)) < np.sqrt(np.mean((noisy / truth - 1) ** 2)) / 5


def test_smooth_keeps_a_step_except_near_the_jump():
    """Flat data is kept exactly; only points within the window of the jump see both levels."""
    steps = np.arange(0, 2001, 10, dtype=float)
    values = np.where(steps < 1000, 2.0, 1.0)
    half_width = 2000 / 40
    far = np.abs(steps - 1000) > half_width
    np.testing.assert_allclose(smooth(steps, values)[far], values[far], rtol=1e-12)
    assert np.abs(trailing_ema(values)[far] - values[far]).max() > 0.3


def _records() -> list[dict]:
    """metrics.jsonl lines as the trainer writes them: steps with lr, evaluations, a NaN loss."""
    records = []
    for step in range(10, 3001, 10):
        lr = 2e-3 * min(1.0, step / 200) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / 3000)) / 2)
        records.append({"step": step, "epoch": 0, "loss": float(decay(np.array(step))), "lr": lr, "grad_norm": 1.0})
    records[5]["loss"] = float("nan")
    records += [{"step": 1000, "val_loss": 0.5}, {"step": 2000, "val_loss": 0.3}, {"step": 2500, "val_loss": None},
                {"step": 3000, "val_loss": 0.25}]
    return records


def test_loss_figure_has_plain_log_ticks_validation_points_and_the_learning_rate():
    records = _records()
    fig = loss_figure(records)
    fig.canvas.draw()
    ax, ax_lr = fig.axes
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert {"0.2", "0.5", "1", "2"} <= set(labels), labels
    assert all(re.fullmatch(r"\d+(\.\d+)?", label) for label in labels), labels  # not 10^-1, not e^x
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["validation loss"].get_xdata()) == [1000, 2000, 3000]
    assert list(lines["validation loss"].get_ydata()) == [0.5, 0.3, 0.25]
    trained = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    np.testing.assert_array_equal(lines["training loss"].get_ydata(), [r["loss"] for r in trained])
    (lr_line,) = ax_lr.get_lines()
    np.testing.assert_array_equal(lr_line.get_ydata(), [r["lr"] for r in records if "lr" in r])
    (legend,) = fig.legends
    assert {t.get_text() for t in legend.get_texts()} == {
        "training loss", "smoothed", "validation loss", "learning rate"}


def test_plot_loss_writes_a_whole_png_and_a_failed_draw_keeps_the_last(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "loss.png"
    plot_loss(_records(), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (800, 480)
    plot_loss([], tmp_path / "empty.png")  # a run that has logged nothing yet
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)

    before = path.read_bytes()

    def killed_midway(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE + b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", killed_midway)
    with pytest.raises(OSError, match="disk full"):
        plot_loss(_records()[:50], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "loss.png"]
