"""Predictions as raw counts (issue #14 item 3): ``predict_context(output="counts")`` and ``to_counts``.

Baselines in-process on simulated data (no ST training); ``vcell predict --output counts`` end to
end is in ``test_st_cli.py`` and its refusals in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import vcell
from vcell.data.dataset import from_anndata, load_dataset
from vcell.data.io import read_h5ad, write_h5ad
from vcell.data.normalize import normalize_log1p
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.eval.vcc2026.submission import prepare_submission_2026
from vcell.predictors.counts import CONTROL_CELL_COL, parse_depth, parse_output, to_counts
from vcell.predictors.predict import predict_context
from vcell.predictors.registry import make_model

N_GENES = 30  # of the 40 simulated: the predicted genes are a subset, as after HVG selection


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


@pytest.fixture(scope="module")
def world():
    raw = simulate_perturbseq(n_genes=40, n_contexts=2, n_perturbations=5, n_combinations=0,
                              cells_per_perturbation=30, n_controls=60, seed=0)
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)
    adata = normalize_log1p(raw)  # raw counts kept in layers["counts"], as `vcell data preprocess` keeps them
    adata.obs["total_all"] = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()  # over all 40 genes
    adata = adata[:, adata.var_names[:N_GENES]].copy()
    data = from_anndata(adata)
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    models = {name: make_model(name, seed=0).fit(data, split) for name in ("pert_mean", "cell_mean")}
    obs = adata.obs
    controls = adata[((obs["cell_type"] == "ctx_B") & (obs["target_gene"] == "non-targeting")).to_numpy()].copy()
    return data, models, controls


def _assert_counts(X: np.ndarray) -> None:
    assert np.isfinite(X).all() and X.min() >= 0
    np.testing.assert_array_equal(X, np.rint(X))


def test_fixed_depth_counts_are_integral_exact_and_seeded(world):
    data, models, _ = world
    pred = predict_context(models["pert_mean"], data, "ctx_B", output="counts", depth=500, seed=1)
    X = _dense(pred.X)
    _assert_counts(X)
    np.testing.assert_array_equal(X.sum(axis=1), 500)  # exactly the depth asked
    labels = pred.obs["target_gene"].astype(str)
    assert "non-targeting" not in set(labels)  # no control rows
    ctx = data.adata.obs[data.adata.obs["cell_type"] == "ctx_B"]["target_gene"].astype(str)
    assert labels.value_counts().to_dict() == ctx[ctx != "non-targeting"].value_counts().to_dict()
    meta = pred.uns["vcell"]
    assert meta["expression"] == meta["output"] == "counts" and meta["model_space"] == "log1p"
    assert meta["library_size"] == "depth" and meta["depth"] == 500 and meta["seed"] == 1
    again = predict_context(models["pert_mean"], data, "ctx_B", output="counts", depth=500, seed=1)
    np.testing.assert_array_equal(_dense(again.X), X)
    other = predict_context(models["pert_mean"], data, "ctx_B", output="counts", depth=500, seed=2)
    assert not np.array_equal(_dense(other.X), X)
    log1p = vcell.predict_context(models["pert_mean"], data, "ctx_B", seed=1)  # the default stays log1p, controls kept
    assert log1p.uns["vcell"] == {"expression": "log1p", "output": "log1p", "model_space": "log1p", "seed": 1}
    assert (log1p.obs["target_gene"] == "non-targeting").sum() == 60


def test_counts_at_each_cells_own_control_library_size(world):
    data, models, controls = world
    model = models["pert_mean"]
    log1p = predict_context(model, data, "ctx_B", seed=3)
    pred = predict_context(model, data, "ctx_B", output="counts", seed=3)
    X = _dense(pred.X)
    _assert_counts(X)
    is_pred = (log1p.obs["target_gene"] != "non-targeting").to_numpy()
    sources = log1p.obs[CONTROL_CELL_COL].to_numpy()[is_pred]
    np.testing.assert_array_equal(pred.obs[CONTROL_CELL_COL].to_numpy(), sources)
    # the recorded control really is the one the cell started from: that control + the perturbation's shift
    perts = list(dict.fromkeys(log1p.obs["target_gene"].astype(str)[is_pred]))
    shifts = dict(zip(perts, model.predict_shift(controls, perts, "ctx_B")))
    pos = controls.obs_names.get_indexer(sources)
    want = np.clip(_dense(controls.X)[pos] + np.stack([shifts[p] for p in log1p.obs["target_gene"].astype(str)[is_pred]]), 0, None)
    np.testing.assert_allclose(_dense(log1p.X)[is_pred], want, rtol=1e-5, atol=1e-5)
    # its counts total is that control's total over the predicted genes (not over all 40 measured)
    totals = _dense(controls.layers["counts"]).sum(axis=1)
    np.testing.assert_array_equal(X.sum(axis=1), totals[pos])
    meta = pred.uns["vcell"]
    assert meta["library_size"] == "controls" and "depth" not in meta
    assert meta["library_pairing"].startswith("each predicted cell's own") and f"over {N_GENES} predicted genes" in meta["library_source"]

    # cell_mean's cells start from no control: sizes drawn from the controls' totals, seeded
    drawn = predict_context(models["cell_mean"], data, "ctx_B", output="counts", seed=3)
    assert CONTROL_CELL_COL not in drawn.obs.columns and drawn.uns["vcell"]["library_pairing"].startswith("drawn")
    assert set(_dense(drawn.X).sum(axis=1)) <= set(totals)


def test_library_sizes_from_an_obs_column_or_one_error(world, caplog, tmp_path):
    data, models, controls = world
    log1p = predict_context(models["pert_mean"], data, "ctx_B", seed=0)
    bare = controls.copy()
    del bare.layers["counts"]
    # a total over all 40 genes measured (as scanpy's QC writes it), 30 of them predicted: each cell
    # is drawn at its total over the 30, told from its log1p values, not at the 40-gene total
    bare.obs["nCount_RNA"] = bare.obs["total_all"]
    with caplog.at_level(logging.WARNING, logger="vcell"):
        pred = to_counts(log1p, bare, seed=0)
    over_predicted = dict(zip(controls.obs_names, _dense(controls.layers["counts"]).sum(axis=1)))
    np.testing.assert_array_equal(_dense(pred.X).sum(axis=1), [over_predicted[c] for c in pred.obs[CONTROL_CELL_COL]])
    share = np.median(_dense(controls.layers["counts"]).sum(axis=1) / bare.obs["total_all"].to_numpy())
    assert pred.uns["vcell"]["library_source"].startswith("obs['nCount_RNA'] x the predicted genes' share")
    assert share < 0.9 and f"hold a median {100 * share:.1f}% of it" in caplog.text
    # the same from a backed file (as `vcell predict` reads it): its control cells' view is read, not sliced again
    full = data.adata.copy()
    del full.layers["counts"]
    full.obs["nCount_RNA"] = full.obs["total_all"]
    write_h5ad(full, tmp_path / "bare.h5ad")
    backed = load_dataset(tmp_path / "bare.h5ad", data.spec, backed=True)
    from_file = predict_context(models["pert_mean"], backed, "ctx_B", output="counts", seed=0)
    np.testing.assert_array_equal(_dense(from_file.X).sum(axis=1), [over_predicted[c] for c in from_file.obs[CONTROL_CELL_COL]])
    bare.obs["nCount_RNA"] = np.arange(100, 100 + bare.n_obs)  # no total these log1p values were normalised by
    with pytest.raises(VcellError, match=r"obs\['nCount_RNA'\] counts every gene measured, and X does not tell"):
        to_counts(log1p, bare)
    del bare.obs["nCount_RNA"]
    with pytest.raises(VcellError, match=r"no raw counts .*--depth 20000"):
        to_counts(log1p, bare)
    no_counts = data.adata.copy()
    del no_counts.layers["counts"]
    with pytest.raises(VcellError, match=r"context 'ctx_B'.*depth"):
        predict_context(models["pert_mean"], from_anndata(no_counts), "ctx_B", output="counts")


def test_library_sizes_from_raw_counts_in_dot_raw(world):
    """Seurat's and many scanpy files keep the counts of every gene in .raw beside a log1p X: predict
    said "give layers['counts'] or a fixed depth" and ignored them. They are used over the predicted
    genes when .raw holds integers; a .raw of log1p values (scanpy's other habit) is not counts."""
    data, models, controls = world
    log1p = predict_context(models["pert_mean"], data, "ctx_B", seed=0)
    over_predicted = dict(zip(controls.obs_names, _dense(controls.layers["counts"]).sum(axis=1)))
    seurat = controls.copy()
    extra = sp.csr_matrix(np.full((seurat.n_obs, 2), 7.0, dtype=np.float32))  # two genes not predicted
    seurat.raw = ad.AnnData(sp.hstack([seurat.layers["counts"], extra]).tocsr(), obs=seurat.obs[[]],
                            var=pd.DataFrame(index=[*seurat.var_names, "NOTPRED1", "NOTPRED2"]))
    del seurat.layers["counts"]
    pred = to_counts(log1p, seurat, seed=0)
    assert pred.uns["vcell"]["library_source"] == f"raw.X over {N_GENES} predicted genes"
    np.testing.assert_array_equal(_dense(pred.X).sum(axis=1), [over_predicted[c] for c in pred.obs[CONTROL_CELL_COL]])
    logged = controls.copy()
    logged.raw = logged  # log1p values in .raw: not counts, so no library sizes from it
    del logged.layers["counts"]
    with pytest.raises(VcellError, match=r"no raw counts .*--depth 20000"):
        to_counts(log1p, logged)


def test_counts_output_passes_the_2026_submission_checks(world, tmp_path):
    data, models, _ = world
    pred = predict_context(models["pert_mean"], data, "ctx_B", output="counts", seed=0)
    path = write_h5ad(pred, tmp_path / "pred.h5ad")
    back = read_h5ad(path)
    assert back.uns["vcell"]["model_space"] == "log1p" and back.uns["vcell"]["expression"] == "counts"
    table = back.obs["target_gene"].astype(str).value_counts().rename_axis("target_gene").reset_index()
    table.to_csv(tmp_path / "perts.csv", index=False)
    out = prepare_submission_2026(path, tmp_path / "sub.h5ad", genes=list(back.var_names), perturbations=tmp_path / "perts.csv")
    assert read_h5ad(out).n_obs == pred.n_obs
    # the log1p prediction is refused by the same checks (control rows)
    write_h5ad(predict_context(models["pert_mean"], data, "ctx_B"), tmp_path / "log1p.h5ad")
    with pytest.raises(VcellError, match="control"):
        prepare_submission_2026(tmp_path / "log1p.h5ad", tmp_path / "no.h5ad", genes=list(back.var_names))

    norm = pytest.importorskip("cell_eval2.norm", reason="cell-eval2 (test extra) checks submissions its own way")
    norm.validate_input_type(back, "counts")  # cell-eval2's value checks of a vcc2026 prediction
    norm.check_scale_limit(back, "counts", 1_000_000.0)


@pytest.mark.parametrize("value", [0, -5, "0", "-5", "2e4", "foo", "", 1_000_001, True, 1.5])
def test_bad_depths_are_one_error_naming_the_value(value):
    with pytest.raises(VcellError, match=r"^--depth .*'controls' or a whole number"):
        parse_depth(value, "--depth")


def test_bad_options(world):
    data, models, _ = world
    assert parse_depth(" Controls ") == "controls" and parse_depth("20000") == 20000 and parse_depth(20_000) == 20000
    assert parse_depth(1_000_000) == parse_depth("1000000") == 1_000_000  # the 2026 cap on a cell's total, included
    assert parse_output("COUNTS") == "counts"
    with pytest.raises(VcellError, match="output 'foo'"):
        predict_context(models["pert_mean"], data, "ctx_B", output="foo")
    with pytest.raises(VcellError, match="depth 100.*output='counts'"):
        predict_context(models["pert_mean"], data, "ctx_B", depth=100)
    log1p = predict_context(models["pert_mean"], data, "ctx_B")
    with pytest.raises(VcellError, match="needs the context's control cells"):
        to_counts(log1p)
    with pytest.raises(VcellError, match="perturbation column 'perturbation'"):
        to_counts(log1p, depth=10, pert_col="perturbation")
    with pytest.raises(VcellError, match="model space 'counts'"):
        to_counts(log1p, depth=10, model_space="counts")
    # a library-size table may be given directly (bench does), indexed by control cell
    sizes = pd.Series(7.0, index=log1p.obs_names[log1p.obs["target_gene"] == "non-targeting"])
    np.testing.assert_array_equal(_dense(to_counts(log1p, sizes).X).sum(axis=1), 7)
    with pytest.raises(VcellError, match="library size nan"):
        to_counts(log1p, sizes * np.nan)


def _same_prediction(a, b) -> None:
    """Two predictions with the same cells, names, labels, sources and record."""
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert list(a.obs.columns) == list(b.obs.columns)
    for col in a.obs.columns:
        assert a.obs[col].astype(str).tolist() == b.obs[col].astype(str).tolist(), col
    assert list(a.obs["target_gene"].cat.categories) == list(b.obs["target_gene"].cat.categories)
    assert a.uns["vcell"] == b.uns["vcell"]


@pytest.mark.parametrize(("model", "output", "depth"), [
    ("pert_mean", "log1p", "controls"),
    ("pert_mean", "counts", "controls"),  # each cell at its own control's library size
    ("cell_mean", "counts", "controls"),  # library sizes drawn from the controls'
    ("cell_mean", "counts", 300),
])
def test_a_prediction_written_in_pieces_is_the_prediction_made_at_once(world, tmp_path, model, output, depth):
    """``write_prediction`` holds a few cells at a time (here 7: pieces of one or two
    perturbations) and writes the file ``predict_context`` returns, draws and counts included."""
    from vcell.predictors.predict import write_prediction

    data, models, _ = world
    whole = predict_context(models[model], data, "ctx_B", output=output, depth=depth, seed=3)
    out = tmp_path / "pred.h5ad"
    meta = write_prediction(out, models[model], data, "ctx_B", output=output, depth=depth, seed=3, piece_cells=7)
    assert meta.n_obs == whole.n_obs and meta.uns["vcell"] == whole.uns["vcell"]
    _same_prediction(read_h5ad(out), whole)
    assert not [p for p in tmp_path.iterdir() if p.name != "pred.h5ad"]  # no temporary file left


def test_a_perturbation_starts_from_the_same_controls_whatever_is_predicted_with_it(world):
    data, models, _ = world
    perts = [p for p in data.index.perts.astype(str) if p != "non-targeting"][:3]
    both = predict_context(models["pert_mean"], data, "ctx_B", perts, cells_per_perturbation=8, seed=5)
    alone = predict_context(models["pert_mean"], data, "ctx_B", perts[1:2], cells_per_perturbation=8, seed=5)
    first = both.obs["target_gene"].astype(str).to_numpy() == perts[1]
    np.testing.assert_array_equal(_dense(both.X)[first], _dense(alone.X)[:8])
    assert both.obs[CONTROL_CELL_COL].to_numpy()[first].tolist() == alone.obs[CONTROL_CELL_COL].to_numpy()[:8].tolist()
    other = predict_context(models["pert_mean"], data, "ctx_B", perts[1:2], cells_per_perturbation=8, seed=6)
    assert alone.obs[CONTROL_CELL_COL].tolist()[:8] != other.obs[CONTROL_CELL_COL].tolist()[:8]  # the seed matters


@pytest.mark.parametrize(("model", "output"), [("pert_mean", "log1p"), ("pert_mean", "counts"), ("cell_mean", "counts")])
def test_a_backed_file_gives_the_prediction_of_the_data_in_memory(world, tmp_path, monkeypatch, model, output):
    """From a backed file only the controls' ``X`` rows are read and the counts layer is summed as it
    is read (a few cells at a time): the same cells, counts and library-size record as in memory.
    The file's ``obsm`` holds what real files do (Papalexi's sparse guide counts, a table, an array)."""
    import scipy.sparse as sp

    from vcell.data.dataset import load_dataset
    from vcell.predictors import predict as predict_mod
    from vcell.predictors.predict import write_prediction

    data, models, _ = world
    whole = predict_context(models[model], data, "ctx_B", output=output, seed=4)
    stored = data.adata.copy()
    n = stored.n_obs
    stored.obsm["grna_counts"] = sp.random(n, 5, density=0.3, format="csr", random_state=0)
    stored.obsm["qc"] = pd.DataFrame({"a": np.arange(n, dtype=float)}, index=stored.obs_names)
    stored.obsm["X_pca"] = np.ones((n, 3), dtype=np.float32)
    path = write_h5ad(stored, tmp_path / "data.h5ad")
    backed = load_dataset(path, data.spec, backed=True)
    assert backed.backed
    monkeypatch.setattr(predict_mod, "CHUNK_CELLS", 7)  # library sizes summed 7 control cells at a time
    meta = write_prediction(tmp_path / "pred.h5ad", models[model], backed, "ctx_B", output=output, seed=4, piece_cells=9)
    assert meta.uns["vcell"] == whole.uns["vcell"]
    _same_prediction(read_h5ad(tmp_path / "pred.h5ad"), whole)


def test_counts_written_in_pieces_say_their_library_sizes_once(world, tmp_path, caplog):
    """One log line for the whole prediction, not one per piece (a full-size one has dozens)."""
    import logging

    from vcell.predictors.predict import write_prediction

    data, models, _ = world
    with caplog.at_level(logging.INFO, logger="vcell"):
        meta = write_prediction(tmp_path / "pred.h5ad", models["pert_mean"], data, "ctx_B", output="counts", seed=3, piece_cells=7)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("counts:")]
    assert len(lines) == 1 and lines[0].startswith(f"counts: {meta.n_obs:,} predicted cells, library sizes: each predicted cell's own")


