"""Shared CLI pieces: options, consoles, logging and the data spec built from options."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from vcell.data.spec import DataSpec
from vcell.errors import VcellError


class HelpGroup(TyperGroup):
    """A command group whose help lists each command's whole first sentence, wrapped.

    vcell's help is click's plain layout (``rich_markup_mode=None`` on every app): typer's rich
    tables cut long option names (``--holdout-conte…``) in an 80-column terminal. Click's own list
    of commands cuts each summary at the line's end; this one wraps it instead.
    """

    def format_commands(self, ctx, formatter) -> None:
        """The ``Commands:`` section, every summary whole."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

#: Width of output to a pipe or a file (a log has no width; 80 columns cropped the last column of wide tables).
LOG_WIDTH = 160


def _console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr): the terminal's width, or COLUMNS, or :data:`LOG_WIDTH` in a pipe or file."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        piped = not stream.isatty()
    except (AttributeError, ValueError):
        piped = True
    return Console(stderr=stderr, width=LOG_WIDTH if piped and "COLUMNS" not in os.environ else None)


console = _console()
err_console = _console(stderr=True)

PertCol = Annotated[str, typer.Option("--pert-col", help="obs column with the perturbation label.")]
Control = Annotated[str, typer.Option("--control", help="Label of control cells in the perturbation column.")]
ContextCol = Annotated[str, typer.Option("--context-col", help="obs column with the cell context; 'none' for one context.")]
BatchCol = Annotated[str | None, typer.Option("--batch-col", help="obs column with the batch (optional, e.g. gem_group): ST training (train st, bench's st) cuts its cell sets per batch and draws their control cells from that batch, as arc-state does; the other steps check the column and keep it (HVG selection is not per batch).")]
Expression = Annotated[
    str | None,
    typer.Option("--expression", help="'counts' or 'log1p'; default: read from the file's metadata, else decided from the values (vcell -v says which)."),
]
AllowMissingControls = Annotated[
    bool,
    typer.Option("--allow-missing-controls", help="Accept contexts without control cells (their perturbed cells go unused)."),
]
#: numpy's and Lightning's seeds are 32-bit: a seed outside [0, SEED_MAX] is a usage error, not a traceback.
SEED_MAX = 2**32 - 1
Seed = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed; the same seed gives the same numbers.")]
# Every command takes --seed so scripts can pass it uniformly; these commands draw no random numbers.
NoRandomSeed = Annotated[int, typer.Option("--seed", help="Accepted by every command; this one is deterministic and draws no random numbers.")]


def make_spec(pert_col: str, control: str, context_col: str, batch_col: str | None, expression: str | None) -> DataSpec:
    """Build a :class:`DataSpec` from CLI options ('none' disables the context column)."""
    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    ctx = None if context_col.lower() in ("none", "") else context_col
    return DataSpec(pert_col=pert_col, control=control, context_col=ctx, batch_col=batch_col or None, expression=expression)


# Third-party libraries whose warnings are about their own internals (deprecations, implicit
# conversions, duplicated names vcell reports itself): shown with `vcell -v` only.
_QUIET_MODULES = ("anndata", "scanpy", "scipy", "sklearn", "numba", "h5py", "pandas", "torch", "lightning",
                  "lightning_fabric", "pytorch_lightning", "legacy_api_wrap", "umap", "pynndescent", "numpy")


