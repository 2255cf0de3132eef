"""The ``vcell`` command line: one command, grouped subcommands."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Annotated

import typer
from rich.markup import escape

try:  # typer 0.2x carries its own copy of click; older typer uses click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError

from vcell._version import __version__
from vcell.cli import data as data_cli
from vcell.cli import eval as eval_cli
from vcell.cli import genes as genes_cli
from vcell.cli.bench import bench
from vcell.cli.common import HelpGroup, cli_args, err_console, given, os_error_message, secondary_rank, set_args, setup_logging
from vcell.cli.demo import demo
from vcell.cli.embed import embed
from vcell.cli.predict import predict
from vcell.cli.train import app as train_app
from vcell.errors import STOP_SIGNALS, Interrupted, VcellError
from vcell.train.display import on_terminal, show_progress


class _Stopped(Exception):
    """A Ctrl-C inside a command, carried past click (which would print 'Aborted!' and exit 1) to :func:`main`."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def _usage_error(exc: UsageError, root) -> VcellError:
    """Click's usage error (a missing or unknown option, a bad value, an unknown command) as the one
    ``error:`` line every other bad input gets, instead of typer's boxed usage text. ``root``: the
    ``vcell`` group, to name the command typed when click gives no context (an option without its value)."""
    message = exc.format_message().strip().rstrip(".")
    message = message[:1].lower() + message[1:]
    value = given(*getattr(getattr(exc, "param", None), "opts", ()))
    if value is not None and repr(value) not in message:  # typer's messages for a bad number omit the value
        message = f"{message} (got {value!r})"
    path = exc.ctx.command_path if exc.ctx is not None else _typed_command(root)
    return VcellError(f"{path}: {message}; see '{path} --help'")


def _typed_command(root) -> str:
    """The command the user typed (``vcell eval run``): the leading words of the command line that name groups and commands."""
    cmd, words = root, ["vcell"]
    for arg in cli_args():
        sub = getattr(cmd, "commands", {}).get(arg)
        if sub is None:
            if arg.startswith("-") and not words[1:]:
                continue  # the top-level options (-v, -q) come before the command
            break
        cmd = sub
        words.append(arg)
    return " ".join(words)


@contextlib.contextmanager
def _one_line_usage_errors(root):
    """Click's usage errors inside as :class:`VcellError` (a group called without a command still shows its help)."""
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as exc:
        raise _usage_error(exc, root) from None


class _Group(HelpGroup):
    """The ``vcell`` group: a Ctrl-C anywhere in a command reaches :func:`main` as :class:`_Stopped`;
    a usage error anywhere as :class:`VcellError`."""

    def make_context(self, info_name, args, parent=None, **extra):
        """Parse the top-level options; a usage error becomes :class:`VcellError`."""
        with _one_line_usage_errors(self):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        """Run the command; turn a ``KeyboardInterrupt`` into :class:`_Stopped`, a usage error into :class:`VcellError`."""
        try:
            with _one_line_usage_errors(self):
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Stopped(exc) from None


