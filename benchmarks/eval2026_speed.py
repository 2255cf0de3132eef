#!/usr/bin/env python
"""End-to-end speed, peak memory and agreement of ``vcell eval`` (profile vcc2026) against cell-eval2.

One run of this script times, on the same simulated input and with the same thread budget
(``--threads``, default 2), each tool as a fresh CLI subprocess:

(A) ``vcell eval run --profile vcc2026`` vs ``cell-eval2 run --preset vcc2026`` on a raw-count
    pair (CSR float32, integral);
(B) the replicate anchor: ``vcell eval baseline --profile vcc2026 --only anchor`` vs
    ``cell-eval2 run ... --anchor`` (which computes the plain run AND the anchor). cell-eval2's
    plain run (A) is timed separately, so the anchor's own cost is reported both ways: call vs
    call, and vcell's anchor vs cell-eval2's extra cost (anchor call - plain call); also vcell's
    run + anchor (two calls) vs cell-eval2's one call, which writes the same outputs;
(C) the baseline end: ``vcell eval baseline --profile vcc2026 --only baseline`` vs
    ``cell-eval2 baseline --preset vcc2026``;
(D) a dense prediction with no shared zeros (every perturbed cell's count >= 1: sampled counts
    + 1, stored as a dense float32 ``X``) for the 2026 profile, vcell vs cell-eval2;
(E) the 2025 profile on a dense, continuous log1p prediction without zeros and without ties in
    any gene (``vcell eval run --profile vcc`` vs ``cell-eval run --profile vcc``, cell-eval 0.8.2).

The data (simulated in worker processes, chunk by chunk; not timed; reused from ``--workdir``
when the parameters match): 50 perturbations x 200 cells + 2,000 ``non-targeting`` controls x
18,080 genes by default. Negative-binomial counts (shape 3) at ~20,000 UMI per cell (cell size
factors log-normal, sd 0.3), log-normal gene proportions; each perturbation is named after a gene
of ``var`` (one expressed at >= 2 counts per cell), knocks it down to 10 % and changes 300 other
genes (log-normal fold changes, sd 1; every 5th perturbation sd 0.25); the cells are shuffled.
The prediction is sampled afresh (new cells, new size factors) from the perturbation's mean
effect shrunk in log space (kept x1, 0.6, 0.3 or 0 in turn over the perturbations) with a
log-normal error (sd 0.1) on every gene of every perturbation: realistic, never the truth. The
2026 prediction files hold the predicted perturbed cells followed by the reference's control
cells, copied (cell-eval2 needs control rows in the prediction; vcell ignores them), so the
same file goes to both tools. Files in ``WORKDIR/data``:

- ``real.h5ad``: reference counts, CSR float32 (A-D);
- ``pred.h5ad``: prediction counts, CSR float32 (A);
- ``pred_dense.h5ad``: (D) dense float32: the same predicted counts + 1 (every perturbed cell's
  entry >= 1, so no gene has a zero shared with anything), then the reference's controls;
- ``real_log1p.h5ad``: (E) ``log1p(normalize_total(1e4))`` of ``real.h5ad``, CSR float32;
- ``pred_log1p.h5ad``: (E) dense float32, every cell (controls included: the 2025 profile
  tests the prediction against its own controls): ``|log1p(1e4 * mean proportion * size) +
  N(0, 0.1)| + U(0, 1e-4)``, then nudged up by float32 ulps where needed so that no two cells
  share a value in any gene (no zeros, no ties).

Timing: each run is a fresh subprocess (interpreter start, imports, reading, computing,
writing); wall time, CPU time and peak RSS (``ru_maxrss`` from ``wait4`` on that child) come from
``eval_speed.timed_run``. Every thread knob is set to ``--threads`` for every tool
(``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``,
``POLARS_MAX_THREADS``, ``RAYON_NUM_THREADS``; vcell ``--threads``; cell-eval2 ``--set
num_threads=N --set gather_threads=N``; cell-eval ``--num-threads N``). Every run gets a private
numba cache, ``NUMBA_CACHE_DIR=WORKDIR/numba_cache``, so that other processes running vcell on the
machine at the same time neither fill nor empty it (``eval_speed.clear_numba_cache`` deletes the
shared ``src/vcell/**/__pycache__`` caches instead). vcell runs per case first with that cache
emptied ("cold", JIT compilation included), then (unless ``--skip-compiled``) with the cache that
``vcell eval compile`` wrote once at the start ("compiled": the first run in an installation or
container image where that step ran; the step is timed on its own row), then with the cache
loaded ("warm"). cell-eval2 (pdex
0.3.0, numba-mwu) and cell-eval keep no numba cache on disk (no ``cache=True``), so they compile
in every run: one run each. Before every run the script waits until the machine is idle and
repeats a run that other processes or the hypervisor's steal disturbed (more than 10 % of a
core), as ``eval_speed`` does. On a shared machine run it under ``flock /tmp/vcell_cpu.lock`` so
other benchmarks wait.

Agreement (vcell's warm run against the peer's run): per (perturbation, metric) values of
``results.csv``, every (statistic, metric) of ``agg_results.csv``, the anchor's aggregate
(vcell ``anchor_agg.csv`` vs cell-eval2 ``anchor_agg.parquet``: replicate, replicate_sd,
replicate_min, replicate_max and the perturbation counts per metric), the baseline's aggregate
and per-perturbation table (``baseline_agg_results.csv`` vs ``baseline_agg.csv``,
``baseline_results.csv`` both). Max |diff| over finite values; a NaN/null must face a NaN/null
and the row sets must match. Target: <= 1e-9. E also runs ``eval_speed.compare`` (its DE-table
checks). vcell's cold and warm outputs must be byte-identical.

Output: a table (case, tool, cold/warm, wall s, peak MiB, speed-up, max diff), PASS/FAIL lines
for the targets (>= 30x faster warm for A, B, D and E; vcell peak RSS <= half of the peer's) and
``WORKDIR/summary.json`` with every measurement. Exit status 1 when a check or a target fails.

Run (about 20 minutes at the default size, most of it cell-eval2)::

    flock /tmp/vcell_cpu.lock .venv/bin/python benchmarks/eval2026_speed.py --workdir /tmp/vcell_eval2026_speed
    .venv/bin/python benchmarks/eval2026_speed.py --cells 40 --perts 10 --genes 2000 --workdir /tmp/e26_small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_speed as es  # noqa: E402  (timing, numba cache, idle waiting, machine info, the 2025 commands)

PY = es.PY
CONTROL = es.CONTROL
PERT_COL = es.PERT_COL
CELL_EVAL2 = str(Path(PY).parent / "cell-eval2")
SIM_VERSION = 1  # bump when the simulation changes (invalidates cached data)
CHUNK_ROWS = 1000
UMI = 20_000.0
NB_SHAPE = 3.0
N_CHANGED = 300  # genes each perturbation changes besides its target
SHRINK = (1.0, 0.6, 0.3, 0.0)  # share of the true log effect the prediction keeps, in turn
PRED_ERROR_SD = 0.1  # log-normal error of the predicted effect, every gene
LOG1P_NOISE_SD = 0.1  # (E) Gaussian noise on the dense log1p prediction
TOL = 1e-9
SPEED_TARGET = 30.0
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "POLARS_MAX_THREADS", "RAYON_NUM_THREADS")


# ============================================================================ simulation (worker)

_MODEL: dict = {}


def _model(n_perts: int, n_genes: int, seed: int) -> dict:
    """Gene proportions, true and predicted effects per group (row 0: control), targets."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    w = np.exp(rng.normal(0.0, 1.7, n_genes))
    prop = w / w.sum()
    targets = np.sort(rng.choice(np.flatnonzero(UMI * prop >= 2.0), n_perts, replace=False))
    effect = np.ones((n_perts + 1, n_genes))
    for p in range(1, n_perts + 1):
        idx = rng.choice(n_genes, min(N_CHANGED, n_genes), replace=False)
        effect[p, idx] = np.exp(rng.normal(0.0, 0.25 if p % 5 == 0 else 1.0, idx.size))
        effect[p, targets[p - 1]] = 0.1
    keep = np.array([1.0] + [SHRINK[(p - 1) % len(SHRINK)] for p in range(1, n_perts + 1)])
    pred_effect = effect ** keep[:, None] * np.exp(rng.normal(0.0, PRED_ERROR_SD, effect.shape))
    pred_effect[0] = 1.0
    return {"prop": prop, "effect": effect, "pred_effect": pred_effect, "targets": targets}


