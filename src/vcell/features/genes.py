"""Gene embeddings: one vector per gene symbol, from protein language models, tables or the data.

Three sources, one object (:class:`GeneEmbeddings`):

- :func:`vcell.features.protein.embed_fasta`: ESM2 protein embeddings (mean over residues,
  then over a gene's isoforms).
- :meth:`GeneEmbeddings.load`: a precomputed table (safetensors, parquet or ``.pt``).
- :func:`data_gene_embeddings`: a fallback needing no protein model: PCA of the gene x gene
  correlation of control cells, so every later step runs without one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from vcell.data.normalize import check_target_sum, log1p_normalize, row_totals
from vcell.errors import VcellError

TABLE_SUFFIXES = (".safetensors", ".parquet", ".pt", ".pth")
DATA_SOURCE = "pca:control-coexpression"
MAX_PCA_CELLS = 20_000


@dataclass
class GeneEmbeddings:
    """A gene x dim table: ``vectors[i]`` embeds gene ``names[i]``.

    ``source`` says where the vectors came from (an ESM model name, ``pca:...`` or ``table:FILE``);
    ``info`` holds JSON-able details recorded with it (isoforms per gene, cells used, ...).
    """

    names: list[str]
    vectors: torch.Tensor
    source: str
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        vectors = torch.as_tensor(self.vectors)
        if vectors.ndim != 2:
            raise VcellError(f"gene vectors must be a 2-D gene x dim table, got shape {tuple(vectors.shape)}")
        if vectors.shape[0] != len(self.names):
            raise VcellError(f"{len(self.names)} gene names but {vectors.shape[0]} vectors")
        if vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise VcellError(f"empty gene embedding table (shape {tuple(vectors.shape)})")
        if not (vectors.is_floating_point() or vectors.dtype in (torch.int32, torch.int64)):
            raise VcellError(f"gene vectors must be numbers, got dtype {vectors.dtype}")
        self.vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(self.vectors).all():
            bad = self.names[int(torch.nonzero(~torch.isfinite(self.vectors))[0, 0])]
            raise VcellError(f"gene {bad!r} has a NaN or infinite value in its vector")
        blank = [n for n in self.names if not n.strip()]
        if blank:
            raise VcellError("a gene name is empty")
        if len(set(self.names)) != len(self.names):
            counts = Counter(self.names)
            dup = next(n for n in self.names if counts[n] > 1)
            raise VcellError(f"gene name {dup!r} is duplicated; each gene needs exactly one vector")

    @property
    def dim(self) -> int:
        """Length of each gene vector."""
        return int(self.vectors.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file atomically; names, source, dim and info go in its metadata."""
        from vcell.data.io import atomic_path
        from vcell.data.tensors import write_safetensors

        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise VcellError(f"{path}: gene tables are written as .safetensors; name the output *.safetensors")
        metadata = {
            "format": "vcell.gene_embeddings",
            "source": self.source,
            "dim": str(self.dim),
            "names": json.dumps(self.names),
            "info": json.dumps(self.info),
        }
        with atomic_path(path) as tmp:
            write_safetensors({"vectors": self.vectors}, tmp, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneEmbeddings:
        """Read a gene table: ``.safetensors``, ``.parquet`` or ``.pt``/``.pth`` (see the module docs).

        - safetensors: ours (tensor ``vectors`` + ``names`` JSON metadata) or one 1-D tensor per gene;
        - parquet: a ``gene`` column (or else the index) holds names, every other column is a dim;
        - pt/pth (``torch.load(weights_only=True)``): ``{name: 1-D tensor}`` or
          ``{"names": [...], "vectors": 2-D tensor}``.
        """
        path = Path(path)
        if not path.exists():
            raise VcellError(f"{path}: gene embedding file not found")
        if not path.is_file():
            raise VcellError(f"{path}: is not a file; expected a gene embedding table")
        suffix = path.suffix.lower()
        readers = {".safetensors": _read_safetensors, ".parquet": _read_parquet, ".pt": _read_torch, ".pth": _read_torch}
        if suffix not in readers:
            raise VcellError(f"{path}: unknown gene table format {suffix or '(no suffix)'!r}; use one of {', '.join(TABLE_SUFFIXES)}")
        try:
            names, vectors, source, info = readers[suffix](path)
            return cls(names=names, vectors=vectors, source=source, info=info)
        except VcellError as exc:
            msg = str(exc)
            raise VcellError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None

    def align(self, genes: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """Rows for ``genes`` in that order ([len(genes), dim]); zero rows for genes not in the table,
        whose names are returned as the second element."""
        row_of = {n: i for i, n in enumerate(self.names)}
        rows = torch.tensor([row_of.get(str(g), -1) for g in genes], dtype=torch.long)
        out = torch.zeros(len(rows), self.dim, dtype=torch.float32)
        found = rows >= 0
        out[found] = self.vectors[rows[found]]
        missing = [str(g) for g, r in zip(genes, rows.tolist()) if r < 0]
        return out, missing


def _read_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise VcellError(f"{path}: unreadable safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if "names" in meta and "vectors" in tensors:
        try:
            names = json.loads(meta["names"])
            info = json.loads(meta.get("info", "{}"))
        except json.JSONDecodeError:
            raise VcellError(f"{path}: the 'names' metadata is not a JSON list") from None
        if not isinstance(names, list):
            raise VcellError(f"{path}: the 'names' metadata is not a JSON list")
        return names, tensors["vectors"], meta.get("source", f"table:{path.name}"), info if isinstance(info, dict) else {}
    return _from_mapping(path, tensors)


def _from_mapping(path: Path, table: dict):
    """names + stacked vectors from ``{name: 1-D tensor}``."""
    if not table:
        raise VcellError(f"{path}: no gene vectors in the file")
    lengths = set()
    for name, vec in table.items():
        if not isinstance(vec, torch.Tensor) or vec.ndim != 1:
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise VcellError(
                f"{path}: entry {name!r} is not a 1-D vector ({shape}); expected gene -> vector, "
                "or 'names' + a 2-D 'vectors' table"
            )
        lengths.add(vec.shape[0])
    if len(lengths) > 1:
        raise VcellError(f"{path}: gene vectors have different lengths {sorted(lengths)}")
    names = [str(k) for k in table]
    return names, torch.stack([table[k].float() for k in table]), f"table:{path.name}", {}


def _read_parquet(path: Path):
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for bad files
        raise VcellError(f"{path}: unreadable parquet file ({type(exc).__name__})") from None
    if "gene" in df.columns:
        names = df["gene"].astype(str).tolist()
        df = df.drop(columns="gene")
    elif isinstance(df.index, pd.RangeIndex):
        raise VcellError(f"{path}: no gene names; add a 'gene' column or store names as the index")
    else:
        names = df.index.astype(str).tolist()
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            raise VcellError(f"{path}: column {col!r} is not numeric; every column but 'gene' must be a vector dimension")
    return names, torch.from_numpy(df.to_numpy(dtype=np.float32)), f"table:{path.name}", {}


def _read_torch(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, zip errors, refused globals
        raise VcellError(f"{path}: unreadable tensor file ({type(exc).__name__}); expected a dict saved with torch.save") from None
    if isinstance(obj, dict) and "names" in obj and "vectors" in obj:
        names, vectors = obj["names"], obj["vectors"]
        if not isinstance(names, (list, tuple)) or not isinstance(vectors, torch.Tensor):
            raise VcellError(f"{path}: 'names' must be a list of strings and 'vectors' a 2-D tensor")
        return list(names), vectors, str(obj.get("source", f"table:{path.name}")), {}
    if isinstance(obj, dict):
        return _from_mapping(path, obj)
    raise VcellError(f"{path}: holds a {type(obj).__name__}; expected {{gene: vector}} or {{'names': [...], 'vectors': 2-D tensor}}")


def data_gene_embeddings(
    adata,
    dim: int = 128,
    control_mask: np.ndarray | None = None,
    seed: int = 0,
    max_cells: int = MAX_PCA_CELLS,
    counts_target_sum: float | None = None,
) -> GeneEmbeddings:
    """Fallback: PCA of the gene x gene co-expression of control cells (all cells when no mask),
    on log1p expression (dense or CSR X; never densify more than cells x genes of the controls at once;
    for many cells use a random subsample of at most ~20k controls, seeded). dim is capped by the data.
    Genes with zero variance get a zero vector (and that must not produce NaN).

    ``counts_target_sum``: ``X`` holds raw counts; each chosen cell is first normalised to that total
    and log1p-transformed, as ``vcell data preprocess`` (scanpy's ``normalize_total`` + ``log1p``) would.

    The vectors are the loadings of the gene correlation matrix's top components (each gene's
    row has norm <= 1): found by a seeded randomized SVD of the standardised cells x genes matrix,
    with centring and scaling applied implicitly so a sparse X stays sparse.
    """
    n_obs = adata.n_obs
    if control_mask is None:
        rows = np.arange(n_obs)
    else:
        mask = np.asarray(control_mask)
        if mask.dtype != bool or mask.shape != (n_obs,):
            raise VcellError(f"control_mask must be a boolean array of length {n_obs} (one per cell), got {mask.dtype} {mask.shape}")
        rows = np.flatnonzero(mask)
    if len(rows) < 2:
        raise VcellError(f"gene co-expression needs at least 2 {'control ' if control_mask is not None else ''}cells, found {len(rows)}")
    if dim < 1:
        raise VcellError(f"gene embedding dim must be >= 1, got {dim}")
    names = [str(g) for g in adata.var_names]
    rng = np.random.default_rng(seed)
    if len(rows) > max_cells:
        rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
    X = adata.X[rows] if len(rows) < n_obs else adata.X[:]
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    info = {"cells": int(len(rows))}
    if counts_target_sum is not None:
        target = check_target_sum(counts_target_sum)
        X = log1p_normalize(X, row_totals(X), target)
        info["expression"] = f"counts, normalised to {target:,g} per cell and log1p-transformed"
    loadings, n_const = _correlation_loadings(X, dim, rng)
    source = DATA_SOURCE if control_mask is not None else "pca:all-cells-coexpression"
    info["genes_zero_variance"] = int(n_const)
    return GeneEmbeddings(names=names, vectors=torch.from_numpy(loadings.astype(np.float32)), source=source, info=info)


def _correlation_loadings(X, dim: int, rng: np.random.Generator, n_iter: int = 4, oversample: int = 10):
    """Top-``dim`` loadings (genes x k) of the correlation matrix of ``X``'s columns, and the
    number of constant columns (which get zero rows).

    Randomized SVD with ``max(oversample, k)`` extra directions and ``n_iter`` power iterations:
    on real data its rank-k reconstruction of the correlation matrix is within ~1% of the exact
    optimum (tests/test_genes.py checks it)."""
    m, g = X.shape
    mean = np.asarray(X.mean(axis=0, dtype=np.float64)).ravel()
    sq = X.multiply(X) if sp.issparse(X) else np.square(X, dtype=np.float64)
    var = np.asarray(sq.mean(axis=0, dtype=np.float64)).ravel() - mean**2
    varies = var > 1e-10 * np.maximum(1.0, mean**2)  # float error leaves tiny non-zero var on constant columns
    scale = np.zeros(g)
    scale[varies] = 1.0 / np.sqrt(var[varies] * m / (m - 1))
    k = int(min(dim, m - 1, varies.sum()))
    if k < 1:
        raise VcellError("no gene varies across the cells used for gene co-expression")
    shift = mean * scale

    def z_times(W: np.ndarray) -> np.ndarray:  # Z @ W, Z = (X - mean) * scale
        return np.asarray(X @ (scale[:, None] * W).astype(np.float32), dtype=np.float64) - shift @ W

    def zt_times(Y: np.ndarray) -> np.ndarray:  # Z.T @ Y
        xty = np.asarray(X.T @ Y.astype(np.float32), dtype=np.float64)
        return scale[:, None] * (xty - np.outer(mean, Y.sum(axis=0)))

    q = min(k + max(oversample, k), m, g)
    Q, _ = np.linalg.qr(z_times(rng.standard_normal((g, q))))
    for _ in range(n_iter):
        P, _ = np.linalg.qr(zt_times(Q))
        Q, _ = np.linalg.qr(z_times(P))
    _, s, vt = np.linalg.svd(zt_times(Q).T, full_matrices=False)
    loadings = vt[:k].T * (s[:k] / np.sqrt(m - 1))
    loadings[~varies] = 0.0
    # A deterministic sign per component: its largest-magnitude loading is positive.
    signs = np.sign(loadings[np.argmax(np.abs(loadings), axis=0), np.arange(k)])
    loadings *= np.where(signs == 0, 1.0, signs)
    return loadings, int((~varies).sum())

