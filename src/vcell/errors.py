"""User-facing errors (one readable line, no traceback) and the pieces their messages share."""

from __future__ import annotations

import difflib
import re
import signal
from collections.abc import Iterable


class VcellError(Exception):
    """A problem with the user's input or request.

    The CLI prints ``error: <message>`` on one line and exits with status 2; the message must name
    the file, column or value at fault so the user can fix it without reading a traceback.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


#: Signals that stop a command as Ctrl-C does (``timeout``, Slurm and Kubernetes send SIGTERM; a
#: closed terminal SIGHUP): the command line turns them into a Ctrl-C, training stops after its step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The user stopped a run (Ctrl-C): a ``KeyboardInterrupt`` whose message says what was saved.

    The CLI prints the message on one line (no ``error:``, no traceback) and exits with status 130
    (128 + ``signum`` for a run stopped by that signal, e.g. SIGTERM); ``quiet`` ones (raised by
    DDP processes other than rank 0) print nothing.
    """

    exit_code = 130

    def __init__(self, message: str = "interrupted; nothing written", quiet: bool = False, signum: int | None = None):
        super().__init__(" ".join(str(message).split()))
        self.quiet = quiet
        self.signum = signum


def preview(items: Iterable, n: int = 5, quote: bool = True) -> str:
    """The first ``n`` of ``items`` for a message, with the total when some are left out.

    Examples
    --------
    >>> preview(["A", "B", "C"], n=2)
    "'A', 'B', ... (3 in all)"
    >>> preview([1, 2], quote=False)
    '1, 2'
    """
    items = [str(i) for i in items]
    shown = ", ".join(repr(i) if quote else i for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def close_matches(value: str, options: Iterable, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The options ``value`` most likely meant, best first: the same name in another case (gene
    symbols written in lower case), then difflib's close matches; at most ``n``.

    Examples
    --------
    >>> close_matches("brd4", ["BRD4", "STAT1"])
    ['BRD4']
    """
    names = [str(o) for o in options]
    folded = {}
    for o in names:
        folded.setdefault(o.casefold(), o)
    same = folded.get(str(value).casefold())
    close = difflib.get_close_matches(str(value), names, n=n, cutoff=cutoff)
    if same is not None and same != str(value):
        close = [same, *[c for c in close if c != same]][:n]
    return close


_CONTROL_LIKE = re.compile(r"^(nt|ntc|non[-_ ]?target\w*|non[-_ ]?targeting.*|ctrl|control|controls|neg\w*[-_ ]?ctrl|negative[-_ ]?control|"
                           r"scrambl\w*|safe[-_ ]?target\w*|dmso|vehicle|unperturbed|untreated|mock|wt|wildtype|wild[-_ ]?type)$")


def control_hint(control: str, labels: Iterable) -> str:
    """What to say when the control label ``control`` is not among ``labels``: the close spellings
    (:func:`did_you_mean`), else the labels that read like a control (``'NT'``, ``'ctrl'``, ``'DMSO'``, ...).

    Examples
    --------
    >>> control_hint("non-targeting", ["ATF2", "NT", "STAT1"])
    "; 'NT' reads like a control label: pass --control 'NT'?"
    >>> control_hint("CTRL", ["CTRL ", "STIM"])
    "; did you mean 'CTRL '?"
    >>> control_hint("non-targeting", ["None", "IRF1"])  # how a missing label reads: no control
    ''
    """
    labels = [str(v) for v in labels]
    close = did_you_mean(control, labels)
    if close:
        return close
    like = [v for v in labels if _CONTROL_LIKE.match(v.strip().casefold())]
    if not like:
        return ""
    return f"; {', '.join(repr(v) for v in like[:3])} {'reads' if len(like) == 1 else 'read'} like a control label: pass --control {like[0]!r}?"


def did_you_mean(value: str, options: Iterable, n: int = 3, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x', 'y'?"`` for the options close to ``value`` (:func:`close_matches`), else ``""``.

    Examples
    --------
    >>> did_you_mean("linaer", ["linear", "cell_mean"])
    "; did you mean 'linear'?"
    >>> did_you_mean("zzz", ["linear"])
    ''
    >>> did_you_mean("brd4", ["BRD4", "STAT1"])
    "; did you mean 'BRD4'?"
    """
    close = close_matches(value, options, n, cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def named_with_guess(value: str, options: Iterable) -> str:
    """``"'x' (did you mean 'X'?)"``: ``value`` quoted, with the one option it most likely meant.

    Examples
    --------
    >>> named_with_guess("brd4", ["BRD4", "STAT1"])
    "'brd4' (did you mean 'BRD4'?)"
    """
    guess = close_matches(value, options, n=1)
    return f"{value!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")


def lock_hint(exc: BaseException) -> str:
    """What to do when HDF5 could not lock a file (``exc`` from opening it), else ``""``."""
    if "unable to lock file" not in str(exc):
        return ""
    return ("; another process has it open for writing, or its filesystem (NFS, Lustre) has no file locks: "
            "close the other process, or set HDF5_USE_FILE_LOCKING=FALSE")
