"""vcell.eval.de: Mann-Whitney U, BH FDR and the cell-eval DE table.

Oracles: scipy (the U test and BH), pdex 0.3.0 called the way cell-eval 0.8.2 calls it, and
cell-eval's own ``MetricsEvaluator`` (its ``real_de.csv``), on the real datasets in
``../shared/data`` (else their small subsets in tests/data).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import false_discovery_control, mannwhitneyu

from vcell.errors import VcellError
from vcell.eval.de import COLUMNS, bh_fdr, de_arrays, differential_expression, mannwhitney_vs_reference

from conftest import real_data

P_RTOL = 1e-9
P_ATOL = 1e-300


def _data(name: str):
    """The full file in ../shared/data, else its small subset in tests/data, else skip."""
    return real_data(name)


def _assert_p_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert not np.isnan(ours).any()
    bad = ~(np.abs(ours - ref) <= P_RTOL * np.abs(ref) + P_ATOL)
    assert not bad.any(), f"{bad.sum()} p-values differ, e.g. ours={ours[bad][:3]} ref={ref[bad][:3]}"


def _scipy_by_group(X, labels, reference, groups):
    """scipy's U and p of each group vs the reference, per gene (float64 input, as scipy ranks
    in the input dtype)."""
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    y = X[labels == reference]
    stats, pvals = [], []
    for g in groups:
        res = mannwhitneyu(X[labels == g], y, axis=0, use_continuity=True, alternative="two-sided", method="asymptotic")
        stats.append(res.statistic)
        pvals.append(res.pvalue)
    return np.array(stats), np.array(pvals)


# ------------------------------------------------------------------------------------------
# Mann-Whitney U against scipy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mwu_matches_scipy_heavy_ties_and_zeros(dtype):
    rng = np.random.default_rng(7)
    n_cells, n_genes = 900, 120
    # few distinct values -> heavy ties; ~75% zeros; some negative and some continuous genes
    X = rng.choice([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.5, 3.25], size=(n_cells, n_genes))
    X[:, :20] = np.where(rng.random((n_cells, 20)) < 0.3, rng.gamma(2.0, 1.0, (n_cells, 20)), 0.0)
    X[:, 20:30] *= rng.choice([-1.0, 1.0], size=(n_cells, 10))
    X = X.astype(dtype)
    labels = rng.choice(["ctrl", "p1", "p2", "p3", "p4"], size=n_cells, p=[0.4, 0.15, 0.15, 0.15, 0.15]).astype(object)
    labels[5] = "single"  # a one-cell perturbation
    ref_stat, ref_p = None, None
    for matrix in (X, sp.csr_matrix(X)):
        res = mannwhitney_vs_reference(matrix, labels, "ctrl", threads=2)
        assert list(res.groups) == ["p1", "p2", "p3", "p4", "single"]  # category (sorted) order
        if ref_stat is None:
            ref_stat, ref_p = _scipy_by_group(X, labels, "ctrl", res.groups)
        np.testing.assert_array_equal(res.statistic, ref_stat)
        _assert_p_close(res.pvalue, ref_p)
        assert res.n_reference == (labels == "ctrl").sum()
        np.testing.assert_array_equal(res.n_cells, [(labels == g).sum() for g in res.groups])


def test_mwu_edge_cases_match_scipy():
    rng = np.random.default_rng(3)
    labels = np.array(["nt"] * 6 + ["one"] + ["two"] * 2 + ["many"] * 25)
    n = labels.size
    is_nt = labels == "nt"
    cols = [
        np.zeros(n),  # all-zero gene
        np.full(n, 2.5),  # constant non-zero gene
        np.where(is_nt, 0.0, rng.integers(0, 3, n).astype(float)),  # no control expressed
        np.where(is_nt, rng.integers(1, 3, n).astype(float), 0.0),  # only controls expressed
        np.where(is_nt, 1.0, rng.integers(0, 4, n).astype(float)),  # controls all tied (non-zero)
        rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], n),  # negatives, zeros and positives, tied
        rng.normal(size=n),  # continuous, no ties
        np.where(rng.random(n) < 0.1, 7.0, 0.0),  # one non-zero value
    ]
    X = np.column_stack(cols)
    for matrix in (X, sp.csr_matrix(X)):
        res = mannwhitney_vs_reference(matrix, labels, "nt")
        stat, p = _scipy_by_group(X, labels, "nt", res.groups)
        np.testing.assert_array_equal(res.statistic, stat)
        _assert_p_close(res.pvalue, p)
    # zero variance (all-zero / constant gene): U = n1 * n2 / 2 and p = 1, as scipy and pdex
    res = mannwhitney_vs_reference(X, labels, "nt")
    np.testing.assert_array_equal(res.pvalue[:, :2], 1.0)
    np.testing.assert_array_equal(res.statistic[:, 0], res.n_cells * 6 / 2)

    # a single control cell, and a one-cell group against it
    lab1 = np.array(["c"] + ["a"] * 8 + ["b"])
    Y = rng.choice([0.0, 0.0, 1.0, 2.0], size=(10, 30))
    r1 = mannwhitney_vs_reference(Y, lab1, "c")
    stat, p = _scipy_by_group(Y, lab1, "c", r1.groups)
    np.testing.assert_array_equal(r1.statistic, stat)
    _assert_p_close(r1.pvalue, p)


def test_mwu_matches_scipy_skewed_values_and_large_groups():
    """Exercises the lookup's fallbacks: a far outlier (one crowded bucket), perturbed values
    beyond every control value, integer counts (long runs of ties), a group larger than the
    control (many of its values share a gap between control values)."""
    rng = np.random.default_rng(19)
    labels = np.array(["ctrl"] * 150 + ["big"] * 600 + ["tiny"] * 3 + ["mid"] * 60, dtype=object)
    n = labels.size
    base = np.where(rng.random((n, 60)) < 0.6, rng.lognormal(0.0, 1.0, (n, 60)), 0.0)
    X = base.copy()
    X[0, :15] = 1e6  # outlier in the control
    X[150:, 15:30] += 50.0 * (X[150:, 15:30] > 0)  # perturbed values above all control values
    X[:, 30:45] = rng.poisson(1.5, (n, 15))  # counts: heavy ties
    X[:, 45:60] = np.round(X[:, 45:60], 1)  # rounded: ties inside the perturbation groups
    for matrix in (X.astype(np.float32), sp.csr_matrix(X)):
        res = mannwhitney_vs_reference(matrix, labels, "ctrl", threads=2)
        dense = matrix.toarray() if sp.issparse(matrix) else matrix
        stat, p = _scipy_by_group(dense, labels, "ctrl", res.groups)
        np.testing.assert_array_equal(res.statistic, stat)
        _assert_p_close(res.pvalue, p)


def test_distinct_ties_counts_each_value_and_leaves_its_table_empty():
    """The tie term of the values sharing a gap between control values, counted in a hash
    table: sum(a^3 - a) over the distinct values, whatever their number, order or collisions."""
    from vcell.eval._de_kernels import _distinct_ties

    rng = np.random.default_rng(2)
    count, used = np.zeros(64, np.int64), np.empty(64, np.int64)
    key = np.empty(64, np.float64)

    def by_sort(x):
        x = x[~np.isnan(x)]
        _, a = np.unique(x, return_counts=True)
        return int((a**3 - a).sum())

    cases = [np.full(30, 2.5), np.arange(30.0), rng.choice([1.0, 2.0, 3.5, -1.0, 1e300], 31),
             np.array([np.nan, np.nan, 1.0, 1.0, np.inf, np.inf, np.inf, -0.0, 0.0]),
             rng.normal(size=31).round(1), np.ldexp(1.0, np.arange(31))]  # powers of 2: one mantissa
    for x in cases:
        want = by_sort(x)
        assert _distinct_ties(x, x.size, count, key, used) == want
        assert not count.any()  # emptied for the next gene and group
    assert _distinct_ties(cases[0], 30, count, key, used) == 30**3 - 30


def test_results_do_not_depend_on_blocks_threads_or_row_order():
    rng = np.random.default_rng(11)
    X = (rng.poisson(0.4, size=(400, 77)) * rng.random((400, 77))).astype(np.float32)
    labels = rng.choice(["c", "x", "y"], 400)
    base = de_arrays(X, labels, "c", threads=1)
    for kw in ({"threads": 2}, {"block_genes": 1}, {"block_genes": 1000}):
        for matrix in (X, sp.csr_matrix(X)):
            other = de_arrays(matrix, labels, "c", **kw)
            np.testing.assert_array_equal(other.p_value, base.p_value)
            np.testing.assert_array_equal(other.statistic, base.statistic)
    perm = rng.permutation(400)
    shuffled = de_arrays(X[perm], labels[perm], "c")
    np.testing.assert_array_equal(shuffled.statistic, base.statistic)
    _assert_p_close(shuffled.p_value, base.p_value)


def test_integer_labels_are_tested_as_the_text_the_input_checks_read():
    """Guide ids stored as integers (control 0): the input checks accepted --control 0 and the DE
    engine then refused it ("control group '0' not found among the perturbation labels (0, 1, 2, 10)")."""
    rng = np.random.default_rng(3)
    X = rng.poisson(1.0, size=(80, 20)).astype(np.float32)
    labels = rng.choice([0, 1, 2, 10], 80)
    as_text = de_arrays(X, labels.astype(str), "0")
    as_int = de_arrays(X, labels, "0")
    assert list(as_int.targets) == list(as_text.targets) == ["1", "10", "2"]
    np.testing.assert_array_equal(as_int.p_value, as_text.p_value)


# ------------------------------------------------------------------------------------------
# Benjamini-Hochberg
# ------------------------------------------------------------------------------------------


def test_bh_matches_scipy_false_discovery_control():
    rng = np.random.default_rng(5)
    p = rng.random((6, 500)) ** 3
    p[:, :40] = np.round(p[:, :40], 2)  # ties
    p[0, :5] = 0.0
    p[1, :5] = 1.0
    p[2] = 1.0
    ours = bh_fdr(p, axis=-1)
    ref = np.array([false_discovery_control(row) for row in p])
    np.testing.assert_array_equal(ours, ref)  # same arithmetic: identical bits
    np.testing.assert_array_equal(bh_fdr(p.T, axis=0), ref.T)
    np.testing.assert_array_equal(bh_fdr(p[3]), false_discovery_control(p[3]))
    # NaN p-values count as 1 (scipy refuses them)
    q = p[4].copy()
    q[[3, 70]] = np.nan
    q1 = q.copy()
    q1[[3, 70]] = 1.0
    np.testing.assert_array_equal(bh_fdr(q), false_discovery_control(q1))
    with pytest.raises(VcellError):
        bh_fdr([0.1, 1.5])


# ------------------------------------------------------------------------------------------
# parity with pdex / cell-eval on real data
# ------------------------------------------------------------------------------------------


def _pdex_as_cell_eval(adata, pert_col, control):
    """pdex exactly as cell-eval 0.8.2 ``_load_or_build_de`` calls it (default CLI options)."""
    from pdex import pdex

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = pdex(
            adata=adata,
            mode="ref",
            reference=control,
            groupby=pert_col,
            threads=2,
            is_log1p=True,
            epsilon=0.0,
            cpm_filter=None,
        )
    return frame.to_pandas()


def _assert_same_table(ours: pd.DataFrame, ref: pd.DataFrame, *, exact_means: bool = True):
    assert list(ours.columns) == list(COLUMNS) == list(ref.columns)
    assert ours.shape == ref.shape
    for col in ("target", "feature"):
        assert ours[col].dtype == object
        np.testing.assert_array_equal(ours[col].to_numpy(), ref[col].to_numpy().astype(object))
    for col in ("target_membership", "ref_membership"):
        assert ours[col].dtype == np.int64
        np.testing.assert_array_equal(ours[col], ref[col])
    for col in ("target_mean", "ref_mean", "log2_fold_change", "percent_change"):
        a, b = ours[col].to_numpy(), ref[col].to_numpy()
        assert a.dtype == b.dtype, (col, a.dtype, b.dtype)
        if exact_means:
            np.testing.assert_array_equal(a, b, err_msg=col)
        finite = np.isfinite(b)
        np.testing.assert_array_equal(a[~finite], b[~finite], err_msg=col)  # same +-inf
        np.testing.assert_allclose(a[finite], b[finite], rtol=1e-9, atol=0, err_msg=col)
    np.testing.assert_array_equal(ours["statistic"], ref["statistic"])
    for col in ("p_value", "fdr"):
        assert ours[col].dtype == np.float64
        _assert_p_close(ours[col].to_numpy(), ref[col].to_numpy())
    sizes = {}
    for name, col, cut in (("fdr<0.05", "fdr", 0.05), ("fdr<0.5", "fdr", 0.5), ("p<0.01", "p_value", 0.01)):
        sig_ours = set(map(tuple, ours.loc[ours[col] < cut, ["target", "feature"]].to_numpy()))
        sig_ref = set(map(tuple, ref.loc[ref[col] < cut, ["target", "feature"]].to_numpy()))
        assert sig_ours == sig_ref, name
        sizes[name] = len(sig_ref)
    return sizes


def _papalexi_subset():
    import anndata as ad

    adata = ad.read_h5ad(_data("papalexi2021_thp1.h5ad"))
    keep = ["non-targeting", "IFNGR1", "IRF1", "JAK2", "STAT1", "SPI1", "MYC", "CUL3", "BRD4"]
    return adata[adata.obs["target"].isin(keep)].copy()


def _normlog(adata):
    """What cell-eval does to integer input: normalize_total (to the median), then log1p."""
    import scanpy as sc

    sc.pp.normalize_total(adata, inplace=True)
    sc.pp.log1p(adata)
    return adata


def test_parity_with_pdex_papalexi_counts_normalised():
    adata = _normlog(_papalexi_subset())
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    n_sig = []
    dense = adata.copy()
    dense.X = dense.X.toarray()
    for a in (adata, dense):
        ref = _pdex_as_cell_eval(a, "target", "non-targeting")
        ours = differential_expression(a, pert_col="target", control="non-targeting", threads=2)
        assert ours.target.nunique() == 8
        n_sig.append(_assert_same_table(ours, ref)["fdr<0.05"])
    assert n_sig[0] == n_sig[1] > 50  # the test has teeth: many significant genes
    # dense vs CSR: tests identical; float32 means differ by at most float32 rounding (numpy
    # and scipy sum differently; cell-eval shows the same difference)
    a = differential_expression(adata, "target", "non-targeting")
    b = differential_expression(dense, "target", "non-targeting")
    for col in ("p_value", "statistic", "fdr", "target", "feature"):
        np.testing.assert_array_equal(a[col], b[col])
    np.testing.assert_allclose(a.target_mean, b.target_mean, rtol=1e-5, atol=0)


def test_parity_with_cell_eval_real_de_csv(tmp_path):
    """``cell-eval``'s own MetricsEvaluator on raw counts writes real_de.csv: we reproduce it."""
    import polars as pl
    from cell_eval import MetricsEvaluator

    raw = _papalexi_subset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MetricsEvaluator(
            adata_pred=raw.copy(),
            adata_real=raw.copy(),
            control_pert="non-targeting",
            pert_col="target",
            num_threads=2,
            outdir=str(tmp_path),
        )
    csv = pl.read_csv(
        os.path.join(tmp_path, "real_de.csv"),
        schema_overrides={"target": pl.Utf8, "feature": pl.Utf8, "target_mean": pl.Float32, "ref_mean": pl.Float32},
    ).to_pandas()
    ours = differential_expression(_normlog(raw), pert_col="target", control="non-targeting")
    assert _assert_same_table(ours, csv)["fdr<0.05"] > 50


