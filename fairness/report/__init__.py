"""Before/after report: annotated image grids, frequency / loss / bias plots, one-file HTML.

Everything here draws from plain arrays and dicts (audit rows, summaries, training logs), so
the report can be rebuilt from saved metrics without models or a GPU.
"""

from fairness.report.grids import annotated_grid, before_after_grid, class_colors, grid_layout, render_grid
from fairness.report.html import Section, Table, format_cell, format_text_table, paper_table, write_report
from fairness.report.plots import plot_bias_summary, plot_group_frequencies, plot_loss_curves

__all__ = [
    "Section",
    "Table",
    "annotated_grid",
    "before_after_grid",
    "class_colors",
    "format_cell",
    "format_text_table",
    "grid_layout",
    "paper_table",
    "plot_bias_summary",
    "plot_group_frequencies",
    "plot_loss_curves",
    "render_grid",
    "write_report",
]
