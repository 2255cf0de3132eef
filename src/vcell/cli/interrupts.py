"""Ctrl-C in commands that write a folder of several outputs: no partial results left under their names.

A single-file output needs nothing here (it is written to a temporary file and renamed, so an
interrupted write leaves nothing, and :func:`vcell.cli.main` says "interrupted; nothing written").
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from vcell.errors import Interrupted


@contextlib.contextmanager
def removed_if_interrupted(out: Path, names: Iterable[str]) -> Iterator[None]:
    """On Ctrl-C in the body, remove the outputs ``names`` of the folder ``out`` that the body created
    (and ``out`` itself if it created it and left it empty), then raise :class:`Interrupted` saying so.

    Outputs that were there before (replaced with ``--overwrite``) are left, and the message says
    they may be partly replaced.
    """
    out, names = Path(out), list(names)
    existed = out.exists()
    before = {name for name in names if (out / name).exists()}
    try:
        yield
    except KeyboardInterrupt:
        made = [name for name in names if name not in before and (out / name).exists()]
        for name in made:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if before:
            raise Interrupted(f"interrupted; {out}: the earlier {', '.join(sorted(before))} may be partly replaced "
                              "(rerun with --overwrite)") from None
        raise Interrupted("interrupted; nothing written" + (f" (removed the partial results in {out})" if made else "")) from None
