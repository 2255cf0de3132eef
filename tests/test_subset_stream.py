"""Row subsets written window by window (``vcell data subset`` on files larger than memory)."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from vcell.data import subset as subset_mod
from vcell.data.simulate import simulate_perturbseq
from vcell.errors import VcellError


def _file(tmp_path, dense=False):
    a = simulate_perturbseq(n_genes=60, n_contexts=2, n_perturbations=5, n_combinations=1, cells_per_perturbation=20,
                            n_controls=30, seed=3)
    a.layers["counts"] = a.X.copy().astype(np.int32)
    a.X = a.X.toarray() if dense else sp.csr_matrix(np.log1p(a.X))
    a.obsm["X_pca"] = np.arange(a.n_obs * 2, dtype=np.float32).reshape(-1, 2)
    path = tmp_path / "in.h5ad"
    a.write_h5ad(path)
    return path, a


@pytest.mark.parametrize("dense", [False, True])
def test_same_cells_as_anndata(tmp_path, monkeypatch, dense):
    path, a = _file(tmp_path, dense)
    monkeypatch.setattr(subset_mod, "_WINDOW_NNZ", 150)  # many windows, some a single row
    mask = np.random.default_rng(0).random(a.n_obs) < 0.4
    mask[-1] = True
    done = []
    got = subset_mod.write_cells(path, mask, tmp_path / "out.h5ad", progress=done.append)
    got.file.close()
    got = ad.read_h5ad(tmp_path / "out.h5ad")
    want = a[mask].copy()
    assert sum(done) == mask.sum() and (len(done) > 3) != dense
    assert list(got.obs_names) == list(want.obs_names)
    X = got.X.toarray() if sp.issparse(got.X) else got.X
    Xw = want.X.toarray() if sp.issparse(want.X) else want.X
    np.testing.assert_array_equal(X, Xw)
    np.testing.assert_array_equal(got.layers["counts"].toarray(), want.layers["counts"].toarray())
    assert got.layers["counts"].dtype == np.int32
    np.testing.assert_array_equal(got.obsm["X_pca"], want.obsm["X_pca"])
    assert got.obs["target_gene"].cat.categories.tolist() == want.obs["target_gene"].cat.categories.tolist()
    assert got.uns["vcell"] == {"expression": "counts"}


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    path, a = _file(tmp_path)
    calls = []

    def boom(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(subset_mod, "_WINDOW_NNZ", 150)
    with pytest.raises(KeyboardInterrupt):
        subset_mod.write_cells(path, np.ones(a.n_obs, bool), tmp_path / "out.h5ad", progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.mark.parametrize("dense", [False, True])
def test_gene_subset_in_the_order_asked(tmp_path, dense):
    path, a = _file(tmp_path, dense)
    genes = list(a.var_names[[7, 2, 40]])
    mask = np.arange(a.n_obs) % 3 == 0
    got = subset_mod.write_cells(path, mask, tmp_path / "out.h5ad", genes=genes)
    got.file.close()
    got = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(got.var_names) == genes
    want = a[mask][:, genes]
    np.testing.assert_array_equal(got.layers["counts"].toarray(), want.layers["counts"].toarray())


def test_unknown_gene_is_named(tmp_path):
    path, a = _file(tmp_path)
    with pytest.raises(VcellError, match="in.h5ad: 1 of the 2 genes.*NOPE"):
        subset_mod.write_cells(path, np.ones(a.n_obs, bool), tmp_path / "out.h5ad", genes=[a.var_names[0], "NOPE"])
    assert not (tmp_path / "out.h5ad").exists()
