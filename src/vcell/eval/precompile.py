"""Compiling the evaluator's numba kernels ahead of its first real run (``vcell eval compile``).

The evaluator's kernels are compiled by numba on their first call and kept in numba's on-disk
cache, so only the first run after an installation pays for it: ~10 s on a 2-core machine, more
than the run itself on a 12,000-cell pair. Where every run is a first run (a container started
fresh, a CI job) that cost is paid each time. :func:`precompile_evaluator` pays it once, e.g.
while a container image is built: it runs every path of the evaluator (both profiles; CSR and
dense predictions; matrices in memory and in gene bands on disk; the 2025 and 2026 baselines,
the replicate anchor and the 2026 submission checks) on a tiny simulated pair in a temporary
folder, which compiles each kernel for the argument types a real file of the same dtype gives
it. numba compiles one version per dtype of the stored values, hence ``dtypes``; float32 is
what AnnData and scanpy write. The 2025 ``full`` profile is left out: its first run's
compilation is umap's and pynndescent's (measured on a 160-cell pair: 19.5 s in a first run,
4.0 s in every later one, in functions they do not cache).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: The dtypes of stored values :func:`precompile_evaluator` can compile for.
DTYPES = ("float32", "float64", "int32", "int64")

_CONTROL, _PERT_COL = "non-targeting", "target_gene"
#: A budget small enough that the tiny matrices are read into gene bands on disk.
_BANDED_BUDGET = 2e3


def _tiny_pair(folder: Path, dtype: np.dtype, perts: int = 4, cells: int = 8, controls: int = 24, genes: int = 40) -> dict[str, Path]:
    """Raw counts (reference, CSR and dense predictions) and their log1p, as ``.h5ad`` files.

    ``perts`` perturbations named by measured genes (their exclusion is exercised), each raising
    six genes tenfold (a panel without an effect is refused, as by cell-eval2), ``cells`` cells
    each, ``controls`` controls, ``genes`` genes (at least ``8 + 6 * perts``).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    names = [f"G{i:03d}" for i in range(genes)]
    labels = [_CONTROL] * controls + [p for p in names[:perts] for _ in range(cells)]
    lam = np.full((perts + 1, genes), 4.0)
    for k in range(perts):
        lam[k + 1, 8 + 6 * k:14 + 6 * k] = 40.0
    rows = [0] * controls + [k + 1 for k in range(perts) for _ in range(cells)]
    real, pred = rng.poisson(lam[rows]), rng.poisson(lam[rows])
    obs = pd.DataFrame({_PERT_COL: pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=names)
    log_dtype = dtype if dtype.kind == "f" else np.dtype(np.float32)  # log1p values are not integers
    matrices = {
        "real": sp.csr_matrix(real.astype(dtype)),
        "pred": sp.csr_matrix(pred.astype(dtype)),
        "pred_dense": (pred + 1).astype(dtype),
        "real_log1p": sp.csr_matrix(np.log1p(real).astype(log_dtype)),
        "pred_log1p": sp.csr_matrix(np.log1p(pred).astype(log_dtype)),
        "pred_log1p_dense": (np.log1p(pred) + rng.random(pred.shape) * 1e-3).astype(log_dtype),  # no ties
    }
    paths = {}
    for name, X in matrices.items():
        paths[name] = folder / f"{name}.h5ad"
        ad.AnnData(X, obs=obs, var=var).write_h5ad(paths[name])
    paths["genes"] = folder / "genes.csv"
    paths["genes"].write_text("\n".join(names) + "\n")
    submission = ad.AnnData(sp.csr_matrix(pred[controls:].astype(dtype)), obs=obs.iloc[controls:].copy(), var=var)
    submission.obs[_PERT_COL] = submission.obs[_PERT_COL].cat.remove_unused_categories()
    paths["submission"] = folder / "submission.h5ad"
    submission.write_h5ad(paths["submission"])
    return paths


def _paths_of_the_evaluator(files: dict[str, Path], out: Path, threads: int) -> list[tuple[str, Callable[[], object]]]:
    """(what, call) for every path of the evaluator on ``files``, in memory and in gene bands."""
    from vcell.data.io import read_h5ad
    from vcell.eval.baseline import build_cell_mean_baseline
    from vcell.eval.inputs import to_log1p
    from vcell.eval.run import run as run_2025
    from vcell.eval.vcc2026.files import Options, scale_ends
    from vcell.eval.vcc2026.files import run as run_2026
    from vcell.eval.vcc2026.submission import prepare_submission_2026

    steps = []
    for where, budget in (("in memory", math.inf), ("gene bands", _BANDED_BUDGET)):
        opts = Options(_PERT_COL, _CONTROL, threads=threads, budget=budget)
        for pred in ("pred", "pred_dense"):
            steps.append((f"vcc2026 run, {pred.replace('_', ' ')}, {where}",
                          lambda p=pred, o=opts: run_2026(files[p], files["real"], out / "run", o, overwrite=True)))
        steps.append((f"vcc2026 baseline and anchor, {where}", lambda o=opts: scale_ends(files["real"], out / "scale", o, overwrite=True)))
        for pred in ("pred_log1p", "pred_log1p_dense"):
            steps.append((f"vcc run, {pred.replace('_', ' ')}, {where}",
                          lambda p=pred, b=budget: run_2025(files[p], files["real_log1p"], out / "run25", _PERT_COL, _CONTROL,
                                                            threads=threads, budget=b, overwrite=True)))
    for real in ("real", "real_log1p"):  # counts are normalised first, log1p values checked as they are
        steps.append((f"vcc baseline, {real.replace('_', ' ')}",
                      lambda r=real: build_cell_mean_baseline(to_log1p(read_h5ad(files[r]), str(files[r])), _PERT_COL, _CONTROL)))
    steps.append(("vcc2026 prep", lambda: prepare_submission_2026(files["submission"], out / "prep.h5ad", genes=files["genes"],
                                                                 pert_col=_PERT_COL, control=_CONTROL, overwrite=True)))
    return steps


def cache_folder() -> Path:
    """The folder holding numba's cache of the evaluator's kernels: ``NUMBA_CACHE_DIR``, else the
    package (each module's ``__pycache__``) or numba's per-user folder when the package is read-only."""
    from vcell.data.matrix import scan_values
    from vcell.eval._de_kernels import _gene_tests
    from vcell.eval.vcc2026._kernels import counts_chunk

    return Path(os.path.commonpath([k._cache._cache_path for k in (scan_values, _gene_tests, counts_chunk)]))


def precompile_evaluator(dtypes: tuple[str, ...] = ("float32",), threads: int = 2,
                         on_step: Callable[[str, int, int], None] | None = None) -> dict:
    """Compile the evaluator's numba kernels into numba's on-disk cache.

    Parameters
    ----------
    dtypes : tuple of str
        The dtypes of the stored values (of :data:`DTYPES`) of the files to be evaluated.
    threads : int
        Threads of the evaluator's passes (the compiled code does not depend on it).
    on_step : callable, optional
        ``on_step(what, done, total)`` before each step: its name, the steps done, all steps.

    Returns
    -------
    dict
        ``seconds`` taken, ``steps`` run, ``cache`` (the folder of the compiled kernels).
    """
    from vcell.data.labels import names_list
    from vcell.errors import VcellError

    dtypes = names_list(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise VcellError(f"--dtypes {','.join(dtypes)!r}: use one or more of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    n = 0
    total = len(dtypes) * len(_paths_of_the_evaluator({}, Path(), threads))  # the steps read their files only when run
    quiet = logging.getLogger("vcell")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the tiny pair's scale warnings say nothing about the user's data
    try:
        with tempfile.TemporaryDirectory(prefix="vcell-compile-") as tmp:
            for dtype in dtypes:
                folder = Path(tmp) / dtype
                folder.mkdir()
                files = _tiny_pair(folder, np.dtype(dtype))
                for what, call in _paths_of_the_evaluator(files, folder / "out", threads):
                    if on_step is not None:
                        on_step(f"{dtype}: {what}", n, total)
                    call()
                    n += 1
    finally:
        quiet.setLevel(level)
    cache = cache_folder()
    asked = os.environ.get("NUMBA_CACHE_DIR")
    package = Path(__file__).resolve().parents[1]
    if asked and not cache.resolve().is_relative_to(Path(asked).resolve()):
        log.warning("numba could not use NUMBA_CACHE_DIR=%s; it cached the kernels in %s instead", asked, cache)
    elif not asked and not cache.resolve().is_relative_to(package):
        log.warning("numba cached the kernels in %s, a per-user folder (the package's folder %s is not writable): "
                    "other users compile again; set NUMBA_CACHE_DIR to a folder they all read", cache, package)
    return {"seconds": time.perf_counter() - t0, "steps": n, "cache": cache}
