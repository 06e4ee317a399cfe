"""Evaluation: statistics (win rates, bootstrap, length control, RM accuracy, calibration, KL,
best-of-n, over-optimization fits), report figures and the HTML/Markdown/JSON report.

Plot functions import matplotlib lazily; importing this package loads numpy only.
"""

from posttrain.evaluation.plots import (
    bar_with_ci,
    calibration_plot,
    frontier,
    line_plot,
    panel_plot,
    panels_figure,
    scatter_frontier,
)
from posttrain.evaluation.report import (
    Report,
    format_p,
    markdown_to_html,
    paired_p,
    parse_report_sections,
    slugify,
    text_table,
)
from posttrain.evaluation.stats import (
    EvaluationError,
    best_of_n_expected,
    best_of_n_kl,
    bootstrap_ci,
    calibration_bins,
    expected_calibration_error,
    gao_fit_bon,
    gao_fit_rl,
    kl_from_samples,
    length_baseline_accuracy,
    length_controlled_win_rate,
    paired_bootstrap,
    pairwise_accuracy,
    swap_consistency,
    win_rate,
)

__all__ = [
    "EvaluationError", "Report", "bar_with_ci", "best_of_n_expected", "best_of_n_kl", "bootstrap_ci",
    "calibration_bins", "calibration_plot", "expected_calibration_error", "format_p", "frontier",
    "gao_fit_bon", "gao_fit_rl", "kl_from_samples", "length_baseline_accuracy", "length_controlled_win_rate",
    "line_plot", "markdown_to_html", "paired_bootstrap", "paired_p", "pairwise_accuracy", "panel_plot",
    "panels_figure", "parse_report_sections", "scatter_frontier", "slugify", "swap_consistency", "text_table",
    "win_rate",
]
