"""A prediction over the model's genes widened to every gene of a raw-count file: a full submission.

A model trained on a gene subset (e.g. ``vcell data preprocess``'s 2,000 HVGs + targets)
predicts those genes only; a Virtual Cell Challenge submission holds every measured gene (18,080
in 2025, 18,533 in 2026). Each predicted cell started from a real control cell (column
``control_cell`` of the prediction); :class:`GeneFill` takes the genes the model does not predict
from that cell in the raw-count file the model's data was preprocessed from (the same cell
names), so the genes the model knows nothing about are predicted unchanged from the control:

* **counts**: with ``depth="controls"`` the model's genes are drawn at the control cell's raw
  total over them and every other gene is the cell's own count, so the predicted cell is exactly
  as deep as its control. With a fixed depth ``D`` the model's genes get ``round(D * m / t)``
  counts (``m``: the control's total over the model's genes, ``t``: over all genes) and the other
  genes the rest, one multinomial draw from the control's composition over them: the total is
  ``D``.
* **log1p**: the other genes are the control cell's counts normalised as ``vcell data preprocess``
  did (its total over all genes scaled to ``uns["vcell"]["target_sum"]``, then log1p), so they
  are the values the preprocessed file would have held for them; the model's genes are the
  model's. The real control rows appended to a log1p prediction are widened the same way.

Genes are written in the raw file's order. Rows are read ``BLOCK_CELLS`` at a time as CSR, straight
from the file (:meth:`~vcell.data.rows.H5Rows.read_csr`; no dense block of every gene): memory does
not grow with the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.io import read_h5ad
from vcell.data.normalize import log1p_normalize
from vcell.data.rows import H5Rows
from vcell.data.validate import check_unique_genes
from vcell.errors import VcellError, preview

__all__ = ["GeneFill"]

#: Cells widened at a time.
BLOCK_CELLS = 2048


class GeneFill:
    """Widens prediction pieces from the model's genes to every gene of ``raw`` (module docstring: the rules).

    Parameters
    ----------
    raw
        ``.h5ad`` of raw counts (``X``, CSR or dense) holding the context's control cells under
        the names the prediction's data gives them, and every gene the model predicts.
    genes
        The model's genes (the prediction's var names).
    output
        ``"counts"`` or ``"log1p"``.
    target_sum
        With ``"log1p"``: the preprocessing's normalisation total (``uns["vcell"]["target_sum"]``
        of the model's data).
    depth
        With ``"counts"``: ``"controls"`` or counts per cell.
    seed
        Seed of the counts drawn (one generator across the pieces).
    """

    def __init__(self, raw: str | os.PathLike, genes, output: str, *, target_sum: float | None = None,
                 depth: int | str = "controls", seed: int = 0):
        self.path = Path(raw)
        if not self.path.is_file():
            raise VcellError(f"{self.path}: no such file (the raw-count file to take the other genes from)")
        meta = read_h5ad(self.path, backed=True)  # an unreadable file is one error line
        try:
            self.var_names = pd.Index(meta.var_names.astype(str))
            self.obs_names = pd.Index(meta.obs_names.astype(str))
        finally:
            meta.file.close()
        check_unique_genes(self.var_names, str(self.path))
        if not self.obs_names.is_unique:
            raise VcellError(f"{self.path}: duplicated cell names in obs ({preview(self.obs_names[self.obs_names.duplicated()].unique(), 5)}); "
                             "control cells are looked up by name")
        genes = pd.Index([str(g) for g in genes])
        self.model_cols = self.var_names.get_indexer(genes)
        if (self.model_cols < 0).any():
            missing = genes[self.model_cols < 0]
            raise VcellError(f"{self.path}: {len(missing)} of the model's genes are not in this file ({preview(missing, 5)}); "
                             "give the raw-count file the model's data was preprocessed from")
        if output == "log1p" and target_sum is None:
            raise VcellError("widening a log1p prediction to every gene needs the preprocessing's target_sum "
                             "(uns['vcell']['target_sum'] of the data, written by `vcell data preprocess`)")
        self.other = np.ones(len(self.var_names), dtype=bool)
        self.other[self.model_cols] = False
        self.output, self.target_sum, self.depth = output, target_sum, depth
        self.rows = H5Rows(self.path)
        self._rows: np.ndarray | None = None  # file rows of obs_names once narrowed to the controls (require_cells)
        self._rng = np.random.default_rng([int(seed), 0x9E3779B9])  # not the model-gene draw's stream
        self.meta = {"genes": f"all {len(self.var_names)} genes of {self.path.name}: {len(genes)} predicted by the model, "
                              "the others from each cell's control cell", "genes_source": str(self.path)}

    def _raw_rows(self, names: np.ndarray) -> np.ndarray:
        pos = self.obs_names.get_indexer(names)
        if (pos < 0).any():
            raise VcellError(f"{self.path}: control cell {str(names[np.flatnonzero(pos < 0)[0]])!r} is not in this file "
                             "(the raw-count file the model's data was preprocessed from holds every control cell under the same name)")
        return pos if self._rows is None else self._rows[pos]

    def require_cells(self, names, values=None) -> None:
        """A one-line error unless every cell in ``names`` (the context's control cells) is in the file
        and holds raw counts (the first cells are read), so nothing is predicted in vain.

        ``values`` (the same cells' expression over the model's genes, the data's X) are checked
        against the file's counts: a gene expressed in one and not the other means another file whose
        cells happen to bear the same names (two simulations' ``cell000000``...). From then on only
        these cells are looked up: the file's other cell names are dropped (a 300,000-cell file's
        names and their hash table are tens of MB).
        """
        names = np.asarray([str(n) for n in names], dtype=str)
        rows = self._raw_rows(names)
        first = np.argsort(rows[:64])
        block = self._read(rows[:64][first])
        if values is not None:
            self._check_same_cells(block[:, self.model_cols], values, names[:64][first], first)
        self.obs_names, self._rows = pd.Index(names), rows

    def _check_same_cells(self, counts: sp.csr_matrix, values, names: np.ndarray, order: np.ndarray) -> None:
        """Refuse a file whose cells, at the model's genes, are expressed where the data's are not (or not where they are)."""
        data = values[order]
        data = np.asarray(data.toarray() if sp.issparse(data) else data) > 0
        raw = counts.toarray() > 0
        # a cell differs when over 5% of the model's genes do (slack for a preprocessing that zeroed or
        # thinned a few values); another file's cells differ in most of them
        share = (data != raw).mean(axis=1)
        differ = np.flatnonzero(share > 0.05)
        if 2 * len(differ) > len(names):
            i = int(differ[0])
            genes = int((data[i] != raw[i]).sum())
            raise VcellError(f"{self.path}: control cell {str(names[i])!r} has other genes expressed here than in the data "
                             f"({genes} of the model's {raw.shape[1]} genes differ, in {len(differ)} of {len(names)} cells read): "
                             "not the raw-count file the data was preprocessed from, though its cell names match")

    def _read(self, rows: np.ndarray) -> sp.csr_matrix:
        block = self.rows.read_csr(rows)
        d = block.data
        bad = ~np.isfinite(d) | (d < 0) | (d != np.rint(d))
        if bad.any():
            k = int(np.argmax(bad))
            i, j = int(np.searchsorted(block.indptr, k, side="right") - 1), int(block.indices[k])
            at = rows[i] if self._rows is None else int(np.flatnonzero(self._rows == rows[i])[0])
            raise VcellError(f"{self.path}: X is not raw counts (cell {self.obs_names[at]!r}, gene {self.var_names[j]!r}: "
                             f"{float(d[k])!r}); the other genes are taken from raw counts")
        return block

    def sources(self, piece: ad.AnnData, control_col: str) -> np.ndarray:
        """Each row's control cell: column ``control_col``, or the row itself (a real control row)."""
        names = pd.Index(piece.obs_names.astype(str)).to_numpy(dtype=object)
        if control_col in piece.obs.columns:
            col = piece.obs[control_col].astype(object).to_numpy()
            given = pd.notna(col)
            names = np.where(given, col, names)
        return np.asarray(names, dtype=str)

    def widen(self, piece: ad.AnnData, names: np.ndarray, draw=None) -> ad.AnnData:
        """``piece`` (log1p over the model's genes) over every gene of the raw file.

        ``names`` are the rows' control cells (:meth:`sources`). For counts, ``draw`` (a
        :class:`~vcell.predictors.counts.CountsDraw` made with ``sizes_from``) draws the model's
        genes at :meth:`model_sizes`; ``piece`` then holds predicted cells only.
        """
        rows = self._raw_rows(names)
        X = piece.X.tocsr() if sp.issparse(piece.X) else sp.csr_matrix(piece.X)
        n_genes = len(self.var_names)
        blocks, frames = [], []
        for s in range(0, len(rows), BLOCK_CELLS):
            raw = self._read(rows[s:s + BLOCK_CELLS])
            total = np.asarray(raw.sum(axis=1), dtype=np.float64).ravel()
            other = _keep_columns(raw, self.other)
            if draw is None:
                model = sp.csr_matrix(X[s:s + BLOCK_CELLS], dtype=np.float32)
                other = log1p_normalize(other, total, self.target_sum)
            else:
                rest = np.asarray(other.sum(axis=1), dtype=np.float64).ravel()
                drawn = draw.convert(piece[s:s + BLOCK_CELLS], sizes=self.model_sizes(total - rest, total))
                frames.append(drawn.obs)
                model = drawn.X
                if self.depth != "controls":
                    other = self._thin(other, rest, np.asarray(model.sum(axis=1)).ravel())
            model = sp.csr_matrix((model.data, self.model_cols[model.indices], model.indptr), shape=(model.shape[0], n_genes))
            part = sp.csr_matrix(other + model, dtype=np.float32)
            part.sort_indices()
            part.eliminate_zeros()
            blocks.append(part)
        X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)
        obs = pd.concat(frames) if frames else piece.obs
        out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=self.var_names.copy()))
        out.uns["vcell"] = {**dict(piece.uns.get("vcell", {})), **(draw.meta if draw is not None else {}), **self.meta}
        return out

    def model_sizes(self, m: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Counts to draw over the model's genes: ``m`` (depth 'controls') or ``round(D * m / t)``."""
        if self.depth == "controls":
            return np.rint(m).astype(np.int64)
        share = np.divide(m, t, out=np.ones_like(m), where=t > 0)
        return np.rint(self.depth * share).astype(np.int64)

    def _thin(self, other: sp.csr_matrix, left: np.ndarray, drawn: np.ndarray) -> sp.csr_matrix:
        """The other genes of a fixed-depth cell: ``D - drawn`` counts from the control's composition over them."""
        n = np.maximum(self.depth - np.rint(drawn).astype(np.int64), 0)
        data = np.zeros(other.nnz, dtype=np.float32)
        ptr = other.indptr
        for i in np.flatnonzero((n > 0) & (left > 0)):
            a, b = ptr[i], ptr[i + 1]
            values = other.data[a:b].astype(np.float64)
            data[a:b] = self._rng.multinomial(n[i], values / values.sum())
        return sp.csr_matrix((data, other.indices, ptr), shape=other.shape)


def _keep_columns(X: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """``X`` with the stored values of columns where ``keep`` is False dropped (same shape)."""
    mask = keep[X.indices]
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[mask], minlength=X.shape[0]))])
    return sp.csr_matrix((X.data[mask], X.indices[mask], indptr), shape=X.shape)