def test_a_context_named_as_splits_name_it_is_that_context(world):
    """`vcell data split` names a context ``dataset.context``; predict takes that name too (the cells
    of that context in that dataset), and refuses a dataset that does not hold the context."""
    data, models, _ = world
    _same_prediction(predict_context(models["pert_mean"], data, "synthetic.ctx_B", seed=3),
                     predict_context(models["pert_mean"], data, "ctx_B", seed=3))
    with pytest.raises(VcellError, match="unknown context 'other.ctx_B'"):
        predict_context(models["pert_mean"], data, "other.ctx_B")


def test_cell_mean_counts_are_drawn_from_the_mean_composition_not_from_its_log1p_vector(world):
    """cell_mean's vector is a mean of log1p values: drawn as counts it starves the genes few cells
    express (its 2026 score in bench was -0.5, far below a no-change model). Its counts come from
    the groups' mean normalised expression instead: their pseudobulk composition is much nearer
    the real cells'; the log1p prediction is unchanged."""
    data, models, controls = world
    model = models["cell_mean"]
    obs = data.adata.obs
    held = ((obs["cell_type"] == "ctx_B") & (obs["target_gene"] != "non-targeting")).to_numpy()
    real = _dense(data.adata.layers["counts"][np.flatnonzero(held)]).sum(axis=0)

    def l1(pred):
        c = _dense(pred.X).sum(axis=0)
        return float(np.abs(c / c.sum() - real / real.sum()).sum())

    log1p = predict_context(model, data, "ctx_B", seed=1)
    counts = predict_context(model, data, "ctx_B", output="counts", seed=1)
    assert counts.uns["vcell"]["counts_basis"].startswith("cell_mean's groups' mean normalised expression")
    vector = model.counts_vector_
    try:
        del model.counts_vector_  # as a model saved before it: drawn from the log1p vector
        from_vector = predict_context(model, data, "ctx_B", output="counts", seed=1)
        np.testing.assert_array_equal(_dense(predict_context(model, data, "ctx_B", seed=1).X), _dense(log1p.X))
    finally:
        model.counts_vector_ = vector
    assert "counts_basis" not in from_vector.uns["vcell"]
    assert l1(counts) < 0.75 * l1(from_vector), (l1(counts), l1(from_vector))
    # to_counts given the model draws the same cells; data whose column is named otherwise than the model's too
    np.testing.assert_array_equal(_dense(to_counts(log1p, controls, seed=1, model=model).X), _dense(counts.X))
    renamed = data.adata.copy()
    renamed.obs = renamed.obs.rename(columns={"target_gene": "gene"})
    other = from_anndata(renamed, data.spec.with_(pert_col="gene"))
    np.testing.assert_array_equal(_dense(predict_context(model, other, "ctx_B", output="counts", seed=1).X), _dense(counts.X))
    np.testing.assert_array_equal(_dense(counts.X).sum(axis=1), _dense(from_vector.X).sum(axis=1))  # the same depths


