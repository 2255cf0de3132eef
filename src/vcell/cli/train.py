"""``vcell train st`` and ``vcell train se``: train the State Transition and State Embedding models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import (
    Accelerator,
    AllowMissingControls,
    BatchCol,
    CheckpointEvery,
    ContextCol,
    Control,
    Devices,
    Expression,
    HelpGroup,
    HoldoutPerturbations,
    MaxSteps,
    NumNodes,
    NumWorkers,
    Overwrite,
    PertCol,
    Precision,
    Resume,
    ResumeSE,
    SaveOptimizer,
    SaveOptimizerSE,
    Seed,
    Strategy,
    check_split_options,
    console,
    make_spec,
    split_config,
    split_view,
    table,
)
from vcell.errors import VcellError
from vcell.train.display import status
from vcell.train.options import SETrainOptions, STTrainOptions

app = typer.Typer(help="Train STATE models: ST on a log1p perturbation dataset, SE on any expression data.", no_args_is_help=True, rich_markup_mode=None, cls=HelpGroup)

ST = STTrainOptions()
SE = SETrainOptions()


def _summary(run: Path) -> None:
    """Print the training run's one summary line (steps, time, speed, checkpoints and their size)."""
    from vcell.train.progress import last_run

    summary = last_run()
    console.print(summary.line() if summary is not None else f"checkpoint: {run / 'last'}", highlight=False, soft_wrap=True)


def _options(cls, values: dict):
    """The run options among a command's parameters ``values``."""
    return cls.from_values({k: v for k, v in values.items() if k in cls.names()})


