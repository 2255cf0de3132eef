"""The 2025 evaluator told one side counts and the other log1p (auto-detected): said, numbers as cell-eval's."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import vcell
from vcell.data.normalize import normalize_log1p

from conftest import run_cli

MIXED = "holds counts and {pred} holds log1p (told from their values)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    counts = vcell.simulate_perturbseq(n_genes=60, n_contexts=1, n_perturbations=4, n_combinations=0,
                                       cells_per_perturbation=30, n_controls=60, seed=2)
    counts.X = sp.csr_matrix(counts.X, dtype=np.float32)
    log1p = normalize_log1p(counts)  # to 1e4, as most pipelines: the counts side goes to its median total
    del log1p.layers["counts"]
    d = tmp_path_factory.mktemp("spaces")
    counts.write_h5ad(d / "real.h5ad")
    log1p.write_h5ad(d / "pred.h5ad")
    return counts, log1p, d


def test_in_memory_evaluate_says_when_the_sides_are_in_different_spaces(pair, caplog):
    counts, log1p, _ = pair
    with caplog.at_level(logging.WARNING, logger="vcell"):
        vcell.evaluate(log1p, counts, profile="vcc")
    assert "real " + MIXED.format(pred="pred") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vcell"):
        vcell.evaluate(log1p, log1p, profile="vcc")
    assert "told from their values" not in caplog.text


@pytest.mark.parametrize("budget", [None, "0.00003"])
def test_eval_run_says_it_for_files_read_whole_or_in_tiles(pair, tmp_path, budget):
    _, _, d = pair
    extra = ["--memory-budget", budget] if budget else []
    proc = run_cli("eval", "run", "--pred", d / "pred.h5ad", "--real", d / "real.h5ad", "--profile", "vcc",
                   "--out", tmp_path / "ev", *extra)
    assert proc.returncode == 0, proc.stderr[-1500:]
    said = " ".join(proc.stderr.split())
    assert f"real.h5ad {MIXED.format(pred=d / 'pred.h5ad')}" in said, said
    same = run_cli("eval", "run", "--pred", d / "pred.h5ad", "--real", d / "pred.h5ad", "--profile", "vcc",
                   "--out", tmp_path / "same", *extra)
    assert same.returncode == 0 and "told from their values" not in same.stderr


def test_evaluate_reads_a_layer_when_asked(pair):
    """layer='counts' scores a scanpy-layout reference's counts, as the counts file itself; a missing layer is one line."""
    counts, log1p, _ = pair
    layered = log1p.copy()
    layered.layers["counts"] = counts.X.copy()
    layered.uns["log1p"] = {"base": None}  # scanpy's mark of X: not carried to the layer (it warned 'already log-transformed')
    want = vcell.evaluate(log1p, counts, profile="vcc").results
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = vcell.evaluate(log1p, layered, profile="vcc", layer="counts").results
    assert want.equals(got)
    assert not [w for w in caught if "log-transformed" in str(w.message)], [str(w.message) for w in caught]
    with pytest.raises(vcell.VcellError, match=r"real: no layers\['raw'\]"):
        vcell.evaluate(log1p, layered, profile="vcc", layer="raw")


def test_a_fraction_of_exactly_float32_one_thousandth_is_no_fraction_as_in_cell_eval(tmp_path):
    """cell-eval tells counts from log1p by ``np.modf(X) > 1e-3`` in the values' precision; vcell
    compared a float32 fraction with a float64 1e-3, so integer values beside float32(0.001) were
    read as log1p, not counts (every expression metric differed), in memory and from a file."""
    import anndata as ad
    import pandas as pd

    from vcell.eval.run import run

    rng = np.random.default_rng(0)
    labels = ["ctrl"] * 20 + ["A"] * 15 + ["B"] * 15
    X = rng.poisson(3.0, (50, 10)).astype(np.float32)
    X[:, 0] = np.float32(0.001)
    P = X.copy()
    P[20:35, 3] += 4
    obs = pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(50)])
    real, pred = ad.AnnData(X, obs=obs), ad.AnnData(P, obs=obs.copy())
    cell_eval = pytest.importorskip("cell_eval.utils", reason="cell-eval 0.8.2 (test extra) is the oracle")
    assert not cell_eval.guess_is_lognorm(real.copy())  # counts, to cell-eval
    theirs = [0.11937014758586884, 0.033869002014398575]  # cell-eval's mae, counts normalised (as log1p: 0.400 and 0)
    mae = vcell.evaluate(pred, real, pert_col="t", control="ctrl", profile="vcc").results["mae"].to_numpy()
    np.testing.assert_allclose(mae, theirs, rtol=1e-6)  # cell-eval averages in float32
    for layout in ("dense", "csr"):  # a dense file read whole, a CSR one through the reader's own scan
        for side, name in ((real, "real"), (pred, "pred")):
            ad.AnnData(sp.csr_matrix(side.X) if layout == "csr" else side.X, obs=side.obs).write_h5ad(tmp_path / f"{name}.h5ad")
        result, _ = run(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", tmp_path / layout, "t", "ctrl", profile="vcc")
        np.testing.assert_allclose(result.results["mae"].to_numpy(), theirs, rtol=1e-6)
