"""``vcell embed``: cell embeddings from a trained State Embedding model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import Expression, Seed, console
from vcell.errors import VcellError
from vcell.train.display import format_duration, status, task


def embed(
    model: Annotated[Path, typer.Option("--model", help="SE checkpoint folder (or a `vcell train se` run folder).")],
    data: Annotated[Path, typer.Option("--data", help="Input .h5ad (counts or log1p); never modified.")],
    out: Annotated[Path, typer.Option("--out", help="Output .h5ad: a copy of DATA with the embeddings in .obsm[KEY].")],
    key: Annotated[str, typer.Option("--key", help="obsm key of the embeddings.")] = "X_vcell",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Cells per forward pass.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    expression: Expression = None,
    seed: Seed = 0,
) -> None:
    """Embed every cell of DATA with a trained SE model; genes missing from the model's vocabulary are reported."""
    import time

    import torch

    from vcell.data.io import check_output_path, read_h5ad, write_h5ad
    from vcell.data.validate import check_expression
    from vcell.nn.embedding import StateEmbedding, embed_adata

    if batch_size < 1:
        raise VcellError(f"--batch-size must be >= 1, got {batch_size}")
    if not key.strip():
        raise VcellError("--key must not be empty")
    if "/" in key:  # h5ad stores obsm[key] at obsm/KEY: a '/' makes a group no reader opens as a matrix
        raise VcellError(f"--key {key!r}: an obsm key cannot contain '/'")
    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    check_output_path(out, [data], overwrite=overwrite)
    t0 = time.perf_counter()
    with status(f"reading {data}"):
        adata = read_h5ad(data)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise VcellError(f"{data}: no data ({adata.n_obs} cells x {adata.n_vars} genes)")
    if key in adata.obsm:
        raise VcellError(f"--key {key!r}: {data} already has .obsm[{key!r}]; choose another key")
    kind = check_expression(adata, expression, data).type  # NaN/negative input never becomes NaN embeddings
    se, meta = StateEmbedding.from_checkpoint(model)
    if torch.cuda.is_available():
        se = se.cuda()
    with task("embedding cells", total=adata.n_obs, unit="cells") as line:
        emb, missing = embed_adata(se, meta, adata, kind, batch_size=batch_size, seed=seed, where=str(data), progress=line.advance)
    adata.obsm[key] = emb
    with status(f"writing {out}"):
        write_h5ad(adata, out)
    n_genes = adata.n_vars
    note = f"; {len(missing)} of {n_genes} genes not in the model's vocabulary were ignored" if missing else ""
    console.print(f"wrote {out} in {format_duration(time.perf_counter() - t0)}: .obsm[{key!r}] = {emb.shape[0]:,} cells x {emb.shape[1]:,}{note}",
                  highlight=False, soft_wrap=True)
