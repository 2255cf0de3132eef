"""``vcell predict``: predicted cells of a context from a trained ST checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from vcell.cli.common import Seed, console
from vcell.errors import VcellError


def resolve_model_dir(model: Path, checkpoint: str) -> Path:
    """A checkpoint directory: MODEL itself, or MODEL/best (falling back to MODEL/last) of a run folder."""
    from vcell.train.checkpoint import CONFIG, resolve_checkpoint_dir

    if not model.exists():
        raise VcellError(f"{model}: model directory not found")
    if (model / CONFIG).is_file():
        return model
    if checkpoint not in ("best", "last"):
        raise VcellError(f"--checkpoint {checkpoint!r}: use 'best' or 'last'")
    for name in ((checkpoint, "last") if checkpoint == "best" else ("last",)):
        d = resolve_checkpoint_dir(model / name)
        if (d / CONFIG).is_file():
            return d
    raise VcellError(f"{model}: not a vcell checkpoint (no config.json, nor {checkpoint}/ or last/ inside)")


def predict(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (or a `vcell train st` run folder).")],
    data: Annotated[Path, typer.Option("--data", help="log1p .h5ad holding the context's control cells.")],
    context: Annotated[str, typer.Option("--context", help="Context to predict (its control cells are the input).")],
    out: Annotated[Path, typer.Option("--out", help="Predicted cells (.h5ad), real controls appended.")],
    perturbations: Annotated[str, typer.Option("--perturbations", help="'all' (the model's), 'data' (those with cells of the context in DATA) or A,B,...")] = "all",
    cells_per_pert: Annotated[int | None, typer.Option("--cells-per-pert", help="Cells per perturbation; default 100 ('data': as many as observed).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="In a run folder: best (else last) or last.")] = "best",
    set_size: Annotated[int, typer.Option("--set-size", help="Largest cell set fed to the model.")] = 64,
    pert_col: Annotated[str | None, typer.Option("--pert-col", help="obs column with the perturbation; default: the model's.")] = None,
    control: Annotated[str | None, typer.Option("--control", help="Control label; default: the model's.")] = None,
    context_col: Annotated[str | None, typer.Option("--context-col", help="obs column with the context; default: the model's.")] = None,
    batch_col: Annotated[str | None, typer.Option("--batch-col", help="obs column with the batch (optional).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="32 (default), bf16-mixed (CPU or GPU; ~3x faster on CPUs with AVX512-BF16/AMX, outputs within bf16 rounding) or 16-mixed (GPU only).")] = "32",
    seed: Seed = 0,
) -> None:
    """Predict perturbed cells of CONTEXT from its real control cells with a trained ST model."""
    from vcell.data.dataset import load_dataset, missing_obsm_error
    from vcell.data.io import check_output_path, write_h5ad
    from vcell.data.spec import DataSpec
    from vcell.models.st_predictor import STPredictor

    if cells_per_pert is not None and cells_per_pert < 1:
        raise VcellError(f"--cells-per-pert must be >= 1, got {cells_per_pert}")
    check_output_path(out, [data], overwrite=overwrite)
    predictor = STPredictor.from_checkpoint(resolve_model_dir(model, checkpoint), set_size=set_size, seed=seed, precision=precision)
    mspec = predictor.spec
    ctx_col = mspec.context_col if context_col is None else (None if context_col.lower() in ("none", "") else context_col)
    spec = DataSpec(
        pert_col=pert_col or mspec.pert_col,
        control=control or mspec.control,
        context_col=ctx_col,
        batch_col=batch_col if batch_col is not None else None,
    )
    dataset = load_dataset(data, spec, require_context_controls=False)
    if dataset.spec.expression == "counts":
        raise VcellError(f"{data}: X holds raw counts; the model predicts log1p expression: run `vcell data preprocess` first")
    key = predictor.embed_key
    if key is not None and key not in dataset.adata.obsm:
        raise missing_obsm_error(data, key, dataset.adata.obsm.keys())
    index = dataset.index
    contexts = [str(c) for c in index.contexts]
    if context not in contexts:
        raise VcellError(f"--context {context!r}: unknown context in {data} (contexts: {', '.join(contexts)})")
    in_ctx = index.context_codes == contexts.index(context)
    controls_mask = in_ctx & index.is_control
    if not controls_mask.any():
        raise VcellError(f"--context {context!r}: no control cells ({spec.control!r}) of this context in {data}")

    sizes: dict[str, int] | int
    if perturbations.strip().lower() == "all":
        perts = [str(p) for p in predictor.meta.get("perturbations", []) if str(p) != predictor.meta["control"]]
        sizes = cells_per_pert or 100
    elif perturbations.strip().lower() == "data":
        labels = index.perts[index.pert_codes[in_ctx & ~index.is_control]].astype(str)
        names, counts = np.unique(labels, return_counts=True)
        if not len(names):
            raise VcellError(f"--perturbations data: context {context!r} has no perturbed cells in {data}")
        perts = [str(n) for n in names]
        sizes = cells_per_pert or {str(n): int(c) for n, c in zip(names, counts)}
    else:
        perts = list(dict.fromkeys(p.strip() for p in perturbations.split(",") if p.strip()))
        if not perts:
            raise VcellError("--perturbations: give 'all', 'data' or a comma-separated list")
        sizes = cells_per_pert or 100
    predictor.spec = predictor.spec.with_(pert_col=spec.pert_col, control=spec.control, context_col=spec.context_col)
    predictor.check_perturbations(perts)
    controls = dataset.adata[controls_mask].copy()
    with console.status(f"predicting {len(perts)} perturbation(s) in {context}"):
        pred = predictor.predict(controls, perts, context, cells_per_perturbation=sizes, seed=seed)
    pred.uns["vcell"] = {"expression": "log1p"}
    write_h5ad(pred, out)
    console.print(f"wrote {out}: {pred.n_obs - controls.n_obs} predicted cells of {len(perts)} perturbation(s) + {controls.n_obs} controls")
