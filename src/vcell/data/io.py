"""Reading AnnData files and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py

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
