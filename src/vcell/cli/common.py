"""Shared CLI pieces: options, consoles, logging and the data spec built from options."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from vcell.data.spec import DataSpec
from vcell.errors import VcellError

console = Console()
err_console = Console(stderr=True)

PertCol = Annotated[str, typer.Option("--pert-col", help="obs column with the perturbation label.")]
Control = Annotated[str, typer.Option("--control", help="Label of control cells in the perturbation column.")]
ContextCol = Annotated[str, typer.Option("--context-col", help="obs column with the cell context; 'none' for one context.")]
BatchCol = Annotated[str | None, typer.Option("--batch-col", help="obs column with the batch (optional).")]
Expression = Annotated[
    str | None,
    typer.Option("--expression", help="'counts' or 'log1p'; default: read from the file's metadata (logged)."),
]
AllowMissingControls = Annotated[
    bool,
    typer.Option("--allow-missing-controls", help="Accept contexts without control cells (their perturbed cells go unused)."),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same numbers.")]
# Every command takes --seed so scripts can pass it uniformly; these commands draw no random numbers.
NoRandomSeed = Annotated[int, typer.Option("--seed", help="Accepted by every command; this one is deterministic and draws no random numbers.")]


def make_spec(pert_col: str, control: str, context_col: str, batch_col: str | None, expression: str | None) -> DataSpec:
    """Build a :class:`DataSpec` from CLI options ('none' disables the context column)."""
    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    ctx = None if context_col.lower() in ("none", "") else context_col
    return DataSpec(pert_col=pert_col, control=control, context_col=ctx, batch_col=batch_col or None, expression=expression)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr through rich; INFO by default so inferred settings are always shown."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("numba", "matplotlib", "h5py", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def table(df, title: str | None = None) -> Table:
    """A rich table of a pandas DataFrame."""
    t = Table(title=title, show_lines=False, header_style="bold")
    for i, col in enumerate(df.columns):
        t.add_column(str(col), justify="right" if df[col].dtype.kind in "iuf" else "left", no_wrap=i == 0)
    for row in df.itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return t


def split_view(summary):
    """Compact view of a split summary: 'perturbations / cells' per role, empty roles hidden."""
    import pandas as pd

    view = pd.DataFrame({"context": summary["context"], "controls": summary["controls"]})
    for role in ("train", "val", "test", "unused"):
        if summary[f"{role}_cells"].sum() > 0:
            view[f"{role} (perts/cells)"] = [f"{p} / {c}" for p, c in zip(summary[f"{role}_perts"], summary[f"{role}_cells"])]
    return view

# Options shared by the training commands (vcell train st|se); their defaults come from vcell.train.options.
MaxSteps = Annotated[int, typer.Option("--max-steps", help="Training steps (a resumed run continues up to this step).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", help="Write last/ every N steps.")]
Accelerator = Annotated[str, typer.Option("--accelerator", help="auto, cpu or gpu.")]
Devices = Annotated[int, typer.Option("--devices", help="Processes (GPUs, or CPU processes) per node; > 1 trains with DDP.")]
NumNodes = Annotated[int, typer.Option("--num-nodes", help="Nodes (multi-node: launch one task per device with srun/torchrun).")]
Strategy = Annotated[str, typer.Option("--strategy", help="auto (DDP when devices x nodes > 1) or ddp.")]
Precision = Annotated[str, typer.Option("--precision", help="32 (default), bf16-mixed (CPU or GPU; fast on CPUs with AVX512-BF16/AMX) or 16-mixed (GPU only).")]
NumWorkers = Annotated[int, typer.Option("--num-workers", help="Data loader worker processes.")]
