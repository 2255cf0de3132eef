"""`vcell train st` / `vcell predict` end to end (real subprocesses) and the `st` predictor in-process."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from vcell.data.dataset import from_anndata
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.predictors.registry import make_model

from conftest import error_line, run_cli, run_cli_batch

TINY = {"width": 32, "n_layers": 1, "n_heads": 2}
TINY_OPTS = dict(config={**TINY, "encoder_layers": 1}, max_steps=15, set_size=16, batch_size=4, accelerator="cpu")


def _tiny_adata() -> ad.AnnData:
    adata = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=5, n_combinations=0,
                                cells_per_perturbation=30, n_controls=60, seed=0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    return adata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by the CLI with ctx_B held out; (data file, run folder, adata)."""
    tmp = tmp_path_factory.mktemp("st")
    adata = _tiny_adata()
    data = tmp / "tiny.h5ad"
    adata.write_h5ad(data)
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    run = tmp / "run"
    proc = run_cli("train", "st", "--data", data, "--holdout-context", "ctx_B", "--config", cfg, "--max-steps", "15",
                   "--set-size", "16", "--batch-size", "4", "--accelerator", "cpu", "--out", run, "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run, adata


def test_train_writes_checkpoint(trained):
    _, run, adata = trained
    assert (run / "last" / "weights.safetensors").is_file()
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["genes"] == list(adata.var_names)
    assert meta["model"]["width"] == 32 and meta["model"]["n_layers"] == 1
    assert meta["step"] == 15
    assert set(meta["pert_vocab"]) == set(adata.obs["target_gene"].astype(str)) - {"non-targeting"}


def test_backed_training_streams_the_same_numbers(trained, tmp_path):
    """--backed reads the cell sets' rows from disk: the same seed trains the same weights as in memory."""
    from safetensors.numpy import load_file

    data, run, _ = trained
    cfg = run.parent / "tiny.json"
    proc = run_cli("-v", "train", "st", "--data", data, "--holdout-context", "ctx_B", "--config", cfg, "--max-steps", "15",
                   "--set-size", "16", "--batch-size", "4", "--accelerator", "cpu", "--out", tmp_path / "run", "--seed", "0",
                   "--backed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from disk" in proc.stdout
    # -v shows Lightning's lines once (its own handler printed each a second time)
    assert (proc.stdout + proc.stderr).count("GPU available") == 1, proc.stderr[-2000:]
    want, got = load_file(run / "last" / "weights.safetensors"), load_file(tmp_path / "run" / "last" / "weights.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_predict_output_layout_and_eval(trained, tmp_path):
    data, run, adata = trained
    pred_path = tmp_path / "pred.h5ad"
    proc = run_cli("predict", "--model", run, "--data", data, "--context", "ctx_B", "--perturbations", "data",
                   "--out", pred_path, "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = ad.read_h5ad(pred_path)
    ctx = adata[adata.obs["cell_type"] == "ctx_B"]
    n_ctrl = int((ctx.obs["target_gene"] == "non-targeting").sum())
    assert list(pred.var_names) == list(adata.var_names)
    assert set(pred.obs.columns) >= {"target_gene", "cell_type"}
    assert (pred.obs["cell_type"].astype(str) == "ctx_B").all()
    want = ctx.obs["target_gene"].astype(str).value_counts().to_dict()
    assert pred.obs["target_gene"].astype(str).value_counts().to_dict() == want
    assert pred.n_obs == ctx.n_obs and n_ctrl > 0
    X = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    assert np.isfinite(X).all() and X.min() >= 0
    # the appended controls are the real ones, unchanged
    real_ctrl = ctx[ctx.obs["target_gene"] == "non-targeting"]
    np.testing.assert_allclose(X[-n_ctrl:], real_ctrl.X.toarray(), rtol=1e-6)
    # predicted cells differ from copies of controls (the model did something)
    assert not np.allclose(X[: pred.n_obs - n_ctrl].mean(0), X[-n_ctrl:].mean(0), atol=1e-6)

    real_path = tmp_path / "real.h5ad"
    ctx.copy().write_h5ad(real_path)
    ev = run_cli("eval", "run", "--pred", pred_path, "--real", real_path, "--profile", "minimal",
                 "--out", tmp_path / "eval", "--threads", "1")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert (tmp_path / "eval" / "agg_results.csv").is_file()


def test_predict_unknown_perturbation(trained, tmp_path):
    data, run, _ = trained
    out = tmp_path / "p.h5ad"
    proc = run_cli("predict", "--model", run / "last", "--data", data, "--context", "ctx_A",
                   "--perturbations", "NOT_A_GENE", "--out", out)
    line = error_line(proc)
    assert "unknown perturbation" in line and "NOT_A_GENE" in line
    assert not out.exists()


def test_predict_bad_inputs(trained, tmp_path):
    data, run, adata = trained
    out = tmp_path / "p.h5ad"
    real_pert = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})[0]
    no_ctrl = adata[~((adata.obs["cell_type"] == "ctx_B") & (adata.obs["target_gene"] == "non-targeting"))].copy()
    no_ctrl_path = tmp_path / "noctrl.h5ad"
    no_ctrl.write_h5ad(no_ctrl_path)
    fewer = adata[:, adata.var_names[:40]].copy()
    fewer_path = tmp_path / "fewer.h5ad"
    fewer.write_h5ad(fewer_path)
    predict = ["predict", "--model", run, "--data"]
    ok, *refused = run_cli_batch([  # one interpreter for the five runs
        [*predict, data, "--context", "ctx_A", "--perturbations", real_pert, "--cells-per-perturbation", "7", "--out", out],
        [*predict, data, "--context", "ctx_Z", "--out", tmp_path / "z.h5ad"],
        [*predict, no_ctrl_path, "--context", "ctx_B", "--out", tmp_path / "n.h5ad"],
        [*predict, fewer_path, "--context", "ctx_A", "--out", tmp_path / "f.h5ad"],
    ])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (ad.read_h5ad(out).obs["target_gene"].astype(str) == real_pert).sum() == 7
    lines = [error_line(p) for p in refused]
    assert "ctx_Z" in lines[0]
    assert "ctx_B" in lines[1] and "control" in lines[1]
    assert "genes" in lines[2]
    assert not (tmp_path / "f.h5ad").exists()


def test_train_rejects_counts(tmp_path):
    adata = simulate_perturbseq(n_genes=20, n_contexts=1, n_perturbations=2, n_combinations=0,
                                cells_per_perturbation=10, n_controls=20, seed=0)
    adata.uns["vcell"] = {"expression": "counts"}
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    line = error_line(run_cli("train", "st", "--data", path, "--max-steps", "1", "--out", tmp_path / "run"))
    assert "vcell data preprocess" in line
    assert not (tmp_path / "run" / "last").exists()


def test_st_predictor_in_process(tmp_path):
    adata = _tiny_adata()
    data = from_anndata(adata)
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    model = make_model("st", seed=0, out_dir=tmp_path / "run", **TINY_OPTS)
    assert model.fit(data, split) is model
    assert (tmp_path / "run" / "last" / "weights.safetensors").is_file()
    controls = adata[(adata.obs["cell_type"] == "ctx_B").to_numpy() & (adata.obs["target_gene"] == "non-targeting").to_numpy()].copy()
    perts = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})[:3]
    sizes = {p: n for p, n in zip(perts, (5, 20, 33))}
    pred = model.predict(controls, perts, "ctx_B", cells_per_perturbation=sizes, seed=3)
    counts = pred.obs["target_gene"].astype(str).value_counts().to_dict()
    assert counts == {**sizes, "non-targeting": controls.n_obs}
    assert list(pred.var_names) == list(adata.var_names)
    X = pred.X.toarray()
    assert X.min() >= 0
    again = model.predict(controls, perts, "ctx_B", cells_per_perturbation=sizes, seed=3)
    np.testing.assert_array_equal(again.X.toarray(), X)  # seeded and eval mode: reproducible

    # genes in another order are reordered; a different gene set is an error
    shuffled = controls[:, controls.var_names[::-1]].copy()
    np.testing.assert_allclose(model.predict(shuffled, perts, "ctx_B", cells_per_perturbation=sizes, seed=3).X.toarray(), X, rtol=1e-5, atol=1e-6)
    with pytest.raises(VcellError, match="genes"):
        model.predict(controls[:, :45].copy(), perts, "ctx_B", cells_per_perturbation=sizes)
    with pytest.raises(VcellError, match="NOPE"):
        model.predict(controls, ["NOPE"], "ctx_B")


