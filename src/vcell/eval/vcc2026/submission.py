"""``vcell eval prep --profile vcc2026``: a prediction checked as the 2026 upload requires, then written.

The checks (cell-eval2's ``docs/vcc2026_metrics``, section 7): the gene axis is the challenge
gene list (the same genes in another order are put in the list's order); the perturbation
labels are exactly those listed, with no control rows (the platform adds the reference's
controls itself); each perturbation has the listed number of cells when counts are given;
values are raw counts (finite, non-negative, integral) with no cell above 1e6; the stored
entries of the CSR matrix written (explicit zeros removed) stay under the 4.75e9 cap. Each
violation is one line naming the file and the perturbation, cell or gene; nothing is written
unless every check passes. The output is an ``.h5ad``: CSR float32 counts, ``obs`` holding
``target_gene`` (and the context column when asked for), ``var`` indexed by gene.

The matrix is read, checked and written ``CHUNK_CELLS`` cells at a time (a full-size
submission, ~86,000 cells x 18,080 genes at 20,000 UMI, is ~4 GB as CSR), into a temporary file
renamed into place once every check has passed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.h5write import H5adWriter
from vcell.data.io import atomic_path, check_output_path, read_h5ad
from vcell.data.matrix import iter_row_chunks
from vcell.data.perturbation_lists import read_perturbation_table
from vcell.data.validate import check_unique_genes
from vcell.errors import VcellError, preview
from vcell.eval.prep import read_gene_list
from vcell.eval.vcc2026.inputs import CountsCells, check_counts
from vcell.eval.vcc2026.reader import CONTEXT_COLUMN, DATA_CONTEXT_COLUMN, UPLOAD_PERT_COL, as_csr, labels_of

log = logging.getLogger(__name__)

#: Most stored entries a 2026 submission's matrix may hold.
MAX_STORED_ENTRIES = 4_750_000_000
#: Cells read, checked and written at a time.
CHUNK_CELLS = 4096


def _check_labels(labels: np.ndarray, listed: dict[str, int | None] | None, control: str, where: str) -> None:
    present, counts = np.unique(labels, return_counts=True)
    if "" in set(present):
        raise VcellError(f"{where}: {int(counts[present == ''][0])} cell(s) have no perturbation label")
    if control in set(present):
        raise VcellError(
            f"{where}: {int(counts[present == control][0])} control cell(s) labelled {control!r}: a 2026 submission holds "
            "no control rows (the reference's controls are added when it is scored)"
        )
    if listed is None:
        return
    if control in listed:  # a list of what the challenge holds names its controls too; a submission has none
        listed = {k: v for k, v in listed.items() if k != control}
    extra = sorted(set(present) - set(listed))
    if extra:
        raise VcellError(f"{where}: {len(extra)} perturbation(s) not in the list ({preview(extra, 5)})")
    missing = sorted(set(listed) - set(present))
    if missing:
        raise VcellError(f"{where}: {len(missing)} listed perturbation(s) have no cells ({preview(missing, 5)})")
    for name, n in zip(present, counts, strict=True):
        want = listed[name]
        if want is not None and int(n) != want:
            raise VcellError(f"{where}: perturbation {name!r} has {int(n)} cells, the list asks for {want}")


def prepare_submission_2026(
    pred_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    genes: str | os.PathLike,
    perturbations: str | os.PathLike | None = None,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    context_col: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Check a raw-count prediction as the VCC 2026 upload requires and write it as ``.h5ad``.

    Parameters
    ----------
    pred_path : path
        The prediction; read, never modified.
    out_path : path
        The ``.h5ad`` to write.
    genes : path
        The challenge gene list (CSV, first column, no header), in order.
    perturbations : path, optional
        CSV (with a header) of the perturbations to predict, optionally with their cell counts.
    pert_col, control : str
        The perturbation column and the control label (which must not appear).
    context_col : str, optional
        obs column with each cell's context, carried into the output.
    overwrite : bool
        Replace an existing ``out_path``.

    Returns
    -------
    pathlib.Path
    """
    where = str(pred_path)
    out = check_output_path(out_path, [pred_path], overwrite=overwrite)
    gene_list = read_gene_list(genes)
    listed = read_perturbation_table(perturbations) if perturbations is not None else None
    if listed is None:
        log.warning("%s: no perturbation list given (--perturbations): the labels and cells per perturbation are not checked "
                    "against the challenge's", where)
    if not Path(pred_path).is_file():
        raise VcellError(f"{pred_path}: file not found")
    adata = read_h5ad(pred_path, backed=True)
    try:
        return _prepare(adata, out, where, gene_list, listed, pert_col, control, context_col)
    finally:
        adata.file.close()


