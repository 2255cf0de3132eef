"""What a prediction request names (``vcell.predict_context``): cells, perturbations, the control label."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from vcell.data.dataset import from_anndata
from vcell.data.normalize import normalize_log1p
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.predictors.predict import predict_context
from vcell.predictors.registry import make_model
from vcell.predictors.request import cell_mask


@pytest.fixture(scope="module")
def world():
    raw = simulate_perturbseq(n_genes=30, n_contexts=2, n_perturbations=4, n_combinations=0,
                              cells_per_perturbation=20, n_controls=40, seed=0)
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)
    data = from_anndata(normalize_log1p(raw))
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    return data, split, make_model("pert_mean", seed=0).fit(data, split)


def test_cells_may_be_a_mask_positions_or_names_and_give_the_same_prediction(world):
    data, split, model = world
    mask = split.mask("test") | split.mask("control")
    names = data.adata.obs_names
    by_mask = predict_context(model, data, "ctx_B", cells=mask, seed=1)
    for cells in (np.flatnonzero(mask), names[mask], list(names[mask])):
        same = predict_context(model, data, "ctx_B", cells=cells, seed=1)
        np.testing.assert_array_equal(same.X.toarray() if sp.issparse(same.X) else same.X,
                                      by_mask.X.toarray() if sp.issparse(by_mask.X) else by_mask.X)
    fewer = predict_context(model, data, "ctx_B", cells=np.flatnonzero(mask)[:30], seed=1)  # a subset: fewer cells
    assert fewer.n_obs < by_mask.n_obs


@pytest.mark.parametrize("cells, words", [
    (np.ones(10, dtype=bool), "a boolean mask of 10 values for"),
    (np.array([0, 10**6]), "position 1000000 is out of range"),
    (np.array(["nope"]), "1 cell name(s) not in the data ('nope')"),
    (np.array([0.5]), "give a boolean mask over the cells"),
])
def test_cells_that_name_no_cells_of_the_data_are_one_error_line(world, cells, words):
    data, _, model = world
    with pytest.raises(VcellError, match=words.replace("(", r"\(").replace(")", r"\)")):
        predict_context(model, data, "ctx_B", cells=cells)
    with pytest.raises(VcellError, match="boolean mask"):
        cell_mask(np.zeros(3, dtype=bool), data.adata.obs_names)
    assert not cell_mask([], data.adata.obs_names).any()
    twice = data.adata.obs_names[:1].append(data.adata.obs_names[:-1])
    with pytest.raises(VcellError, match="cell names are not unique"):
        cell_mask(["x"], twice)


def test_the_control_label_is_refused_and_an_unknown_label_warned_of(world, caplog):
    data, _, model = world
    perts = sorted(set(data.index.perts.astype(str)) - {"non-targeting"})
    with pytest.raises(VcellError, match="'non-targeting' is the control label"):
        predict_context(model, data, "ctx_B", perturbations=[perts[0], "non-targeting"], cells_per_perturbation=5)
    with caplog.at_level(logging.WARNING, logger="vcell"):
        pred = predict_context(model, data, "ctx_B", perturbations=[perts[0], perts[0] + "x"], cells_per_perturbation=5)
    assert f"1 perturbation(s) ('{perts[0]}x') with a target that neither the data nor the training has" in caplog.text
    assert f"did you mean '{perts[0]}'" in caplog.text
    assert (pred.obs["target_gene"] == perts[0] + "x").sum() == 5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vcell"):
        predict_context(model, data, "ctx_B", perturbations=perts[:2], cells_per_perturbation=5)
    assert "neither the data nor the training" not in caplog.text
    with pytest.raises(VcellError, match="all_genes: the path"):
        predict_context(model, data, "ctx_B", all_genes=data.adata)