def test_predict_counts_output_is_a_2026_submission(trained, tmp_path):
    """`vcell predict --output counts`: integral counts at each cell's control library size, no control rows,
    the spaces in uns; `vcell eval prep --profile vcc2026`'s checks pass on the file as written."""
    from vcell.eval.vcc2026.submission import prepare_submission_2026

    _, run, adata = trained
    raw = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=5, n_combinations=0,
                              cells_per_perturbation=30, n_controls=60, seed=0)  # _tiny_adata's counts
    with_counts = adata.copy()
    with_counts.layers["counts"] = sp.csr_matrix(raw.X, dtype=np.float32)
    data = tmp_path / "with_counts.h5ad"
    with_counts.write_h5ad(data)
    out = tmp_path / "counts.h5ad"
    proc = run_cli("predict", "--model", run, "--data", data, "--context", "ctx_B", "--output", "counts", "--out", out, "--seed", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as raw counts" in proc.stdout and "no control rows" in proc.stdout
    pred = ad.read_h5ad(out)
    X = pred.X.toarray()
    np.testing.assert_array_equal(X, np.rint(X))
    assert X.min() >= 0 and "non-targeting" not in set(pred.obs["target_gene"].astype(str))
    totals = dict(zip(with_counts.obs_names, np.asarray(with_counts.layers["counts"].sum(axis=1)).ravel()))
    np.testing.assert_array_equal(X.sum(axis=1), [totals[c] for c in pred.obs["control_cell"]])
    meta = pred.uns["vcell"]
    assert (meta["model_space"], meta["expression"], meta["library_size"], meta["seed"]) == ("log1p", "counts", "controls", 4)
    prepare_submission_2026(out, tmp_path / "sub.h5ad", genes=list(pred.var_names))

    # the challenge's pert_counts.csv (its control row too): those perturbations, as many cells each as it lists
    perts = sorted(set(pred.obs["target_gene"].astype(str)))[:2]
    listed = tmp_path / "pert_counts.csv"
    listed.write_text("target_gene,n_cells\n" + f"{perts[0]},7\n{perts[1]},3\nnon-targeting,50\n")
    proc = run_cli("predict", "--model", run, "--data", data, "--context", "ctx_B", "--output", "counts", "--perturbations", listed,
                   "--out", tmp_path / "listed.h5ad")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = ad.read_h5ad(tmp_path / "listed.h5ad").obs["target_gene"].astype(str).value_counts().to_dict()
    assert counts == {perts[0]: 7, perts[1]: 3}
    prepare_submission_2026(tmp_path / "listed.h5ad", tmp_path / "listed_sub.h5ad", genes=list(pred.var_names), perturbations=listed)


def test_predict_all_genes_writes_a_full_submission_from_a_gene_subset_model(trained, tmp_path):
    """`vcell predict --all-genes RAW --output counts`: the model's 50 genes drawn, the 10 genes it never saw
    copied from each cell's control cell, every gene of RAW in its order; log1p without the preprocessing's
    target_sum is one error line."""
    from vcell.eval.vcc2026.submission import prepare_submission_2026

    data, run, adata = trained
    raw = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=5, n_combinations=0,
                              cells_per_perturbation=30, n_controls=60, seed=0)  # _tiny_adata's counts
    extra = np.random.default_rng(0).poisson(3.0, size=(raw.n_obs, 10)).astype(np.float32)
    X = np.hstack([extra[:, :4], raw.X.toarray() if sp.issparse(raw.X) else raw.X, extra[:, 4:]]).astype(np.float32)
    genes = [f"other{i}" for i in range(4)] + list(raw.var_names) + [f"other{i}" for i in range(4, 10)]
    full = ad.AnnData(X=sp.csr_matrix(X), obs=raw.obs.copy(), var=raw.var.reindex(genes))
    full.write_h5ad(tmp_path / "raw.h5ad")
    out = tmp_path / "full.h5ad"
    proc = run_cli("predict", "--model", run, "--data", data, "--context", "ctx_B", "--output", "counts", "--all-genes",
                   tmp_path / "raw.h5ad", "--out", out, "--seed", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all 60 genes of raw.h5ad (50 predicted by the model" in proc.stdout
    pred = ad.read_h5ad(out)
    assert list(pred.var_names) == genes
    got = pred.X.toarray()
    rows = full.obs_names.get_indexer(pred.obs["control_cell"].astype(str))
    src = X[rows]
    other = [i for i, g in enumerate(genes) if g.startswith("other")]
    np.testing.assert_array_equal(got[:, other], src[:, other])
    np.testing.assert_array_equal(got.sum(axis=1), src.sum(axis=1))
    prepare_submission_2026(out, tmp_path / "sub.h5ad", genes=genes)
    proc = run_cli("predict", "--model", run, "--data", data, "--context", "ctx_B", "--all-genes", tmp_path / "raw.h5ad",
                   "--out", tmp_path / "log1p.h5ad")
    assert "needs the preprocessing's target_sum" in error_line(proc) and not (tmp_path / "log1p.h5ad").exists()


def test_one_predict_writes_a_submission_and_the_log1p_cells_it_was_drawn_from(trained, tmp_path):
    """`vcell predict --output counts --all-genes RAW --log1p-out CELLS`: OUT is the file a counts-only run
    writes and CELLS the one `--output log1p` writes, from one prediction; misuse is one error line."""
    data, run, adata = trained
    raw = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=5, n_combinations=0,
                              cells_per_perturbation=30, n_controls=60, seed=0)  # _tiny_adata's counts
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)
    raw.write_h5ad(tmp_path / "raw.h5ad")
    base = ["predict", "--model", run, "--data", data, "--context", "ctx_B", "--seed", "4"]
    sub = [*base, "--output", "counts", "--all-genes", tmp_path / "raw.h5ad"]
    # the single-output runs come first, so the two-file run cannot lean on what they left in the interpreter
    alone_sub, alone_cells, proc, *refused = run_cli_batch([
        [*sub, "--out", tmp_path / "sub_alone.h5ad"],
        [*base, "--out", tmp_path / "cells_alone.h5ad"],
        # the context as DATASET.CONTEXT: the summary line crashed on it (ValueError, exit 1, after both files were written)
        [*(("synthetic.ctx_B" if a == "ctx_B" else a) for a in sub), "--out", tmp_path / "sub.h5ad", "--log1p-out", tmp_path / "cells.h5ad"],
        [*base, "--out", tmp_path / "x.h5ad", "--log1p-out", tmp_path / "y.h5ad"],
        [*sub, "--out", tmp_path / "x.h5ad", "--log1p-out", tmp_path / "x.h5ad"],
        [*sub, "--out", tmp_path / "x.h5ad", "--log1p-out", tmp_path / "cells.h5ad"],
    ])
    assert alone_sub.returncode == alone_cells.returncode == 0, alone_sub.stderr[-3000:] + alone_cells.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"; their log1p cells \+ 60 controls in \S*cells\.h5ad", proc.stdout), proc.stdout
    for name in ("sub", "cells"):
        got, alone = ad.read_h5ad(tmp_path / f"{name}.h5ad"), ad.read_h5ad(tmp_path / f"{name}_alone.h5ad")
        np.testing.assert_array_equal(got.X.toarray(), alone.X.toarray())
        assert got.obs.astype(str).equals(alone.obs.astype(str)) and got.uns["vcell"] == alone.uns["vcell"]
        assert list(got.var_names) == list(alone.var_names)

    lines = [error_line(p) for p in refused]
    assert lines[0].startswith("error: --log1p-out") and "--output counts" in lines[0]
    assert "the same file as --out" in lines[1]
    assert "cells.h5ad: output file already exists" in lines[2]
    assert not (tmp_path / "x.h5ad").exists() and not (tmp_path / "y.h5ad").exists()


def test_st_prediction_written_in_pieces_is_the_one_made_at_once(trained, tmp_path):
    """ST cells predicted perturbation group by perturbation group (``write_prediction``, which
    `vcell predict` runs) are the cells predicted all at once, to float32 rounding (the cell sets
    of a forward pass differ, and a matmul's summation order with them)."""
    from vcell.data.dataset import load_dataset
    from vcell.predictors.predict import predict_context, write_prediction
    from vcell.predictors.st import STPredictor

    data, run, _ = trained
    predictor = STPredictor.from_checkpoint(run, seed=0)
    dataset = load_dataset(data, predictor.spec)
    whole = predict_context(predictor, dataset, "ctx_B", seed=2)
    meta = write_prediction(tmp_path / "p.h5ad", predictor, dataset, "ctx_B", seed=2, piece_cells=40)
    got = ad.read_h5ad(tmp_path / "p.h5ad")
    assert meta.n_obs == whole.n_obs == got.n_obs
    np.testing.assert_allclose(got.X.toarray(), whole.X.toarray(), rtol=1e-5, atol=1e-6)
    assert got.obs.astype(str).equals(whole.obs.astype(str)) and got.uns["vcell"] == whole.uns["vcell"]
