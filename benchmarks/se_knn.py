"""Do State Embedding cell embeddings separate cell types? k-NN accuracy on Kang 2018 vs PCA.

Trains a small SE on all cells of ``kang2018_ifnb.h5ad`` (CPU; the embedding is unsupervised, the
cell-type labels are never seen in training), embeds every cell, and compares 5-fold stratified
k-NN (k = 15) cell-type accuracy of

- SE [CLS] embeddings (L2-normalised, Euclidean = cosine distance);
- PCA of log1p-normalised expression of 2,000 highly variable genes, with the same dimension;
- PCA of all genes, with the same dimension.

Usage::

    flock /tmp/vcell_cpu.lock .venv/bin/python benchmarks/se_knn.py --preset small --max-steps 1000

Prints a table and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("VCELL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "kang2018_ifnb.h5ad"


def knn_accuracy(X: np.ndarray, labels: np.ndarray, k: int = 15, folds: int = 5, seed: int = 0, metric: str = "euclidean"):
    """Mean and sd over stratified folds of k-NN accuracy and balanced accuracy."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    acc, bal = [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, labels):
        clf = KNeighborsClassifier(n_neighbors=k, metric=metric).fit(X[train], labels[train])
        pred = clf.predict(X[test])
        acc.append(float(np.mean(pred == labels[test])))
        bal.append(float(balanced_accuracy_score(labels[test], pred)))
    return float(np.mean(acc)), float(np.std(acc)), float(np.mean(bal))


def pca_embedding(adata, dim: int, n_hvg: int | None, seed: int = 0) -> np.ndarray:
    """PCA scores of log1p-normalised expression (``n_hvg`` HVGs, or all genes)."""
    import scanpy as sc

    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    if n_hvg:
        sc.pp.highly_variable_genes(a, n_top_genes=n_hvg, flavor="seurat")
        a = a[:, a.var["highly_variable"]].copy()
    sc.pp.pca(a, n_comps=dim, random_state=seed)
    return np.asarray(a.obsm["X_pca"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--config", type=json.loads, default={}, help="SEConfig overrides as JSON")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gene-dim", type=int, default=128)
    parser.add_argument("--genes", type=Path, default=None, help="gene embedding table (default: data-derived)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data}: not found (the shared data folder beside the repo)", file=sys.stderr)
        return 2

    import anndata as ad
    import torch

    from vcell.nn.embedding import SEConfig, StateEmbedding, embed_adata
    from vcell.train.se import train_se

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    adata = ad.read_h5ad(args.data)
    labels = adata.obs["seurat_annotations"].astype(str).to_numpy()
    values = SEConfig.preset_values(args.preset, args.config)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "se"
        t0 = time.perf_counter()
        train_se([args.data], out, values, genes=args.genes, max_steps=args.max_steps, batch_size=args.batch_size,
                 lr=args.lr, seed=args.seed, gene_dim=args.gene_dim, accelerator="cpu", checkpoint_every=10**9)
        train_s = time.perf_counter() - t0
        model, meta = StateEmbedding.from_checkpoint(out)
        t0 = time.perf_counter()
        emb, _ = embed_adata(model, meta, adata, "counts", seed=args.seed)
        embed_s = time.perf_counter() - t0
    dim = emb.shape[1]
    rows = [("SE [CLS]", dim, *knn_accuracy(emb, labels, seed=args.seed))]
    rows.append(("PCA, 2000 HVGs", dim, *knn_accuracy(pca_embedding(adata, dim, 2000, args.seed), labels, seed=args.seed)))
    rows.append(("PCA, all genes", dim, *knn_accuracy(pca_embedding(adata, dim, None, args.seed), labels, seed=args.seed)))
    cfg = model.config
    print(f"data: {args.data.name} ({adata.n_obs} cells x {adata.n_vars} genes, {len(set(labels))} cell types)")
    print(f"SE: preset {args.preset} (d_model {cfg.d_model}, {cfg.n_layers} layers, sentence {cfg.sentence_len} tokens, "
          f"{cfg.n_mask} targets), gene table {meta['gene_source']} ({cfg.gene_dim}-d), {args.max_steps} steps x "
          f"{args.batch_size} cells, lr {args.lr}, seed {args.seed}; train {train_s:.0f} s, embed {embed_s:.0f} s "
          f"on {args.threads} CPU threads")
    print(f"{'embedding':<18} {'dim':>4} {'k-NN acc (5-fold)':>18} {'balanced acc':>13}")
    for name, d, mean, sd, bal in rows:
        print(f"{name:<18} {d:>4} {mean:>11.3f} ± {sd:.3f} {bal:>13.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "train_s": train_s, "embed_s": embed_s,
            "rows": [dict(zip(("embedding", "dim", "acc", "acc_sd", "balanced_acc"), r)) for r in rows],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
