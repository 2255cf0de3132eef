"""Reading AnnData files and writing outputs atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from vcell.errors import STOP_SIGNALS, Interrupted, VcellError, preview

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)


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
    from vcell.data.layout import check_stored_matrices

    check_stored_matrices(path)  # a corrupt sparse matrix is read without a word by anndata and scipy
    import anndata as ad  # here, not at the top: readers of other formats need not import it

    try:
        return _read_backed(path) if backed else ad.read_h5ad(path)
    except Exception as exc:  # anndata raises many types for corrupt files
        raise VcellError(f"{path}: unreadable .h5ad file ({type(exc).__name__}: {exc})") from exc


def _read_backed(path: Path) -> ad.AnnData:
    """anndata's backed read, with sparse layers left on disk too.

    anndata's own backed mode leaves ``X`` on disk but reads every layer into memory (a raw-counts
    layer beside a log1p ``X`` doubles what a "backed" file costs); here a CSR/CSC layer is a lazy
    dataset, read where it is indexed. Files of old layouts, or with ``raw``, take anndata's path.
    """
    import anndata as ad
    from anndata.io import read_elem, sparse_dataset

    f = h5py.File(path, "r")
    if "encoding-type" not in f.attrs or not isinstance(f.get("obs"), h5py.Group) or "raw" in f:
        f.close()
        return ad.read_h5ad(path, backed="r")
    try:
        slots = {k: read_elem(f[k]) for k in ("obs", "var", "obsm", "varm", "obsp", "varp", "uns") if k in f}
        layers = {}
        for key, node in f.get("layers", {}).items():
            sparse = isinstance(node, h5py.Group) and str(node.attrs.get("encoding-type", "")) in ("csr_matrix", "csc_matrix")
            layers[key] = sparse_dataset(node) if sparse else read_elem(node)
        return ad.AnnData(filename=f, layers=layers, **slots)
    except BaseException:
        f.close()
        raise


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
    import anndata as ad

    return ad.AnnData(X=mapped, obs=obs, var=var)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files and folders are written beside their destination as ``.NAME.PID-XXXXXXXX.tmp``
# (PID: the writing process; XXXXXXXX: tempfile's random part), so a later run of the same output
# recognises what an interrupted one left, and leaves alone what a running one is writing.
_RANDOM = r"[a-z0-9_]{8}"


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of this process's temporary files for ``path`` (``.NAME.PID-``)."""
    return f".{Path(path).name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (this process counts as running; zombies do not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def human_size(n: int) -> str:
    """``n`` bytes for a message: ``"512 B"``, ``"1.5 kB"``, ``"137.2 MB"``, ``"2.0 GB"``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def disk_size(path: str | os.PathLike) -> int:
    """Bytes of the file ``path``, or of every file under the folder ``path`` (0 if it is gone)."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        return path.stat().st_size
    except OSError:
        return 0


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Temporary files (or folders) an interrupted write of ``path`` left beside it.

    Only names of the form ``.NAME.PID-XXXXXXXX.tmp`` (and ``.NAME.XXXXXXXX.tmp`` of older vcell
    versions) whose process is no longer running count; nothing else is ever listed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)-)?{_RANDOM}\.tmp$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not (m.group(1) is not None and _pid_alive(int(m.group(1)))):
            found.append(entry)
    return sorted(found)