def _mcfaline_subset(dataset="mcfaline23", cell_type="A172"):
    import anndata as ad

    adata = ad.read_h5ad(_data("mcfaline2023_norman2019.h5ad"))
    obs = adata.obs
    return adata[(obs["dataset"] == dataset) & (obs["cell_type"] == cell_type)].copy()


def test_parity_with_pdex_mcfaline_log1p():
    adata = _mcfaline_subset()
    assert sp.issparse(adata.X) and adata.X.dtype == np.float64
    dense = adata.copy()
    dense.X = dense.X.toarray()
    tables = []
    for a in (adata, dense):
        ref = _pdex_as_cell_eval(a, "perturbation", "control")
        ours = differential_expression(a, pert_col="perturbation", control="control", threads=2)
        assert ours.target.nunique() == 9
        sizes = _assert_same_table(ours, ref)
        # this subset's effects are weak (no FDR < 0.05 at all): the looser sets carry the test
        assert sizes["fdr<0.5"] > 5 and sizes["p<0.01"] > 20
        tables.append(ours)
    # float64: dense and CSR storage agree (means to float64 rounding, the rest exactly)
    a, b = tables
    for col in ("p_value", "statistic", "fdr", "target_membership", "ref_membership"):
        np.testing.assert_array_equal(a[col], b[col])
    for col in ("target_mean", "ref_mean"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-12, atol=0)
    for col in ("log2_fold_change", "percent_change"):  # differences of near-equal means: absolute
        np.testing.assert_allclose(a[col], b[col], rtol=1e-12, atol=1e-12)


