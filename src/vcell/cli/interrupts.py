"""Commands that write a folder of several outputs: one writer at a time, and no partial results
left under their names after Ctrl-C.

A single-file output needs nothing here (it is written to a temporary file and renamed, so an
interrupted write leaves nothing, and :func:`vcell.cli.main` says "interrupted; nothing written";
files written together are put in place together, :func:`vcell.data.io.atomic_files`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from vcell.data.staging import sole_writer
from vcell.errors import Interrupted, preview


@contextlib.contextmanager
def removed_if_interrupted(out: Path, names: Iterable[str], staged: bool = False, kept: str | None = None) -> Iterator[None]:
    """On Ctrl-C in the body, remove the outputs ``names`` of the folder ``out`` that the body created
    (and ``out`` itself if it created it and left it empty), then raise :class:`Interrupted` saying so.
    While the body runs no other vcell command can write into ``out`` (:func:`~vcell.data.staging.sole_writer`).

    Outputs that were there before (replaced with ``--overwrite``) are left, and the message says
    they may be partly replaced; with ``staged`` (the body writes in a staging folder and replaces
    them only once it is done: :func:`~vcell.data.staging.staged_folder`), that they are as they were.
    ``kept``: the record (a path in ``out``) of what the body may leave to be continued from
    (``vcell bench --resume``); if it is there, the message names its folder. Outputs a stop
    found being put in place (:func:`~vcell.data.io.atomic_files` puts them in place first) are
    whole: they are kept, and the message names them.
    """
    out, names = Path(out), list(names)
    existed = out.exists()
    before = {name for name in names if (out / name).exists()}
    try:
        with sole_writer(out):
            yield
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)  # a SIGTERM training turned into its own stop: still said as one
        # a stop that came while files were put in place (io.atomic_files) is raised once they are: those are whole, kept
        root = out.resolve()
        written = [Path(p).resolve() for p in getattr(exc, "written", ())]
        whole = [str(p.relative_to(root)) for p in written if p.is_relative_to(root)]  # e.g. CONTEXT/results.csv
        made = [name for name in names if name not in before and name not in whole and (out / name).exists()]
        for name in made:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if whole:
            others = sorted(before - set(whole))
            raise Interrupted(f"interrupted once {preview(whole, 6, quote=False)} in {out} were written whole"
                              + (f"; {', '.join(others)} may be from the earlier run (rerun with --overwrite)" if others else ""),
                              signum=signum) from None
        if kept and (out / kept).is_file():
            earlier = f"; {out} holds the earlier results as they were" if before and staged else ""
            raise Interrupted(f"interrupted; the finished runs are kept in {(out / kept).parent}: run the same command with --resume to "
                              f"continue from them{earlier}", signum=signum) from None
        if before and staged:
            raise Interrupted(f"interrupted; nothing written: {out} holds the earlier results as they were", signum=signum) from None
        if before:
            raise Interrupted(f"interrupted; {out}: the earlier {', '.join(sorted(before))} may be partly replaced "
                              "(rerun with --overwrite)", signum=signum) from None
        raise Interrupted("interrupted; nothing written" + (f" (removed the partial results in {out})" if made else ""), signum=signum) from None