@pytest.mark.parametrize("model", ["pert_mean", "cell_mean"])
def test_a_perturbations_counts_do_not_depend_on_the_others_drawn(world, model):
    """One generator drew every perturbation's counts in request order: A,B and B,A (or B alone, or a
    prediction split over jobs) gave B other counts. Each perturbation draws from its own now."""
    data, models, _ = world
    perts = sorted(set(data.index.perts) - {"non-targeting"})[:2]

    def of(pred, label):
        cells = pred[(pred.obs["target_gene"].astype(str) == label).to_numpy()]
        return cells.X.toarray()

    ab, ba, b = (predict_context(models[model], data, "ctx_B", perturbations=p, cells_per_perturbation=20, seed=3, output="counts")
                 for p in (perts, perts[::-1], perts[1:]))
    for label in perts:
        np.testing.assert_array_equal(of(ab, label), of(ba, label))
    np.testing.assert_array_equal(of(ab, perts[1]), of(b, perts[1]))
    other = predict_context(models[model], data, "ctx_B", perturbations=perts, cells_per_perturbation=20, seed=4, output="counts")
    assert not np.array_equal(of(ab, perts[0]), of(other, perts[0]))  # the seed still draws


def test_a_perturbation_split_over_calls_draws_what_one_call_draws(world):
    """CountsDraw in pieces that split one perturbation: drawn library sizes and counts came from one
    stream per perturbation, interleaved differently when split; each has its own now."""
    from vcell.predictors.counts import CountsDraw

    data, models, controls = world
    pred = predict_context(models["cell_mean"], data, "ctx_B", cells_per_perturbation=9, seed=2)  # no control_cell: sizes drawn
    rows = np.flatnonzero((pred.obs["target_gene"] != "non-targeting").to_numpy())
    once = CountsDraw(controls, rows.size, seed=7, genes=pred.var_names).convert(pred)
    draw = CountsDraw(controls, rows.size, seed=7, genes=pred.var_names)
    cut = rows[4]  # inside the first perturbation's cells
    parts = [draw.convert(pred[:cut]), draw.convert(pred[cut:])]
    np.testing.assert_array_equal(sp.vstack([p.X for p in parts]).toarray(), once.X.toarray())
    assert once.uns["vcell"]["library_pairing"].startswith("drawn with replacement")