def _warn_dropped_contexts(obs: pd.DataFrame, where: str) -> None:
    """A prediction of several contexts written without its context column cannot be scored per
    context (``eval run`` refuses it against a reference with the column, pools it against one without)."""
    for col in dict.fromkeys((CONTEXT_COLUMN, DATA_CONTEXT_COLUMN)):
        if col in obs.columns:
            values = sorted(set(obs[col].dropna().astype(str)))
            if len(values) > 1:
                log.warning("%s: obs column %r holds %d contexts (%s), and the output keeps no context column: pass "
                            "--context-col %s (context_col= in Python) to keep it", where, col, len(values), preview(values, 3), col)
                return


def _prepare(adata, out: Path, where: str, gene_list, listed, pert_col: str, control: str, context_col: str | None) -> Path:
    labels, _ = labels_of(adata.obs, pert_col, where)
    if context_col is None:
        _warn_dropped_contexts(adata.obs, where)
    else:
        if context_col not in adata.obs.columns:
            raise VcellError(f"{where}: context column {context_col!r} not found in obs (columns: {preview(adata.obs.columns, 10)})")
        if adata.obs[context_col].isna().any():
            raise VcellError(f"{where}: context column {context_col!r} has cells without a context")
    _check_labels(labels, listed, control, where)
    var = pd.Index(adata.var_names)
    check_unique_genes(var, where)
    wanted = pd.Index(gene_list)
    missing = wanted.difference(var, sort=False)
    if len(missing):
        raise VcellError(f"{where}: {len(missing)} gene(s) of the gene list missing from var ({preview(missing, 5)})")
    extra = var.difference(wanted, sort=False)
    if len(extra):
        raise VcellError(f"{where}: {len(extra)} gene(s) not in the gene list ({preview(extra, 5)})")
    cols = None if var.equals(wanted) else var.get_indexer(wanted)
    X = adata.X
    if getattr(X, "format", "csr") != "csr":  # a CSC file has no cheap rows: read it whole
        X = as_csr(X, where)
    obs = pd.DataFrame({UPLOAD_PERT_COL: pd.Categorical(labels.astype(str))}, index=adata.obs_names.astype(str))
    if context_col is not None:
        obs[context_col] = adata.obs[context_col].astype(str).to_numpy()
    stored, writer = 0, None
    with atomic_path(out) as tmp:
        try:
            writer = H5adWriter(tmp, len(wanted))
            for lo, block in iter_row_chunks(X, CHUNK_CELLS):
                block = as_csr(block, where)
                if cols is not None:
                    block = block[:, cols]
                    block.sort_indices()
                check_counts(CountsCells(block, labels[lo:lo + block.shape[0]], wanted, where), first_row=lo)
                block = sp.csr_matrix(block, dtype=np.float32)
                block.eliminate_zeros()
                stored += block.nnz
                if stored > MAX_STORED_ENTRIES:
                    raise VcellError(f"{where}: more than the {MAX_STORED_ENTRIES:,} stored entries allowed "
                                     f"({stored:,} in the first {lo + block.shape[0]:,} cells)")
                writer.append(X=block)
            writer.finish(obs, pd.DataFrame(index=wanted), {"vcell": {"prepared_for": "vcc2026", "expression": "counts"}})
        finally:
            if writer is not None:
                writer.close()
    return out