def _init_pool(model: dict) -> None:
    _MODEL.update(model)


def _counts_chunk(task):
    """NB counts of one chunk of cells (groups given), CSR float32; ``kind`` picks the effects."""
    import numpy as np
    import scipy.sparse as sp

    kind, seed, k, groups = task
    rng = np.random.default_rng([seed, 10 if kind == "effect" else 11, k])
    size = UMI * rng.lognormal(0.0, 0.3, (groups.size, 1))
    lam = size * _MODEL["prop"][None, :] * _MODEL[kind][groups]
    counts = rng.poisson(rng.gamma(NB_SHAPE, lam / NB_SHAPE)).astype(np.float32)
    return sp.csr_matrix(counts)


def _log1p_chunk(task):
    """(E) dense continuous log1p prediction of one chunk of cells, all values > 0, float32."""
    import numpy as np

    seed, k, groups = task
    rng = np.random.default_rng([seed, 12, k])
    size = rng.lognormal(0.0, 0.2, (groups.size, 1))
    mu = np.log1p(1e4 * size * _MODEL["prop"][None, :] * _MODEL["pred_effect"][groups])
    mu += rng.normal(0.0, LOG1P_NOISE_SD, mu.shape)
    np.abs(mu, out=mu)
    mu += rng.uniform(0.0, 1e-4, mu.shape)
    return mu.astype(np.float32)


def _normalise_log1p(block):
    import numpy as np

    out = block.copy()
    total = np.asarray(out.sum(axis=1)).ravel()
    total[total == 0] = 1
    out.data = np.log1p(out.data / np.repeat(total, np.diff(out.indptr)).astype(np.float32) * np.float32(1e4))
    return out.astype(np.float32)


def _untie(X, block_cols: int = 2048) -> int:
    """Nudge values up by float32 ulps so no two rows share a value in any column; returns changes."""
    import numpy as np

    changed = 0
    inf = np.float32(np.inf)
    for a in range(0, X.shape[1], block_cols):
        B = X[:, a : a + block_cols]
        order = np.argsort(B, axis=0, kind="stable")
        S = np.take_along_axis(B, order, axis=0)
        if not (S[1:] == S[:-1]).any():
            continue
        before = S.copy()
        for i in range(1, S.shape[0]):
            np.maximum(S[i], np.nextafter(S[i - 1], inf), out=S[i])
        changed += int((S != before).sum())
        np.put_along_axis(B, order, S, axis=0)
        X[:, a : a + block_cols] = B
    return changed


