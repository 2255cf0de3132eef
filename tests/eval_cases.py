"""Evaluation scenarios shared by the evaluator tests: (real, pred) pairs with imperfect predictions.

Each builder returns ``(real, pred, pert_col, control)``; real-data builders read the full
files in ../shared/data, else their small subsets in tests/data (``conftest.real_data``).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _cap_cells(adata: ad.AnnData, col: str, n: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(idx)[:n] for idx in adata.obs.groupby(col, observed=True).indices.values()]
    return adata[np.sort(np.concatenate(rows))].copy()


def _only(adata: ad.AnnData, col: str) -> ad.AnnData:
    adata.obs = pd.DataFrame({col: adata.obs[col].astype(str).to_numpy()}, index=adata.obs_names)
    return adata


def simulated() -> tuple[ad.AnnData, ad.AnnData, str, str]:
    """10 perturbations + controls, 300 genes, log1p; pred = real + noise, shifted genes, and three
    perturbations' cells relabelled among each other."""
    rng = np.random.default_rng(7)
    n_genes = 300
    perts = [f"G{i}" for i in range(10)]
    genes = perts[:6] + [f"gene{i}" for i in range(n_genes - 6)]  # six perturbations target a measured gene
    base = rng.gamma(2.0, 0.6, n_genes)
    blocks, labels = [], []
    for p in ["non-targeting", *perts]:
        effect = np.zeros(n_genes)
        if p not in ("non-targeting", "G9"):  # G9 has no effect, hence no significant gene
            hit = rng.random(n_genes) < 0.15
            effect[hit] = rng.normal(0.0, 1.0, hit.sum())
        if p in genes:
            effect[genes.index(p)] = -2.5
        n = int(rng.integers(40, 70))
        depth = rng.gamma(5.0, 0.2, (n, 1))
        blocks.append(rng.poisson(base * np.exp(effect) * depth))
        labels += [p] * n
    counts = np.vstack(blocks).astype(np.float64)
    X = np.log1p(counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None) * 1e3).astype(np.float32)
    obs = pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))])
    real = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))

    noisy = X + rng.normal(0.0, 0.3, X.shape).astype(np.float32) * (X > 0)
    noisy[:, 100:120] += np.float32(0.4) * (np.asarray(labels) != "non-targeting")[:, None]
    pred_labels = np.asarray(labels).copy()
    swap = {"G6": "G7", "G7": "G8", "G8": "G6"}
    pred_labels = np.array([swap.get(p, p) for p in pred_labels])
    pred = ad.AnnData(
        np.clip(noisy, 0, None).astype(np.float32),
        obs=pd.DataFrame({"target": pred_labels}, index=[f"p{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    return real, pred, "target", "non-targeting"


def papalexi() -> tuple[ad.AnnData, ad.AnnData, str, str]:
    """THP-1 CRISPR KO, raw counts (cell-eval normalises them); 8 targets; real = replicate 1,
    pred = the same targets' cells of replicate 2."""
    from conftest import PAPALEXI, real_data

    data = ad.read_h5ad(real_data(PAPALEXI))
    keep = ["non-targeting", "IFNGR1", "IRF1", "JAK2", "STAT1", "SMAD4", "MYC", "CUL3", "SPI1"]
    data = data[data.obs["target"].isin(keep)]
    real = _cap_cells(data[data.obs["bio_rep"] == "rep_1"], "target", 150)
    pred = _cap_cells(data[data.obs["bio_rep"] == "rep_2"], "target", 150)
    return _only(real, "target"), _only(pred, "target"), "target", "non-targeting"


def mcfaline() -> tuple[ad.AnnData, ad.AnnData, str, str]:
    """McFaline 2023 CRISPRi, log1p: real = U87MG, pred = the T98G cells of the same knockdowns
    (another cell line). U87MG has no significant DE gene, a corner case of its own."""
    from conftest import MCFALINE, real_data

    data = ad.read_h5ad(real_data(MCFALINE))
    data = data[data.obs["dataset"] == "mcfaline23"]
    real = data[data.obs["cell_type"] == "U87MG"].copy()
    pred = data[data.obs["cell_type"] == "T98G"].copy()
    return _only(real, "perturbation"), _only(pred, "perturbation"), "perturbation", "control"


def norman() -> tuple[ad.AnnData, ad.AnnData, str, str]:
    """Norman 2019 CRISPRa in K562 (log1p), 8 perturbations; pred = real cells with noise on the
    expressed values, 50 genes scaled up and two perturbations' labels swapped."""
    from conftest import MCFALINE, real_data

    data = ad.read_h5ad(real_data(MCFALINE))
    data = data[data.obs["dataset"] == "norman19"]
    perts = sorted(set(data.obs["perturbation"].astype(str)) - {"control"})[:8]
    real = _only(data[data.obs["perturbation"].isin(["control", *perts])].copy(), "perturbation")
    rng = np.random.default_rng(1)
    X = real.X.toarray()
    X = np.clip(X + rng.normal(0.0, 0.3, X.shape) * (X > 0), 0, None)
    X[:, :50] *= 1.2
    swap = {perts[0]: perts[1], perts[1]: perts[0]}
    pred = ad.AnnData(
        sp.csr_matrix(X),
        obs=pd.DataFrame({"perturbation": [swap.get(p, p) for p in real.obs["perturbation"]]}, index=real.obs_names),
        var=real.var[[]],
    )
    return real, pred, "perturbation", "control"


def kang() -> tuple[ad.AnnData, ad.AnnData, str, str]:
    """Kang 2018 IFN-beta, raw counts, one perturbation (STIM vs CTRL): real = CD14 monocytes,
    pred = CD16 monocytes (another cell type), all genes of the file (13,215 in the full one)."""
    from conftest import KANG, real_data

    data = ad.read_h5ad(real_data(KANG))
    real = data[data.obs["seurat_annotations"] == "CD14 Mono"].copy()
    pred = data[data.obs["seurat_annotations"] == "CD16 Mono"].copy()
    return _only(real, "stim"), _only(pred, "stim"), "stim", "CTRL"


SCENARIOS = {"simulated": simulated, "papalexi": papalexi, "mcfaline": mcfaline, "norman": norman, "kang": kang}
