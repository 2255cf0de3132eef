"""``vcell predict``: predicted cells of a context from a trained ST checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import Expression, Precision, Seed, console
from vcell.data.spec import DEFAULT_SET_SIZE, DataSpec
from vcell.errors import VcellError
from vcell.train.display import format_duration, status


def predict(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (or a `vcell train st` run folder).")],
    data: Annotated[Path, typer.Option("--data", help="log1p .h5ad holding the context's control cells.")],
    context: Annotated[str, typer.Option("--context", help="Context to predict (its control cells are the input).")],
    out: Annotated[Path, typer.Option("--out", help="Predicted cells (.h5ad), real controls appended.")],
    perturbations: Annotated[str, typer.Option("--perturbations", help="'data' (those with cells of the context in DATA, as many cells as observed: ready to score against them), 'all' (every one the model was trained on) or A,B,...")] = "data",
    cells_per_pert: Annotated[int | None, typer.Option("--cells-per-pert", help="Cells per perturbation; default: as many as observed ('data'), else 100.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="In a run folder: best (else last) or last.")] = "best",
    set_size: Annotated[int, typer.Option("--set-size", help="Largest cell set fed to the model.")] = DEFAULT_SET_SIZE,
    pert_col: Annotated[str | None, typer.Option("--pert-col", help="obs column with the perturbation; default: the model's.")] = None,
    control: Annotated[str | None, typer.Option("--control", help="Control label; default: the model's.")] = None,
    context_col: Annotated[str | None, typer.Option("--context-col", help="obs column with the context; default: the model's.")] = None,
    batch_col: Annotated[str | None, typer.Option("--batch-col", help="obs column with the batch (optional).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    precision: Precision = "32",
    expression: Expression = None,
    seed: Seed = 0,
) -> None:
    """Predict perturbed cells of CONTEXT from its real control cells with a trained ST model."""
    from vcell.data.dataset import load_dataset, missing_obsm_error
    from vcell.data.io import check_output_path, write_h5ad
    from vcell.predictors.predict import predict_context
    from vcell.predictors.st import STPredictor

    if cells_per_pert is not None and cells_per_pert < 1:
        raise VcellError(f"--cells-per-pert must be >= 1, got {cells_per_pert}")
    if expression is not None and expression not in ("counts", "log1p"):
        raise VcellError(f"--expression {expression!r}: use 'counts' or 'log1p'")
    if checkpoint not in ("best", "last"):
        raise VcellError(f"--checkpoint {checkpoint!r}: use 'best' or 'last'")
    check_output_path(out, [data], overwrite=overwrite)
    t0 = time.perf_counter()
    predictor = STPredictor.from_checkpoint(model, seed=seed, checkpoint=checkpoint, set_size=set_size, precision=precision)
    mspec = predictor.spec
    ctx_col = mspec.context_col if context_col is None else (None if context_col.lower() in ("none", "") else context_col)
    spec = DataSpec(pert_col=pert_col or mspec.pert_col, control=control or mspec.control, context_col=ctx_col, batch_col=batch_col,
                    expression=expression)
    with status(f"reading {data}"):
        dataset = load_dataset(data, spec, require_context_controls=False)
    if dataset.spec.expression == "counts":
        raise VcellError(f"{data}: X holds raw counts; the model predicts log1p expression: run `vcell data preprocess` first")
    key = predictor.embed_key
    if key is not None and key not in dataset.adata.obsm:
        raise missing_obsm_error(data, key, dataset.adata.obsm.keys())
    which = perturbations.strip()
    if which.lower() not in ("all", "data"):
        which = [p.strip() for p in perturbations.split(",") if p.strip()]
        predictor.check_perturbations(which)
    pred = predict_context(predictor, dataset, context, which, cells_per_pert, seed=seed)  # shows the sets done
    pred.uns["vcell"] = {"expression": "log1p"}
    with status(f"writing {out}"):
        write_h5ad(pred, out)
    n_ctrl = int((pred.obs[spec.pert_col].astype(str) == spec.control).sum())
    n_perts = pred.obs[spec.pert_col].astype(str).nunique() - 1
    console.print(f"wrote {out} in {format_duration(time.perf_counter() - t0)}: {pred.n_obs - n_ctrl} predicted cells of "
                  f"{n_perts} perturbation(s) + {n_ctrl} controls", highlight=False, soft_wrap=True)