def clean_leftovers(*paths: str | os.PathLike) -> int:
    """Remove the :func:`leftovers` of each of ``paths`` and log one line saying what went (and its size).

    Returns the bytes removed.
    """
    by_path = {str(Path(path)): leftovers(path) for path in paths}
    found = [p for items in by_path.values() for p in items]
    if not found:
        return 0
    size = sum(disk_size(p) for p in found)
    folders = sum(p.is_dir() and not p.is_symlink() for p in found)
    files = len(found) - folders
    what = " and ".join(f"{n} temporary {kind}{'s' if n > 1 else ''}" for n, kind in ((files, "file"), (folders, "folder")) if n)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    where = ", ".join(path for path, items in by_path.items() if items)
    log.warning("removed %s (%s) left by an interrupted write of %s: %s", what, human_size(size), where,
                preview([p.name for p in found], n=3, quote=False))
    return size


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing is left behind if the body raises, and an existing ``path`` is untouched until the
    new file is complete. What an interrupted earlier write of ``path`` left is removed first
    (:func:`clean_leftovers`). A ``path`` that is itself one of this process's temporary files (a
    writer called inside another's ``atomic_path``) is yielded as is.
    """
    path = Path(path)
    if re.match(rf"^\..+\.{os.getpid()}-{_RANDOM}\.tmp$", path.name):
        yield path  # already this process's temporary file (nested atomic writes): no second one
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:  # a full disk, say, met while writing: the error names the output, not nothing
            if exc.filename is None and exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        if _key(path) in _FRESH:
            _place_new(tmp_path, path)
        else:
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
        _FRESH.discard(_key(path))  # one write per check: a later write of it in this process is checked anew


#: Outputs :func:`check_output_path` found absent without ``--overwrite``: written only if they are
#: still absent (two commands writing one file both passed that check; the last rename won, silently).
_FRESH: set[str] = set()


def _key(path: str | os.PathLike) -> str:
    return os.path.abspath(path)


def _expect(path: str | os.PathLike, overwrite: bool) -> None:
    """Record a checked output: without ``overwrite`` it must still be absent when it is written."""
    (_FRESH.discard if overwrite else _FRESH.add)(_key(path))


def placed(*paths: str | os.PathLike) -> None:
    """Say that ``paths`` were put in place other than by :func:`atomic_path` (renamed from a staging
    folder): a later write of them in this process is checked anew, not taken for another command's."""
    for path in paths:
        _FRESH.discard(_key(path))


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless a file appeared there meanwhile (a hard link fails then, atomically)."""
    appeared = VcellError(f"{path}: appeared while this command was writing it (another command writing the same "
                          "file?); it was kept, and this command's result not written")
    try:
        os.link(tmp, path)
    except FileExistsError:
        if os.path.islink(path) and not os.path.exists(path):  # a dangling link, absent to the check: replaced as then
            os.replace(tmp, path)
            return
        raise appeared from None
    except OSError:  # no hard links on this filesystem: check, then rename
        if path.exists():
            raise appeared from None
        os.replace(tmp, path)


@contextlib.contextmanager
def stop_signals_held(redeliver: bool = False) -> Iterator[list]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the body (a few renames) is done; yields a list that is
    non-empty if one came. After the body, a signal whose default was to end the process is raised
    again (the process then ends with everything in place); one with a handler (the command line
    turns them into a Ctrl-C) is raised again with ``redeliver``, else only reported through the
    list (results that are complete need no stop). Off the main thread (where no handler can be
    set) the body runs as it is."""
    import signal
    import threading

    caught: list = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    held = [s for s in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    previous = {}
    try:
        for s in held:  # inside the try: a signal landing among these still gets every handler put back
            previous[s] = signal.signal(s, lambda signum, frame: caught.append(signum))
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            if redeliver or previous.get(s) == signal.SIG_DFL:
                signal.raise_signal(s)


@contextlib.contextmanager
def atomic_files(paths: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths for several files (:func:`atomic_path` each), renamed into place only when the
    body succeeds, with Ctrl-C, SIGTERM and SIGHUP held while they are: a stop leaves every file new
    or every file as it was, never a mix. A stop that came meanwhile is raised once all are in place,
    as an :class:`~vcell.errors.Interrupted` saying they were written."""
    import signal

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]
        with stop_signals_held() as caught:
            stack.close()
        if caught:
            stop = Interrupted(f"interrupted once {', '.join(map(str, paths))} were written whole",
                               signum=None if caught[0] == signal.SIGINT else caught[0])
            stop.written = [Path(p) for p in paths]  # complete: whoever cleans up after a stop keeps them
            raise stop


@contextlib.contextmanager
def atomic_paths(directory: str | os.PathLike, names: list[str]) -> Iterator[dict[str, Path]]:
    """Temporary paths for several files of ``directory``, all renamed into place only on success.

    If the body raises, every temporary file is removed, and the folders this call created
    (``directory`` and the subfolders of ``names``, e.g. ``CONTEXT/``) when left empty: a failed
    run leaves nothing behind.
    """
    directory = Path(directory)
    folders = {parent for name in names for parent in (directory / name).parents if directory in parent.parents}
    made = sorted((d for d in [*folders, directory] if not d.exists()), key=lambda d: len(d.parts), reverse=True)  # deepest first
    try:
        with atomic_files([directory / name for name in names]) as temps:
            yield dict(zip(names, temps))
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, compression: str | None = None) -> Path:
    """Write ``adata`` to ``path`` atomically (temp file + rename), after :func:`check_space` for
    its matrices. Returns the path."""
    path = Path(path)
    check_space(path, matrices_nbytes(adata))
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return path


def matrices_nbytes(adata: ad.AnnData) -> int:
    """Bytes of ``adata``'s matrices (``X``, ``raw``, layers, ``obsm``, ``obsp``) as they are written."""
    raw = [adata.raw.X] if adata.raw is not None else []
    mats = [m for m in (adata.X, *raw, *adata.layers.values(), *adata.obsm.values(), *adata.obsp.values()) if m is not None]
    return sum(int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) if hasattr(m, "indptr") else int(getattr(m, "nbytes", 0))
               for m in mats)


#: Free space kept beyond a write's own bytes: HDF5 needs some to close a file cleanly (on a full
#: disk it fails to, and the interpreter can crash while unwinding).
SPACE_MARGIN = 16 << 20


def free_space(folder: str | os.PathLike) -> int | None:
    """Free bytes on the device of ``folder`` or its nearest existing parent; ``None`` if unknown (not POSIX, no sizes: FUSE)."""
    folder = next(p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists())
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize if stat.f_blocks else None


def check_space(path: str | os.PathLike, nbytes: int) -> None:
    """A one-line error naming ``path`` when its device has less free space than ``nbytes`` (the
    bytes about to be written) plus :data:`SPACE_MARGIN`: a full disk is said before it is hit."""
    free = free_space(Path(path).parent)
    if free is not None and free < nbytes + SPACE_MARGIN:
        # name the output, not its temporary file or folder (.NAME.PID-XXXXXXXX.tmp anywhere in the path)
        shown = Path(*(m.group(1) if (m := re.match(rf"^\.(.+)\.\d+-{_RANDOM}\.tmp$", part)) else part
                       for part in Path(path).parts))
        raise VcellError(f"{shown}: not enough free space on its device ({human_size(free)} free, about "
                         f"{human_size(int(nbytes) + SPACE_MARGIN)} needed to write it); free some or write elsewhere")


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """Raise a one-line error unless ``path`` can be written: a file (``folder=False``) or a folder.

    ``path`` must not be a folder where a file is expected (or the reverse), and the folder it goes
    into must exist and be writable, or be creatable under a writable folder. Nothing is left
    behind (a probe file is made and removed in the nearest existing folder).
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise VcellError(f"{path}: is a file, not a folder (this output is a folder of files)")
        if not folder and path.is_dir():
            raise VcellError(f"{path}: is a folder; give a file name for this output")
    into = path if folder else path.parent
    existing = into
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise VcellError(f"{path}: cannot write there: {existing} is a file, not a folder")
    what = f"folder {existing}" if existing == into else f"folder {into} cannot be created: {existing}"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VcellError(f"{path}: cannot write there: {what} is not writable (permission denied or read-only)")
    try:  # what access() cannot tell (a read-only or special file system such as /proc): one file, made and gone
        fd, probe = tempfile.mkstemp(prefix=".vcell-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise VcellError(f"{path}: cannot write there: {what} does not take files ({exc.strerror})") from None
    return path


def _check_inputs(out: Path, inputs) -> None:
    """Refuse ``out`` when it is an input file, or a file already in an input folder (a model's
    checkpoint); a new file in an input folder is fine."""
    target = out.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if target == inp:
            raise VcellError(f"{out}: output path is the input file; inputs are never modified in place")
        if inp.is_dir() and inp in target.parents and target.exists():
            raise VcellError(f"{out}: output path is a file of the input folder {inp}; inputs are never modified in place")


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Check, before any work, that the file ``out`` can be written; every command that writes a file calls it.

    Refuses to write over an input, over an existing file unless ``overwrite``, into a folder that
    cannot be written or created, or where a folder stands. Then removes what an interrupted earlier
    write of ``out`` left (:func:`clean_leftovers`). All refusals are one-line :class:`VcellError`.
    """
    out = Path(out)
    _check_inputs(out, inputs)
    check_writable(out)
    if out.exists() and not overwrite:
        raise VcellError(f"{out}: output file already exists (pass --overwrite to replace it)")
    _expect(out, overwrite)  # after every refusal: a refused check leaves no record
    clean_leftovers(out)
    return out


def subfolder(name: str | None, what: str) -> str:
    """``"NAME/"``, the prefix of the outputs a folder of its own holds (``""`` for ``None`` or
    ``""``: the output folder itself); a name that cannot be one folder is an error naming ``what``."""
    if not name:
        return ""
    if "/" in name or name in (".", ".."):
        raise VcellError(f"{what} {name!r} cannot name an output folder")
    return f"{name}/"


def subfolders(names, what: str) -> dict[str, str]:
    """name -> :func:`subfolder` of each of ``names``; ``""`` (the output folder itself) only alone."""
    names = list(names)
    if "" in names and len(names) > 1:
        raise VcellError(f"an empty {what} names the output folder itself: only for one output, not {len(names)}")
    return {name: subfolder(name, what) for name in names}


def check_output_dir(
    directory: str | os.PathLike, names: list[str], inputs: list[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """:func:`check_output_path` for a command whose output is a folder holding ``names``.

    Refuses when ``directory`` is a file, cannot be written or created, or already holds any of
    ``names`` (unless ``overwrite``); other files in it are never touched. Then removes what an
    interrupted earlier write of each name left. (Folder outputs replaced whole:
    :func:`vcell.data.staging.check_replaceable` too.)
    """
    directory = Path(directory)
    for name in names:
        _check_inputs(directory / name, inputs)
    check_writable(directory, folder=True)
    there = [name for name in names if (directory / name).exists()]
    if there and not overwrite:
        raise VcellError(f"{directory}: already holds {preview(there, n=3)} from an earlier run "
                         "(pass --overwrite to replace them, or choose another --out)")
    for name in names:
        _expect(directory / name, overwrite)
    clean_leftovers(*(directory / name for name in names))
    return directory
