"""Output folders whose parts are replaced whole (``vcell bench --out``): written in a staging
folder and put in place only when the run is done, never deleting a file a user put there; the
locks that keep a second writer out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from vcell.data.io import atomic_path, clean_leftovers, placed, stop_signals_held, temp_prefix
from vcell.errors import VcellError, preview

try:  # POSIX only; without it concurrent writers are not guarded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


def check_replaceable(out: str | os.PathLike, names: Sequence[str], earlier: Sequence[str] = ()) -> None:
    """Refuse ``--overwrite`` when a folder among the outputs ``names`` of ``out`` holds a file vcell
    did not write (:func:`foreign_files`): the folder is replaced whole, and the file would go with it."""
    mine = foreign_files(out, names, earlier)
    if mine:
        folders = ", ".join(f"{m}/" for m in sorted({m.split("/")[0] for m in mine}))
        one = len(mine) == 1
        raise VcellError(f"{out}: --overwrite replaces {folders} whole, and {preview(mine, n=3)} in it "
                         f"{'was' if one else 'were'} not written by vcell; move {'it' if one else 'them'} out of {out} "
                         "or choose another --out")


#: In a :func:`staged_folder` output folder: the files its last run wrote inside its folder outputs,
#: so that ``--overwrite`` can tell them from files a user put there (:func:`foreign_files`).
WRITTEN = ".vcell-written.json"


_BROWSER_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # a file browser's, not the user's work


def foreign_files(out: str | os.PathLike, names: Sequence[str], earlier: Sequence[str] = ()) -> list[str]:
    """Files inside the folder outputs ``names`` of ``out`` that the run which wrote them did not
    list in ``WRITTEN`` (without a list: not in ``earlier``, what the caller knows an older run
    wrote), as paths relative to ``out``."""
    out = Path(out)
    folders = [out / name for name in names if (out / name).is_dir() and not (out / name).is_symlink()]
    if not folders:
        return []
    try:
        listed = set(json.loads((out / WRITTEN).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set(earlier)
    found = (p.relative_to(out).as_posix() for folder in folders for p in folder.rglob("*")
             if not p.is_dir() and p.name not in _BROWSER_FILES)
    return sorted(p for p in found if p not in listed)


def _written(stage: Path, names: Sequence[str]) -> list[str]:
    return sorted(p.relative_to(stage).as_posix() for name in names if (stage / name).is_dir()
                  for p in (stage / name).rglob("*") if not p.is_dir())


@contextlib.contextmanager
def sole_writer(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``out`` (created if missing) while the body runs.

    Two runs into one folder would both pass the "already holds" check (their outputs are only
    renamed into place at the end) and leave a mix of both; the second is refused instead. The
    lock is the kernel's (``flock`` on the folder itself): no lock file, and it goes with the
    process however that ends; the thread holding it may take it again (the command line, then the API).
    A folder made here and left empty is removed.
    """
    from vcell.data.io import check_writable

    out = Path(out)
    check_writable(out, folder=True)  # a file there, or a read-only place: its own one-line error
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with held_exclusively(out, f"{out}: another vcell command is writing into this folder now; "
                                   "wait for it to finish or choose another --out", reentrant=True):
            yield
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, names: Sequence[str], keep: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder inside ``out`` to write the outputs ``names`` into; on success they
    replace every earlier output of ``names`` in ``out`` (with ``--overwrite``: an earlier run's go
    whole, also those this run does not write, such as a report not asked for again; check first
    with :func:`check_replaceable`, which refuses when a user's file is inside one of them). The
    files written inside folder outputs are listed in ``out/WRITTEN``.

    If the body raises (Ctrl-C included) the temporary folder goes and ``out`` holds what it held
    before; one that a killed run left is removed first (:func:`clean_leftovers`). With ``keep`` (a
    folder name) the staging folder is ``out/keep``, reused if it is there, and left as it is when
    the body raises (the body decides what of it stays: ``vcell bench --resume``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "staging"
    clean_leftovers(marker)
    if keep:
        stage = out / keep
        stage.mkdir(exist_ok=True)
    else:
        stage = Path(tempfile.mkdtemp(prefix=temp_prefix(marker), suffix=".tmp", dir=out))
    done = False
    try:
        yield stage
        with atomic_path(stage / WRITTEN) as tmp:
            Path(tmp).write_text(json.dumps({"files": _written(stage, names)}, indent=1))
        # every earlier output (one this run does not write too) renamed aside, then the new ones in:
        # renames only, with Ctrl-C held until they are done; what was set aside goes last (a kill
        # while it goes leaves a staging folder the next run removes)
        aside = Path(tempfile.mkdtemp(prefix=temp_prefix(marker), suffix=".tmp", dir=out))
        with stop_signals_held() as held:
            for name in names:
                if (out / name).exists() or (out / name).is_symlink():
                    os.replace(out / name, aside / name)
            for name in [*names, WRITTEN]:
                if (stage / name).exists() or (stage / name).is_symlink():
                    os.replace(stage / name, out / name)
        done = True  # the results are in place: what is left of the stage goes, whatever comes next
        placed(*(out / name for name in [*names, WRITTEN]))
        if held:
            log.warning("a stop signal (Ctrl-C) came as the results were put in place in %s: they are complete", out)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if done or not keep:
            shutil.rmtree(stage, ignore_errors=True)


_HELD: dict[str, int] = {}  # path -> the thread of this process holding it (held_exclusively's reentrant)


@contextlib.contextmanager
def held_exclusively(path: str | os.PathLike, busy: str, reentrant: bool = False) -> Iterator[None]:
    """Hold the kernel's exclusive lock (``flock``) on ``path`` while the body runs.

    ``path`` is an existing folder, or a lock file created if missing. Another process holding it
    is a one-line :class:`VcellError` saying ``busy``; the lock goes with its process however that
    ends. With ``reentrant``, the thread holding it already (the command line, then the API it
    calls) goes on; any other holder, another thread too, is refused. Not POSIX: no lock.
    """
    path = Path(path)
    key = str(path.resolve())
    if fcntl is None or (reentrant and _HELD.get(key) == threading.get_ident()):
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise VcellError(f"{path}: cannot create lock file ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            raise VcellError(busy) from None
        except OSError as exc:  # no flock here (NFS, Lustre without -o flock): run without the lock
            log.warning("%s: cannot be locked here (%s): a second command writing into it at the same time would not be "
                        "refused", path, exc.strerror or exc)
        _HELD[key] = threading.get_ident()
        try:
            yield
        finally:
            _HELD.pop(key, None)
    finally:
        os.close(fd)  # closing releases the lock