class _DenseWriter:
    """Writes a dense float32 ``X`` row block by row block into a new ``.h5ad``."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        import h5py
        import numpy as np

        self.path = path
        self.f = h5py.File(path, "w")
        self.f.attrs["encoding-type"] = "anndata"
        self.f.attrs["encoding-version"] = "0.1.0"
        self.X = self.f.create_dataset("X", shape=shape, dtype=np.float32)
        self.X.attrs["encoding-type"] = "array"
        self.X.attrs["encoding-version"] = "0.2.0"
        self.rows = 0

    def append(self, block) -> None:
        import numpy as np

        block = block.toarray() if hasattr(block, "toarray") else block
        self.X[self.rows : self.rows + block.shape[0]] = np.asarray(block, dtype=np.float32)
        self.rows += block.shape[0]

    def close(self, obs, var) -> None:
        from anndata.io import write_elem

        assert self.rows == self.X.shape[0], (self.rows, self.X.shape)
        write_elem(self.f, "obs", obs)
        write_elem(self.f, "var", var)
        write_elem(self.f, "uns", {})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self.f, key, {})
        self.f.close()


def _chunks(kind, group, seed):
    for k, s in enumerate(range(0, group.size, CHUNK_ROWS)):
        yield (kind, seed, k, group[s : s + CHUNK_ROWS]) if kind else (seed, k, group[s : s + CHUNK_ROWS])


def simulate(datadir: Path, n_perts: int, cells: int, n_ctrl: int, n_genes: int, seed: int, procs: int) -> dict:
    """Write the five files of the module docstring into ``datadir``."""
    import multiprocessing as mp

    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    t0 = time.perf_counter()
    model = _model(n_perts, n_genes, seed)
    genes = np.array([f"G{j:05d}" for j in range(n_genes)], dtype=object)
    names = np.array([CONTROL] + [genes[t] for t in model["targets"]], dtype=object)
    cats = sorted(names)
    real_group = np.random.default_rng([seed, 2]).permutation(
        np.concatenate([np.zeros(n_ctrl, np.int64), np.repeat(np.arange(1, n_perts + 1), cells)]))
    pred_group = np.random.default_rng([seed, 3]).permutation(np.repeat(np.arange(1, n_perts + 1), cells))
    n = real_group.size
    var = pd.DataFrame(index=pd.Index(genes, name=None))

    def obs(groups, prefix):
        return pd.DataFrame({PERT_COL: pd.Categorical(names[groups], categories=cats)},
                            index=pd.Index([f"{prefix}{i:07d}" for i in range(groups.size)]))

    def log(msg):
        print(f"  [{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    ctrl_blocks = []
    nnz = {}
    with mp.get_context("fork").Pool(procs, initializer=_init_pool, initargs=(model,)) as pool:
        # reference counts + their log1p (E)
        index = np.int32 if n * n_genes < np.iinfo(np.int32).max else np.int64
        w_real = es._CSRWriter(datadir / "real.h5ad.tmp", n_genes, index)
        w_log = es._CSRWriter(datadir / "real_log1p.h5ad.tmp", n_genes, index)
        s, umi = 0, 0.0
        for block in pool.imap(_counts_chunk, _chunks("effect", real_group, seed)):
            g = real_group[s : s + block.shape[0]]
            umi += float(block.sum(dtype=np.float64))
            w_real.append(block)
            w_log.append(_normalise_log1p(block))
            ctrl_blocks.append(block[np.flatnonzero(g == 0)])
            s += block.shape[0]
        ctrl = sp.vstack(ctrl_blocks, format="csr")
        del ctrl_blocks
        nnz["real"] = w_real.nnz
        w_real.close(obs(real_group, "c"), var)
        w_log.close(obs(real_group, "c"), var)
        log(f"real.h5ad, real_log1p.h5ad: {n:,} cells, {nnz['real']:,} non-zeros")
        # predicted counts (A) and the same + 1, dense (D); then the reference's controls
        m = pred_group.size + n_ctrl
        w_pred = es._CSRWriter(datadir / "pred.h5ad.tmp", n_genes, index)
        w_dense = _DenseWriter(datadir / "pred_dense.h5ad.tmp", (m, n_genes))
        for block in pool.imap(_counts_chunk, _chunks("pred_effect", pred_group, seed)):
            w_pred.append(block)
            w_dense.append(block.toarray() + np.float32(1))
        w_pred.append(ctrl.copy())
        w_dense.append(ctrl)
        nnz["pred"] = w_pred.nnz
        pred_obs = obs(np.concatenate([pred_group, np.zeros(n_ctrl, np.int64)]), "p")
        w_pred.close(pred_obs, var)
        w_dense.close(pred_obs, var)
        log(f"pred.h5ad, pred_dense.h5ad: {m:,} cells, {nnz['pred']:,} non-zeros in pred.h5ad")
        # (E) dense continuous log1p prediction, every cell (own controls), no zeros, no ties
        X = np.empty((n, n_genes), np.float32)
        s = 0
        for block in pool.imap(_log1p_chunk, _chunks(None, real_group, seed)):
            X[s : s + block.shape[0]] = block
            s += block.shape[0]
    nudged = _untie(X)
    zeros = int((X <= 0).sum())
    import anndata as ad

    ad.AnnData(X=X, obs=obs(real_group, "c"), var=var).write_h5ad(datadir / "pred_log1p.h5ad.tmp")
    del X
    log(f"pred_log1p.h5ad: {n:,} cells dense, {nudged:,} values nudged to break ties, {zeros} zeros")
    for name in ("real", "real_log1p", "pred", "pred_dense", "pred_log1p"):
        os.replace(datadir / f"{name}.h5ad.tmp", datadir / f"{name}.h5ad")
    return {"cells_real": int(n), "cells_pred_2026": int(m), "genes": n_genes, "perturbations": n_perts,
            "cells_per_perturbation": cells, "controls": n_ctrl, "nnz_real": int(nnz["real"]),
            "density_real": nnz["real"] / (n * n_genes), "nnz_pred": int(nnz["pred"]),
            "density_pred_perturbed": (nnz["pred"] - ctrl.nnz) / (pred_group.size * n_genes),
            "mean_umi_real": umi / n, "log1p_values_nudged": nudged, "log1p_zeros": zeros}


# ============================================================================ comparison (worker)


def _frame(path: Path):
    import pandas as pd

    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def compare_tables(a: Path, b: Path, keys: list[str], tol: dict[str, float] | None = None) -> dict:
    """Max |diff| of the numeric columns of two tables aligned on ``keys``; NaN must face NaN.

    Every column must agree within :data:`TOL`, or within ``tol[column]`` where given.
    """
    import numpy as np
    import pandas as pd

    x, y = _frame(a), _frame(b)
    problems = []
    if set(x.columns) != set(y.columns):
        problems.append(f"columns differ: only vcell {sorted(set(x.columns) - set(y.columns))}, "
                        f"only peer {sorted(set(y.columns) - set(x.columns))}")
    for f in (x, y):
        for k in keys:
            f[k] = f[k].astype(str)
    kx, ky = set(map(tuple, x[keys].to_numpy())), set(map(tuple, y[keys].to_numpy()))
    if kx != ky:
        problems.append(f"rows differ: {len(kx - ky)} only in vcell (e.g. {sorted(kx - ky)[:3]}), "
                        f"{len(ky - kx)} only in the peer (e.g. {sorted(ky - kx)[:3]})")
    if len(kx) != len(x) or len(ky) != len(y):
        problems.append("duplicate keys")
    common = sorted(kx & ky)
    idx = pd.MultiIndex.from_tuples(common, names=keys) if len(keys) > 1 else pd.Index([c[0] for c in common], name=keys[0])
    xa, ya = x.set_index(keys).reindex(idx), y.set_index(keys).reindex(idx)
    worst, worst_at, n_values, n_nan = 0.0, None, 0, 0
    problems_soft: list[str] = []
    for col in sorted(set(xa.columns) & set(ya.columns)):
        u = pd.to_numeric(xa[col], errors="coerce").to_numpy(float)
        v = pd.to_numeric(ya[col], errors="coerce").to_numpy(float)
        if np.all(np.isnan(u)) and np.all(np.isnan(v)) and xa[col].dtype == object:
            if not (xa[col].astype(str).to_numpy() == ya[col].astype(str).to_numpy()).all():
                problems.append(f"{col}: text differs")
            continue
        nu, nv = np.isnan(u), np.isnan(v)
        if not np.array_equal(nu, nv):
            problems.append(f"{col}: NaN pattern differs at {int((nu != nv).sum())} row(s)")
        ok = ~(nu | nv)
        n_nan += int((nu & nv).sum())
        n_values += int(ok.sum())
        if ok.any():
            d = np.abs(u[ok] - v[ok])
            i = int(np.argmax(d))
            if d[i] > worst or worst_at is None:
                worst, worst_at = float(d[i]), f"{col} at {common[int(np.flatnonzero(ok)[i])]}"
            limit = (tol or {}).get(col, TOL)
            if d[i] > limit:
                problems.append(f"{col}: max |diff| {d[i]:.3g} > {limit:g}")
            elif limit != TOL and d[i] > TOL:
                problems_soft.append(f"{col}: max |diff| {d[i]:.3g}, within its tolerance {limit:g}")
    ok = not problems
    problems += problems_soft
    return {"ok": ok, "max_diff": worst, "detail": f"{len(common)} rows, {n_values} values, {n_nan} NaN = NaN; max |diff| "
            f"{worst:.3g} ({worst_at})" + ("; " + "; ".join(problems) if problems else "")}


def _identical(a: Path, b: Path, files: list[str]) -> dict:
    same = [f for f in files if (a / f).read_bytes() == (b / f).read_bytes()]
    diff = [f for f in files if f not in same]
    return {"ok": not diff, "max_diff": None, "detail": f"{len(same)} of {len(files)} files byte-identical"
            + (f"; differ: {diff}" if diff else "")}


def mae_exact(datadir: Path, vcell_dir: Path, peer_dir: Path, key: str) -> dict:
    """(E) each perturbation's mae recomputed in float64 from the files, against vcell's and cell-eval's."""
    import anndata as ad
    import numpy as np

    pred, real = ad.read_h5ad(datadir / "pred_log1p.h5ad"), ad.read_h5ad(datadir / "real_log1p.h5ad")
    v, c = _frame(vcell_dir / "results.csv").set_index(key), _frame(peer_dir / "results.csv").set_index(key)
    dv, dc = [], []
    for pert in c.index:
        rows_p = np.flatnonzero(pred.obs[PERT_COL].astype(str).to_numpy() == pert)
        rows_r = np.flatnonzero(real.obs[PERT_COL].astype(str).to_numpy() == pert)
        mp = np.asarray(pred.X[rows_p], dtype=np.float64).mean(axis=0)
        mr = np.asarray(real.X[rows_r].toarray(), dtype=np.float64).mean(axis=0)
        exact = float(np.abs(mp - mr).mean())
        dv.append(abs(float(v.loc[pert, "mae"]) - exact))
        dc.append(abs(float(c.loc[pert, "mae"]) - exact))
    worst_v, worst_c = max(dv), max(dc)
    return {"ok": worst_v <= max(TOL, worst_c), "max_diff": None,
            "detail": f"{len(dv)} perturbations: max |vcell - float64| {worst_v:.3g}, max |cell-eval - float64| {worst_c:.3g} "
                      "(pass: vcell within 1e-9 of it or closer than cell-eval)"}