def test_parity_with_pdex_norman19_log1p():
    """The CRISPRa half of the same file, where FDR < 0.05 genes exist."""
    adata = _mcfaline_subset("norman19", "k562")
    ref = _pdex_as_cell_eval(adata, "perturbation", "control")
    ours = differential_expression(adata, pert_col="perturbation", control="control", threads=2)
    assert _assert_same_table(ours, ref)["fdr<0.05"] > 30


# ------------------------------------------------------------------------------------------
# inputs and errors
# ------------------------------------------------------------------------------------------


def test_table_shape_order_and_fold_change_corners():
    import anndata as ad

    X = np.array(
        [  # genes: zero in both, zero in control only, zero in perturbation only, expressed in both
            [0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 2.0, 2.0],
            [0.0, 1.0, 0.0, 1.0],
            [0.0, 3.0, 0.0, 2.0],
            [0.0, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    obs = pd.DataFrame({"target_gene": ["non-targeting", "non-targeting", "B", "B", ""]}, index=list("abcde"))
    adata = ad.AnnData(X, obs=obs)
    adata.var_names = ["g0", "g1", "g2", "g3"]
    df = differential_expression(adata)
    assert list(df.columns) == list(COLUMNS)
    assert df.target.tolist() == ["B"] * 4 and df.feature.tolist() == ["g0", "g1", "g2", "g3"]
    assert df.target_membership.tolist() == [2] * 4 and df.ref_membership.tolist() == [2] * 4
    assert df.target_mean.dtype == np.float32 and df.p_value.dtype == np.float64
    lfc, pc = df.log2_fold_change.to_numpy(), df.percent_change.to_numpy()
    assert lfc[0] == 0.0 and pc[0] == 0.0  # 0 / 0 -> 0
    assert lfc[1] == np.inf and pc[1] == np.inf  # x / 0 -> +inf
    assert lfc[2] == -np.inf and pc[2] == -1.0  # 0 / x -> -inf
    assert np.isfinite(lfc[3])
    expected = np.expm1(np.float32(1.5)) / np.expm1(np.float32(1.5))
    assert lfc[3] == np.log2(expected)


def test_errors_are_one_line_vcell_errors():
    import anndata as ad

    X = np.ones((4, 3), dtype=np.float32)
    adata = ad.AnnData(X, obs=pd.DataFrame({"p": ["c", "c", "a", "a"]}, index=list("wxyz")))
    with pytest.raises(VcellError, match="perturbation column"):
        differential_expression(adata, pert_col="nope", control="c")
    with pytest.raises(VcellError, match="control group 'ctrl' not found"):
        differential_expression(adata, pert_col="p", control="ctrl")
    bad = adata.copy()
    bad.X[2, 1] = np.nan
    with pytest.raises(VcellError, match="NaN"):
        differential_expression(bad, pert_col="p", control="c")
    with pytest.raises(VcellError, match="NaN"):
        differential_expression(ad.AnnData(sp.csr_matrix(bad.X), obs=bad.obs), pert_col="p", control="c")


def test_a_negative_epsilon_is_refused():
    X = np.ones((4, 2), dtype=np.float32)
    with pytest.raises(VcellError, match="epsilon must be >= 0, got -1"):
        de_arrays(X, np.array(["non-targeting", "non-targeting", "A", "A"]), epsilon=-1)