@app.command("st")
def st(
    data: Annotated[Path, typer.Option("--data", help="The log1p .h5ad dataset (run `vcell data preprocess` on counts).")],
    split: Annotated[Path | None, typer.Option("--split", help="cell-load style split TOML.")] = None,
    holdout_context: Annotated[list[str] | None, typer.Option("--holdout-context", help="Held-out (test) context, repeatable; never trained on.")] = None,
    val_context: Annotated[list[str] | None, typer.Option("--val-context", help="Validation context, repeatable (writes best/).")] = None,
    holdout_perturbations: HoldoutPerturbations = None,
    val_perturbations: Annotated[str | None, typer.Option("--val-perturbations", help="Validation perturbations in every context, never trained on (writes best/): FRACTION, LIST or FILE as --holdout-perturbations, drawn after it with --seed.")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Model size: small (for a CPU), default (STATE's default ST size, for a GPU) or large.")] = "small",
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of STConfig overrides (e.g. width, n_layers).")] = None,
    max_steps: MaxSteps = ST.max_steps,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Cell sets per step, over all processes (each of W processes takes 1/W).")] = ST.batch_size,
    set_size: Annotated[int, typer.Option("--set-size", help="Cells per set.")] = ST.set_size,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = ST.lr,
    out: Annotated[Path, typer.Option("--out", help="Run folder: last/, best/, logs/.")] = Path("vcell-st"),
    embed_key: Annotated[str | None, typer.Option("--embed-key", help="Train in this .obsm cell-embedding space (e.g. X_vcell from `vcell embed`) with a gene decoder back to X.")] = None,
    pert_features: Annotated[str, typer.Option("--pert-features", help="Perturbation vectors: onehot (the training targets), a gene table FILE (`vcell genes embed|from-data`; predicts any target in it) or onehot,FILE.")] = "onehot",
    resume: Resume = False,
    overwrite: Overwrite = False,
    save_optimizer: SaveOptimizer = ST.save_optimizer,
    checkpoint_every: CheckpointEvery = ST.checkpoint_every,
    accelerator: Accelerator = ST.accelerator,
    devices: Devices = ST.devices,
    num_nodes: NumNodes = ST.num_nodes,
    strategy: Strategy = ST.strategy,
    precision: Precision = ST.precision,
    num_workers: NumWorkers = ST.num_workers,
    backed: Annotated[bool, typer.Option("--backed/--in-memory", help="Stream the cell sets' rows from the file on disk (memory stays flat whatever its size) or load X first (faster when it fits).")] = False,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    expression: Expression = None,
    allow_missing_controls: AllowMissingControls = False,
    seed: Seed = 0,
) -> None:
    """Train a State Transition model; checkpoints go to OUT/last (and OUT/best with validation cells)."""
    from vcell.data.dataset import load_dataset
    from vcell.data.splits import apply_split, require_training_cells
    from vcell.nn.transition import STConfig
    from vcell.train.runs import check_run_dir

    check_split_options(split, holdout_context, holdout_perturbations, val_perturbations, val_context, required=False)
    from vcell.features.perturbations import check_sources

    options = _options(STTrainOptions, locals())
    check_run_dir(out, resume, overwrite, kind="st", max_steps=options.max_steps)  # refuse before the data is read
    check_sources(pert_features)
    # DDP runs this command once per process (Lightning re-runs it); only rank 0 reports
    values = STConfig.from_file(config, preset)
    spec = make_spec(pert_col, control, context_col, batch_col, expression)
    # only what training reads: a raw-counts layer or other .obsm entries would just take memory
    with status(f"reading {data}"):
        dataset = load_dataset(data, spec, backed=backed, only_obsm=None if backed else [embed_key] if embed_key else [],
                               require_context_controls=not allow_missing_controls)
    if dataset.spec.expression == "counts":
        raise VcellError(f"{data}: X holds raw counts; the ST model trains on log1p expression: run `vcell data preprocess` first")
    index = dataset.index
    cfg = split_config(index, split, list(holdout_context or []), holdout_perturbations, seed, list(val_context or []),
                       val_perturbations)
    applied = apply_split(index, cfg)
    require_training_cells(applied, cfg.source)
    # Lightning only now: every refusal above comes in a second, not after its import
    from lightning.pytorch.utilities import rank_zero_only

    from vcell.train.st import train_st

    if rank_zero_only.rank == 0:
        console.print(table(split_view(applied.summary(index)), title="split"))
        where = "streamed from disk (--backed)" if backed else "in memory (--in-memory)"
        console.print(f"data: {index.n_cells:,} cells x {dataset.adata.n_vars:,} genes, {where}", highlight=False, soft_wrap=True)
    run = train_st(dataset, applied, out, values, options, resume=resume, embed_key=embed_key, overwrite=overwrite,
                   pert_features=pert_features)
    if rank_zero_only.rank == 0:
        _summary(run)


@app.command("se")
def se(
    data: Annotated[list[Path], typer.Option("--data", help=".h5ad file (counts or log1p); repeat for several datasets.")],
    genes: Annotated[Path | None, typer.Option("--genes", help="Gene embedding table (.safetensors, .parquet or .pt); default: derived from the data.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder: last/, logs/.")] = Path("vcell-se"),
    preset: Annotated[str, typer.Option("--preset", help="Model size: tiny, small (for a CPU), default (the STATE preprint's SE size) or large.")] = "small",
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of SEConfig overrides (e.g. d_model, sentence_len, n_mask).")] = None,
    max_steps: MaxSteps = SE.max_steps,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Cells per step, over all processes.")] = SE.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate (warm-up, then cosine decay).")] = SE.lr,
    gene_dim: Annotated[int, typer.Option("--gene-dim", help="Width of data-derived gene embeddings (without --genes).")] = SE.gene_dim,
    resume: ResumeSE = False,
    overwrite: Overwrite = False,
    save_optimizer: SaveOptimizerSE = SE.save_optimizer,
    checkpoint_every: CheckpointEvery = SE.checkpoint_every,
    accelerator: Accelerator = SE.accelerator,
    devices: Devices = SE.devices,
    num_nodes: NumNodes = SE.num_nodes,
    strategy: Strategy = SE.strategy,
    precision: Precision = SE.precision,
    num_workers: NumWorkers = SE.num_workers,
    expression: Expression = None,
    seed: Seed = 0,
) -> None:
    """Train a State Embedding model (cell sentences -> cell embeddings); the checkpoint goes to OUT/last."""
    from vcell.data.io import read_h5ad
    from vcell.data.validate import check_expression
    from vcell.nn.embedding import SEConfig
    from vcell.train.runs import check_run_dir

    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    options = _options(SETrainOptions, locals())
    check_run_dir(out, resume, overwrite, kind="se", max_steps=options.max_steps)  # refuse before the data is read
    values = SEConfig.from_file(config, preset)
    for path in data:  # every file's values checked (one line naming it) before Lightning loads, in a second
        adata = read_h5ad(path, backed=True)
        try:
            check_expression(adata, expression, path)
        finally:
            adata.file.close()
    from lightning.pytorch.utilities import rank_zero_only  # Lightning only now: refusals come first

    from vcell.train.se import train_se

    run = train_se(data, out, values, genes=genes, options=options, resume=resume, expression=expression, overwrite=overwrite)
    if rank_zero_only.rank == 0:
        _summary(run)
