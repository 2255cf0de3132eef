"""A single self-contained HTML report of a benchmark run (``vcell bench``'s output directory).

* :func:`build_report` writes ``report.html``: header, leaderboard, per-metric bar charts,
  predicted-vs-real effect scatters, perturbation-discrimination heatmaps and DE overlap per
  perturbation; every figure is an embedded PNG, no external file, script, font or URL.
* :func:`load_bench` reads a benchmark directory; :func:`render_report` returns the page's HTML.
* :func:`screenshot` renders an HTML file to PNG with headless Chromium.

Modules: ``inputs`` (reading the benchmark directory), ``effects`` (the data behind the effect
and discrimination figures), ``header`` (what was run, the headline), ``sections`` (the page's
other HTML sections), ``vcc2026`` (the VCC 2026 texts and caveats), ``figures`` (matplotlib),
``html`` (HTML helpers), ``build`` (assembling and writing the page), ``chromium``.
"""

from vcell.report.build import build_report, render_report
from vcell.report.chromium import find_chromium, screenshot
from vcell.report.inputs import Bench, load_bench

__all__ = ["Bench", "build_report", "find_chromium", "load_bench", "render_report", "screenshot"]
