"""What the user sees while long work runs: one live progress display on stderr.

The command line turns it on with :func:`show_progress` (``vcell -q`` leaves it off); in Python
it is on in an interactive session (a Jupyter notebook, IPython, the ``python`` prompt) and off in
a script, until you call ``vcell.show_progress(True or False)``. Every step that may take more than a few
seconds opens a :func:`task` line (a bar with a total, a spinner without): nested steps, such as
the ST training or prediction inside ``vcell bench``, add their line below the outer one on the
same display, so there is only ever one live display. Lines are transient: when a step ends its
line goes, and the command prints one summary line of its own. On a non-terminal (a pipe, a log
file, a batch job's output) nothing is drawn, so captured output holds no control codes; instead
each step prints a plain line every ``VCELL_PROGRESS_EVERY`` seconds (default 60; 0: none), so a
long job's log shows it is moving.

This module is light (rich only, no torch), so the command line can import it at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

log = logging.getLogger(__name__)

_lock = threading.RLock()
_settings = {"enabled": None, "console": None}  # None: on in an interactive session (:func:`_interactive`)
_live: dict = {"progress": None, "open": 0}


def show_progress(enabled: bool = True, console: Console | None = None) -> None:
    """Turn the progress display on or off (by default it is on in an interactive session only).

    Parameters
    ----------
    enabled : bool
        Show progress lines (ST training, prediction, evaluation, benchmarks).
    console : rich.console.Console, optional
        Where they are drawn (default: a stderr console).
    """
    with _lock:
        _settings["enabled"] = bool(enabled)
        if console is not None:
            _settings["console"] = console


def progress_enabled() -> bool:
    """Whether progress is shown: :func:`show_progress` turned it on and this is the main process
    (under DDP, rank 0; the other ranks run the same command silently)."""
    enabled = _settings["enabled"]
    return bool(_interactive() if enabled is None else enabled) and _rank_zero()


def _interactive() -> bool:
    """A Jupyter kernel, IPython or the ``python`` prompt (not a script, not a test run)."""
    import sys

    if hasattr(sys, "ps1"):
        return True
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and get() is not None


def _rank_zero() -> bool:
    """Whether this process is rank 0 (the variables Lightning, torchrun and SLURM set for each process)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"))


def progress_console() -> Console:
    """The console progress and notes go to (stderr)."""
    with _lock:
        if _settings["console"] is None:
            _settings["console"] = Console(stderr=True)
        return _settings["console"]


def on_terminal(console: Console | None = None) -> bool:
    """Whether ``console`` (default: the progress console) draws on an interactive terminal or in
    a Jupyter notebook (rich draws there with widgets).

    A pipe or a file is not one, whatever ``FORCE_COLOR`` says: live displays would fill it with
    control codes.
    """
    console = console or progress_console()
    try:
        return bool(console.is_jupyter or (console.is_interactive and console.file.isatty()))
    except (AttributeError, ValueError):  # a closed or unusual file
        return False


def format_duration(seconds: float) -> str:
    """``seconds`` for a message: ``"0.4s"``, ``"45s"``, ``"1m12s"``, ``"2h03m"``.

    Examples
    --------
    >>> format_duration(72.4), format_duration(7380), format_duration(0.42)
    ('1m12s', '2h03m', '0.4s')
    """
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Counts(ProgressColumn):
    """``done/total unit`` (nothing for a step without a total)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        unit = task.fields.get("unit", "")
        return Text(f"{int(task.completed):,}/{int(task.total):,} {unit}".rstrip(), style="progress.download")


class _Remaining(ProgressColumn):
    """``ETA 1m12s`` once the speed is known (nothing for a step without a total)."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        if task.total is None or task.finished or task.time_remaining is None:
            return Text("")
        return Text(f"ETA {format_duration(task.time_remaining)}", style="progress.remaining")


class _Bar(BarColumn):
    """The bar of a step with a total (a spinner line has none)."""

    def render(self, task: Task):
        return Text("") if task.total is None else super().render(task)


class TaskLine:
    """One line of the display: :meth:`advance` and :meth:`update` it (both do nothing when progress is off)."""

    def __init__(self, progress: Progress | None = None, task_id=None):
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        """Add ``n`` to the line's count."""
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def update(self, completed: float | None = None, total: float | None = None, description: str | None = None,
               info: str | None = None) -> None:
        """Set the count, the total, the text before the bar or the text after the counts (``info``)."""
        if self._progress is None:
            return
        fields = {} if info is None else {"info": info}
        self._progress.update(self._id, completed=completed, total=total, description=description, **fields)