def test_counts_stay_on_their_cells_when_perturbations_interleave():
    """Counts are drawn per perturbation (one seeded stream each), then put back in the prediction's
    row order: a prediction whose labels interleave (shuffled, or sorted by cell) keeps each cell's
    counts on its own row and label."""
    X = np.zeros((6, 3), np.float32)
    X[[0, 2, 5], 0] = 2.0  # A's cells express gene 0 only, B's gene 1 only
    X[[1, 3, 4], 1] = 2.0
    labels = ["A", "B", "A", "B", "B", "A"]
    pred = ad.AnnData(X, obs=pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(6)]))
    out = to_counts(pred, depth=50, seed=3)
    counts = _dense(out.X)
    assert list(out.obs_names) == list(pred.obs_names) and list(out.obs["target_gene"]) == labels
    np.testing.assert_array_equal(counts[[0, 2, 5]], np.tile([50.0, 0.0, 0.0], (3, 1)))
    np.testing.assert_array_equal(counts[[1, 3, 4]], np.tile([0.0, 50.0, 0.0], (3, 1)))
    pred.X = np.ones((6, 3), np.float32)  # every gene expressed: the draws depend on the seed
    draws = {seed: _dense(to_counts(pred, depth=50, seed=seed).X) for seed in (0, 1)}
    assert (draws[0] != draws[1]).any() and (_dense(to_counts(pred, depth=50).X) == draws[0]).all()  # seed 0 by default


