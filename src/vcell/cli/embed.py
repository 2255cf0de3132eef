"""``vcell train se`` and ``vcell embed``: train a State Embedding model, write cell embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import (
    Accelerator,
    CheckpointEvery,
    Devices,
    Expression,
    NumNodes,
    NumWorkers,
    Precision,
    Resume,
    Seed,
    Strategy,
    console,
)
from vcell.errors import VcellError


def train_se(
    data: Annotated[list[Path], typer.Option("--data", help=".h5ad file (counts or log1p); repeat for several datasets.")],
    genes: Annotated[Path | None, typer.Option("--genes", help="Gene embedding table (.safetensors, .parquet or .pt); default: derived from the data.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder: last/, logs/.")] = Path("vcell-se"),
    preset: Annotated[str, typer.Option("--preset", help="Model size: tiny, small (CPU), default or large.")] = "small",
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of SEConfig overrides (e.g. d_model, sentence_len, n_mask).")] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Training steps (small on Kang, 2,000 cells: ~5 min on 2 CPU cores).")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Cells per step, over all processes.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate (warm-up, then cosine decay).")] = 3e-3,
    gene_dim: Annotated[int, typer.Option("--gene-dim", help="Width of data-derived gene embeddings (without --genes).")] = 128,
    resume: Resume = False,
    checkpoint_every: CheckpointEvery = 100,
    accelerator: Accelerator = "auto",
    devices: Devices = 1,
    num_nodes: NumNodes = 1,
    strategy: Strategy = "auto",
    precision: Precision = "32",
    num_workers: NumWorkers = 0,
    expression: Expression = None,
    seed: Seed = 0,
) -> None:
    """Train a State Embedding model (cell sentences -> cell embeddings); the checkpoint goes to OUT/last."""
    from lightning.pytorch.utilities import rank_zero_only

    from vcell.cli.train import read_config_file
    from vcell.models.embedding import SEConfig
    from vcell.train.se import train_se as run_train_se

    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    values = SEConfig.preset_values(preset, read_config_file(config) if config is not None else {})
    with console.status(f"training SE ({preset}) for {max_steps} steps"):
        run = run_train_se(
            data, out, values, genes=genes, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, resume=resume,
            expression=expression, gene_dim=gene_dim, checkpoint_every=checkpoint_every, accelerator=accelerator,
            devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, num_workers=num_workers,
        )
    if rank_zero_only.rank == 0:
        console.print(f"checkpoint: {run / 'last'}")


def embed(
    model: Annotated[Path, typer.Option("--model", help="SE checkpoint folder (or a `vcell train se` run folder).")],
    data: Annotated[Path, typer.Option("--data", help="Input .h5ad (counts or log1p); never modified.")],
    out: Annotated[Path, typer.Option("--out", help="Output .h5ad: a copy of DATA with the embeddings in .obsm[KEY].")],
    key: Annotated[str, typer.Option("--key", help="obsm key of the embeddings.")] = "X_vcell",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Cells per forward pass.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    expression: Expression = None,
    seed: Seed = 0,
) -> None:
    """Embed every cell of DATA with a trained SE model; genes missing from the model's vocabulary are reported."""
    import torch

    from vcell.data.io import check_output_path, read_h5ad, write_h5ad
    from vcell.data.validate import infer_expression_type
    from vcell.train.se import embed_adata, load_se

    if batch_size < 1:
        raise VcellError(f"--batch-size must be >= 1, got {batch_size}")
    if not key.strip():
        raise VcellError("--key must not be empty")
    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    check_output_path(out, [data], overwrite=overwrite)
    se, meta = load_se(model)
    adata = read_h5ad(data)
    if adata.n_obs == 0:
        raise VcellError(f"{data}: the file has no cells")
    if key in adata.obsm:
        raise VcellError(f"--key {key!r}: {data} already has .obsm[{key!r}]; choose another key")
    kind = infer_expression_type(adata, expression, path=data).type
    if torch.cuda.is_available():
        se = se.cuda()
    emb, missing = embed_adata(se, meta, adata, kind, batch_size=batch_size, seed=seed, where=str(data))
    adata.obsm[key] = emb
    write_h5ad(adata, out)
    n_genes = adata.n_vars
    note = f"; {len(missing)} of {n_genes} genes not in the model's vocabulary were ignored" if missing else ""
    console.print(f"wrote {out}: .obsm[{key!r}] = {emb.shape[0]} cells x {emb.shape[1]}{note}")
