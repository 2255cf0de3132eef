"""Prepare a prediction ``.h5ad`` for submission, as ``cell-eval prep`` (0.8.2) does.

The Virtual Cell Challenge takes predictions as a ``.vcc`` file: an uncompressed tar archive
holding two members, in this order:

- ``pred.h5ad.zst``: a zstd-compressed ``.h5ad`` with a CSR float32 (or float64) ``X``, the genes
  of the challenge gene list in its order, ``obs`` reduced to the perturbation column (renamed to
  ``target_gene``, plus an optional cell-type column) on a ``"0".."n-1"`` index, and an empty
  ``var``;
- ``watermark.txt``: the 8 bytes ``vcc-prep`` (no newline).

Before writing, the prediction is checked: the gene list (18,080 genes for VCC 2025; another
count is only warned about), the gene set (a different set is an error; the same genes in another
order are reordered, with a log line), the number of cells (at most 200,000), the perturbation
column and its control label, and the values (no NaN, inf or negative values; log1p-scale data
must stay below 15). Integer-valued data is taken for counts and is normalised to the median total
count and log1p-transformed, as ``cell-eval prep`` does, unless ``allow_discrete`` is set.

Every problem is a one-line :class:`~vcell.errors.VcellError` raised before anything is written;
the output appears only when complete (temporary file + rename) and the input is never modified.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.io import atomic_path, check_output_path, check_space, matrices_nbytes, read_h5ad, temp_prefix
from vcell.data.spec import column_guess
from vcell.data.validate import CELL_EVAL_MAX_LOG1P
from vcell.errors import VcellError, control_hint, preview

log = logging.getLogger(__name__)

#: Genes in the VCC 2025 gene list.
VCC_N_GENES = 18_080
#: Most cells a submission may hold (``cell-eval prep --max-cell-dim``; 100,000 in early releases).
MAX_CELLS = 200_000
#: Name of the compressed prediction inside the archive.
PRED_MEMBER = "pred.h5ad.zst"
#: Name and content of the watermark member.
WATERMARK_MEMBER = "watermark.txt"
WATERMARK_TEXT = "vcc-prep"
#: Data with decimals must be below this to count as log1p-normalised (as in cell-eval).
LOG1P_MAX = CELL_EVAL_MAX_LOG1P
#: A value whose fractional part exceeds this is "not an integer" (as in cell-eval).
INTEGER_EPS = 1e-3
#: Default zstd level: the ``zstd`` command's default.
ZSTD_LEVEL = 3

_ENCODINGS = {32: np.float32, 64: np.float64}


# ----------------------------------------------------------------------------------------------
# small helpers


def default_output_path(pred_path: str | os.PathLike) -> Path:
    """``x.h5ad`` -> ``x.prep.vcc`` beside it (``cell-eval prep``'s default); other names get ``.prep.vcc`` appended."""
    pred_path = Path(pred_path)
    name = pred_path.name
    stem = name[: -len(".h5ad")] if name.endswith(".h5ad") else name
    return pred_path.with_name(stem + ".prep.vcc")


def read_gene_list(genes: str | os.PathLike | Sequence[str] | pd.Index) -> list[str]:
    """The expected genes, in order: a list of names, or a CSV file whose first column lists them.

    The file has no header (as ``cell-eval prep --genes``): every non-empty line is a gene, and only
    its first field is read. Duplicate or empty names are errors.
    """
    if isinstance(genes, (str, os.PathLike)):
        path = Path(genes)
        if not path.exists():
            raise VcellError(f"{path}: gene list file not found")
        if path.is_dir():
            raise VcellError(f"{path}: is a directory, expected a CSV file listing one gene per line")
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = [row for row in csv.reader(fh) if row and any(f.strip() for f in row)]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise VcellError(f"{path}: unreadable gene list ({type(exc).__name__}: {exc})") from exc
        names = [row[0].strip() for row in rows]
        where = str(path)
    else:
        names = [str(g) for g in genes]
        where = "gene list"
    if not names:
        raise VcellError(f"{where}: the gene list is empty")
    empty = [i for i, g in enumerate(names) if not g]
    if empty:
        raise VcellError(f"{where}: empty gene name on line {empty[0] + 1}")
    dup = pd.Index(names)
    dup = dup[dup.duplicated()].unique()
    if len(dup):
        raise VcellError(f"{where}: {len(dup)} duplicated gene name(s): {preview(dup)}")
    return names


def _first_bad(X: sp.csr_matrix, bad: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first stored value flagged in ``bad`` (a mask over ``X.data``)."""
    k = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(X.indptr, k, side="right") - 1)
    return row, int(X.indices[k])


def _check_values(X: sp.csr_matrix, obs_names: pd.Index, var_names: pd.Index, where: str) -> None:
    """No NaN, inf or negative value in ``X`` (checked on its stored values)."""
    data = X.data

    def at(mask: np.ndarray) -> str:
        r, c = _first_bad(X, mask)
        return f"cell {obs_names[r]!r} (row {r}), gene {var_names[c]!r}"

    nan = np.isnan(data)
    if nan.any():
        raise VcellError(f"{where}: X has {int(nan.sum())} NaN value(s), first at {at(nan)}; predictions must be finite")
    inf = np.isinf(data)
    if inf.any():
        raise VcellError(
            f"{where}: X has {int(inf.sum())} infinite value(s) (or values too large for the float encoding), "
            f"first at {at(inf)}; predictions must be finite"
        )
    neg = data < 0
    if neg.any():
        r, c = _first_bad(X, neg)
        raise VcellError(
            f"{where}: X has {int(neg.sum())} negative value(s), first {float(X[r, c]):g} at {at(neg)}; "
            "predictions must be counts or log1p-normalised expression (>= 0)"
        )


def _to_csr(X, dtype) -> sp.csr_matrix:
    """``X`` as a CSR matrix of ``dtype`` (sparse structure kept as is; dense zeros dropped)."""
    if sp.issparse(X):
        return sp.csr_matrix(X).astype(dtype, copy=False)
    return sp.csr_matrix(np.asarray(X).astype(dtype, copy=False))


# ----------------------------------------------------------------------------------------------
# zstd and tar


def _import_zstandard():
    import zstandard  # noqa: PLC0415 (optional: the zstd command is the fallback)

    return zstandard


def zstd_compress(src: str | os.PathLike, dst: str | os.PathLike, level: int = ZSTD_LEVEL) -> str:
    """Compress ``src`` into a standard zstd frame at ``dst``; returns the backend used.

    Uses the ``zstandard`` package (multi-threaded, with the content size and checksum in the frame
    header, as the ``zstd`` command writes them); without it, the ``zstd`` command if on ``PATH``.
    """
    src, dst = Path(src), Path(dst)
    try:
        zstandard = _import_zstandard()
    except ImportError:
        zstandard = None
    if zstandard is not None:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True, threads=-1)
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            cctx.copy_stream(fin, fout, size=src.stat().st_size)
        return "zstandard"
    exe = shutil.which("zstd")
    if exe is None:
        raise VcellError(
            "zstd compression needs the 'zstandard' Python package (pip install zstandard) "
            "or the 'zstd' command on PATH; neither was found"
        )
    proc = subprocess.run([exe, "-q", f"-{level}", "-T0", "-f", str(src), "-o", str(dst)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout or "").split()) or f"exit status {proc.returncode}"
        raise VcellError(f"{dst}: zstd compression failed ({msg})")
    return "zstd"


def _write_archive(minimal: ad.AnnData, out: Path, level: int) -> None:
    """Write the ``.vcc`` tar for ``minimal`` atomically at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    check_space(out, 2 * matrices_nbytes(minimal))  # the .h5ad and its compressed copy are there at once
    try:
        _write_archive_files(minimal, out, level)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc  # name the output (a compressor's error names none)


def _write_archive_files(minimal: ad.AnnData, out: Path, level: int) -> None:
    # named as every vcell temporary (.NAME.PID-XXXXXXXX.tmp) so a rerun removes it if this run is killed
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent) as tmp:
        tmp = Path(tmp)
        h5ad = tmp / "pred.h5ad"
        minimal.write_h5ad(h5ad)
        zst = tmp / PRED_MEMBER
        backend = zstd_compress(h5ad, zst, level=level)
        h5ad.unlink()
        watermark = tmp / WATERMARK_MEMBER
        watermark.write_bytes(WATERMARK_TEXT.encode("ascii"))
        log.info("compressed the prediction with %s: %s bytes", backend, f"{zst.stat().st_size:,}")
        with atomic_path(out) as tmp_out:
            # GNU format, members in cell-eval's order; names without a leading './'
            with tarfile.open(tmp_out, "w", format=tarfile.GNU_FORMAT) as tar:
                tar.add(zst, arcname=PRED_MEMBER, recursive=False)
                tar.add(watermark, arcname=WATERMARK_MEMBER, recursive=False)


def read_submission(path: str | os.PathLike) -> ad.AnnData:
    """Read back the prediction inside a ``.vcc`` archive (for checks and tests)."""

    try:
        zstandard = _import_zstandard()
    except ImportError:
        zstandard = None
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".vcell-vcc-") as tmp:
        h5ad = Path(tmp) / "pred.h5ad"
        try:
            with tarfile.open(path, "r:") as tar:
                member = tar.extractfile(PRED_MEMBER)
                if member is None:
                    raise KeyError(PRED_MEMBER)
                raw = member.read()
        except (tarfile.TarError, KeyError, OSError) as exc:
            raise VcellError(f"{path}: not a .vcc submission archive ({type(exc).__name__}: {exc})") from exc
        if zstandard is not None:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader, open(h5ad, "wb") as fout:
                shutil.copyfileobj(reader, fout)
        else:
            exe = shutil.which("zstd")
            if exe is None:
                raise VcellError("reading a .vcc needs the 'zstandard' package or the 'zstd' command")
            zst = Path(tmp) / PRED_MEMBER
            zst.write_bytes(raw)
            subprocess.run([exe, "-q", "-d", "-f", str(zst), "-o", str(h5ad)], check=True)
        return ad.read_h5ad(h5ad)


