"""The ``vcell`` command line: one command, grouped subcommands."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from vcell._version import __version__
from vcell.cli import data as data_cli
from vcell.cli import eval as eval_cli
from vcell.cli import genes as genes_cli
from vcell.cli.bench import bench
from vcell.cli.common import err_console, setup_logging
from vcell.cli.demo import demo
from vcell.cli.embed import embed
from vcell.cli.predict import predict
from vcell.cli.train import app as train_app
from vcell.errors import VcellError

app = typer.Typer(
    name="vcell",
    help="Virtual cell modelling: predict perturbation responses in unseen cell contexts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """vcell: data, evaluation, baselines and STATE-style models for perturbation prediction."""
    setup_logging(verbose=verbose, quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes print one ``error:`` line and exit 2, with no traceback."""
    try:
        app(args=argv)
    except VcellError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