def compare(case: str, vcell_dir: Path, peer_dir: Path, cold_dir: Path | None, datadir: Path | None = None) -> dict:
    """The checks of one case: {name: {"ok", "max_diff", "detail"}}."""
    out = {}
    if case in ("A", "D"):
        out["results.csv"] = compare_tables(vcell_dir / "results.csv", peer_dir / "results.csv", ["perturbation", "metric"])
        out["agg_results.csv"] = compare_tables(vcell_dir / "agg_results.csv", peer_dir / "agg_results.csv", ["statistic"])
        files = ["results.csv", "agg_results.csv"]
    elif case == "B":
        out["anchor_agg"] = compare_tables(vcell_dir / "anchor_agg.csv", peer_dir / "anchor_agg.parquet", ["metric"])
        files = ["anchor_agg.csv", "anchor_splits.csv"]
    elif case == "C":
        out["baseline_agg"] = compare_tables(vcell_dir / "baseline_agg_results.csv", peer_dir / "baseline_agg.csv", ["statistic"])
        out["baseline_results"] = compare_tables(vcell_dir / "baseline_results.csv", peer_dir / "baseline_results.csv",
                                                 ["perturbation", "metric"])
        files = ["baseline_agg_results.csv", "baseline_results.csv"]
    elif case == "E":
        # cell-eval 0.8.2 averages the cells of a perturbation in float32 before its mae: within 1e-6
        # of vcell there, and both are also compared with a float64 recomputation (mae_exact)
        key = _frame(peer_dir / "results.csv").columns[0]  # cell-eval's wide table: one row per perturbation
        out["results.csv"] = compare_tables(vcell_dir / "results.csv", peer_dir / "results.csv", [key], {"mae": 1e-6})
        out["agg_results.csv"] = compare_tables(vcell_dir / "agg_results.csv", peer_dir / "agg_results.csv", ["statistic"],
                                                {"mae": 1e-6})
        if datadir is not None:
            out["mae vs float64 recomputation"] = mae_exact(datadir, vcell_dir, peer_dir, key)
        for name, (ok, detail) in es.compare(vcell_dir, peer_dir).items():
            if name.startswith(("real_de", "pred_de")):
                out["eval_speed: " + name] = {"ok": bool(ok), "max_diff": None, "detail": detail}
        files = ["results.csv", "agg_results.csv", "real_de.csv", "pred_de.csv"]
    if cold_dir is not None:
        out["vcell cold = warm"] = _identical(cold_dir, vcell_dir, files)
    return out