class _Once(logging.Filter):
    """Let each distinct message through once (the same file read twice is reported once)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """True the first time a message is seen."""
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


class _OnceWarned(_Once):
    """Let a warning through once per process (a file validated again after a conversion repeats them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True for every record below WARNING, and for a warning the first time its text is seen."""
        return record.levelno < logging.WARNING or super().filter(record)


def secondary_rank() -> str | None:
    """``"rank N"`` when this process is a distributed run's process other than rank 0, as its
    launcher's environment says (a world of several processes: ``WORLD_SIZE``, which torchrun and
    Lightning set for the processes they start, or Slurm's ``SLURM_NTASKS``; the rank: ``RANK``,
    else ``NODE_RANK`` / ``LOCAL_RANK``, else ``SLURM_PROCID``), else ``None``. Every process runs
    the same command: such a process keeps its warnings to itself and labels its errors, which
    mostly repeat rank 0's."""
    env = os.environ

    def number(key: str) -> int:
        try:
            return int(env.get(key, "0").strip() or 0)
        except ValueError:
            return 0

    if max(number("WORLD_SIZE"), number("SLURM_NTASKS")) <= 1:
        return None
    if "RANK" in env:
        rank = number("RANK")
    elif "LOCAL_RANK" in env or "NODE_RANK" in env:
        node, local = number("NODE_RANK"), number("LOCAL_RANK")
        return None if node == local == 0 else (f"rank {local}" if node == 0 else f"node {node}, process {local}")
    else:
        rank = number("SLURM_PROCID")
    return f"rank {rank}" if rank else None


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr through rich: vcell's own lines only (INFO; ``-v``: DEBUG; ``-q``: warnings).

    Other libraries log warnings and errors only (INFO with ``-v``, never their DEBUG lines), and
    their Python warnings are hidden unless ``-v``: what the user sees is what vcell says.
    """
    import warnings

    own = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    if secondary_rank():  # rank 0 says it
        own = logging.ERROR
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    handler.addFilter(_OnceWarned())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("vcell").setLevel(own)
    inferred = logging.getLogger("vcell.inferred")  # what vcell decided for the user: with -v, each said once
    inferred.setLevel(logging.INFO if verbose else logging.WARNING)
    inferred.filters[:] = [_Once()]
    for noisy in ("numba", "matplotlib", "h5py", "fsspec", "urllib3", "numcodecs", "PIL", "fontTools", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        for module in _QUIET_MODULES:
            warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


_ARGS: list[str] = []


def set_args(args: list[str]) -> None:
    """Remember the command line (for :func:`spelled`)."""
    _ARGS[:] = [str(a) for a in args]


def cli_args() -> list[str]:
    """The command line as remembered by :func:`set_args`."""
    return list(_ARGS)


def given(*names: str) -> str | None:
    """The value typed after an option (``--seed x`` or ``--seed=x``; the last one if repeated), else ``None``."""
    value = None
    for i, arg in enumerate(_ARGS):
        for name in names:
            if arg == name and i + 1 < len(_ARGS):
                value = _ARGS[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
    return value


def spelled(*names: str) -> str:
    """The spelling of an option that has aliases as the user typed it (the first of ``names`` if not typed)."""
    for arg in _ARGS:
        for name in names:
            if arg == name or arg.startswith(name + "="):
                return name
    return names[0]


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system fault: the file at fault and what went wrong (no traceback)."""
    what = exc.strerror or type(exc).__name__
    files = [str(f) for f in (exc.filename, getattr(exc, "filename2", None)) if f]
    return f"{' -> '.join(files)}: {what}" if files else f"{what} ({exc})"


def _flag_type(original):
    def display_type_rich(self, ctx):
        """No ``<bool>`` beside a flag in ``--help``: a flag takes no value."""
        return None if self.is_flag else original(self, ctx)

    return display_type_rich


# typer's rich help shows a type beside every option, '<bool>' for flags (--help included); flags
# take no value, so they show none. One place for every command.
TyperOption.display_type_rich = _flag_type(TyperOption.display_type_rich)


