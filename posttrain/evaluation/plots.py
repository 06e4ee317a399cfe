"""Report figures as PNG bytes.

matplotlib is imported inside each function so that importing posttrain.evaluation stays cheap.
Figures are built with ``matplotlib.figure.Figure`` (rendered by the Agg canvas) instead of
pyplot: no global figure registry, no GUI backend, nothing to close. Figures are small
(5 × 3.2 in at 100 dpi → 500 × 320 px) to keep the self-contained HTML report small; a figure
of several panels (:func:`panels_figure`) grows with its panel count.

One axis shows one quantity: figures that show several metrics (training curves, gold and proxy
reward against KL) put each metric in its own panel, titled and y-labelled with the metric's
name, and every curve carries a legend label, so no two quantities ever share a y axis.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
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


def _style(ax: Any, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)


def to_png(fig: Any, palette: bool = False) -> bytes:
    """Render a figure (from this module) to PNG bytes; ``palette`` stores it with 256 colours (a
    third of the bytes for a multi-panel line figure, no visible difference), which keeps the
    self-contained HTML report small."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": keep the pixel size fixed
    if not palette:
        return buf.getvalue()
    from PIL import Image  # a matplotlib dependency

    out = io.BytesIO()
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _finish(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, legend: bool = True) -> bytes:
    _style(ax, title, xlabel, ylabel, legend)
    return to_png(fig)


def _draw_lines(ax: Any, series: Mapping[str, Series]) -> None:
    for name, (x, y) in series.items():
        if len(x) != len(y):
            raise EvaluationError(f"series {name!r} has {len(x)} x values but {len(y)} y values")
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, label=name)


def _draw_frontier(ax: Any, points: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    for name, pts in points.items():
        arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        if len(arr) == 0:
            continue
        fx, fy = zip(*frontier(arr.tolist()))
        (line,) = ax.plot(fx, fy, drawstyle="steps-post", linewidth=1.2, label=name)
        ax.scatter(arr[:, 0], arr[:, 1], s=12, alpha=0.6, color=line.get_color())


def line_plot(series: dict[str, Series], title: str = "", xlabel: str = "", ylabel: str = "",
              logx: bool = False) -> bytes:
    """One line (with markers) per named (x, y) series, e.g. gold reward vs step per run. All
    series share one y axis: pass only series of the same quantity (several metrics go to
    :func:`panels_figure`)."""
    fig, ax = _figure()
    _draw_lines(ax, series)
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, title, xlabel, ylabel)


def panels_figure(panels: Mapping[str, Mapping[str, Any]], title: str = "", xlabel: str = "",
                  kind: str = "line", ncols: int = 2) -> Any:
    """One axis (panel) per metric: ``panels`` maps a metric name to that panel's curves.

    ``kind="line"``: each curve is ``{label: (x, y)}`` (as :func:`line_plot`);
    ``kind="frontier"``: each is ``{label: [(x, y), ...]}`` (as :func:`scatter_frontier`).
    Each panel's title and y label are its metric name, its curves keep their labels in a legend
    (pass the metric's real name, e.g. the ``metrics.jsonl`` key ``reward/mean``), the x axis is
    ``xlabel`` for all. Panels fill ``ncols`` columns row by row; the figure is 4 × 2.6 in per
    panel. Returns the ``matplotlib.figure.Figure`` (``fig.axes`` holds one axis per metric, in
    order); :func:`panel_plot` renders it to PNG.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise EvaluationError("panels_figure needs at least one metric")
    if kind not in ("line", "frontier"):
        raise EvaluationError(f"kind must be 'line' or 'frontier', got {kind!r}")
    n = len(panels)
    cols = max(1, min(ncols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.0 * cols, 2.6 * rows + (0.3 if title else 0.0)), dpi=DPI, layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [a for row in grid for a in row]
    for ax, (metric, curves) in zip(axes, panels.items()):
        (_draw_lines if kind == "line" else _draw_frontier)(ax, curves)
        _style(ax, str(metric), xlabel, str(metric))
    for ax in axes[n:]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def panel_plot(panels: Mapping[str, Mapping[str, Any]], title: str = "", xlabel: str = "",
               kind: str = "line", ncols: int = 2) -> bytes:
    """:func:`panels_figure` as PNG bytes (256 colours)."""
    return to_png(panels_figure(panels, title, xlabel, kind, ncols), palette=True)


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
    _draw_frontier(ax, points)
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