# ============================================================================ orchestration


def _spawn_worker(args: list[str]) -> dict:
    proc = subprocess.run([PY, __file__, *args], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ensure_data(datadir: Path, shape: list[int], seed: int, procs: int) -> dict:
    stamp = datadir / "data.json"
    want = {"shape": shape, "seed": seed, "version": SIM_VERSION}
    if stamp.exists():
        have = json.loads(stamp.read_text())
        if {k: have.get(k) for k in want} == want and all((datadir / f).exists() for f in have.get("files", [])):
            print(f"reusing simulated data in {datadir}", file=sys.stderr)
            return have
    stamp.unlink(missing_ok=True)
    datadir.mkdir(parents=True, exist_ok=True)
    print(f"simulating data in {datadir} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    info = _spawn_worker(["--worker", "simulate", "--workdir", str(datadir), "--perts", str(shape[0]),
                          "--cells", str(shape[1]), "--controls", str(shape[2]), "--genes", str(shape[3]),
                          "--seed", str(seed), "--procs", str(procs)])
    files = ["real.h5ad", "pred.h5ad", "pred_dense.h5ad", "real_log1p.h5ad", "pred_log1p.h5ad"]
    info.update(want, simulate_s=round(time.perf_counter() - t0, 1), files=files,
                file_mib={f: round((datadir / f).stat().st_size / 2**20, 1) for f in files})
    stamp.write_text(json.dumps(info, indent=1))
    return info


def _vcell(*args: str, threads: int) -> list[str]:
    return [PY, "-m", "vcell", "eval", *args, "--pert-col", PERT_COL, "--control", CONTROL, "--threads", str(threads)]


def _ce2(*args: str, threads: int) -> list[str]:
    return [CELL_EVAL2, *args, "--preset", "vcc2026", "--pert-col", PERT_COL, "--control", CONTROL,
            "--set", f"num_threads={threads}", "--set", f"gather_threads={threads}"]


