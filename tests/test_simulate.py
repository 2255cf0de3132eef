"""Tests of the synthetic Perturb-seq simulator."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from vcell.data.simulate import CONTROL_LABEL, simulate_perturbseq
from vcell.data.spec import COMBO_SEP, DataSpec, split_combo
from vcell.errors import VcellError

SMALL = dict(n_genes=200, n_contexts=2, n_perturbations=6, n_combinations=2, cells_per_perturbation=20, n_controls=50)
MEDIUM = dict(
    n_genes=800, n_contexts=2, n_perturbations=16, n_combinations=6, cells_per_perturbation=150, n_controls=800
)


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return simulate_perturbseq(**MEDIUM, seed=7)


def _norm(adata: ad.AnnData) -> np.ndarray:
    """Counts scaled to 10k per cell (dense)."""
    X = adata.X.toarray()
    return X / X.sum(axis=1, keepdims=True) * 1e4


def _group_means(adata: ad.AnnData) -> dict[tuple[str, str], np.ndarray]:
    X = _norm(adata)
    keys = adata.obs["cell_type"].astype(str) + "|" + adata.obs["target_gene"].astype(str)
    out = {}
    for key, idx in pd.Series(np.arange(adata.n_obs)).groupby(keys.to_numpy()):
        ctx, lab = key.split("|")
        out[ctx, lab] = X[idx.to_numpy()].mean(axis=0)
    return out


def test_same_seed_identical_different_seed_differs():
    a, b, c = (simulate_perturbseq(**SMALL, seed=s) for s in (3, 3, 4))
    assert (a.X != b.X).nnz == 0 and np.array_equal(a.X.indptr, b.X.indptr)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.uns["simulation"]["true_lfc"], b.uns["simulation"]["true_lfc"])
    assert a.shape != c.shape or (a.X != c.X).nnz > 0
    assert not np.array_equal(a.uns["simulation"]["true_lfc"], c.uns["simulation"]["true_lfc"])


def test_layout_dtypes_and_integer_counts(adata):
    sim = adata.uns["simulation"]
    assert adata.n_vars == MEDIUM["n_genes"]
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert np.all(adata.X.data >= 0) and np.array_equal(adata.X.data, np.round(adata.X.data))
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    for col in ("target_gene", "cell_type", "gem_group", "dataset"):
        assert isinstance(adata.obs[col].dtype, pd.CategoricalDtype), col
    assert set(adata.obs["dataset"]) == {"synthetic"}
    assert set(DataSpec().columns) <= set(adata.obs.columns)
    assert adata.uns["vcell"] == {"expression": "counts"} and "log1p" not in adata.uns
    n_labels = MEDIUM["n_perturbations"] + MEDIUM["n_combinations"]
    assert sim["true_lfc"].shape == (MEDIUM["n_contexts"], n_labels, MEDIUM["n_genes"])
    assert sim["true_lfc"].dtype == np.float32
    assert list(sim["labels"][: MEDIUM["n_perturbations"]]) == list(sim["targets"])
    assert set(sim["targets"]) <= set(adata.var_names)
    assert all(0.05 <= r <= 0.3 for r in sim["knockdown_residual"])
    # Realistic scRNA: sparse matrix, wide spread of gene means.
    assert 0.05 < adata.X.nnz / np.prod(adata.shape) < 0.6
    gene_means = np.asarray(adata.X.mean(axis=0)).ravel()
    assert np.median(gene_means) < 0.5 and gene_means.max() > 10


def test_group_sizes(adata):
    sim = adata.uns["simulation"]
    counts = pd.crosstab(adata.obs["target_gene"], adata.obs["cell_type"])
    assert list(counts.columns) == list(sim["contexts"]) and len(sim["contexts"]) == MEDIUM["n_contexts"]
    assert (counts.loc[CONTROL_LABEL] == MEDIUM["n_controls"]).all()
    assert set(counts.index) == {CONTROL_LABEL, *sim["labels"]}
    perts = counts.drop(index=CONTROL_LABEL)
    assert (perts > 0).all().all()
    assert perts.to_numpy().std() > 0  # jittered sizes
    fixed = simulate_perturbseq(**{**SMALL, "cell_jitter": 0.0})
    sizes = pd.crosstab(fixed.obs["target_gene"], fixed.obs["cell_type"]).drop(index=CONTROL_LABEL)
    assert (sizes == SMALL["cells_per_perturbation"]).all().all()


def test_on_target_knockdown(adata):
    means = _group_means(adata)
    sim = adata.uns["simulation"]
    ratios = [
        means[ctx, t][adata.var_names.get_loc(t)] / means[ctx, CONTROL_LABEL][adata.var_names.get_loc(t)]
        for ctx in sim["contexts"]
        for t in sim["targets"]
    ]
    assert np.mean(np.array(ratios) < 0.5) >= 0.9


def _observed_lfc(means, ctx, label):
    return np.log((means[ctx, label] + 0.1) / (means[ctx, CONTROL_LABEL] + 0.1))


def test_planted_effects_recoverable(adata):
    sim = adata.uns["simulation"]
    means = _group_means(adata)
    strong = np.argsort(-sim["strength"])[:3]
    for c, ctx in enumerate(sim["contexts"]):
        expressed = means[ctx, CONTROL_LABEL] > 1.0  # > 1 per 10k
        for p in strong:
            obs = _observed_lfc(means, ctx, sim["labels"][p])
            r = np.corrcoef(obs[expressed], sim["true_lfc"][c, p][expressed])[0, 1]
            assert r > 0.7, (ctx, sim["labels"][p], r)
    # Near-null perturbations exist: effect sizes vary across perturbations.
    assert sim["strength"].max() > 10 * sim["strength"].min()


def test_effects_are_context_specific_but_correlated(adata):
    lfc = adata.uns["simulation"]["true_lfc"]
    n = MEDIUM["n_perturbations"]
    r = [np.corrcoef(lfc[0, p], lfc[1, p])[0, 1] for p in range(n)]
    assert 0.4 < np.median(r) < 0.95
    shared = simulate_perturbseq(**SMALL, context_effect_share=0.0).uns["simulation"]["true_lfc"]
    np.testing.assert_allclose(shared[0], shared[1], atol=1e-6)


def test_combinations(adata):
    sim = adata.uns["simulation"]
    labels = list(sim["labels"])
    combos = [lab for lab in labels if COMBO_SEP in lab]
    assert len(combos) == MEDIUM["n_combinations"] == len(set(combos))
    means = _group_means(adata)
    for ctx in sim["contexts"]:
        ctrl = means[ctx, CONTROL_LABEL]
        for combo in combos:
            a, b = split_combo(combo)
            assert a in sim["targets"] and b in sim["targets"] and a != b
            for t in (a, b):
                g = adata.var_names.get_loc(t)
                assert means[ctx, combo][g] < 0.5 * ctrl[g], (ctx, combo, t)
    # Truth off the targets: the sum of the singles' effects plus a small non-zero interaction.
    lfc = sim["true_lfc"][0]
    for combo in combos:
        a, b = split_combo(combo)
        off_target = ~adata.var_names.isin([a, b])
        diff = (lfc[labels.index(combo)] - lfc[labels.index(a)] - lfc[labels.index(b)])[off_target]
        assert 0 < np.sqrt(np.mean(diff**2)) <= 0.1, combo


def test_batch_effect_present(adata):
    sim = adata.uns["simulation"]
    ctrl = adata[adata.obs["target_gene"] == CONTROL_LABEL]
    assert (pd.crosstab(ctrl.obs["cell_type"], ctrl.obs["gem_group"]) > 0).all().all()
    X = _norm(ctrl)
    b = ctrl.obs["gem_group"].cat.codes.to_numpy()
    m0, m1 = X[b == 0].mean(axis=0), X[b == 1].mean(axis=0)
    expressed = (m0 + m1) / 2 > 2.0
    observed = np.log(m1[expressed] / m0[expressed])
    true = (sim["batch_lfc"][1] - sim["batch_lfc"][0])[expressed]
    assert np.corrcoef(observed, true)[0, 1] > 0.6


def test_h5ad_round_trip(tmp_path):
    a = simulate_perturbseq(**SMALL, seed=1)
    path = tmp_path / "sim.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    sa, sb = a.uns["simulation"], b.uns["simulation"]
    np.testing.assert_array_equal(sa["true_lfc"], sb["true_lfc"])
    np.testing.assert_array_equal(sa["knockdown_residual"], sb["knockdown_residual"])
    assert list(sb["labels"]) == sa["labels"] and list(sb["contexts"]) == sa["contexts"]
    assert sb["params"]["seed"] == 1 and sb["params"]["context_effect_share"] == pytest.approx(0.3)
    assert b.uns["vcell"]["expression"] == "counts"
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(n_genes=0), "n_genes"),
        (dict(n_genes=10, n_perturbations=11), "n_perturbations"),
        (dict(n_contexts=0), "n_contexts"),
        (dict(n_perturbations=3, n_combinations=4), "n_combinations"),
        (dict(cells_per_perturbation=0), "cells_per_perturbation"),
        (dict(n_controls=0), "n_controls"),
        (dict(n_batches=0), "n_batches"),
        (dict(context_effect_share=1.5), "context_effect_share"),
        (dict(knockdown_residual=(0.5, 0.1)), "knockdown_residual"),
        (dict(knockdown_residual=0.2), "knockdown_residual"),
        (dict(cell_jitter=1.0), "cell_jitter"),
        (dict(seed=-1), "seed"),
        (dict(n_genes=2.5), "n_genes"),
    ],
)
def test_bad_parameters_raise(kwargs, name):
    with pytest.raises(VcellError, match=name) as exc:
        simulate_perturbseq(**kwargs)
    assert "\n" not in str(exc.value)
