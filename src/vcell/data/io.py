"""Reading AnnData files and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np

from vcell.errors import VcellError


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file, in memory or backed (matrix left on disk).

    Any failure to open or parse the file becomes a one-line :class:`VcellError` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise VcellError(f"{path}: file not found")
    if path.is_dir():
        raise VcellError(f"{path}: is a directory, expected an .h5ad file")
    if not h5py.is_hdf5(path):
        raise VcellError(f"{path}: unreadable file (not an HDF5/.h5ad file)")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # anndata raises many types for corrupt files
        raise VcellError(f"{path}: unreadable .h5ad file ({type(exc).__name__}: {exc})") from exc


def dense_x_memmap(adata: ad.AnnData) -> np.memmap | None:
    """A read-only memory map of a backed AnnData's dense ``X``, or ``None`` when it cannot be mapped.

    Mapping needs ``X`` stored as one contiguous, uncompressed, little-endian float dataset (how
    anndata writes dense matrices). Reading such a matrix into fresh memory costs far more in page
    faults than the copy itself; a map of the (usually cached) file costs neither, and the input
    cannot be modified through it.
    """
    if not adata.isbacked:
        return None
    x = adata.file._file.get("X")
    if not isinstance(x, h5py.Dataset) or x.ndim != 2 or x.chunks is not None or x.compression is not None:
        return None
    if x.dtype.kind != "f" or x.dtype.byteorder == ">" or x.external:
        return None
    offset = x.id.get_offset()
    if offset is None or x.size == 0:
        return None
    return np.memmap(adata.filename, dtype=x.dtype, mode="r", offset=offset, shape=x.shape)


def read_h5ad_mapped(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """``obs``, ``var`` and ``X`` of an ``.h5ad``, with a dense ``X`` memory-mapped read-only.

    Other slots (``uns``, ``obsm``, layers) are not carried. When ``X`` cannot be mapped (sparse,
    chunked or compressed) this is :func:`read_h5ad` with ``backed``.
    """
    meta = read_h5ad(path, backed=True)
    mapped = dense_x_memmap(meta)
    if mapped is None:
        meta.file.close()
        return read_h5ad(path, backed=backed)
    obs, var = meta.obs.copy(), meta.var.copy()
    meta.file.close()
    return ad.AnnData(X=mapped, obs=obs, var=var)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing is left behind if the body raises, and an existing ``path`` is untouched until the
    new file is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_paths(directory: str | os.PathLike, names: list[str]) -> Iterator[dict[str, Path]]:
    """Temporary paths for several files of ``directory``, all renamed into place only on success.

    If the body raises, every temporary file is removed, and ``directory`` too when this call
    created it and it is left empty: a failed run leaves nothing behind.
    """
    directory = Path(directory)
    created = not directory.exists()
    try:
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(atomic_path(directory / name)) for name in names}
    except BaseException:
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, compression: str | None = None) -> Path:
    """Write ``adata`` to ``path`` atomically (temp file + rename). Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return path


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Refuse to write over an input file, or over an existing file unless ``overwrite``."""
    out = Path(out)
    for inp in inputs:
        if out.resolve() == Path(inp).resolve():
            raise VcellError(f"{out}: output path is the input file; inputs are never modified in place")
    if out.exists() and not overwrite:
        raise VcellError(f"{out}: output file already exists (pass --overwrite to replace it)")
    return out
