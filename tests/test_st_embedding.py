"""ST in a cell-embedding space: gene decoder, training on `.obsm`, SE -> embed -> ST -> predict end to end."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch

from vcell.data.dataset import from_anndata
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.nn.transition import StateTransition, STConfig
from vcell.predictors.st import STPredictor
from vcell.train.st import CellSetDataModule, build_module, train_st

from conftest import error_line, run_cli

TINY = {"width": 32, "n_layers": 1, "n_heads": 2, "encoder_layers": 2, "gene_hidden": [48, 48]}
SE_TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "sentence_len": 40, "n_mask": 16}


def _adata(n_comps: int = 8) -> ad.AnnData:
    adata = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=5, n_combinations=0,
                                cells_per_perturbation=30, n_controls=60, seed=0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = np.asarray(adata.X.toarray(), dtype=np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    sc.pp.pca(adata, n_comps=n_comps)
    adata.obsm["X_pca"] = adata.obsm["X_pca"].astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def tiny():
    data = from_anndata(_adata())
    return data, apply_split(data.index, holdout_config(data.index, ["ctx_B"]))


def test_gene_residual_gives_back_the_basal_genes_and_decoder_is_checked():
    torch.manual_seed(0)
    cfg = STConfig(input_dim=6, pert_dim=3, gene_dim=10, relu_output=False, **TINY)
    model = StateTransition(cfg).eval()
    basal = torch.randn(2, 5, 6)
    genes = torch.rand(2, 5, 10) * 3
    # an embedding equal to its basal cell decodes to exactly that cell's genes
    assert torch.allclose(model.decode_genes(basal, basal, genes), genes, atol=1e-6)
    moved = model.decode_genes(basal + 1.0, basal, genes)
    assert moved.shape == (2, 5, 10) and (moved >= 0).all() and not torch.allclose(moved, genes)
    with pytest.raises(VcellError, match="basal"):
        model.decode_genes(basal)
    direct = StateTransition(STConfig(input_dim=6, pert_dim=3, gene_dim=10, gene_residual=False, **TINY)).eval()
    assert direct.decode_genes(basal).shape == (2, 5, 10) and (direct.decode_genes(basal) >= 0).all()
    with pytest.raises(VcellError, match="gene_dim"):
        StateTransition(STConfig(input_dim=6, pert_dim=3, **{k: v for k, v in TINY.items()})).decode_genes(basal)
    with pytest.raises(VcellError, match="gene_loss_weight"):
        STConfig(input_dim=6, pert_dim=3, gene_loss_weight=-1)


def test_embedding_batches_carry_both_spaces(tiny):
    data, split = tiny
    dm = CellSetDataModule(data, split, batch_size=3, set_size=8, embed_key="X_pca")
    batch = next(iter(dm._loader(dm.train_set, batch_size=3)))
    assert batch["basal"].shape == (3, 8, 8) and batch["target"].shape == (3, 8, 8)
    assert batch["basal_genes"].shape == (3, 8, 50) and batch["target_genes"].shape == (3, 8, 50)
    # the rows behind both spaces are the same cells
    emb, X = data.adata.obsm["X_pca"], data.adata.X
    for b in range(3):
        for s in range(8):
            row = int(np.flatnonzero((emb == batch["target"][b, s].numpy()).all(axis=1))[0])
            assert np.array_equal(X[row], batch["target_genes"][b, s].numpy())


@pytest.mark.parametrize("detach", [True, False])
def test_gene_loss_reaches_the_transition_model_only_when_not_detached(tiny, detach):
    data, split = tiny
    torch.manual_seed(0)
    # predict_residual off: with it, an untrained model predicts its basal cells and the residual
    # gene decoding cancels exactly (no gradient anywhere)
    module = build_module(data, {**TINY, "detach_gene_decoder": detach, "predict_residual": False}, embed_key="X_pca")
    dm = CellSetDataModule(data, split, batch_size=3, set_size=8, embed_key="X_pca")
    batch = next(iter(dm._loader(dm.train_set, batch_size=3)))
    _, gene_loss = module._losses(batch)
    gene_loss.backward()
    decoder = [p.grad for p in module.model.gene_decoder.parameters()]
    transition = [p.grad for n, p in module.model.named_parameters() if not n.startswith("gene_decoder.")]
    assert decoder[-2] is not None and decoder[-2].abs().sum() > 0  # last weight (its bias cancels in the residual)
    reached = any(g is not None and g.abs().sum() > 0 for g in transition)
    assert reached is (not detach)


def test_build_module_in_embedding_space(tiny):
    data, _ = tiny
    module = build_module(data, TINY, embed_key="X_pca")
    c = module.config
    assert (c.input_dim, c.output_dim, c.gene_dim, c.relu_output) == (8, 8, 50, False)
    assert module.meta["embed_key"] == "X_pca" and module.meta["genes"] == list(data.adata.var_names)
    with pytest.raises(VcellError, match=r"no \.obsm\['X_se'\].*vcell embed"):
        build_module(data, TINY, embed_key="X_se")
    with pytest.raises(VcellError, match="input_dim is 9"):
        build_module(data, {**TINY, "input_dim": 9}, embed_key="X_pca")
    bad = _adata()
    bad.obsm["X_pca"][3, 1] = np.nan
    with pytest.raises(VcellError, match="NaN/inf in 1 cell"):
        build_module(from_anndata(bad), TINY, embed_key="X_pca")


def test_training_lowers_both_losses_and_predicts_genes(tiny, tmp_path):
    data, split = tiny
    # without the residuals the untrained model is far off in both spaces, so the losses must fall
    config = {**TINY, "predict_residual": False, "gene_residual": False}
    run = train_st(data, split, tmp_path / "run", config, max_steps=60, batch_size=4, set_size=16, lr=2e-3,
                   accelerator="cpu", log_every=1, embed_key="X_pca", seed=0)
    import pandas as pd

    log = pd.read_csv(next((run / "logs").rglob("metrics.csv")))
    for col in ("train_embed_loss", "train_gene_loss"):
        values = log[col].dropna().to_numpy()
        assert values[-10:].mean() < 0.75 * values[:5].mean(), (col, values)
    total = log[["train_loss", "train_embed_loss", "train_gene_loss"]].dropna()
    assert np.allclose(total["train_loss"], total["train_embed_loss"] + total["train_gene_loss"], rtol=1e-5)

    predictor = STPredictor.from_checkpoint(run / "last", set_size=16)
    assert predictor.embed_key == "X_pca"
    adata = data.adata
    ctrl = adata[((adata.obs["target_gene"] == "non-targeting") & (adata.obs["cell_type"] == "ctx_B")).to_numpy()].copy()
    perts = predictor.pert_vocab[:2]
    pred = predictor.predict(ctrl, perts, "ctx_B", cells_per_perturbation=7, seed=0)
    assert pred.shape == (14 + ctrl.n_obs, 50) and list(pred.var_names) == list(adata.var_names)
    X = pred.X.toarray()
    assert (X >= 0).all() and np.isfinite(X).all()
    assert not np.allclose(X[:7], X[7:14])  # the perturbation changes the decoded genes
    again = predictor.predict(ctrl, perts, "ctx_B", cells_per_perturbation=7, seed=0)
    assert np.array_equal(again.X.toarray(), X)
    no_emb = ctrl.copy()
    del no_emb.obsm["X_pca"]
    with pytest.raises(VcellError, match=r"\.obsm\['X_pca'\].*vcell embed"):
        predictor.predict(no_emb, perts, "ctx_B", cells_per_perturbation=7)
    narrow = ctrl.copy()
    narrow.obsm["X_pca"] = narrow.obsm["X_pca"][:, :5]
    with pytest.raises(VcellError, match="expects 8 dimensions"):
        predictor.predict(narrow, perts, "ctx_B", cells_per_perturbation=7)


@pytest.mark.slow
def test_se_embed_st_predict_end_to_end(tmp_path):
    """The whole path through the real CLI: train SE, embed, train ST on the embeddings, predict genes."""
    adata = _adata()
    del adata.obsm["X_pca"]
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    se_cfg, st_cfg = tmp_path / "se.json", tmp_path / "st.json"
    se_cfg.write_text(json.dumps(SE_TINY))
    st_cfg.write_text(json.dumps(TINY))
    common = ["--accelerator", "cpu", "--seed", "0"]
    proc = run_cli("train", "se", "--data", data, "--out", tmp_path / "se", "--preset", "tiny", "--config", se_cfg,
                   "--max-steps", "4", "--batch-size", "16", "--gene-dim", "8", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    embedded = tmp_path / "embedded.h5ad"
    proc = run_cli("embed", "--model", tmp_path / "se", "--data", data, "--out", embedded, "--key", "X_vcell", "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # ST on data without the embeddings: one line naming the file and the key
    line = error_line(run_cli("train", "st", "--data", data, "--embed-key", "X_vcell", "--holdout-context", "ctx_B",
                               "--config", st_cfg, "--max-steps", "2", "--out", tmp_path / "bad", *common))
    assert "cells.h5ad" in line and "X_vcell" in line and "vcell embed" in line
    assert not (tmp_path / "bad" / "last").exists()

    run = tmp_path / "st"
    proc = run_cli("train", "st", "--data", embedded, "--embed-key", "X_vcell", "--holdout-context", "ctx_B", "--config", st_cfg,
                   "--max-steps", "6", "--set-size", "16", "--batch-size", "4", "--out", run, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["embed_key"] == "X_vcell" and meta["model"]["gene_dim"] == 50 and meta["model"]["input_dim"] == 32

    pred_path = tmp_path / "pred.h5ad"
    proc = run_cli("predict", "--model", run, "--data", embedded, "--context", "ctx_B", "--perturbations", "data",
                   "--out", pred_path, "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = ad.read_h5ad(pred_path)
    truth = adata[adata.obs["cell_type"] == "ctx_B"]
    assert pred.n_obs == truth.n_obs and list(pred.var_names) == list(adata.var_names)
    # predicting from a file without the embeddings is a clear error too
    line = error_line(run_cli("predict", "--model", run, "--data", data, "--context", "ctx_B", "--out", tmp_path / "p2.h5ad"))
    assert "cells.h5ad" in line and "X_vcell" in line and not (tmp_path / "p2.h5ad").exists()
    real = tmp_path / "real_b.h5ad"
    truth.copy().write_h5ad(real)
    proc = run_cli("eval", "run", "--pred", pred_path, "--real", real, "--pert-col", "target_gene",
                   "--control", "non-targeting", "--profile", "minimal", "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "results.csv").is_file()