def table(df, title: str | None = None) -> Table:
    """A rich table of a pandas DataFrame. Names are not cut: on a narrow terminal (or COLUMNS=80)
    numeric columns' headers wrap, and, if still too wide, text columns after the first. A NaN
    (no value: e.g. an ``avg_score`` row's inputs) shows as "–", as in the report."""
    from rich import box

    t = Table(title=title, show_lines=False, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cells = [[("–" if v != v else f"{v:.4g}") if isinstance(v, float) else str(v) for v in df[col]] for col in df.columns]
    numeric = [df[col].dtype.kind in "iuf" for col in df.columns]
    widths = [max(map(len, values), default=1) for values in cells]
    # text columns whole (headers too) when the table fits, else those after the first may wrap;
    # a numeric column's header wraps between its words when needed, so its values and its longest word count
    least = [max(w, *(len(word) for word in str(c).split())) if num else None for w, num, c in zip(widths, numeric, df.columns)]
    fits = sum(m if num else max(w, len(str(c))) for w, m, num, c in zip(widths, least, numeric, df.columns)) + 2 * len(widths) <= console.width
    for i, (col, num, m) in enumerate(zip(df.columns, numeric, least)):
        t.add_column(str(col), justify="right" if num else "left", no_wrap=not num and (fits or i == 0), min_width=m)
    for row in zip(*cells):
        t.add_row(*row)
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
MaxSteps = Annotated[int, typer.Option("--max-steps", help="Training steps (a resumed run continues up to this step; one already there is an error, exit 2).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last at its step, e.g. after Ctrl-C, with the same data, split, columns and training options (seed, --lr, --batch-size, --set-size, --precision; --devices may change).")]
ResumeSE = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last at its step, e.g. after Ctrl-C, with the same --data files, --preset/--config, --genes and training options (seed, --lr, --batch-size, --precision; --devices may change); the gene table (and its --gene-dim) is the checkpoint's.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a trained run in OUT: its checkpoints (last/, best/) and logs/version_N/ are set aside, deleted once the new run has saved a checkpoint and put back if it stops before; other files are kept. Without it an existing run is never replaced.")]
SaveOptimizer = Annotated[bool, typer.Option("--save-optimizer/--no-save-optimizer", help="Keep the optimiser state in OUT/last (needed for --resume; about twice the weights' size). OUT/best never holds it.")]
SaveOptimizerSE = Annotated[bool, typer.Option("--save-optimizer/--no-save-optimizer", help="Keep the optimiser state in OUT/last (needed for --resume; about twice the weights' size).")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", help="Write last/ every N steps.")]
Accelerator = Annotated[str, typer.Option("--accelerator", help="auto, cpu or gpu.")]
Devices = Annotated[int, typer.Option("--devices", help="Processes (GPUs, or CPU processes) per node; > 1 trains with DDP.")]
NumNodes = Annotated[int, typer.Option("--num-nodes", help="Nodes (multi-node: launch one task per device with srun/torchrun).")]
Strategy = Annotated[str, typer.Option("--strategy", help="auto (DDP when devices x nodes > 1) or ddp.")]
Precision = Annotated[str, typer.Option("--precision", help="32 (default), bf16-mixed (CPU or GPU; fast on CPUs with AVX512-BF16/AMX) or 16-mixed (GPU only).")]
NumWorkers = Annotated[int, typer.Option("--num-workers", help="Data loader worker processes.")]


# How a split is given (vcell data split|subset, vcell train st): a TOML file or held-out contexts/perturbations.
HoldoutPerturbations = Annotated[str | None, typer.Option(
    "--holdout-perturbations", metavar="FRACTION|LIST|FILE",
    help="Hold out perturbations in every context (test, never trained on): a fraction in (0, 1) of the non-control labels, "
         "drawn with --seed, comma-separated labels, or a file of them (.csv/.tsv: first column, with a header, as the "
         "challenge's pert_counts.csv; .txt: one a line); an A+B label is one label. Alone or with --holdout-context.")]


def check_split_options(split, holdout_context, holdout_perturbations, val_perturbations=None, val_context=None,
                        required: bool = True) -> None:
    """A split comes from --split FILE or from --holdout-context/--holdout-perturbations, never both
    (``required=False``: or from none of them, e.g. training on every cell)."""
    made = bool(holdout_context) or holdout_perturbations is not None
    if split is not None and (made or val_perturbations is not None or val_context):
        raise VcellError("give either --split FILE or --holdout-context/--holdout-perturbations (with --val-*), not both")
    if required and split is None and not made:
        raise VcellError("give one of --split FILE, --holdout-context NAME or --holdout-perturbations FRACTION|LIST|FILE")
    from vcell.data.perturbation_lists import parse_perturbations

    for option, value in (("--holdout-perturbations", holdout_perturbations), ("--val-perturbations", val_perturbations)):
        if value is not None:
            parse_perturbations(value, option)  # a bad fraction is named before the data is read


def split_config(index, split, holdout_context, holdout_perturbations, seed, val_context=None, val_perturbations=None):
    """The split the options give: a TOML file, held-out contexts, held-out perturbations, or both."""
    from vcell.data import splits
    from vcell.data.split_files import read_split_toml

    if split is not None:
        return read_split_toml(split)
    if holdout_perturbations is None and val_perturbations is None:
        return splits.holdout_config(index, holdout_context, val_contexts=val_context or [])
    return splits.holdout_perturbations(index, holdout_perturbations or (), seed, contexts=holdout_context or [],
                                        val=val_perturbations or (), val_contexts=val_context or [])