def test_predicted_genes_missing_from_the_controls_counts_are_named():
    """Library sizes are the controls' totals over the predicted genes: a predicted gene they do not
    count is an error naming it (it used to be able to read another column's counts)."""
    genes = ["a", "b", "c"]
    controls = ad.AnnData(np.ones((4, 3), np.float32), var=pd.DataFrame(index=genes),
                          obs=pd.DataFrame({"target_gene": ["non-targeting"] * 4}, index=[f"k{i}" for i in range(4)]))
    controls.layers["counts"] = sp.csr_matrix(np.full((4, 3), 7.0, np.float32))
    pred = ad.AnnData(np.ones((2, 2), np.float32), var=pd.DataFrame(index=["a", "z"]),
                      obs=pd.DataFrame({"target_gene": ["P", "P"]}, index=["p0", "p1"]))
    with pytest.raises(VcellError, match=r"1 predicted gene\(s\) not in the control cells' counts \('z'\)"):
        to_counts(pred, controls)


def test_the_predicted_genes_share_of_a_library_is_at_most_all_of_it():
    """A control cell normalised to a larger total than the others (its X reads as more than its
    library) keeps at most its whole library size, never more."""
    from vcell.predictors.counts import predicted_share

    counts = np.array([[1, 3, 6], [1, 2, 6], [1, 1, 8], [5, 1, 5], [1, 4, 4]], dtype=float)
    totals = counts.sum(axis=1)
    target = np.array([1e4, 1e4, 1e4, 1e4, 2e4])  # the last cell: twice the others' normalisation total
    controls = ad.AnnData(np.log1p(counts / totals[:, None] * target[:, None]), var=pd.DataFrame(index=["a", "b", "c"]))
    share = predicted_share(controls, ["a", "b"], totals, "obs['total_counts']", "controls")
    np.testing.assert_allclose(share, [4 / 10, 3 / 9, 2 / 10, 6 / 11, 1.0])  # the last: 2 x 5/9, capped
    np.testing.assert_allclose(predicted_share(controls, None, totals, "obs['total_counts']", "controls"), np.ones(5))


def test_a_negative_library_size_is_named_with_its_cell():
    pred = ad.AnnData(np.ones((2, 2), np.float32), obs=pd.DataFrame({"target_gene": ["P", "P"]}, index=["p0", "p1"]))
    sizes = pd.Series([100.0, -5.0], index=["k0", "k1"])
    with pytest.raises(VcellError, match=r"control cell 'k1' has library size -5.0 .*expected a count >= 0"):
        to_counts(pred, sizes)
