"""``vcell genes ...``: gene embedding tables (ESM protein embeddings, or a data-derived fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import Control, Expression, HelpGroup, NoRandomSeed, PertCol, Seed, console
from vcell.errors import VcellError

app = typer.Typer(help="Gene embeddings: protein language model vectors or a co-expression fallback.", no_args_is_help=True, rich_markup_mode=None, cls=HelpGroup)

Out = Annotated[Path, typer.Option("--out", help="Output gene table (.safetensors).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]


def _summary(emb, skipped: str) -> None:
    from rich.table import Table

    t = Table(title="gene embeddings", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("genes", f"{len(emb.names):,}")
    t.add_row("dim", str(emb.dim))
    t.add_row("source", emb.source)
    if "isoforms" in emb.info:
        t.add_row("isoforms per gene", f"{emb.info['isoforms_per_gene_mean']:.2f} mean, {emb.info['isoforms_per_gene_max']} max")
        t.add_row("proteins chunked", f"{emb.info['proteins_chunked']} (longer than {emb.info['max_residues']} residues)")
    if "cells" in emb.info:
        t.add_row("cells used", f"{emb.info['cells']:,}")
    if "expression" in emb.info:
        t.add_row("expression", emb.info["expression"])
    t.add_row("genes skipped", skipped)
    console.print(t)


@app.command("embed")
def embed(
    fasta: Annotated[Path, typer.Option("--fasta", help="Protein FASTA; headers name the gene (GN=, gene_symbol: or first word).")],
    esm_model: Annotated[Path, typer.Option("--esm-model", help="Local folder of a Hugging Face ESM2 model (config.json, weights, vocab.txt).")],
    out: Out = Path("genes.safetensors"),
    header_regex: Annotated[str | None, typer.Option("--header-regex", help="Regex with one capture group: the gene symbol in each header.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Token budget per batch (sequences x padded length).")] = 4096,
    device: Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda or cuda:N.")] = "cpu",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    overwrite: Overwrite = False,
    seed: NoRandomSeed = 0,
) -> None:
    """Embed proteins with ESM2 (mean over residues, then isoforms) into a gene x dim table; resumable."""
    from vcell.data.io import check_output_path
    from vcell.features.protein import embed_fasta

    check_output_path(out, [fasta], overwrite)
    emb = embed_fasta(fasta, esm_model, out, header_regex=header_regex, max_tokens=max_tokens, device=device, seed=seed, progress=progress)
    _summary(emb, "0 (every record maps to a gene)")
    console.print(f"wrote {out}")


@app.command("from-data")
def from_data(
    data: Annotated[Path, typer.Option("--data", help="The .h5ad dataset (log1p, or raw counts: normalised per cell first); its control cells are used.")],
    out: Out = Path("genes.safetensors"),
    dim: Annotated[int, typer.Option("--dim", help="Vector length (capped by the numbers of cells and genes).")] = 128,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    expression: Expression = None,
    target_sum: Annotated[float, typer.Option("--target-sum", help="Raw counts only: counts per cell after normalize_total, before log1p (as `vcell data preprocess`).")] = 1e4,
    overwrite: Overwrite = False,
    seed: Seed = 0,
) -> None:
    """Gene vectors without a protein model: PCA of gene co-expression in the control cells."""
    from vcell.data.io import check_output_path, read_h5ad
    from vcell.data.validate import check_expression
    from vcell.eval.inputs import perturbation_labels
    from vcell.features.genes import data_gene_embeddings

    if not target_sum > 0:
        raise VcellError(f"--target-sum must be > 0, got {target_sum:g}")
    check_output_path(out, [data], overwrite)
    adata = read_h5ad(data, backed=True)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise VcellError(f"{data}: no data ({adata.n_obs} cells x {adata.n_vars} genes)")
    mask = (perturbation_labels(adata, pert_col, str(data), control) == control).to_numpy()  # named with a did-you-mean
    counts = check_expression(adata, expression, data).type == "counts"
    try:
        emb = data_gene_embeddings(adata, dim=dim, control_mask=mask, seed=seed, counts_target_sum=target_sum if counts else None)
    except VcellError as exc:  # the table's own checks (an empty or repeated gene name) name no file
        raise VcellError(f"{data}: {exc}") from None
    emb.save(out)
    _summary(emb, f"{emb.info['genes_zero_variance']:,} (no variance in the controls: zero vectors)")
    console.print(f"wrote {out}")
