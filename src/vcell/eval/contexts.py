"""``vcell eval run --profile vcc --context-col COL``: the 2025 metrics per context (cell line, cell
type), as cell-eval 0.8's ``run --celltype-col`` scores each cell type apart.

Each context's cells (its perturbations and its own controls, in the prediction and in the
reference) are read from the files one context at a time and scored as a pair of their own, into
``OUT/CONTEXT/`` (the layout of the 2026 profile's contexts). Every file is written only when all
contexts are scored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vcell.data.io import atomic_paths, check_output_dir, read_h5ad, subfolder
from vcell.data.labels import factorize
from vcell.data.spec import column_guess
from vcell.errors import VcellError, preview
from vcell.eval.inputs import check_pair
from vcell.eval.profiles import selected_metrics
from vcell.eval.run import OUTPUT_NAMES, EvalResult, _needs, evaluate, write_de_csv
from vcell.eval.scoring import write_csv


def _contexts(adata, column: str, where: str) -> np.ndarray:
    """Each cell's context (as a string), the column checked: present and without missing values."""
    if column not in adata.obs.columns:
        raise VcellError(f"{where}: context column {column!r} not found in obs{column_guess(column, adata.obs.columns, 'context')} "
                         f"(columns: {preview(list(adata.obs.columns), 12)})")
    codes, names = factorize(adata.obs[column])
    if (codes < 0).any():
        first = adata.obs_names[int(np.flatnonzero(codes < 0)[0])]
        raise VcellError(f"{where}: {int((codes < 0).sum())} cell(s) without a context in column {column!r} (first: {first!r})")
    return np.asarray(names, dtype=object).astype(str)[codes]


def run_contexts(
    pred: str | os.PathLike, real: str | os.PathLike, out: str | os.PathLike, context_col: str,
    pert_col: str = "target_gene", control: str = "non-targeting", profile: str = "vcc", threads: int = 2,
    input_type: str = "auto", skip: tuple[str, ...] = (), overwrite: bool = False, option: str = "--expression",
) -> dict[str, tuple[EvalResult, list[Path]]]:
    """Score ``pred`` against ``real`` context by context (``obs[context_col]`` of both files).

    Both files must hold the same contexts. Each context is read into memory on its own (its cells
    of both files) and scored as ``vcell eval run`` scores a pair; its files go to ``OUT/CONTEXT/``.
    Nothing is written unless every context is scored.

    Returns
    -------
    dict
        context -> (result, paths written); the results hold no DE tables (they are in the files).
    """
    pred, real, out = Path(pred), Path(real), Path(out)
    real_meta, pred_meta = read_h5ad(real, backed=True), read_h5ad(pred, backed=True)
    try:
        real_ctx, pred_ctx = _contexts(real_meta, context_col, str(real)), _contexts(pred_meta, context_col, str(pred))
        contexts = sorted(set(real_ctx))
        only_pred, only_real = sorted(set(pred_ctx) - set(contexts)), sorted(set(contexts) - set(pred_ctx))
        if only_pred or only_real:
            parts = ([f"{preview(only_real, 3)} only in {real}"] if only_real else []) + \
                    ([f"{preview(only_pred, 3)} only in {pred}"] if only_pred else [])
            raise VcellError(f"the contexts in column {context_col!r} differ: {'; '.join(parts)}; predict every context of {real}")
        need_de, _ = _needs(selected_metrics(profile, skip))
        files = [n for n in OUTPUT_NAMES if need_de or not n.endswith("_de.csv")]
        folders = {c: subfolder(c, f"{real}: context") for c in contexts}
        names = [folders[c] + f for c in contexts for f in files]
        check_output_dir(out, names, [pred, real], overwrite=overwrite)
        done = {}
        with atomic_paths(out, names) as tmp:
            for c in contexts:
                pair = check_pair(pred_meta[pred_ctx == c].to_memory(), real_meta[real_ctx == c].to_memory(), pert_col, control,
                                  input_type, f"{pred} (context {c})", f"{real} (context {c})", option=option)
                result = evaluate(pair, profile, threads, skip)
                write_csv(result.results, tmp[folders[c] + "results.csv"])
                write_csv(result.agg, tmp[folders[c] + "agg_results.csv"])
                for table, base in ((result.real_de, "real_de.csv"), (result.pred_de, "pred_de.csv")):
                    if table is not None:
                        write_de_csv(table, tmp[folders[c] + base])
                result.real_de = result.pred_de = None  # in the files: memory does not grow with the contexts
                done[c] = result
    finally:
        real_meta.file.close()
        pred_meta.file.close()
    for c in contexts:  # an earlier run's DE tables, replaced (--overwrite) by a profile without them
        for stale in set(OUTPUT_NAMES) - set(files):
            (out / f"{folders[c]}{stale}").unlink(missing_ok=True)
    return {c: (done[c], [out / f"{folders[c]}{f}" for f in files]) for c in contexts}
