"""Tests of vcell.data.preprocess on the real datasets in ../shared/data (else their small subsets
in tests/data; the tests that check numbers of the full files skip without them)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from vcell.data.preprocess import (
    knockdown_qc,
    normalize_log1p,
    preprocess,
    preprocess_file,
    select_hvg,
    subset_genes,
)
from vcell.data.spec import DataSpec
from vcell.errors import VcellError

PAPALEXI_SPEC = DataSpec(pert_col="target", control="non-targeting", context_col=None, expression="counts")
KANG_SPEC = DataSpec(pert_col="stim", control="CTRL", context_col="seurat_annotations", expression="counts")
MCF_SPEC = DataSpec(pert_col="perturbation", control="control", context_col="cell_type", expression="log1p")
# Two of the mcfaline23 knockdown targets; neither is among the file's 500 genes, so the synthetic
# tests rename measured genes to them.
KD, NOT_KD = "MAP2K3", "SGK1"


def _load(name: str) -> ad.AnnData:
    from conftest import real_data  # the full file, else its small subset in tests/data

    return ad.read_h5ad(real_data(name))


def _full_file_only(name: str) -> None:
    """Skip (without ../shared/data) a test whose expectations are numbers of the full file."""
    from conftest import shared_path

    shared_path(name)


@pytest.fixture(scope="module")
def papalexi() -> ad.AnnData:
    return _load("papalexi2021_thp1.h5ad")


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    return _load("kang2018_ifnb.h5ad")


@pytest.fixture(scope="module")
def mcf_full() -> ad.AnnData:
    return _load("mcfaline2023_norman2019.h5ad")


@pytest.fixture(scope="module")
def mcf(mcf_full) -> ad.AnnData:
    return mcf_full[mcf_full.obs["dataset"] == "mcfaline23"].copy()


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _snapshot(adata: ad.AnnData) -> dict:
    return {
        "X": _dense(adata.X).copy(),
        "X_type": type(adata.X),
        "X_dtype": adata.X.dtype,
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": sorted(adata.uns.keys()),
        "layers": sorted(adata.layers.keys()),
        "shape": adata.shape,
    }


def _assert_unchanged(adata: ad.AnnData, snap: dict) -> None:
    assert adata.shape == snap["shape"]
    assert type(adata.X) is snap["X_type"] and adata.X.dtype == snap["X_dtype"]
    np.testing.assert_array_equal(_dense(adata.X), snap["X"])
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert sorted(adata.uns.keys()) == snap["uns"]
    assert sorted(adata.layers.keys()) == snap["layers"]


def _expm1_dense(adata: ad.AnnData) -> np.ndarray:
    return np.expm1(_dense(adata.X).astype(np.float64))


# --------------------------------------------------------------------------- normalize_log1p


def test_normalize_log1p_sums_and_counts_layer_csr(papalexi):
    snap = _snapshot(papalexi)
    out = normalize_log1p(papalexi, target_sum=1e4)
    _assert_unchanged(papalexi, snap)

    assert sparse.issparse(out.X) and out.X.format == "csr"
    assert out.X.dtype == np.float32
    sums = _expm1_dense(out).sum(axis=1)
    nonempty = snap["X"].sum(axis=1) > 0
    assert nonempty.sum() > 0.99 * out.n_obs
    np.testing.assert_allclose(sums[nonempty], 1e4, rtol=1e-3)
    np.testing.assert_array_equal(_dense(out.layers["counts"]), snap["X"])
    assert "log1p" in out.uns
    assert out.uns["vcell"]["expression"] == "log1p"
    assert out.uns["vcell"]["target_sum"] == 1e4


def test_normalize_log1p_dense_and_other_target_sum(kang):
    sub = kang[:300].copy()
    sub.X = sub.X.toarray()
    snap = _snapshot(sub)
    out = normalize_log1p(sub, target_sum=5000, counts_layer="raw")
    _assert_unchanged(sub, snap)
    assert isinstance(out.X, np.ndarray) and out.X.dtype == np.float32
    np.testing.assert_allclose(_expm1_dense(out).sum(axis=1), 5000, rtol=1e-3)
    np.testing.assert_array_equal(out.layers["raw"], snap["X"])
    assert "counts" not in out.layers
    assert out.uns["vcell"]["target_sum"] == 5000


def test_normalize_log1p_refuses_log1p_data(mcf):
    with pytest.raises(VcellError, match="already log1p"):
        normalize_log1p(mcf)


# --------------------------------------------------------------------------- select_hvg


@pytest.fixture(scope="module")
def kang_log(kang) -> ad.AnnData:
    return normalize_log1p(kang)


def test_select_hvg_count_order_and_keep(kang_log):
    marked = select_hvg(kang_log, n_top_genes=300, subset=False)
    assert marked.n_vars == kang_log.n_vars
    hv = marked.var["highly_variable"].to_numpy()
    assert hv.sum() == 300

    not_hv = marked.var_names[~hv]
    keep = [not_hv[0], not_hv[len(not_hv) // 2], not_hv[-1], "NOT_A_GENE"]
    snap = _snapshot(kang_log)
    out = select_hvg(kang_log, n_top_genes=300, keep=keep)
    _assert_unchanged(kang_log, snap)

    assert out.n_vars == 300 + 3
    assert set(keep[:3]) <= set(out.var_names)
    assert set(marked.var_names[hv]) <= set(out.var_names)
    positions = kang_log.var_names.get_indexer(out.var_names)
    assert np.all(np.diff(positions) > 0), "genes must stay in their original order"
    # subsetting does not change values
    np.testing.assert_array_equal(_dense(out.X), _dense(kang_log[:, out.var_names].X))


def test_select_hvg_all_genes_when_n_top_too_large(papalexi, caplog):
    log = normalize_log1p(papalexi)
    with caplog.at_level(logging.WARNING, logger="vcell.data.preprocess"):
        out = select_hvg(log, n_top_genes=2000)
    assert out.n_vars == papalexi.n_vars
    assert out.var["highly_variable"].all()
    assert any("keeping all genes" in r.getMessage() for r in caplog.records)


def test_select_hvg_batch_key_must_exist(kang_log):
    with pytest.raises(VcellError, match="'no_such_col'"):
        select_hvg(kang_log, n_top_genes=100, batch_key="no_such_col")


# --------------------------------------------------------------------------- subset_genes


def test_subset_genes_order_list_and_file(papalexi, tmp_path):
    genes = list(papalexi.var_names[[200, 3, 57, 120]])
    snap = _snapshot(papalexi)
    out = subset_genes(papalexi, genes)
    _assert_unchanged(papalexi, snap)
    assert list(out.var_names) == genes
    np.testing.assert_array_equal(_dense(out.X), _dense(papalexi.X)[:, [200, 3, 57, 120]])

    path = tmp_path / "genes.txt"
    path.write_text("# my genes\n" + "\n".join(genes[::-1]) + "\n\n" + genes[0] + "\n")
    from_file = subset_genes(papalexi, str(path))
    assert list(from_file.var_names) == genes[::-1]
    assert list(subset_genes(papalexi, path).var_names) == genes[::-1]


def test_subset_genes_missing(papalexi, caplog):
    missing = [f"FAKE{i}" for i in range(7)]
    genes = [papalexi.var_names[0], *missing, papalexi.var_names[1]]
    with pytest.raises(VcellError) as err:
        subset_genes(papalexi, genes)
    msg = str(err.value)
    assert "7 of 9 genes not found" in msg
    assert all(m in msg for m in missing[:5])
    assert "FAKE5" not in msg and "FAKE6" not in msg
    assert "\n" not in msg

    with caplog.at_level(logging.WARNING, logger="vcell.data.preprocess"):
        out = subset_genes(papalexi, genes, allow_missing=True)
    assert list(out.var_names) == list(papalexi.var_names[:2])
    assert any("7 of 9" in r.getMessage() for r in caplog.records)

    with pytest.raises(VcellError, match="gene list file not found"):
        subset_genes(papalexi, Path("/nonexistent/genes.txt"))


# --------------------------------------------------------------------------- knockdown_qc


def _ctrl_means(adata: ad.AnnData, genes: list[str]) -> pd.DataFrame:
    """Control mean of expm1(X) per context (rows) and gene (columns)."""
    ctrl = adata[adata.obs["perturbation"] == "control"]
    e = pd.DataFrame(np.expm1(_dense(ctrl[:, genes].X)), columns=genes)
    return e.groupby(ctrl.obs["cell_type"].astype(str).to_numpy()).mean()


@pytest.fixture(scope="module")
def target_like_genes(mcf) -> list[str]:
    """Two measured genes expressed in the controls of every line and not among the top-50 HVGs."""
    hv = select_hvg(mcf, n_top_genes=50, subset=False).var["highly_variable"]
    cm = _ctrl_means(mcf, list(mcf.var_names)).min(axis=0)
    cand = cm[(cm > 0.5) & ~hv.reindex(cm.index).to_numpy()].sort_values(ascending=False)
    assert len(cand) >= 2
    return list(cand.index[:2])


def _with_targets(mcf: ad.AnnData, genes: list[str], zero_in: dict[str, str]) -> ad.AnnData:
    """Rename ``genes`` to KD / NOT_KD and zero a gene in the cells of the given perturbation."""
    a = mcf.copy()
    names = list(a.var_names)
    for g, new in zip(genes, (KD, NOT_KD), strict=True):
        names[names.index(g)] = new
    a.var_names = names
    X = _dense(a.X).copy()
    for gene, pert in zero_in.items():
        X[np.flatnonzero(a.obs["perturbation"] == pert), a.var_names.get_loc(gene)] = 0
    a.X = sparse.csr_matrix(X)
    return a


def test_knockdown_qc_real_targets_unmeasured(mcf, caplog):
    snap = _snapshot(mcf)
    with caplog.at_level(logging.WARNING, logger="vcell.data.preprocess"):
        out, rep = knockdown_qc(mcf, MCF_SPEC)
    _assert_unchanged(mcf, snap)
    # a QC that could test nothing says so, once, at warning level
    said = [r.getMessage() for r in caplog.records if "untested" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("knockdown QC kept 27 of 27 perturbation groups untested: 27 with no target "
                                                 "among the genes (e.g. "), said
    assert out.n_obs == mcf.n_obs
    assert list(rep.columns[:2]) == ["context", "perturbation"]
    perts = rep[rep["status"] != "control"]
    assert len(perts) == 27  # 9 knockdowns x 3 lines
    assert (perts["status"] == "target_not_measured").all()
    assert set(rep.loc[rep["status"] == "control", "context"]) == {"A172", "T98G", "U87MG"}
    counts = mcf.obs.groupby(["cell_type", "perturbation"], observed=True).size()
    for r in rep.itertuples():
        assert r.n_cells == counts[r.context, r.perturbation]


def test_knockdown_qc_drops_not_knocked_down(mcf, target_like_genes):
    a = _with_targets(mcf, target_like_genes, zero_in={KD: KD})
    snap = _snapshot(a)
    out, rep = knockdown_qc(a, MCF_SPEC, residual_expression=0.3)
    _assert_unchanged(a, snap)

    # report numbers against a direct computation
    e = np.expm1(_dense(a[:, [KD, NOT_KD]].X).astype(np.float64))
    obs = a.obs
    for ctx in ("A172", "T98G", "U87MG"):
        ctrl = ((obs["cell_type"] == ctx) & (obs["perturbation"] == "control")).to_numpy()
        for j, gene in enumerate((KD, NOT_KD)):
            cells = ((obs["cell_type"] == ctx) & (obs["perturbation"] == gene)).to_numpy()
            row = rep[(rep["context"] == ctx) & (rep["perturbation"] == gene)].iloc[0]
            assert row.target_gene == gene
            assert row.n_cells == cells.sum()
            np.testing.assert_allclose(row.control_mean, e[ctrl, j].mean(), rtol=1e-9)
            np.testing.assert_allclose(row.pert_mean, e[cells, j].mean(), rtol=1e-9)
            np.testing.assert_allclose(row.ratio, e[cells, j].mean() / e[ctrl, j].mean(), rtol=1e-9)
            expected = "kept" if gene == KD else "not_knocked_down"
            assert row.status == expected, (ctx, gene, row.ratio)

    kept = out.obs["perturbation"].astype(str)
    assert (kept == KD).sum() == (obs["perturbation"] == KD).sum()
    assert (kept == NOT_KD).sum() == 0
    # controls never dropped; unmeasured targets kept
    assert (kept == "control").sum() == (obs["perturbation"] == "control").sum() == 300
    assert out.n_obs == a.n_obs - (obs["perturbation"] == NOT_KD).sum()
    other = rep[~rep["perturbation"].isin([KD, NOT_KD, "control"])]
    assert len(other) == 21 and (other["status"] == "target_not_measured").all()


def test_knockdown_qc_cell_filter_and_min_cells(mcf, target_like_genes):
    a = _with_targets(mcf, target_like_genes, zero_in={})
    # knock KD down in half of its cells: mean ratio ~0.5
    X = _dense(a.X).copy()
    kd_cells = np.flatnonzero(a.obs["perturbation"] == KD)
    j = a.var_names.get_loc(KD)
    X[kd_cells[::2], j] = 0
    a.X = sparse.csr_matrix(X)

    _, strict = knockdown_qc(a, MCF_SPEC, residual_expression=0.3)
    assert (strict.loc[strict["perturbation"] == KD, "status"] == "not_knocked_down").all()

    out, rep = knockdown_qc(a, MCF_SPEC, residual_expression=1.0, cell_residual_expression=0.2, min_cells=1)
    e = np.expm1(X[:, j].astype(np.float64))
    expected_kept = 0
    for ctx in ("A172", "T98G", "U87MG"):
        ctx_mask = (a.obs["cell_type"] == ctx).to_numpy()
        ctrl_mean = e[ctx_mask & (a.obs["perturbation"] == "control").to_numpy()].mean()
        cells = ctx_mask & (a.obs["perturbation"] == KD).to_numpy()
        n_ok = int((e[cells] <= 0.2 * ctrl_mean).sum())
        row = rep[(rep["context"] == ctx) & (rep["perturbation"] == KD)].iloc[0]
        assert row.status == "kept" and row.n_cells_kept == n_ok < row.n_cells
        expected_kept += n_ok
    assert (out.obs["perturbation"] == KD).sum() == expected_kept

    smallest = int(rep.loc[rep["perturbation"] == KD, "n_cells_kept"].min())
    out2, rep2 = knockdown_qc(
        a, MCF_SPEC, residual_expression=1.0, cell_residual_expression=0.2, min_cells=smallest + 1
    )
    too_few = rep2[(rep2["perturbation"] == KD) & (rep2["status"] == "too_few_cells")]
    assert len(too_few) >= 1
    for ctx in too_few["context"]:
        assert not ((out2.obs["cell_type"] == ctx) & (out2.obs["perturbation"] == KD)).any()
    assert (out2.obs["perturbation"] == "control").sum() == 300


def test_knockdown_qc_combinations_and_no_control_expression(mcf, target_like_genes):
    a = _with_targets(mcf, target_like_genes, zero_in={})
    perts = a.obs["perturbation"].astype(str).to_numpy().copy()
    perts[perts == "PLK4"] = f"{KD}+{NOT_KD}"  # KD zeroed, NOT_KD left: must fail
    perts[perts == "MAPK1"] = f"{KD}+NOT_A_GENE"  # the measured target is knocked down
    a.obs["perturbation"] = perts
    X = _dense(a.X).copy()
    jk = a.var_names.get_loc(KD)
    for lab in (f"{KD}+{NOT_KD}", f"{KD}+NOT_A_GENE"):
        X[perts == lab, jk] = 0
    # no control expression of NOT_KD in U87MG, and the SGK1 group there is then untestable
    u87_ctrl = (a.obs["cell_type"] == "U87MG").to_numpy() & (perts == "control")
    X[u87_ctrl, a.var_names.get_loc(NOT_KD)] = 0
    a.X = sparse.csr_matrix(X)

    out, rep = knockdown_qc(a, MCF_SPEC)
    status = rep.set_index(["context", "perturbation"])["status"]
    for ctx in ("A172", "T98G"):
        assert status[ctx, f"{KD}+{NOT_KD}"] == "not_knocked_down"
        assert status[ctx, NOT_KD] == "not_knocked_down"
    assert status["U87MG", NOT_KD] == "no_control_expression"
    assert status["U87MG", f"{KD}+{NOT_KD}"] == "kept"  # NOT_KD untestable there, KD passes
    assert (rep.loc[rep["perturbation"] == f"{KD}+NOT_A_GENE", "status"] == "kept").all()
    combo_row = rep[(rep["context"] == "A172") & (rep["perturbation"] == f"{KD}+{NOT_KD}")].iloc[0]
    assert combo_row.target_gene == NOT_KD  # the limiting target is reported
    kept = out.obs.groupby(["cell_type", "perturbation"], observed=True).size()
    assert ("U87MG", NOT_KD) in kept.index and ("A172", NOT_KD) not in kept.index
    assert (out.obs["perturbation"] == "control").sum() == 300


def test_knockdown_qc_counts_matches_log1p_path(papalexi):
    a = papalexi.copy()
    names = list(a.var_names)
    # two well-expressed genes stand in for targets STAT1 (knocked out) and IRF1 (untouched)
    order = np.argsort(-np.asarray(a.X.sum(axis=0)).ravel())
    names[order[0]], names[order[1]] = "STAT1", "IRF1"
    a.var_names = names
    X = _dense(a.X).astype(np.float64)
    X[(a.obs["target"] == "STAT1").to_numpy(), order[0]] = 0
    a.X = sparse.csr_matrix(X)

    out, rep = knockdown_qc(a, PAPALEXI_SPEC)
    cp10k = X / X.sum(axis=1, keepdims=True) * 1e4
    ctrl = (a.obs["target"] == "non-targeting").to_numpy()
    irf1 = (a.obs["target"] == "IRF1").to_numpy()
    row = rep.set_index("perturbation").loc["IRF1"]
    np.testing.assert_allclose(row.control_mean, cp10k[ctrl, order[1]].mean(), rtol=1e-9)
    expected_ratio = cp10k[irf1, order[1]].mean() / cp10k[ctrl, order[1]].mean()
    np.testing.assert_allclose(row.ratio, expected_ratio, rtol=1e-9)
    assert row.status == "not_knocked_down"
    assert rep.set_index("perturbation").loc["STAT1", "status"] == "kept"
    assert (rep["context"] == "all").all()
    assert (out.obs["target"] == "IRF1").sum() == 0

    _, summary = preprocess(a, PAPALEXI_SPEC, knockdown_qc=True, n_top_genes=None)
    via_log = pd.DataFrame(summary["knockdown_report"]).set_index("perturbation")
    np.testing.assert_allclose(via_log.loc["IRF1", "ratio"], row.ratio, rtol=1e-4)
    assert summary["perturbations_dropped_qc"] == ["IRF1"]


def test_knockdown_qc_errors(mcf, kang):
    with pytest.raises(VcellError, match="'no_such'"):
        knockdown_qc(mcf, MCF_SPEC.with_(pert_col="no_such"))
    with pytest.raises(VcellError, match="context column 'no_ctx'"):
        knockdown_qc(mcf, MCF_SPEC.with_(context_col="no_ctx"))
    with pytest.raises(VcellError, match="'ctrl'"):
        knockdown_qc(mcf, MCF_SPEC.with_(control="ctrl"))
    with pytest.raises(VcellError, match="expression type not set"):
        knockdown_qc(mcf, MCF_SPEC.with_(expression=None))



def test_knockdown_qc_context_without_controls_kept_untested(mcf, target_like_genes, kang, caplog):
    """A context without controls (accepted with --allow-missing-controls) cannot be tested: its
    groups are kept with status no_controls and warned of, the other contexts tested as before."""
    a = _with_targets(mcf, target_like_genes, zero_in={KD: KD})
    perts = a.obs["perturbation"].astype(str).to_numpy().copy()
    perts[(a.obs["cell_type"] == "T98G").to_numpy() & (perts == "control")] = "MAPK1"
    a.obs["perturbation"] = perts
    with caplog.at_level(logging.WARNING, logger="vcell.data.preprocess"):
        out, rep = knockdown_qc(a, MCF_SPEC)
    status = rep.set_index(["context", "perturbation"])["status"]
    assert (rep.loc[rep["context"] == "T98G", "status"] == "no_controls").all()
    assert status["T98G", NOT_KD] == "no_controls" and status["A172", NOT_KD] == "not_knocked_down"
    assert ((out.obs["cell_type"] == "T98G").sum() == (a.obs["cell_type"] == "T98G").sum())
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "9 with no control cells in the context (e.g. " in said and "in 'T98G')" in said, said
    assert out.uns["vcell"]["knockdown_qc"]["n_groups_untested"] == 9 + 2 * 7  # and 7 unmeasured targets in A172, U87MG
    # real case: in the Kang subset the Eryth cells are all stimulated
    _, rep = knockdown_qc(kang, KANG_SPEC)
    assert rep.set_index(["context", "perturbation"])["status"]["Eryth", "STIM"] == "no_controls"


def test_knockdown_qc_points_to_a_var_column_naming_the_targets(mcf, target_like_genes, caplog):
    """Ensembl IDs as var_names with the symbols in var['gene_name'] (cell-load's layout): nothing can
    be tested, and the warning names the column to make the var_names."""
    a = _with_targets(mcf, target_like_genes, zero_in={KD: KD})
    a.var["gene_name"] = list(a.var_names)
    a.var_names = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    with caplog.at_level(logging.WARNING, logger="vcell.data.preprocess"):
        _, rep = knockdown_qc(a, MCF_SPEC)
    assert (rep.loc[rep["status"] != "control", "status"] == "target_not_measured").all()
    said = [r.getMessage() for r in caplog.records if "untested" in r.getMessage()]
    assert len(said) == 1 and f"var['gene_name'] names 2 of their targets (e.g. '{KD}'), var_names do not: make " \
        "var['gene_name'] the var_names to test them" in said[0], said


# --------------------------------------------------------------------------- preprocess


def test_preprocess_counts_pipeline(kang):
    _full_file_only("kang2018_ifnb.h5ad")  # 2000 cells x 13,215 genes
    snap = _snapshot(kang)
    out, summary = preprocess(kang, KANG_SPEC, n_top_genes=400)
    _assert_unchanged(kang, snap)
    assert out.shape == (2000, 400)
    assert summary["n_cells_before"] == 2000 and summary["n_genes_before"] == 13215
    assert summary["n_cells_after"] == 2000 and summary["n_genes_after"] == 400
    assert summary["normalized"] is True and summary["steps"] == ["normalize_log1p", "select_hvg"]
    counts = _dense(kang.X).astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    cols = kang.var_names.get_indexer(out.var_names)
    np.testing.assert_allclose(_dense(out.X), expected[:, cols], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_dense(out.layers["counts"]), _dense(kang[:, out.var_names].X))
    assert out.uns["vcell"]["expression"] == "log1p"


def test_preprocess_log1p_skips_normalisation(mcf):
    snap = _snapshot(mcf)
    out, summary = preprocess(mcf, MCF_SPEC, n_top_genes=None)
    _assert_unchanged(mcf, snap)
    assert summary["normalized"] is False and "normalize_log1p" not in summary["steps"]
    assert "counts" not in out.layers and not out.layers
    np.testing.assert_array_equal(_dense(out.X), snap["X"])
    assert out.X.dtype == mcf.X.dtype
    assert out.uns["vcell"]["expression"] == "log1p"


def test_preprocess_qc_runs_before_gene_subset(mcf, target_like_genes):
    a = _with_targets(mcf, target_like_genes, zero_in={KD: KD})
    out, summary = preprocess(a, MCF_SPEC, n_top_genes=50, knockdown_qc=True)
    assert summary["steps"] == ["knockdown_qc", "select_hvg"]
    assert summary["perturbations_dropped_qc"] == [NOT_KD]
    assert summary["n_groups_dropped_qc"] == 3
    assert summary["n_cells_dropped_qc"] == (a.obs["perturbation"] == NOT_KD).sum()
    assert NOT_KD not in set(out.obs["perturbation"])
    # KD is not an HVG but is kept as a target; NOT_KD is no longer a target once its cells are gone
    hv = out.var["highly_variable"]
    assert hv.sum() == 50 and out.n_vars == 51
    assert KD in out.var_names and not hv[KD]
    assert NOT_KD not in out.var_names
    assert summary["n_cells_after"] == out.n_obs == a.n_obs - summary["n_cells_dropped_qc"]

    genes = list(a.var_names[:10])
    out2, summary2 = preprocess(a, MCF_SPEC, genes=genes, knockdown_qc=True)
    assert list(out2.var_names) == genes and KD not in genes
    assert summary2["perturbations_dropped_qc"] == [NOT_KD]
    assert summary2["steps"] == ["knockdown_qc", "subset_genes"]


def test_preprocess_targets_unmeasured_real(papalexi):
    out, summary = preprocess(papalexi, PAPALEXI_SPEC, knockdown_qc=True)
    assert out.shape == papalexi.shape  # n_top_genes 2000 > 290 genes: all kept
    assert summary["n_targets_not_measured_qc"] == summary["n_groups_untested_qc"] == 25
    assert summary["perturbations_dropped_qc"] == [] and summary["n_perturbations_after"] == 25


def test_preprocess_requires_expression(mcf):
    with pytest.raises(VcellError, match="expression type not set"):
        preprocess(mcf, MCF_SPEC.with_(expression=None))


# --------------------------------------------------------------------------- preprocess_file


def test_preprocess_file_atomic_and_refuses_input(kang, tmp_path):
    src = tmp_path / "in" / "kang_small.h5ad"
    src.parent.mkdir()
    kang[:400].copy().write_h5ad(src)
    src_bytes = src.read_bytes()
    out_dir = tmp_path / "out"
    out_path = out_dir / "pre.h5ad"

    summary = preprocess_file(src, out_path, KANG_SPEC, n_top_genes=200)
    assert sorted(os.listdir(out_dir)) == ["pre.h5ad"]  # no temp file left behind
    back = ad.read_h5ad(out_path)
    assert back.shape == (400, 200) == (summary["n_cells_after"], summary["n_genes_after"])
    assert "counts" in back.layers and back.uns["vcell"]["expression"] == "log1p"
    assert summary["output"] == str(out_path)

    for same in (src, tmp_path / "in" / ".." / "in" / "kang_small.h5ad"):
        with pytest.raises(VcellError, match="input file"):
            preprocess_file(src, same, KANG_SPEC)
    assert src.read_bytes() == src_bytes

    with pytest.raises(VcellError, match="already exists"):
        preprocess_file(src, out_path, KANG_SPEC)
    preprocess_file(src, out_path, KANG_SPEC, overwrite=True, n_top_genes=100)
    assert ad.read_h5ad(out_path).n_vars == 100

    # a failing run leaves neither an output nor a temp file
    bad = out_dir / "bad.h5ad"
    with pytest.raises(VcellError, match="'nope'"):
        preprocess_file(src, bad, KANG_SPEC.with_(pert_col="nope"))
    assert sorted(os.listdir(out_dir)) == ["pre.h5ad"]
    with pytest.raises(VcellError, match="expression type not set"):
        preprocess_file(src, bad, KANG_SPEC.with_(expression=None))


def test_knockdown_qc_warns_of_raised_targets(caplog):
    """CRISPRa or overexpression data: a target far above the controls is dropped as not knocked down,
    and one warning asks whether the data are knockdowns at all (Norman's TMSB4X is 9x its controls)."""
    # columns UP, DOWN, a filler; every cell 10,000 counts
    X = np.array([[10.0, 100.0, 9890.0]] * 40 + [[40.0, 100.0, 9860.0]] * 40 + [[10.0, 10.0, 9980.0]] * 40)
    obs = pd.DataFrame({"gene": ["non-targeting"] * 40 + ["UP"] * 40 + ["DOWN"] * 40}, index=[f"c{i}" for i in range(120)])
    a = ad.AnnData(sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=["UP", "DOWN", "FILL"]))
    spec = DataSpec(pert_col="gene", control="non-targeting", context_col=None, expression="counts")
    with caplog.at_level(logging.WARNING, logger="vcell.data.preprocess"):
        _, rep = knockdown_qc(a, spec)
    status = rep.set_index("perturbation")["status"]
    assert status["UP"] == "not_knocked_down" and status["DOWN"] == "kept"
    said = [r.getMessage() for r in caplog.records if "activation" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("knockdown QC: 1 tested perturbation group(s) have their target at 2x or more "
                                                 "of the controls' level (e.g. 'UP' in 'all': 4x), 1 of them dropped"), said


def _kd_data(values: dict[str, list], labels: list[str], base=None) -> ad.AnnData:
    X = np.array([values[g] for g in ("A", "B", "C")], dtype=np.float64).T
    X = np.log1p(X) / (np.log(base) if base else 1.0)
    adata = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame({"gene": labels}, index=[f"c{i}" for i in range(len(labels))]),
                       var=pd.DataFrame(index=["A", "B", "C"]))
    adata.uns["log1p"] = {"base": base}
    return adata


def test_knockdown_qc_reads_log1p_values_in_their_base():
    from vcell.data.knockdown import knockdown_qc
    from vcell.data.spec import DataSpec

    labels = ["ctrl"] * 40 + ["A"] * 40
    vals = {"A": [100.0] * 40 + [25.0] * 40, "B": [5.0] * 80, "C": [1.0] * 80}
    spec = DataSpec(pert_col="gene", control="ctrl", context_col=None, expression="log1p")
    for base in (None, 2.0):
        _, report = knockdown_qc(_kd_data(vals, labels, base), spec, min_cells=10)
        row = report.set_index("perturbation").loc["A"]
        assert row["ratio"] == pytest.approx(0.25, rel=1e-4), base
        assert row["control_mean"] == pytest.approx(100.0, rel=1e-4) and row["pert_mean"] == pytest.approx(25.0, rel=1e-4)


def test_knockdown_qc_cell_filter_needs_every_target_of_a_combination_low():
    from vcell.data.knockdown import knockdown_qc
    from vcell.data.spec import DataSpec

    labels = ["ctrl"] * 40 + ["A+B"] * 40
    vals = {"A": [10.0] * 40 + [1.0] * 40, "B": [10.0] * 40 + [1.0] * 30 + [8.0] * 10, "C": [1.0] * 80}
    spec = DataSpec(pert_col="gene", control="ctrl", context_col=None, expression="log1p")
    out, report = knockdown_qc(_kd_data(vals, labels), spec, residual_expression=0.3, cell_residual_expression=0.5, min_cells=20)
    row = report.set_index("perturbation").loc["A+B"]
    assert row["status"] == "kept" and row["n_cells_kept"] == 30  # the 10 cells whose B stayed at 8 (> 0.5 x 10) go
    assert out.n_obs == 70


def test_normalize_log1p_refuses_negative_integer_counts():
    from vcell.data.normalize import normalize_log1p

    for dtype in (np.int32, np.int64):
        with pytest.raises(VcellError, match="negative values"):
            normalize_log1p(ad.AnnData(X=np.array([[1, -2], [3, 4]], dtype=dtype)))
