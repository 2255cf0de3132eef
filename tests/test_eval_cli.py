"""`vcell eval run|score|baseline|prep` in real subprocesses, against cell-eval's own outputs."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell.eval.scoring import STATISTICS, read_csv

from conftest import run_cli
from eval_cases import norman, simulated

pytest.importorskip("cell_eval", reason="cell-eval 0.8.2 (test extra) is the oracle for these tests")


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    real, pred, pert_col, control = simulated()
    d = tmp_path_factory.mktemp("sim")
    real.write_h5ad(d / "real.h5ad")
    pred.write_h5ad(d / "pred.h5ad")
    return d, pert_col, control


@pytest.fixture(scope="module")
def cell_eval_out(sim_files):
    from cell_eval import MetricsEvaluator

    d, pert_col, control = sim_files
    out = d / "cell_eval"
    evaluator = MetricsEvaluator(
        adata_pred=str(d / "pred.h5ad"), adata_real=str(d / "real.h5ad"), control_pert=control, pert_col=pert_col,
        num_threads=2, outdir=str(out), pdex_kwargs={"cpm_filter": None, "epsilon": 0.0},
    )
    evaluator.compute(profile="full", write_csv=True)
    return out


def _eval(d, pert_col, control, out, *extra, pred="pred.h5ad"):
    return run_cli("eval", "run", "--pred", d / pred, "--real", d / "real.h5ad", "--pert-col", pert_col,
                   "--control", control, "--out", out, *extra)


def test_run_matches_cell_eval_files(sim_files, cell_eval_out):
    d, pert_col, control = sim_files
    out = d / "vcell_full"
    result = _eval(d, pert_col, control, out, "--profile", "full")
    assert result.returncode == 0, result.stderr
    assert "overlap_at_N" in result.stdout and "discrimination_score_l1" in result.stdout
    ours, theirs = read_csv(out / "results.csv"), read_csv(cell_eval_out / "results.csv")
    assert list(ours.columns) == list(theirs.columns)
    assert ours["perturbation"].tolist() == theirs["perturbation"].tolist()
    for col in ours.columns[1:]:
        a, b = ours[col].to_numpy(dtype=float, na_value=np.nan), theirs[col].to_numpy(dtype=float, na_value=np.nan)
        assert np.allclose(a, b, atol=1e-6, equal_nan=True), col
    agg_ours, agg_theirs = read_csv(out / "agg_results.csv"), read_csv(cell_eval_out / "agg_results.csv")
    assert list(agg_ours.columns) == list(agg_theirs.columns)
    assert agg_ours["statistic"].tolist() == agg_theirs["statistic"].tolist() == list(STATISTICS)
    de_ours, de_theirs = pd.read_csv(out / "real_de.csv"), pd.read_csv(cell_eval_out / "real_de.csv")
    assert list(de_ours.columns) == list(de_theirs.columns)
    np.testing.assert_allclose(de_ours["p_value"], de_theirs["p_value"], rtol=1e-9, atol=1e-300)
    for name in ("real_de.csv", "pred_de.csv"):  # the same text: whole floats as "735.0", labels unquoted
        assert (out / name).read_bytes() == (cell_eval_out / name).read_bytes(), name


def test_several_predictions_in_one_run_write_what_their_own_runs_write(sim_files, tmp_path):
    """--pred twice: the reference read and summarised once; each prediction's four files (its
    genes in another order for one, values changed for the other) byte for byte as alone."""
    d, pert_col, control = sim_files
    pred = ad.read_h5ad(d / "pred.h5ad")
    other = pred[:, np.random.default_rng(1).permutation(pred.n_vars)].copy()
    other.X = np.asarray(other.X.toarray() if hasattr(other.X, "toarray") else other.X) * 1.1
    other.write_h5ad(tmp_path / "other.h5ad")
    many = run_cli("eval", "run", "--pred", d / "pred.h5ad", "--pred", tmp_path / "other.h5ad", "--real", d / "real.h5ad",
                   "--pert-col", pert_col, "--control", control, "--out", tmp_path / "many")
    assert many.returncode == 0, many.stderr[-2000:]
    for name, path in (("pred", d / "pred.h5ad"), ("other", tmp_path / "other.h5ad")):
        alone = run_cli("eval", "run", "--pred", path, "--real", d / "real.h5ad", "--pert-col", pert_col, "--control", control,
                        "--out", tmp_path / f"alone_{name}")
        assert alone.returncode == 0, alone.stderr[-2000:]
        for f in ("results.csv", "agg_results.csv", "real_de.csv", "pred_de.csv"):
            assert (tmp_path / "many" / name / f).read_bytes() == (tmp_path / f"alone_{name}" / f).read_bytes(), (name, f)
    assert (tmp_path / "many" / "pred" / "results.csv").read_bytes() != (tmp_path / "many" / "other" / "results.csv").read_bytes()


def test_each_context_is_scored_apart_as_cell_eval_scores_each_cell_type(sim_files, tmp_path):
    """--context-col with the vcc profile (cell-eval's --celltype-col) was ignored: every context
    pooled, exit 0. Each context is now scored as a pair of its own, in OUT/CONTEXT/, byte for byte
    what a run on that context's cells writes; contexts the files do not share are one error."""
    d, pert_col, control = sim_files
    real, pred = ad.read_h5ad(d / "real.h5ad"), ad.read_h5ad(d / "pred.h5ad")
    halves = {}
    for name, a in (("real", real), ("pred", pred)):
        b = a.copy()
        b.X = np.asarray(b.X.toarray() if hasattr(b.X, "toarray") else b.X) * (1.2 if name == "pred" else 1.1)
        both = ad.concat({"A": a, "B": b}, label="line", index_unique="-")
        both.write_h5ad(tmp_path / f"{name}2.h5ad")
        for line in ("A", "B"):
            both[both.obs["line"] == line].copy().write_h5ad(tmp_path / f"{name}_{line}.h5ad")
        halves[name] = both
    args = ["--pert-col", pert_col, "--control", control, "--profile", "vcc"]
    split = run_cli("eval", "run", "--pred", tmp_path / "pred2.h5ad", "--real", tmp_path / "real2.h5ad", "--context-col", "line",
                    "--out", tmp_path / "split", *args)
    assert split.returncode == 0, split.stderr[-2000:]
    assert "in 2 contexts" in split.stdout
    for line in ("A", "B"):
        alone = run_cli("eval", "run", "--pred", tmp_path / f"pred_{line}.h5ad", "--real", tmp_path / f"real_{line}.h5ad",
                        "--out", tmp_path / f"alone_{line}", *args)
        assert alone.returncode == 0, alone.stderr[-2000:]
        for f in ("results.csv", "agg_results.csv", "real_de.csv", "pred_de.csv"):
            assert (tmp_path / "split" / line / f).read_bytes() == (tmp_path / f"alone_{line}" / f).read_bytes(), (line, f)
    assert (tmp_path / "split" / "A" / "results.csv").read_bytes() != (tmp_path / "split" / "B" / "results.csv").read_bytes()
    # Each context scored in gene bands within --memory-budget (it was read whole, the budget ignored), and
    # several predictions in one run (refused before), each in OUT/NAME/CONTEXT/: the same bytes.
    shutil.copy(tmp_path / "pred2.h5ad", tmp_path / "again.h5ad")
    tiled = run_cli("eval", "run", "--pred", tmp_path / "pred2.h5ad", "--pred", tmp_path / "again.h5ad", "--real", tmp_path / "real2.h5ad",
                    "--context-col", "line", "--memory-budget", "0.00002", "--out", tmp_path / "tiled", *args)
    assert tiled.returncode == 0, tiled.stderr[-2000:]
    assert "in 2 contexts x 2 predictions" in tiled.stdout
    for name in ("pred2", "again"):
        for line in ("A", "B"):
            for f in ("results.csv", "agg_results.csv", "real_de.csv", "pred_de.csv"):
                assert (tmp_path / "tiled" / name / line / f).read_bytes() == (tmp_path / "split" / line / f).read_bytes(), (name, line, f)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch copies left behind"
    only_a = halves["pred"][halves["pred"].obs["line"] == "A"].copy()
    only_a.write_h5ad(tmp_path / "pred_only_a.h5ad")
    missing = run_cli("eval", "run", "--pred", tmp_path / "pred_only_a.h5ad", "--real", tmp_path / "real2.h5ad",
                      "--context-col", "line", "--out", tmp_path / "missing", *args)
    assert missing.returncode == 2 and "the contexts in column 'line' differ: 'B' only in" in missing.stderr
    assert not (tmp_path / "missing").exists()


def test_reordered_genes_give_the_same_results(sim_files, tmp_path):
    d, pert_col, control = sim_files
    pred = ad.read_h5ad(d / "pred.h5ad")
    order = np.random.default_rng(0).permutation(pred.n_vars)
    pred[:, order].copy().write_h5ad(d / "pred_shuffled.h5ad")
    a = _eval(d, pert_col, control, tmp_path / "a")
    b = _eval(d, pert_col, control, tmp_path / "b", pred="pred_shuffled.h5ad")
    assert a.returncode == b.returncode == 0, b.stderr
    assert "reordered to match" in b.stderr
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def _bad(make):
    def build(real, pred):
        return make(real.copy(), pred.copy())
    return build


def _set_pred(fn):
    def make(real, pred):
        X = pred.X.copy()
        fn(X)
        pred.X = X
        return real, pred
    return make


def _drop_genes(real, pred):
    return real, pred[:, 3:].copy()


def _drop_pert(real, pred):
    return real, pred[(pred.obs["target"] != "G2").to_numpy()].copy()


def _no_control(real, pred):
    return real, pred[(pred.obs["target"] != "non-targeting").to_numpy()].copy()


def _counts(real, pred):
    pred.X = np.round(np.expm1(pred.X) * 10)
    return real, pred


def _out_of_range(real, pred):
    pred.X = pred.X * 10 + 0.5
    return real, pred


BAD = {
    "genes_differ": (_drop_genes, [], ["genes differ from", "3 gene(s)", "missing"]),
    "perturbation_missing": (_drop_pert, [], ["1 perturbation(s)", "missing from the prediction (G2); predict every perturbation"]),
    "control_missing": (_no_control, [], ["no control cells ('non-targeting' in column 'target'", "--profile vcc2026"]),
    "nan": (_set_pred(lambda X: X.__setitem__((5, 7), np.nan)), [], ["NaN or infinite"]),
    "negative": (_set_pred(lambda X: X.__setitem__((5, 7), -1.0)), [], ["negative values"]),
    "counts_declared_log1p": (_counts, ["--input-type", "log1p"], ["--input-type log1p but every value is an integer"]),
    "log1p_declared_counts": (lambda r, p: (r, p), ["--input-type", "counts"], ["--input-type counts but X has non-integer values"]),
    "out_of_log_range": (_out_of_range, [], ["out of the log1p range"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_one_line_no_output(case, sim_files, tmp_path):
    d, pert_col, control = sim_files
    make, extra, expected = BAD[case]
    real, pred = make(ad.read_h5ad(d / "real.h5ad"), ad.read_h5ad(d / "pred.h5ad"))
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    out = tmp_path / "out"
    result = _eval(tmp_path, pert_col, control, out, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert not out.exists()  # nothing written before the checks pass


def test_baseline_matches_cell_eval_and_scores(tmp_path):
    from cell_eval import build_base_mean_adata

    real, pred, pert_col, control = norman()
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    result = run_cli("eval", "baseline", "--real", tmp_path / "real.h5ad", "--out", tmp_path / "base.h5ad",
                     "--de-out", tmp_path / "base_de.csv", "--pert-col", pert_col, "--control", control)
    assert result.returncode == 0, result.stderr
    ours = ad.read_h5ad(tmp_path / "base.h5ad")
    theirs = build_base_mean_adata(ad.read_h5ad(tmp_path / "real.h5ad"), pert_col=pert_col, control_pert=control)
    assert ours.shape == theirs.shape
    dense = lambda X: X.toarray() if hasattr(X, "toarray") else np.asarray(X)  # noqa: E731
    ours_x, theirs_x = dense(ours.X), dense(theirs.X)
    ours_pert, theirs_pert = (ours.obs[pert_col] != control).to_numpy(), (theirs.obs[pert_col] != control).to_numpy()
    np.testing.assert_allclose(ours_x[ours_pert], theirs_x[theirs_pert], atol=1e-6)  # the same vector in every row
    np.testing.assert_allclose(ours_x[~ours_pert], theirs_x[~theirs_pert], atol=0)  # the real controls
    assert sorted(ours.obs[pert_col]) == sorted(theirs.obs[pert_col])
    de = pd.read_csv(tmp_path / "base_de.csv")
    assert set(de["target"]) == set(real.obs[pert_col]) - {control}

    for name, pred_file in (("model", "pred.h5ad"), ("base", "base.h5ad")):
        r = run_cli("eval", "run", "--pred", tmp_path / pred_file, "--real", tmp_path / "real.h5ad",
                    "--pert-col", pert_col, "--control", control, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    scored = run_cli("eval", "score", "--user", tmp_path / "model" / "agg_results.csv",
                     "--baseline", tmp_path / "base" / "agg_results.csv", "--out", tmp_path / "score.csv")
    assert scored.returncode == 0, scored.stderr
    table = read_csv(tmp_path / "score.csv")
    assert {"mae", "discrimination_score_l1", "overlap_at_N"} <= set(table["metric"])
    assert "unclipped" in table.columns
    missing = run_cli("eval", "score", "--user", tmp_path / "nope.csv", "--baseline", tmp_path / "score.csv")
    assert missing.returncode == 2 and "nope.csv: file not found" in missing.stderr


def test_counts_with_no_positive_cell_total_are_one_error_not_nans():
    """normalize_total's target is the median of the positive totals: with none it is NaN, and scanpy
    then fails deep inside (found by test_properties); vcell names the file instead."""
    import scipy.sparse as sp

    from vcell.errors import VcellError
    from vcell.eval.inputs import to_log1p

    zeros = ad.AnnData(X=sp.csr_matrix(np.zeros((3, 2), np.float32)), obs=pd.DataFrame(index=["a", "b", "c"]))
    for declared in ("counts", "auto"):
        with pytest.raises(VcellError, match=r"^real\.h5ad: every cell has 0 counts in total"):
            to_log1p(zeros, "real.h5ad", declared)
    one = zeros.copy()
    one.X = sp.csr_matrix(np.array([[0, 0], [0, 3], [0, 0]], np.float32))
    assert np.isfinite(to_log1p(one, "real.h5ad", "counts").X.toarray()).all()


def test_counts_whose_totals_overflow_are_one_error_not_nans():
    """Cell totals beyond float32's range (here the median total: normalize_total's target) make the
    normalised values NaN; vcell names the file."""
    import scipy.sparse as sp

    from vcell.errors import VcellError
    from vcell.eval.inputs import to_log1p

    huge = ad.AnnData(X=sp.csr_matrix(np.array([[3e38, 3e38], [3e38, 3e38], [2, 0]], np.float32)), obs=pd.DataFrame(index=["a", "b", "c"]))
    with pytest.raises(VcellError, match=r"^real\.h5ad: the counts normalised to the median library size are not finite "
                                         r"\(cell totals beyond the range of float32\)$"):
        to_log1p(huge, "real.h5ad", "counts")
