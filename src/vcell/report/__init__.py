"""A single self-contained HTML report of a benchmark run (``vcell bench``'s output directory).

* :func:`build_report` writes ``report.html``: header, leaderboard, per-metric bar charts,
  predicted-vs-real effect scatters, perturbation-discrimination heatmaps and DE overlap per
  perturbation; every figure is an embedded PNG, no external file, script, font or URL.
* :func:`screenshot` renders an HTML file to PNG with headless Chromium.
"""

from vcell.report.build import build_report, load_bench, render_report
from vcell.report.chromium import find_chromium, screenshot

__all__ = ["build_report", "find_chromium", "load_bench", "render_report", "screenshot"]
