"""Memory of ST training: only the slots training reads are loaded; gradients never outlive their step."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from vcell.data.dataset import load_dataset
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.train.st import CellSetDataModule, build_module, fit

TINY = {"width": 32, "n_layers": 1, "n_heads": 2, "encoder_layers": 2}


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    adata = simulate_perturbseq(n_genes=40, n_contexts=2, n_perturbations=4, n_combinations=0,
                                cells_per_perturbation=30, n_controls=60, seed=0)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    rng = np.random.default_rng(0)
    adata.obsm["X_a"] = rng.normal(size=(adata.n_obs, 4)).astype(np.float32)
    adata.obsm["X_b"] = rng.normal(size=(adata.n_obs, 3)).astype(np.float32)
    path = tmp_path_factory.mktemp("mem") / "data.h5ad"
    adata.write_h5ad(path)
    return path, adata


def test_only_obsm_reads_x_obs_var_uns_and_the_named_embeddings(h5ad):
    path, adata = h5ad
    full = load_dataset(path)
    lean = load_dataset(path, only_obsm=["X_b"])
    assert "counts" in full.adata.layers and "counts" not in lean.adata.layers
    assert list(lean.adata.obsm.keys()) == ["X_b"]
    np.testing.assert_array_equal(lean.adata.obsm["X_b"], adata.obsm["X_b"])
    assert sp.issparse(lean.adata.X) and lean.adata.X.dtype == np.float32
    assert (lean.adata.X != full.adata.X).nnz == 0
    assert lean.adata.obs.equals(full.adata.obs) and list(lean.adata.var_names) == list(full.adata.var_names)
    assert lean.adata.uns["vcell"]["expression"] == "log1p" and lean.expression == full.expression
    np.testing.assert_array_equal(lean.index.pert_codes, full.index.pert_codes)
    assert load_dataset(path, only_obsm=[]).adata.obsm.keys() == set()


def test_only_obsm_names_a_missing_embedding_and_the_ones_there(h5ad, tmp_path):
    path, _ = h5ad
    with pytest.raises(VcellError, match=r"data\.h5ad: no \.obsm\['X_se'\] .*\(have: 'X_a', 'X_b'\).*vcell embed --key X_se"):
        load_dataset(path, only_obsm=["X_se"])
    with pytest.raises(VcellError, match="file not found"):
        load_dataset(tmp_path / "none.h5ad", only_obsm=[])
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(VcellError, match="bad.h5ad: unreadable"):
        load_dataset(tmp_path / "bad.h5ad", only_obsm=[])


def test_gradients_are_freed_after_every_step(h5ad, tmp_path):
    path, _ = h5ad
    data = load_dataset(path, only_obsm=[])
    split = apply_split(data.index, holdout_config(data.index, []))
    module = build_module(data, TINY, seed=0)
    seen: list[bool] = []
    # what the next step's forward pass finds: no gradient beside its activations
    module.on_train_batch_start = lambda batch, i: seen.append(all(p.grad is None for p in module.parameters()))
    dm = CellSetDataModule(data, split, batch_size=2, set_size=8, seed=0)
    fit(module, dm, tmp_path / "run", max_steps=3, accelerator="cpu", checkpoint_every=100)
    assert seen == [True, True, True]
    assert all(p.grad is None for p in module.parameters())
