"""A prediction over a model's gene subset widened to every gene of the raw file (``all_genes``).

Baselines in-process on simulated counts: the model knows 30 of the 40 genes, as after HVG
selection; ``vcell predict --all-genes`` with ST end to end is in ``test_st_cli.py``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from vcell.data.dataset import from_anndata
from vcell.data.io import read_h5ad
from vcell.data.normalize import normalize_log1p
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.eval.vcc2026.submission import prepare_submission_2026
from vcell.predictors.counts import CONTROL_CELL_COL
from vcell.predictors.predict import predict_context, write_prediction
from vcell.predictors.registry import make_model

N_MODEL = 30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("all_genes")
    raw = simulate_perturbseq(n_genes=40, n_contexts=2, n_perturbations=5, n_combinations=0,
                              cells_per_perturbation=30, n_controls=60, seed=1)
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)
    raw.write_h5ad(tmp / "raw.h5ad")
    adata = normalize_log1p(raw)
    # the model's genes: 30 of the 40, not in the raw file's order (HVG + targets are not)
    genes = list(reversed(adata.var_names[5:5 + N_MODEL]))
    data = from_anndata(adata[:, genes].copy())
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    models = {name: make_model(name, seed=0).fit(data, split) for name in ("pert_mean", "cell_mean")}
    counts = dict(zip(raw.obs_names, raw.X.toarray()))
    return tmp, raw, data, models, genes, counts


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def test_counts_keep_the_control_cells_other_genes_and_its_depth(world):
    tmp, raw, data, models, genes, counts = world
    sub = predict_context(models["pert_mean"], data, "ctx_B", output="counts", seed=2)
    full = predict_context(models["pert_mean"], data, "ctx_B", output="counts", seed=2, all_genes=tmp / "raw.h5ad")
    assert list(full.var_names) == list(raw.var_names) and full.n_obs == sub.n_obs
    X = _dense(full.X)
    np.testing.assert_array_equal(X, np.rint(X))
    model = raw.var_names.get_indexer(genes)
    other = np.setdiff1d(np.arange(raw.n_vars), model)
    src = np.stack([counts[c] for c in full.obs[CONTROL_CELL_COL]]).astype(np.float64)
    np.testing.assert_array_equal(X[:, other], src[:, other])  # the genes the model does not know: the control's own
    np.testing.assert_array_equal(X.sum(axis=1), src.sum(axis=1))  # as deep as the control, over every gene
    np.testing.assert_array_equal(X[:, model].sum(axis=1), src[:, model].sum(axis=1))
    assert full.obs[CONTROL_CELL_COL].tolist() == sub.obs[CONTROL_CELL_COL].tolist()
    meta = full.uns["vcell"]
    assert meta["expression"] == "counts" and "40 genes of raw.h5ad: 30 predicted" in meta["genes"]
    # the model's genes hold the model's composition: the perturbation's mean differs from the controls'
    labels = full.obs["target_gene"].astype(str).to_numpy()
    assert not np.allclose(X[labels == labels[0]][:, model].mean(0), src[labels == labels[0]][:, model].mean(0))
    # a full 2026 submission as written
    path = tmp / "sub_in.h5ad"
    full.write_h5ad(path)
    prepare_submission_2026(path, tmp / "sub.h5ad", genes=list(raw.var_names))
    again = predict_context(models["pert_mean"], data, "ctx_B", output="counts", seed=2, all_genes=tmp / "raw.h5ad")
    np.testing.assert_array_equal(_dense(again.X), X)  # seeded


def test_a_fixed_depth_is_shared_between_the_models_genes_and_the_others(world):
    tmp, raw, data, models, genes, counts = world
    full = predict_context(models["pert_mean"], data, "ctx_B", output="counts", depth=500, seed=2, all_genes=tmp / "raw.h5ad")
    X = _dense(full.X)
    np.testing.assert_array_equal(X.sum(axis=1), 500)
    model = raw.var_names.get_indexer(genes)
    src = np.stack([counts[c] for c in full.obs[CONTROL_CELL_COL]]).astype(np.float64)
    want = np.rint(500 * src[:, model].sum(axis=1) / src.sum(axis=1))
    np.testing.assert_array_equal(X[:, model].sum(axis=1), want)
    other = np.setdiff1d(np.arange(raw.n_vars), model)
    assert not (X[:, other][src[:, other] == 0]).any()  # drawn from the control's own composition


def test_log1p_other_genes_are_the_controls_normalised_as_preprocessing_did(world):
    tmp, raw, data, models, genes, counts = world
    sub = predict_context(models["pert_mean"], data, "ctx_B", seed=2)
    full = predict_context(models["pert_mean"], data, "ctx_B", seed=2, all_genes=tmp / "raw.h5ad")
    assert list(full.var_names) == list(raw.var_names) and list(full.obs_names) == list(sub.obs_names)
    model = raw.var_names.get_indexer(genes)
    X = _dense(full.X)
    np.testing.assert_array_equal(X[:, model], _dense(sub.X))
    src = np.stack([counts[c] for c in full.obs[CONTROL_CELL_COL]]).astype(np.float64)
    want = np.log1p(src / src.sum(axis=1, keepdims=True) * 1e4)
    other = np.setdiff1d(np.arange(raw.n_vars), model)
    np.testing.assert_allclose(X[:, other], want[:, other], rtol=1e-6)
    ctrl = full.obs["target_gene"].astype(str).to_numpy() == "non-targeting"
    assert ctrl.any() and (full.obs[CONTROL_CELL_COL][ctrl] == full.obs_names[ctrl]).all()
    np.testing.assert_allclose(X[ctrl], want[ctrl], rtol=1e-6)  # a real control row: the preprocessed cell, every gene


@pytest.mark.parametrize(("output", "depth"), [("log1p", "controls"), ("counts", "controls"), ("counts", 300)])
def test_widened_pieces_are_the_prediction_made_at_once(world, output, depth):
    tmp, raw, data, models, genes, counts = world
    whole = predict_context(models["pert_mean"], data, "ctx_B", output=output, depth=depth, seed=4, all_genes=tmp / "raw.h5ad")
    out = tmp / f"pieces_{output}_{depth}.h5ad"
    meta = write_prediction(out, models["pert_mean"], data, "ctx_B", output=output, depth=depth, seed=4, piece_cells=7,
                            all_genes=tmp / "raw.h5ad")
    got = read_h5ad(out)
    assert meta.uns["vcell"] == whole.uns["vcell"] == got.uns["vcell"]
    np.testing.assert_array_equal(_dense(got.X), _dense(whole.X))
    assert got.obs.astype(str).equals(whole.obs.astype(str)) and list(got.var_names) == list(raw.var_names)


@pytest.mark.parametrize(("depth", "all_genes"), [("controls", True), (300, True), (300, False)])
def test_one_prediction_writes_the_counts_and_the_log1p_cells_they_were_drawn_from(world, depth, all_genes):
    """``log1p_out``: the counts file is the one a counts-only run writes, and the log1p file the one a
    log1p run writes (model's genes, controls appended), to the bit, both written in pieces."""
    tmp, raw, data, models, genes, counts = world
    model, widen = models["pert_mean"], (tmp / "raw.h5ad" if all_genes else None)
    kw = dict(depth=depth, seed=5, piece_cells=7, all_genes=widen)
    both, cells = tmp / f"both_{depth}_{all_genes}.h5ad", tmp / f"cells_{depth}_{all_genes}.h5ad"
    meta = write_prediction(both, model, data, "ctx_B", output="counts", log1p_out=cells, **kw)
    write_prediction(tmp / "alone.h5ad", model, data, "ctx_B", output="counts", overwrite=True, **kw)  # one per parameter set
    alone, got = read_h5ad(tmp / "alone.h5ad"), read_h5ad(both)
    np.testing.assert_array_equal(_dense(got.X), _dense(alone.X))
    assert got.obs.astype(str).equals(alone.obs.astype(str)) and meta.uns["vcell"] == got.uns["vcell"] == alone.uns["vcell"]
    log1p = predict_context(model, data, "ctx_B", seed=5)  # what a log1p prediction holds
    written = read_h5ad(cells)
    np.testing.assert_array_equal(_dense(written.X), _dense(log1p.X))
    assert written.obs.astype(str).equals(log1p.obs.astype(str)) and list(written.var_names) == genes
    assert written.uns["vcell"] == log1p.uns["vcell"] and written.uns["vcell"]["output"] == "log1p"
    # the counts were drawn from these cells: each counts row is a log1p row's cell, in order
    assert list(got.obs_names) == [n for n, p in zip(written.obs_names, written.obs["target_gene"].astype(str)) if p != "non-targeting"]
    with pytest.raises(VcellError, match=r"add --output counts \(output='counts'\)"):
        write_prediction(tmp / "never.h5ad", model, data, "ctx_B", log1p_out=tmp / "never_cells.h5ad")
    with pytest.raises(VcellError, match=r"the same file as --out \(the output\)"):
        write_prediction(tmp / "never.h5ad", model, data, "ctx_B", output="counts", log1p_out=tmp / "never.h5ad", **kw)
    assert not (tmp / "never.h5ad").exists() and not (tmp / "never_cells.h5ad").exists()


def test_a_failed_two_file_prediction_leaves_neither_file(world, monkeypatch):
    from vcell.predictors import predict as predict_mod

    tmp, raw, data, models, genes, counts = world
    calls = []
    as_output = predict_mod._Job._as_output

    def failing(self, piece):
        calls.append(1)
        if len(calls) == 2:
            raise VcellError("stopped in the second piece")
        return as_output(self, piece)

    monkeypatch.setattr(predict_mod._Job, "_as_output", failing)
    folder = tmp / "failed"
    folder.mkdir()
    with pytest.raises(VcellError, match="second piece"):
        write_prediction(folder / "c.h5ad", models["pert_mean"], data, "ctx_B", output="counts", depth=300, piece_cells=7,
                         log1p_out=folder / "l.h5ad")
    assert len(calls) == 2 and list(folder.iterdir()) == []


def test_refusals_name_the_gene_the_cell_or_the_missing_piece(world):
    tmp, raw, data, models, genes, counts = world
    path = tmp / "raw.h5ad"
    with pytest.raises(VcellError, match=r"model 'cell_mean' does not start each predicted cell from a control cell"):
        predict_context(models["cell_mean"], data, "ctx_B", output="counts", all_genes=path)
    with pytest.raises(VcellError, match=r"no_such\.h5ad: no such file"):
        predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "no_such.h5ad")
    (tmp / "broken.h5ad").write_text("not an h5ad file")
    with pytest.raises(VcellError, match=r"broken\.h5ad: unreadable file"):
        predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "broken.h5ad")
    fewer = raw[:, [g for g in raw.var_names if g != genes[3]]].copy()
    fewer.write_h5ad(tmp / "fewer.h5ad")
    with pytest.raises(VcellError, match=rf"fewer\.h5ad: 1 of the model's genes are not in this file \('{genes[3]}'\)"):
        predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "fewer.h5ad")
    ctrl = raw.obs_names[(raw.obs["cell_type"] == "ctx_B").to_numpy() & (raw.obs["target_gene"] == "non-targeting").to_numpy()]
    others = raw[~raw.obs_names.isin(ctrl[:1])].copy()
    others.write_h5ad(tmp / "others.h5ad")
    with pytest.raises(VcellError, match=rf"others\.h5ad: control cell '{ctrl[0]}' is not in this file"):
        predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "others.h5ad")
    thinned = raw.copy()  # a few values zeroed in one cell (a cleaning step): still the file the data came from
    X = raw.X.tolil()
    first = int(np.flatnonzero(((raw.obs["cell_type"] == "ctx_B") & (raw.obs["target_gene"] == "non-targeting")).to_numpy())[0])
    X[first, raw.var_names.get_indexer(genes[:1])] = 0
    thinned.X = sp.csr_matrix(X)
    thinned.write_h5ad(tmp / "thinned.h5ad")
    predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "thinned.h5ad")
    other = raw.copy()  # other cells under the same names (two simulations both name theirs cell000000...)
    other.X = raw.X[::-1].copy()
    other.write_h5ad(tmp / "other_sim.h5ad")
    with pytest.raises(VcellError, match=r"other_sim\.h5ad: control cell '.+' has other genes expressed here than in the data .*"
                                         r"not the raw-count file the data was preprocessed from"):
        predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "other_sim.h5ad")
    logs = normalize_log1p(raw)
    del logs.layers["counts"]
    logs.write_h5ad(tmp / "logs.h5ad")
    with pytest.raises(VcellError, match=r"logs\.h5ad: X is not raw counts \(cell '.+', gene '.+': "):
        predict_context(models["pert_mean"], data, "ctx_B", output="counts", all_genes=tmp / "logs.h5ad")
    bare = ad.AnnData(X=data.adata.X.copy(), obs=data.adata.obs.copy(), var=data.adata.var.copy())
    with pytest.raises(VcellError, match=r"needs the preprocessing's target_sum"):
        predict_context(models["pert_mean"], from_anndata(bare), "ctx_B", all_genes=path)