def commands(case: str, d: Path, out: Path, threads: int) -> dict:
    """tool -> command line of a case (``out`` is the run's output folder)."""
    real, pred = str(d / "real.h5ad"), str(d / "pred.h5ad")
    if case == "A":
        return {"vcell": _vcell("run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", str(out), threads=threads),
                "cell-eval2": _ce2("run", "-ap", pred, "-ar", real, "-o", str(out), threads=threads)}
    if case == "B":
        return {"vcell": _vcell("baseline", "--profile", "vcc2026", "--real", real, "--out", str(out), "--only", "anchor",
                                threads=threads),
                "cell-eval2": _ce2("run", "-ap", pred, "-ar", real, "-o", str(out), "--anchor", threads=threads)}
    if case == "C":
        return {"vcell": _vcell("baseline", "--profile", "vcc2026", "--real", real, "--out", str(out), "--only", "baseline",
                                threads=threads),
                "cell-eval2": _ce2("baseline", "-ar", real, "-o", str(out), threads=threads)}
    if case == "D":
        dense = str(d / "pred_dense.h5ad")
        return {"vcell": _vcell("run", "--profile", "vcc2026", "--pred", dense, "--real", real, "--out", str(out), threads=threads),
                "cell-eval2": _ce2("run", "-ap", dense, "-ar", real, "-o", str(out), threads=threads)}
    if case == "E":
        p, r = d / "pred_log1p.h5ad", d / "real_log1p.h5ad"
        return {"vcell": es.vcell_cmd(p, r, out, threads, False), "cell-eval 0.8.2": es.cell_eval_cmd(p, r, out, threads)}
    raise ValueError(case)