def _log_every() -> float:
    """Seconds between a step's plain progress lines off a terminal (``VCELL_PROGRESS_EVERY``; 0: none)."""
    try:
        return max(0.0, float(os.environ.get("VCELL_PROGRESS_EVERY", "60")))
    except ValueError:
        return 60.0


class _LogLine(TaskLine):
    """A step's progress off a terminal: a plain line at most every ``every`` seconds, e.g.
    ``training ST: 500/2,000 steps (25%), loss 0.41, 2,345 cells/s, ETA 12m05s``."""

    def __init__(self, description: str, total: float | None, unit: str, completed: float, every: float):
        super().__init__()
        self.description, self.total, self.unit, self.completed, self.info = description, total, unit, completed, ""
        self.every, self._c0 = every, completed
        self._t0 = self._last = time.monotonic()

    def advance(self, n: float = 1) -> None:
        self.completed += n
        self._maybe_print()

    def update(self, completed: float | None = None, total: float | None = None, description: str | None = None,
               info: str | None = None) -> None:
        for name, value in (("completed", completed), ("total", total), ("description", description), ("info", info)):
            if value is not None:
                setattr(self, name, value)
        self._maybe_print()

    def text(self, now: float) -> str:
        """The line as printed at time ``now`` (``time.monotonic``)."""
        unit = f" {self.unit}" if self.unit else ""
        parts = []
        if self.total:
            parts.append(f"{int(self.completed):,}/{int(self.total):,}{unit} ({100 * self.completed / self.total:.0f}%)")
        elif self.completed:
            parts.append(f"{int(self.completed):,}{unit}")
        if self.info:
            parts.append(self.info)
        done = self.completed - self._c0
        if self.total and done > 0:
            parts.append(f"ETA {format_duration((self.total - self.completed) * (now - self._t0) / done)}")
        else:
            parts.append(f"{format_duration(now - self._t0)} so far")
        return f"{self.description}: {', '.join(parts)}"

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every and not (self.total and self.completed >= self.total):  # the summary says done
            self._last = now
            progress_console().print(self.text(now), highlight=False, markup=False, soft_wrap=True)


def _new_progress(console: Console) -> Progress:
    def fixed() -> Column:
        return Column(no_wrap=True)

    columns = [SpinnerColumn(), TextColumn("{task.description}", table_column=fixed()), _Bar(bar_width=20),
               _Counts(table_column=fixed()), TextColumn("{task.fields[info]}", table_column=fixed()), _Remaining(table_column=fixed())]
    return Progress(*columns, console=console, transient=True, refresh_per_second=4)


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "", completed: float = 0) -> Iterator[TaskLine]:
    """Show a line for the body's work: ``description``, a bar to ``total`` (a spinner without), ETA.

    Yields a :class:`TaskLine`. With progress off nothing is shown and the line's methods do
    nothing; on a non-terminal the line is a plain one every ``VCELL_PROGRESS_EVERY`` seconds.
    """
    if not progress_enabled():
        yield TaskLine()
        return
    if not on_terminal():
        every = _log_every()
        yield _LogLine(description, total, unit, completed, every) if every > 0 else TaskLine()
        return
    with _lock:
        if _live["progress"] is None:
            _live["progress"] = _new_progress(progress_console())
            _live["progress"].start()
        progress = _live["progress"]
        _live["open"] += 1
        task_id = progress.add_task(description, total=total, completed=completed, unit=unit, info="")
    try:
        yield TaskLine(progress, task_id)
    finally:
        with _lock:
            progress.remove_task(task_id)
            _live["open"] -= 1
            if _live["open"] == 0:
                progress.stop()
                _live["progress"] = None


def status(description: str) -> contextlib.AbstractContextManager[TaskLine]:
    """A spinner line saying what the body is doing (a :func:`task` without a total)."""
    return task(description)


def note(message: str) -> None:
    """Print ``message`` as one line on the progress console when progress is on; else log it (INFO)."""
    if not _rank_zero():
        return
    if progress_enabled():
        progress_console().print(message, highlight=False, markup=False, soft_wrap=True)
    else:
        log.info("%s", message)