app = typer.Typer(
    cls=_Group,
    name="vcell",
    help="Virtual cell modelling: predict perturbation responses in unseen cell contexts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(data_cli.app, name="data")
app.add_typer(eval_cli.app, name="eval")
app.add_typer(genes_cli.app, name="genes")
app.command("bench")(bench)
app.command("demo")(demo)
app.add_typer(train_app, name="train")
app.command("predict")(predict)
app.command("embed")(embed)


def _version(value: bool) -> None:
    if value:
        print(f"vcell {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also say what vcell decided for you (e.g. the expression type of each file), debug lines and other libraries' warnings.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """vcell: data, evaluation, baselines and STATE-style models for perturbation prediction."""
    setup_logging(verbose=verbose, quiet=quiet)
    show_progress(not quiet, err_console)  # progress bars on stderr; -q: none


# STOP_SIGNALS stop a command as Ctrl-C does: its partial outputs are removed (training saves a
# checkpoint first), one line says so, and the status is 128 + the signal's number. By default
# Python would die at once, leaving temporary files.
_received: list[int] = []


def _stop_on_signal(signum, frame) -> None:
    """A SIGTERM or SIGHUP, raised as the ``KeyboardInterrupt`` a Ctrl-C would be (the same clean-up)."""
    _received.append(signum)
    raise KeyboardInterrupt


def _stop_status(exc: BaseException | None = None) -> tuple[int, str]:
    """Exit status and message prefix of a stopped command: 130 for Ctrl-C, 128 + N for signal N."""
    signum = _received[0] if _received else getattr(exc, "signum", None)
    if signum is None:
        return Interrupted.exit_code, ""
    return 128 + signum, f"{signal.Signals(signum).name}: "


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes print one ``error:`` line and exit 2, with no traceback; Ctrl-C prints
    one line saying what was saved (or that nothing was written) and exits 130 (SIGTERM, SIGHUP: the
    same, exit 128 + the signal's number)."""
    set_args(sys.argv[1:] if argv is None else argv)
    rank = secondary_rank()  # now: Lightning's teardown removes WORLD_SIZE from the environment
    if argv is None:  # the process's own command line: a signal ends this command
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:  # an ignored one (nohup) stays ignored
                signal.signal(signum, _stop_on_signal)
    try:
        try:
            app(args=argv, prog_name="vcell")  # not 'python -m vcell' in messages
        except VcellError as exc:
            _print_error(str(exc), rank)
            sys.exit(exc.exit_code)
        except OSError as exc:  # an ordinary fault of the system (permission denied, disk full, ...): one line too
            _print_error(os_error_message(exc), rank)
            sys.exit(VcellError.exit_code)
        except (MemoryError, ImportError) as exc:
            # out of memory under an address-space limit (ulimit -v, a job's memory limit): a fault of the
            # machine, not of the input; a library loaded then fails to map its code ("failed to map segment")
            if isinstance(exc, ImportError) and not ("failed to map segment" in str(exc) and _memory_limited()):
                raise  # e.g. the same words for a library on a noexec mount: its own traceback says which
            _print_error(_out_of_memory_message(exc), rank)
            sys.exit(1)
        except _Stopped as stopped:
            exc = stopped.interrupt
            status, by = _stop_status(exc)
            if not getattr(exc, "quiet", False):
                if on_terminal(err_console) and not by:
                    err_console.print()  # past the terminal's ^C echo
                text = str(exc) if isinstance(exc, Interrupted) and str(exc) else Interrupted().args[0]
                err_console.print(escape(by + text), highlight=False, soft_wrap=True)
            sys.exit(status)
    except KeyboardInterrupt:  # a Ctrl-C while a result or an error was being reported
        sys.exit(_stop_status()[0])
    finally:
        if argv is None:  # the process's own command line: it ends now
            for signum in (signal.SIGINT, *STOP_SIGNALS):
                signal.signal(signum, _exit_interrupted)


def _memory_limited() -> bool:
    """Whether this process runs under an address-space or data-size limit (``ulimit -v`` / ``-d``)."""
    try:
        import resource
    except ImportError:
        return False
    return any(resource.getrlimit(r)[0] != resource.RLIM_INFINITY for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA))


def _out_of_memory_message(exc: BaseException) -> str:
    """The one line for a command that ran out of memory."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    what = lines[-1] if lines else type(exc).__name__  # a worker's MemoryError carries its traceback; the cause is last
    return (f"out of memory ({what}): give this command more memory (a larger machine or job, a higher ulimit -v), or "
            "let it stream from disk where it can (see its --help: --backed, --memory-budget)")


def _print_error(message: str, rank: str | None) -> None:
    """The one ``error:`` line; a distributed run's other processes (``rank``: :func:`secondary_rank`)
    label theirs (``[rank 1] error: ...``): mostly rank 0's check again, but a file missing on one
    node is said only there."""
    label = f"[{rank}] " if rank else ""
    err_console.print(f"{escape(label)}[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _exit_interrupted(signum, frame) -> None:
    """SIGINT (SIGTERM, SIGHUP) once the command is done (the interpreter closing files, removing
    temporary folders): end at once with status 130 (128 + N), without a traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(Interrupted.exit_code if signum == signal.SIGINT else 128 + signum)