def test_a_dense_raw_file_gives_the_same_cells(world):
    tmp, raw, data, models, genes, counts = world
    dense = raw.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp / "dense.h5ad")
    a = predict_context(models["pert_mean"], data, "ctx_B", output="counts", seed=2, all_genes=tmp / "raw.h5ad")
    b = predict_context(models["pert_mean"], data, "ctx_B", output="counts", seed=2, all_genes=tmp / "dense.h5ad")
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))


@pytest.mark.parametrize(("output", "all_genes"), [("log1p", False), ("counts", False), ("log1p", True), ("counts", True)])
def test_a_written_piece_is_freed_before_the_next_is_predicted(world, monkeypatch, output, all_genes):
    """Pieces are AnnData objects, and widening one takes views of it: reference cycles, which
    Python's collector frees only when its thresholds (counts of objects, not bytes) are reached,
    dozens of pieces later in a full-size prediction. With automatic collection off, no earlier
    piece (the model's cells or the written matrix) is alive when the next one is written."""
    import gc
    import weakref

    from vcell.predictors import predict as predict_mod

    tmp, raw, data, models, genes, counts = world
    made, written, alive = [], [], []
    assemble = predict_mod.assemble_cells

    def recording_assemble(*args, **kwargs):
        piece = assemble(*args, **kwargs)
        made.append(weakref.ref(piece.X))
        return piece

    class RecordingWriter(predict_mod.H5adWriter):
        def append(self, *, X, **kwargs):
            alive.append(sum(r() is not None for r in made[:-1] + written))
            written.append(weakref.ref(X))
            return super().append(X=X, **kwargs)

    monkeypatch.setattr(predict_mod, "assemble_cells", recording_assemble)
    monkeypatch.setattr(predict_mod, "H5adWriter", RecordingWriter)
    gc.collect()
    gc.disable()
    try:
        write_prediction(tmp / f"freed_{output}_{all_genes}.h5ad", models["pert_mean"], data, "ctx_B", output=output, seed=4,
                         piece_cells=7, all_genes=tmp / "raw.h5ad" if all_genes else None)
    finally:
        gc.enable()
    assert len(made) > 3 and len(written) >= len(made)
    assert alive == [0] * len(alive)
