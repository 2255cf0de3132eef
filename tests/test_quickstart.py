"""The README's quick start, run verbatim as a new user would paste it, on the shared data.

Every ```bash block of the "Quick start" section is run, in order, in one bash process, from a
copy of the project's layout in a temporary folder: ``REPO/`` (the working directory, with a
``.venv/bin/activate`` that puts this interpreter's ``vcell`` first on PATH) beside
``shared/data`` (a link to the real data). The README text itself is not changed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import anndata as ad
import pandas as pd
import pytest

from conftest import MCFALINE, REPO, SHARED_DATA

README = REPO / "README.md"
VCC_METRICS = ("overlap_at_N", "mae", "discrimination_score_l1")


def quickstart_blocks(text: str) -> list[str]:
    """The ```bash blocks of the README's "## Quick start" section, in order."""
    section = re.search(r"^## Quick start.*?(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    return re.findall(r"^```bash\n(.*?)^```", section.group(0), flags=re.S | re.M)


def test_readme_quickstart_blocks_are_one_path():
    """The quick start names only commands and files it makes itself (and the shared data)."""
    blocks = quickstart_blocks(README.read_text())
    assert len(blocks) >= 1
    script = "\n".join(blocks)
    for step in ("vcell data check", "vcell data split", "vcell train st", "vcell predict", "vcell data subset",
                 "vcell eval run", "vcell eval score", "vcell eval baseline", "vcell bench"):
        assert step in script, f"the quick start lost its `{step}` step"
    assert "shared/data/" + MCFALINE in script


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~2 min on an idle 2-core machine (the 100 ST steps are most of it); far more on a busy one
def test_readme_quickstart_runs_verbatim(tmp_path):
    if not (SHARED_DATA / MCFALINE).is_file():
        pytest.skip(f"the README quick start needs {MCFALINE} in {SHARED_DATA} (../shared/data beside the repo); skipping")
    repo, bindir = tmp_path / "repo", tmp_path / "repo" / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA.resolve(), target_is_directory=True)
    shim = bindir / "vcell"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m vcell \"$@\"\n")
    shim.chmod(0o755)
    (bindir / "activate").write_text(f"export PATH={shlex.quote(str(bindir))}:\"$PATH\"\n")

    blocks = quickstart_blocks(README.read_text())
    # Stop at the first failing command and name it; the blocks themselves run as written.
    script = "set -eo pipefail\ntrap 'echo \"QUICKSTART FAILED (exit $?): $BASH_COMMAND\" >&2' ERR\n" + "\n".join(blocks)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n--- stdout ---\n{proc.stdout[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]

    qs = repo / "quickstart"
    # the split holds T98G out; the run trained 100 steps on the other contexts
    assert '"mcfaline23.T98G" = "test"' in (qs / "split.toml").read_text()
    assert (qs / "st" / "last" / "weights.safetensors").is_file()
    # prediction and truth: the same 9 T98G perturbations, with as many cells each
    pred, real = ad.read_h5ad(qs / "pred.h5ad"), ad.read_h5ad(qs / "real.h5ad")
    assert set(real.obs["cell_type"].astype(str)) == {"T98G"}
    pred_counts = pred.obs["perturbation"].astype(str).value_counts().sort_index()
    real_counts = real.obs["perturbation"].astype(str).value_counts().sort_index()
    assert pred_counts.equals(real_counts) and len(real_counts) == 10 and real_counts["control"] == 100
    assert list(pred.var_names) == list(real.var_names)
    # scored: the vcc metrics over the 9 perturbations, finite
    for folder in ("eval", "base_eval"):
        agg = pd.read_csv(qs / folder / "agg_results.csv").set_index("statistic")
        assert set(VCC_METRICS) <= set(agg.columns)
        assert agg.loc["count", "mae"] == 9
        assert agg.loc["mean", list(VCC_METRICS)].astype(float).notna().all()
        assert len(pd.read_csv(qs / folder / "results.csv")) == 9
    # the baselines' leaderboard and report, and the model's score against bench's cell_mean
    board = pd.read_csv(qs / "bench" / "leaderboard.csv")
    assert {"cell_mean", "pert_mean", "linear"} <= set(board["model"]) and "T98G" in set(board["context"])
    assert (qs / "bench" / "report.html").stat().st_size > 10_000
    score = pd.read_csv(qs / "score.csv").set_index("metric")
    assert {"avg_score", *VCC_METRICS} <= set(score.index)
    assert 0.0 <= float(score.loc["avg_score", "from_baseline"]) <= 1.0