# ----------------------------------------------------------------------------------------------
# the entry point


def prepare_submission(
    pred_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    genes: str | os.PathLike | Sequence[str],
    pert_col: str = "target_gene",
    control: str | None = "non-targeting",
    celltype_col: str | None = None,
    output_pert_col: str = "target_gene",
    output_celltype_col: str = "celltype",
    max_cells: int | None = MAX_CELLS,
    expected_n_genes: int | None = VCC_N_GENES,
    encoding: int = 32,
    allow_discrete: bool = False,
    overwrite: bool = False,
    zstd_level: int = ZSTD_LEVEL,
) -> Path:
    """Check a prediction ``.h5ad`` and write it as a ``.vcc`` submission archive.

    Parameters
    ----------
    pred_path : path
        The prediction (cells x genes); read, never modified.
    out_path : path, optional
        The ``.vcc`` to write; ``None`` gives ``<pred>.prep.vcc`` beside the input.
    genes : path or sequence of str
        The expected genes in order: a list, or a header-less CSV file (first column).
    pert_col : str
        obs column with each cell's perturbation; written as ``output_pert_col``.
    control : str or None
        Label of the control cells, which must be present (``None`` skips the check).
    celltype_col : str, optional
        obs column kept as ``output_celltype_col``.
    output_pert_col, output_celltype_col : str
        Names of those columns in the archive.
    max_cells : int or None
        Most cells allowed (``None`` or negative, e.g. -1: no cap).
    expected_n_genes : int or None
        Gene-list length expected (VCC 2025: 18,080); another length is only warned about, as in
        ``cell-eval prep`` (``None``, 0 or negative, e.g. -1: no warning).
    encoding : {32, 64}
        The float width of ``X``.
    allow_discrete : bool
        Keep integer-valued data as it is instead of normalising and log1p-ing it, and skip the
        log1p range check.
    overwrite : bool
        Replace an existing ``out_path``.
    zstd_level : int
        zstd compression level.

    Returns
    -------
    pathlib.Path
        The archive written.

    Raises
    ------
    VcellError
        Any problem with the input, the gene list or the output path, before anything is written.
    """
    pred_path = Path(pred_path)
    out = Path(out_path) if out_path is not None else default_output_path(pred_path)
    check_output_path(out, [pred_path], overwrite=overwrite)
    if encoding not in _ENCODINGS:
        raise VcellError(f"encoding {encoding!r} is not supported; use one of {', '.join(map(str, _ENCODINGS))}")
    dtype = _ENCODINGS[encoding]
    where = str(pred_path)

    genelist = read_gene_list(genes)
    gene_src = str(genes) if isinstance(genes, (str, os.PathLike)) else "the gene list"
    if expected_n_genes is not None and expected_n_genes > 0 and len(genelist) != expected_n_genes:
        log.warning(
            "%s has %s genes, not the %s expected (VCC 2025); preparing for its %s genes",
            gene_src, f"{len(genelist):,}", f"{expected_n_genes:,}", f"{len(genelist):,}",
        )

    adata = read_h5ad(pred_path)
    var_names = pd.Index(adata.var_names.astype(str))
    obs = adata.obs

    # obs columns and labels
    for col, role in ((pert_col, "pert_col"), (celltype_col, "celltype_col")):
        if col is not None and col not in obs.columns:
            raise VcellError(
                f"{where}: obs column {col!r} ({role}) not found; columns are {preview(obs.columns, 8)}"
                f"{column_guess(col, obs.columns, 'perturbation' if role == 'pert_col' else 'context')}"
            )
    labels = obs[pert_col]
    if labels.isna().any():
        first = obs.index[np.flatnonzero(labels.isna().to_numpy())[0]]
        raise VcellError(
            f"{where}: obs column {pert_col!r} has {int(labels.isna().sum())} missing label(s), first at cell {first!r}"
        )
    if control is not None and not (labels.astype(str) == str(control)).any():
        uniq = pd.unique(labels.astype(str))
        raise VcellError(
            f"{where}: obs column {pert_col!r} has no control cells labelled {control!r}"
            f"{control_hint(control, uniq)} (labels: {preview(sorted(uniq))})"
        )

    # genes
    dup = var_names[var_names.duplicated()].unique()
    if len(dup):
        raise VcellError(f"{where}: {len(dup)} duplicated gene name(s) in var_names: {preview(dup)}")
    order = None
    if var_names.tolist() != genelist:
        expected = pd.Index(genelist)
        missing = expected.difference(var_names, sort=False)
        extra = var_names.difference(expected, sort=False)
        if len(missing) or len(extra):
            parts = []
            if len(missing):
                parts.append(f"{len(missing)} gene(s) of the list missing ({preview(missing)})")
            if len(extra):
                parts.append(f"{len(extra)} gene(s) not in the list ({preview(extra)})")
            raise VcellError(
                f"{where}: genes differ from {gene_src}: {'; '.join(parts)}; "
                f"the prediction must have exactly the {len(genelist)} listed genes"
            )
        order = var_names.get_indexer(expected)
        log.warning("%s: genes are the listed %d but in another order; reordering them to %s", where, len(genelist), gene_src)

    # cells
    if max_cells is not None and max_cells >= 0 and adata.n_obs > max_cells:
        raise VcellError(
            f"{where}: {adata.n_obs} cells exceed the submission cap of {max_cells} (max_cells); "
            "predict fewer cells per perturbation"
        )

    # matrix: CSR of the requested width, genes in list order
    X = adata.X
    if X is None:
        raise VcellError(f"{where}: X is empty; the prediction matrix is required")
    if order is not None:
        X = X[:, order]
    X = _to_csr(X, dtype)
    _check_values(X, obs.index, var_names if order is None else pd.Index(genelist), where)

    new_obs = pd.DataFrame({output_pert_col: labels.to_numpy()}, index=np.arange(adata.n_obs).astype(str))
    if celltype_col is not None:
        new_obs[output_celltype_col] = obs[celltype_col].to_numpy()
    minimal = ad.AnnData(X=X, obs=new_obs, var=pd.DataFrame(index=np.asarray(genelist, dtype=object)))
    del adata

    # counts or log1p
    data = minimal.X.data
    has_decimals = bool(np.any(data - np.floor(data) > INTEGER_EPS)) if data.size else False
    if not has_decimals:
        if allow_discrete:
            log.info("%s: X is integer-valued; kept as is (allow_discrete)", where)
        else:
            import scanpy as sc  # noqa: PLC0415 (slow import, only needed for counts)

            log.warning(
                "%s: X is integer-valued (counts); normalising to the median total count and applying log1p, "
                "as cell-eval prep does (allow_discrete keeps counts)", where,
            )
            sc.pp.normalize_total(minimal)
            sc.pp.log1p(minimal)
    elif not allow_discrete:
        vmax = float(data.max())
        if vmax >= LOG1P_MAX:
            r, c = _first_bad(minimal.X, data >= LOG1P_MAX)
            raise VcellError(
                f"{where}: X has non-integer values up to {vmax:g} (first >= {LOG1P_MAX:g} at row {r}, gene "
                f"{genelist[c]!r}): neither counts nor log1p-normalised; submit counts or log1p(normalised) "
                "values below 15 (allow_discrete skips this check)"
            )

    _write_archive(minimal, out, zstd_level)
    log.debug("wrote %s: %d cells x %d genes", out, minimal.n_obs, minimal.n_vars)
    return out