CASE_TITLES = {
    "A": "vcc2026 run, CSR counts",
    "B": "vcc2026 replicate anchor",
    "C": "vcc2026 baseline end",
    "D": "vcc2026 run, dense prediction (counts + 1)",
    "E": "vcc (2025) run, dense tie-free log1p prediction",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vcell_eval2026_speed"))
    ap.add_argument("--perts", type=int, default=50)
    ap.add_argument("--cells", type=int, default=200, help="cells per perturbation")
    ap.add_argument("--controls", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="A,B,C,D,E", help="comma-separated subset of A,B,C,D,E (B also runs A)")
    ap.add_argument("--skip-cell-eval2", action="store_true", help="time vcell only (no peers, no agreement checks)")
    ap.add_argument("--skip-compiled", action="store_true",
                    help="leave out the runs after `vcell eval compile` (each case's first run with the cache it writes)")
    ap.add_argument("--max-rss-gb", type=float, default=16.0, help="abort a run above this RSS (GiB)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="abort a run after this many seconds")
    ap.add_argument("--max-busy", type=float, default=0.15, help="before each run, wait until fewer cores than this are busy")
    ap.add_argument("--max-wait", type=float, default=120.0, help="... for at most this many seconds per run")
    ap.add_argument("--retry-disturbed", type=int, default=2,
                    help="run again (at most this many times) when other processes or steal took > 10%% of a core meanwhile")
    ap.add_argument("--procs", type=int, default=2, help="processes for the simulation")
    ap.add_argument("--worker", choices=["simulate", "compare"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--a", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--b", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cold", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "simulate":
        print(json.dumps(simulate(args.workdir, args.perts, args.cells, args.controls, args.genes, args.seed, args.procs)))
        return 0
    if args.worker == "compare":
        print(json.dumps(compare(args.case, args.a, args.b, args.cold, args.workdir)))
        return 0

    cases = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - set(CASE_TITLES))
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from A,B,C,D,E")
    if "B" in cases and "A" not in cases:
        cases.append("A")  # the anchor's extra cost needs cell-eval2's plain run
    cases = sorted(set(cases))
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    data = _ensure_data(workdir / "data", [args.perts, args.cells, args.controls, args.genes], args.seed, args.procs)
    code_before = _code_state()
    numba_dir = workdir / "numba_cache"  # private: other processes' vcell runs neither fill nor empty it
    env = dict(os.environ, PYTHONFAULTHANDLER="1", NUMBA_CACHE_DIR=str(numba_dir), **{v: str(args.threads) for v in THREAD_VARS})
    max_rss = args.max_rss_gb * 1024
    runs: dict[str, dict] = {}  # key "case/tool/mode"

    def measure(case: str, tool: str, mode: str, cmd_of) -> dict:
        key = f"{case}/{tool}/{mode}"
        stem = f"{case}_{tool.split()[0]}_{mode.split()[0]}"
        out = workdir / "out" / stem
        cmd = cmd_of(out)
        for attempt in range(1 + args.retry_disturbed):
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            busy = es.wait_idle(args.max_busy, args.max_wait)
            cleared = None
            if mode in ("cold", "compiled"):
                cleared = sum(1 for f in numba_dir.rglob("*") if f.suffix in (".nbi", ".nbc"))
                shutil.rmtree(numba_dir, ignore_errors=True)
            if mode == "compiled":  # the cache exactly as `vcell eval compile` left it
                shutil.copytree(compiled_dir, numba_dir)
            cache = sum(1 for f in numba_dir.rglob("*.nbi")) if numba_dir.exists() else 0
            print(f"running {key} (busy cores {busy:.2f}, numba cache index files {cache}) ...", file=sys.stderr, flush=True)
            r = es.timed_run(key, cmd, workdir / "out" / f"log_{stem}.txt", env, max_rss, args.timeout)
            if not es._disturbed(r):
                break
            print(f"  disturbed ({es.disturbance(r)}): again",
                  file=sys.stderr, flush=True)
        r.update(case=case, tool=tool, mode=mode, out=str(out), busy_before=busy, attempts=attempt + 1,
                 numba_cache_files_before=cache, numba_cache_cleared=cleared)
        tl = r.get("timeline") or []
        r["timeline"] = tl[:: max(1, len(tl) // 200)]  # a coarse RSS timeline is enough for the JSON
        print(f"  {key}: rc {r['rc']}, wall {r['wall_s']:.2f} s, peak {r['peak_mib']:,.0f} MiB, "
              f"other processes {r['other_cpu_s']:.1f} CPU s, steal {r['steal_s']:.1f} s"
              + (f", ABORTED: {r['aborted']}" if r["aborted"] else ""), file=sys.stderr, flush=True)
        if r["rc"] != 0:
            print("".join(open(r["log"], errors="replace").readlines()[-30:]), file=sys.stderr)
        runs[key] = r
        return r

    compiled_dir = workdir / "numba_compiled"  # what `vcell eval compile` writes, copied before each "compiled" run
    modes = ("cold", "warm") if args.skip_compiled else ("cold", "compiled", "warm")
    if not args.skip_compiled:
        shutil.rmtree(compiled_dir, ignore_errors=True)
        (workdir / "out").mkdir(parents=True, exist_ok=True)
        busy = es.wait_idle(args.max_busy, args.max_wait)
        r = es.timed_run("compile", [PY, "-m", "vcell", "eval", "compile", "--threads", str(args.threads)], workdir / "out" / "log_compile.txt",
                         dict(env, NUMBA_CACHE_DIR=str(compiled_dir)), max_rss, args.timeout)
        r.update(case="compile", tool="vcell", mode="once", out=None, busy_before=busy, attempts=1)
        print(f"  vcell eval compile: rc {r['rc']}, wall {r['wall_s']:.2f} s", file=sys.stderr, flush=True)
        runs["compile/vcell/once"] = r
        if r["rc"] != 0:
            print("".join(open(r["log"], errors="replace").readlines()[-30:]), file=sys.stderr)
            modes = ("cold", "warm")
    for case in cases:
        tools = list(commands(case, workdir / "data", workdir, args.threads))
        vtool, peer = tools[0], tools[1]
        for mode in modes:
            measure(case, vtool, mode, lambda out, c=case: commands(c, workdir / "data", out, args.threads)[vtool])
        if not args.skip_cell_eval2:
            measure(case, peer, "single run", lambda out, c=case, p=peer: commands(c, workdir / "data", out, args.threads)[p])

    # ------------------------------------------------------------------------ agreement
    checks: dict[str, dict] = {}
    for case in cases:
        v, c = runs.get(f"{case}/vcell/warm"), runs.get(f"{case}/vcell/cold")
        peer = next((r for k, r in runs.items() if r["case"] == case and r["tool"] != "vcell"), None)
        if v is None or peer is None or v["rc"] != 0 or peer["rc"] != 0:
            continue
        checks[case] = _spawn_worker(["--worker", "compare", "--case", case, "--a", v["out"], "--b", peer["out"],
                                      "--workdir", str(workdir / "data"),
                                      *(["--cold", c["out"]] if c and c["rc"] == 0 else [])])

    # ------------------------------------------------------------------------ report
    def get(case, tool, mode):
        r = runs.get(f"{case}/{tool}/{mode}")
        return r if r and r["rc"] == 0 else None

    def peer_of(case):
        return next((r for r in runs.values() if r["case"] == case and r["tool"] != "vcell" and r["rc"] == 0), None)

    def max_diff(case):
        ds = [c["max_diff"] for c in checks.get(case, {}).values() if c["max_diff"] is not None]
        return max(ds) if ds else None

    rows, gates = [], []
    if get("compile", "vcell", "once"):
        c = get("compile", "vcell", "once")
        rows.append({"case": "-", "tool": "vcell eval compile (once; the cache the 'compiled' runs start from)", "mode": "once",
                     "wall_s": c["wall_s"], "peak_mib": c["peak_mib"], "speedup": None, "max_diff": None, "note": ""})
    for case in cases:
        peer = peer_of(case)
        md = max_diff(case)
        for mode in modes:
            r = get(case, "vcell", mode)
            if r is None:
                rows.append({"case": case, "tool": "vcell", "mode": mode, "wall_s": None, "peak_mib": None, "speedup": None,
                             "max_diff": None, "note": f"failed (rc {runs.get(f'{case}/vcell/{mode}', {}).get('rc')})"})
                continue
            sp = peer["wall_s"] / r["wall_s"] if peer else None
            rows.append({"case": case, "tool": "vcell", "mode": mode, "wall_s": r["wall_s"], "peak_mib": r["peak_mib"],
                         "speedup": sp, "max_diff": md, "note": ""})
        if peer:
            rows.append({"case": case, "tool": peer["tool"], "mode": "single run (no JIT cache)", "wall_s": peer["wall_s"],
                         "peak_mib": peer["peak_mib"], "speedup": 1.0, "max_diff": None,
                         "note": "plain run + anchor" if case == "B" else ""})
    # B, the other two ways
    extra = {}
    ce_plain, ce_anchor = peer_of("A"), peer_of("B")
    for mode in ("cold", "warm"):
        va, vb = get("A", "vcell", mode), get("B", "vcell", mode)
        if ce_plain and ce_anchor and vb:
            cost = ce_anchor["wall_s"] - ce_plain["wall_s"]
            extra[mode] = cost / vb["wall_s"]
            rows.append({"case": "B'", "tool": "vcell anchor vs cell-eval2's anchor extra cost", "mode": mode,
                         "wall_s": vb["wall_s"], "peak_mib": vb["peak_mib"], "speedup": extra[mode], "max_diff": max_diff("B"),
                         "note": f"cell-eval2 --anchor {ce_anchor['wall_s']:.1f} s - plain {ce_plain['wall_s']:.1f} s = {cost:.1f} s"})
        if ce_anchor and va and vb:
            both = va["wall_s"] + vb["wall_s"]
            rows.append({"case": "B''", "tool": "vcell run + anchor (2 calls) vs cell-eval2 run --anchor", "mode": mode,
                         "wall_s": both, "peak_mib": max(va["peak_mib"], vb["peak_mib"]), "speedup": ce_anchor["wall_s"] / both,
                         "max_diff": max(x for x in (max_diff("A"), max_diff("B"), 0.0) if x is not None), "note": ""})

    for case in cases:
        peer, r = peer_of(case), get(case, "vcell", "warm")
        rc = get(case, "vcell", "cold")
        if peer and r:
            if case in ("A", "B", "D", "E"):
                for mode, x in (("warm", r), ("cold", rc)):
                    if x is None:
                        continue
                    ratio = peer["wall_s"] / x["wall_s"]
                    label = f"{case} speed, {mode}: {ratio:.1f}x {peer['tool']}'s wall time"
                    if case == "B":
                        label += f" (call vs call; vs the anchor's extra cost: {extra.get(mode, float('nan')):.1f}x)"
                        ratio = min(ratio, extra.get(mode, ratio))
                    gates.append((ratio >= SPEED_TARGET, label + f" (target >= {SPEED_TARGET:.0f}x)"))
            mx = max(x["peak_mib"] for x in (r, rc) if x)
            gates.append((mx <= peer["peak_mib"] / 2, f"{case} memory: vcell peak {mx:,.0f} MiB vs {peer['tool']} "
                          f"{peer['peak_mib']:,.0f} MiB ({mx / peer['peak_mib']:.2f}x; target <= 0.5x)"))
    failed_runs = [k for k, r in runs.items() if r["rc"] != 0]
    code_after = _code_state()

    print(f"\n## vcell eval (vcc2026 / vcc) vs cell-eval2 {_version('cell-eval2')} / cell-eval {_version('cell-eval')}\n")
    print(f"machine: {es.machine_info()}, cell-eval2 {_version('cell-eval2')}, numba-mwu {_version('numba-mwu')}")
    print(f"data: {json.dumps({k: v for k, v in data.items() if k not in ('version', 'files')})}")
    print(f"threads: {args.threads} ({', '.join(THREAD_VARS)} = {args.threads} for every run)")
    print(f"vcell code: commit {code_before['commit']}, "
          + (f"uncommitted changes in {code_before['dirty']}" if code_before["dirty"] else "src/ clean")
          + ("" if code_after["src_mtime"] == code_before["src_mtime"] else
             "; WARNING: files under src/vcell changed during the runs (the cases may have measured different code)"))
    print("\ncommands (WORKDIR = " + str(workdir) + "):")
    for k, r in runs.items():
        print(f"    {k}: " + " ".join(Path(x).name if i == 0 else x for i, x in enumerate(r["cmd"])).replace(str(workdir), "WORKDIR"))
    print("\n| case | tool | cold/warm | wall s | peak RSS MiB | speed-up (peer wall / this wall) | max abs diff | note |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} {CASE_TITLES.get(row['case'][0], '') if len(row['case']) == 1 else ''} | {row['tool']} | "
              f"{row['mode']} | {_f(row['wall_s'], '.2f')} | {_f(row['peak_mib'], ',.0f')} | "
              f"{_f(row['speedup'], '.1f', 'x')} | {_f(row['max_diff'], '.2g')} | {row['note']} |")
    print()
    ok_all = not failed_runs
    for k in failed_runs:
        print(f"FAIL run {k} exited with {runs[k]['rc']}" + (f" ({runs[k]['aborted']})" if runs[k]["aborted"] else "")
              + f"; log {runs[k]['log']}")
    for case, cs in checks.items():
        for name, c in cs.items():
            ok_all &= bool(c["ok"])
            print(f"{'PASS' if c['ok'] else 'FAIL'} {case} {name}: {c['detail']}")
    for ok, label in gates:
        ok_all &= ok
        print(f"{'PASS' if ok else 'FAIL'} {label}")
    compile_run = get("compile", "vcell", "once")
    for case in cases:  # not a gate: the target's cold run is the first after an install, without this step
        peer, r = peer_of(case), get(case, "vcell", "compiled")
        if compile_run and peer and r:
            print(f"info {case}, first run after `vcell eval compile` ({compile_run['wall_s']:.1f} s once): "
                  f"{r['wall_s']:.2f} s, {peer['wall_s'] / r['wall_s']:.1f}x {peer['tool']}'s wall time")
    disturbed = [k for k, r in runs.items() if r["attempts"] > 1 or es._disturbed(r)]
    if disturbed:
        print(f"note: repeated or disturbed runs: {disturbed}")
    summary = {"data": data, "threads": args.threads, "cases": cases, "rows": rows, "code": [code_before, code_after],
               "gates": [{"ok": ok, "label": label} for ok, label in gates], "checks": checks, "runs": runs,
               "load_average_end": os.getloadavg()}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nsummary: {workdir / 'summary.json'}; load average at the end: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0 if ok_all else 1


def _code_state() -> dict:
    """The commit, uncommitted files under src/ and the newest source mtime (to notice edits during a run)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(es.REPO), *a], capture_output=True, text=True).stdout.strip()

    mtime = max((f.stat().st_mtime for f in (es.REPO / "src" / "vcell").rglob("*.py")), default=0.0)
    return {"commit": git("rev-parse", "--short", "HEAD") or "?", "dirty": git("status", "--porcelain", "--", "src").splitlines(),
            "src_mtime": mtime}


def _f(x, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
