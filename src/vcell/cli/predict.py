"""``vcell predict``: predicted cells of a context from a trained ST checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import Expression, Precision, Seed, console
from vcell.data.spec import DataSpec
from vcell.errors import VcellError
from vcell.train.display import format_duration, status


def predict(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (or a `vcell train st` run folder).")],
    data: Annotated[Path, typer.Option("--data", help="log1p .h5ad holding the context's control cells.")],
    context: Annotated[str, typer.Option("--context", help="Context to predict (its control cells are the input); DATASET.CONTEXT, as `vcell data split` names it, works too.")],
    out: Annotated[Path, typer.Option("--out", help="Predicted cells (.h5ad): log1p with the real controls appended, or counts (--output counts).")],
    perturbations: Annotated[str, typer.Option("--perturbations", help="'data' (those with cells of the context in DATA, as many cells as observed: ready to score against them), 'all' (every one the model was trained on), A,B,... or a CSV with a header (the challenge's pert_counts.csv: names, then cells each; its control row skipped)")] = "data",
    cells_per_pert: Annotated[int | None, typer.Option("--cells-per-pert", "--cells-per-perturbation", help="Cells per perturbation; default: as many as observed ('data') or listed (a CSV's second column), else 100.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="In a run folder: best (else last) or last.")] = "best",
    set_size: Annotated[int | None, typer.Option("--set-size", help="Largest cell set fed to the model; default: the set size it was trained with (a set's cells attend to each other, so it changes the numbers).")] = None,
    pert_col: Annotated[str | None, typer.Option("--pert-col", help="obs column with the perturbation; default: the model's.")] = None,
    control: Annotated[str | None, typer.Option("--control", help="Control label; default: the model's.")] = None,
    context_col: Annotated[str | None, typer.Option("--context-col", help="obs column with the context; default: the model's.")] = None,
    batch_col: Annotated[str | None, typer.Option("--batch-col", help="obs column with the batch (optional; checked and kept: a predicted cell starts from a control cell of the context, any batch).")] = None,
    output: Annotated[str, typer.Option("--output", help="'log1p' (predicted cells + real controls) or 'counts': integral raw counts of the predicted cells only, no control rows, as a VCC 2026 submission takes them.")] = "log1p",
    depth: Annotated[str, typer.Option("--depth", help="With --output counts: counts per cell, 'controls' (each cell at the library size of the real control cell it started from; needs DATA's raw counts: layers['counts'], .raw.X holding integer counts, or an obs total (total_counts, nCount_RNA, n_counts, ncounts) when X is log1p normalised by it) or a number (e.g. 20000: exactly that many per cell). --seed seeds the draw.")] = "controls",
    all_genes: Annotated[Path | None, typer.Option("--all-genes", help="Raw-count .h5ad that DATA was preprocessed from (same cell names): write every gene of it, in its order, as a full challenge submission needs; the genes the model does not predict are taken from the control cell each predicted cell started from (counts: its own counts; log1p: normalised as preprocessing did).")] = None,
    log1p_out: Annotated[Path | None, typer.Option("--log1p-out", help="With --output counts: also write the log1p cells the counts are drawn from (the model's genes, the real controls appended: what --output log1p writes without --all-genes) to this .h5ad. One prediction for both files, so a 2025 score of it and a 2026 score of OUT judge the same cells.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT (and --log1p-out) if it exists.")] = False,
    precision: Precision = "32",
    expression: Expression = None,
    seed: Seed = 0,
) -> None:
    """Predict perturbed cells of CONTEXT from its real control cells with a trained ST model (log1p, or raw counts with --output counts)."""
    from vcell.data.dataset import load_dataset, missing_obsm_error
    from vcell.data.io import check_output_path
    from vcell.data.perturbation_lists import LIST_FILES, read_label_file, read_perturbation_table
    from vcell.nn.checkpoint import run_checkpoints
    from vcell.predictors.counts import parse_depth, parse_output
    from vcell.predictors.predict import check_log1p_out, write_prediction
    from vcell.predictors.st import STPredictor

    if cells_per_pert is not None and cells_per_pert < 1:
        raise VcellError(f"--cells-per-pert must be >= 1, got {cells_per_pert}")
    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    if checkpoint not in ("best", "last"):
        raise VcellError(f"--checkpoint {checkpoint!r}: use 'best' or 'last'")
    output = parse_output(output, "--output")
    depth = parse_depth(depth, "--depth")
    if output != "counts" and depth != "controls":
        raise VcellError(f"--depth {depth}: the depth of drawn counts; add --output counts (the default output is log1p)")
    listed_file = perturbations.strip() if "," not in perturbations and perturbations.strip().lower().endswith(LIST_FILES) else None
    inputs = [data, *run_checkpoints(model)] + [p for p in (all_genes, listed_file) if p is not None]
    check_log1p_out(out, log1p_out, output)
    if log1p_out is not None:
        check_output_path(log1p_out, inputs, overwrite=overwrite)
    check_output_path(out, inputs, overwrite=overwrite)
    t0 = time.perf_counter()
    sizes = {} if set_size is None else {"set_size": set_size}
    predictor = STPredictor.from_checkpoint(model, seed=seed, checkpoint=checkpoint, precision=precision, **sizes)
    mspec = predictor.spec
    ctx_col = mspec.context_col if context_col is None else (None if context_col.lower() in ("none", "") else context_col)
    spec = DataSpec(pert_col=pert_col or mspec.pert_col, control=control or mspec.control, context_col=ctx_col, batch_col=batch_col,
                    expression=expression)
    with status(f"reading {data}"):
        dataset = load_dataset(data, spec, backed=True, require_context_controls=None)  # the context's controls are all it reads
    if dataset.spec.expression == "counts":
        raise VcellError(f"{data}: X holds raw counts; the model predicts log1p expression: run `vcell data preprocess` first")
    key = predictor.embed_key
    if key is not None and key not in dataset.adata.obsm:
        raise missing_obsm_error(data, key, dataset.adata.obsm.keys())
    which = perturbations.strip()
    if listed_file is not None:  # the challenge's pert_counts.csv: labels and cells each
        listed = (read_perturbation_table(which) if which.lower().endswith(".csv")
                  else dict.fromkeys(read_label_file(which, "--perturbations")))
        listed = {k: v for k, v in listed.items() if k != spec.control}
        which = list(listed)
        if cells_per_pert is None and all(n is not None for n in listed.values()):
            cells_per_pert = {k: int(n) for k, n in listed.items()}
        predictor.check_perturbations(which)
    elif which.lower() not in ("all", "data"):
        which = [p.strip() for p in perturbations.split(",") if p.strip()]
        predictor.check_perturbations(which)
    # written piece by piece (memory does not grow with the cells predicted); shows the sets done;
    # uns["vcell"] records the model's space, the file's, and how counts were drawn
    pred = write_prediction(out, predictor, dataset, context, which, cells_per_pert, seed=seed, output=output, depth=depth,
                            all_genes=all_genes, log1p_out=log1p_out, overwrite=overwrite)
    labels = pred.obs[spec.pert_col].astype(str)
    n_ctrl = int((labels == spec.control).sum())
    n_perts = labels[labels != spec.control].nunique()
    what = f"{pred.n_obs - n_ctrl:,} predicted cells of {n_perts} perturbation(s)"
    if output == "counts":
        meta = pred.uns["vcell"]
        sizes = f"{depth:,} counts each" if depth != "controls" else f"library sizes: {meta['library_pairing']}, {meta['library_source']}"
        what += f" as raw counts ({sizes}; no control rows)"
    else:
        what += f" + {n_ctrl:,} controls"
    if all_genes is not None:
        what += f"; all {pred.n_vars:,} genes of {all_genes.name} ({len(predictor.genes):,} predicted by the model, the rest from each cell's control cell)"
    if log1p_out is not None:
        from vcell.predictors.request import context_cells

        index = dataset.index
        in_ctx = context_cells(index, context, str(data))[1]  # "dataset.context" too, as the prediction took it
        what += f"; their log1p cells + {int((in_ctx & index.is_control).sum()):,} controls in {log1p_out}"
    if predictor.anchor is not None:
        what += f"; each perturbation's mean set by the checkpoint's effect anchor ({predictor.effect_anchor})"
    console.print(f"wrote {out} in {format_duration(time.perf_counter() - t0)}: {what}", highlight=False, soft_wrap=True)
