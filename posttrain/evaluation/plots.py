"""Report figures as PNG bytes.

matplotlib is imported inside each function so that importing posttrain.evaluation stays cheap.
Figures are built with ``matplotlib.figure.Figure`` (rendered by the Agg canvas) instead of
pyplot: no global figure registry, no GUI backend, nothing to close. Figures are small
(5 × 3.2 in at 100 dpi → 500 × 320 px) to keep the self-contained HTML report small.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from posttrain.evaluation.stats import EvaluationError, calibration_bins, expected_calibration_error

FIGSIZE = (5.0, 3.2)
DPI = 100
Series = tuple[Sequence[float], Sequence[float]]


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _finish(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, legend: bool = True) -> bytes:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": keep the pixel size fixed
    return buf.getvalue()


def line_plot(series: dict[str, Series], title: str = "", xlabel: str = "", ylabel: str = "",
              logx: bool = False) -> bytes:
    """One line (with markers) per named (x, y) series, e.g. gold reward vs step per run."""
    fig, ax = _figure()
    for name, (x, y) in series.items():
        if len(x) != len(y):
            raise EvaluationError(f"series {name!r} has {len(x)} x values but {len(y)} y values")
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, label=name)
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, title, xlabel, ylabel)


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-left Pareto frontier: the points, by increasing x (cost, e.g. KL), whose y (e.g.
    gold reward) beats every point with smaller or equal x."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((float(x), float(y)))
    return out


def scatter_frontier(points: dict[str, Sequence[tuple[float, float]]], title: str = "",
                     xlabel: str = "", ylabel: str = "") -> bytes:
    """Scatter each method's (x, y) points and draw its Pareto frontier as a step line (the best
    y reached within an x budget, so no interpolation is implied), e.g. gold reward vs KL for
    PPO, DPO and best-of-n."""
    fig, ax = _figure()
    for name, pts in points.items():
        arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        if len(arr) == 0:
            continue
        fx, fy = zip(*frontier(arr.tolist()))
        (line,) = ax.plot(fx, fy, drawstyle="steps-post", linewidth=1.2, label=name)
        ax.scatter(arr[:, 0], arr[:, 1], s=12, alpha=0.6, color=line.get_color())
    return _finish(fig, ax, title, xlabel, ylabel)


def bar_with_ci(names: Sequence[str], values: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                title: str = "", ylabel: str = "", ref: float | None = None) -> bytes:
    """Bars with [lo, hi] error bars (e.g. win rates with bootstrap intervals); ``ref`` draws a
    dashed horizontal line (e.g. 0.5 = parity with the baseline)."""
    v, l, h = (np.asarray(a, dtype=np.float64) for a in (values, lo, hi))
    if not len(names) == len(v) == len(l) == len(h):
        raise EvaluationError("names, values, lo and hi must have the same length")
    if np.any(l > v) or np.any(h < v):
        raise EvaluationError("each interval must contain its value (lo <= value <= hi)")
    fig, ax = _figure()
    pos = np.arange(len(v))
    ax.bar(pos, v, yerr=np.vstack([v - l, h - v]), capsize=4, color="#4C72B0", alpha=0.85)
    crowded = len(names) > 4  # slant long label rows so they do not overlap
    ax.set_xticks(pos, [str(n) for n in names], rotation=20 if crowded else 0,
                  ha="right" if crowded else "center")
    if ref is not None:
        ax.axhline(ref, color="gray", linestyle="--", linewidth=1)
    return _finish(fig, ax, title, "", ylabel, legend=False)


def calibration_plot(probs: Sequence[float], labels: Sequence[int], n_bins: int = 10,
                     title: str = "Calibration") -> bytes:
    """Reliability diagram: observed frequency of label 1 per equal-width confidence bin (bars)
    against the diagonal (perfect calibration), with the ECE in the legend."""
    b = calibration_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    fig, ax = _figure()
    edges = np.linspace(0, 1, n_bins + 1)
    filled = b["count"] > 0
    ax.bar(edges[:-1][filled], b["frac_pos"][filled], width=1 / n_bins, align="edge",
           edgecolor="black", linewidth=0.5, alpha=0.8, label=f"observed (ECE = {ece:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _finish(fig, ax, title, "predicted probability", "observed frequency")
