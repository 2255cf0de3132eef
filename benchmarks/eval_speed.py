#!/usr/bin/env python
"""End-to-end speed and peak memory of ``vcell eval run`` against ``cell-eval run`` (vcc profile).

The claim checked: on a simulated Virtual Cell Challenge-shaped input (log1p, dense float32,
12,000 cells x 18,080 genes: 50 perturbations x 200 cells + 2,000 ``non-targeting`` controls),
``vcell eval run --profile vcc --threads 2`` writes the same numbers as ``cell-eval run
--profile vcc --num-threads 2`` (cell-eval 0.8.2 + pdex 0.3.0), is >= 20x faster wall-clock and
peaks at <= 1.5 GB RSS. ``--vcc-scale`` also times vcell alone on the full challenge scale
(150 perturbations x 1,000 cells + 38,000 controls x 18,080 genes, CSR float32, ``--backed``).

What it does:

1. Simulates the data (in worker processes, not timed; reused from ``--workdir`` when the
   parameters match). Negative-binomial counts (log-normal gene means, cell size factors); each
   perturbation knocks down its own target gene (perturbations are named after genes of
   ``var``) and changes 200 other genes (every 5th perturbation only weakly); counts are
   normalised to 10,000 per cell (``normalize_total(target_sum=1e4)``) and log1p'd, float32;
   the labels are shuffled over the cells. The prediction keeps the real cells' layout: on each
   expressed (non-zero) value, the perturbation's mean effect is shrunk by a factor (1, 0.6,
   0.3 or 0 in turn over the perturbations; controls untouched) and Gaussian noise (sd 0.15) is
   added, clipped at 0. Default mode writes both files dense; ``--vcc-scale`` writes them as CSR
   chunk by chunk into resizable HDF5 datasets, so no dense (or whole) matrix is ever in memory.
2. Runs each tool as a fresh CLI subprocess and measures its end-to-end wall time (interpreter
   start, imports, reading, DE, metrics, writing), its CPU time and its peak RSS (``ru_maxrss``
   from ``wait4`` on that child: the child and the processes it waited for). This process
   imports no numpy, so it stays small (``ru_maxrss`` survives fork + exec). vcell runs first
   with an empty numba cache (``src/vcell/**/__pycache__/*.nbi|*.nbc`` deleted: "cold", JIT
   compilation included), then ``--vcell-runs - 1`` more times (cache loaded: "warm"); cell-eval
   runs once (its pdex numba cache in site-packages is left as it is). Each run writes to its own
   folder. Before each run the script waits (up to ``--max-wait`` s) until the machine is idle
   (< ``--max-busy`` cores busy, from /proc/stat); it records the load average, the CPU
   seconds other processes used during the run and the hypervisor's steal time, and repeats a
   run (``--retry-disturbed``) when together they took more than 10% of a core. A sampler polls the child's VmRSS every 0.25 s for a
   coarse RSS timeline; above ``--max-rss-gb`` the child gets SIGABRT and, run with
   ``PYTHONFAULTHANDLER=1``, prints its Python stack into its log (shown in the report).
3. Checks the numbers: ``results.csv`` per perturbation x metric (``|diff| <= 1e-6``, empty =
   null must match null), ``agg_results.csv`` layout (columns, statistic rows) and values, and
   the DE tables ``real_de.csv`` / ``pred_de.csv`` (same (target, feature) rows; ``p_value`` and
   ``fdr`` within 1e-9 relative), of vcell's last run against cell-eval's. Prints PASS/FAIL lines
   (speed gate >= 20x, memory gate <= 1.5 GB, the checks) and a markdown table.
4. ``--stages``: runs vcell's pipeline once more in one process, stage by stage (the functions
   ``vcell.eval.run.run`` calls), with each stage's time and peak RSS: where the time and the
   memory go. ``--stages-workaround`` is kept for old runs (it streamed the pseudobulk of a
   backed matrix before vcell did). ``--vcc-scale --also-in-memory`` adds a vcell run with
   ``--in-memory`` (both CSR files read whole) as a contrast to the gene bands of ``--backed``
   (``--memory-budget`` passes vcell's budget); at that scale the gate is issue #15's: peak
   RSS <= 4 GB with ``--backed``.

Run (see benchmarks/README.md, "Evaluator speed")::

    .venv/bin/python benchmarks/eval_speed.py --workdir /tmp/vcell_eval_speed --stages
    .venv/bin/python benchmarks/eval_speed.py --vcc-scale --workdir /tmp/vcell_eval_vcc \
        --also-in-memory --stages --stages-workaround

The exit status is 1 when a check or a gate fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CONTROL = "non-targeting"
PERT_COL = "target_gene"
TARGET_SUM = 1e4
NOISE_SD = 0.15
SHRINK = (1.0, 0.6, 0.3, 0.0)  # fraction of the real mean effect kept by the prediction, in turn
CHUNK_ROWS = 1000
SIM_VERSION = 1  # bump when the simulation changes (invalidates cached data)

SPEED_GATE = 20.0  # cell-eval wall / vcell wall
MEMORY_GATE_MIB = 1.5e9 / 2**20  # 1.5 GB = 1,430.5 MiB
VCC_MEMORY_GATE_MIB = 4e9 / 2**20  # issue #15: 4 GB at the challenge's size = 3,814.7 MiB


# ============================================================================ simulation (workers)

_MODEL: dict = {}


def _model(n_perts: int, n_genes: int, seed: int) -> dict:
    """Gene means, per-group effects (row 0: control) and the target gene of each perturbation."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    gene_mean = np.exp(rng.normal(-2.0, 1.8, n_genes))
    expressed = np.flatnonzero(gene_mean > 1.0)
    targets = np.sort(rng.choice(expressed, n_perts, replace=False))
    effect = np.ones((n_perts + 1, n_genes))
    for p in range(1, n_perts + 1):
        idx = rng.choice(n_genes, 200, replace=False)
        sigma = 0.25 if p % 5 == 0 else 1.0  # every 5th perturbation: weak effects
        effect[p, idx] = np.exp(rng.normal(0.0, sigma, idx.size))
        effect[p, targets[p - 1]] = 0.1  # knock-down of the perturbation's own gene
    return {"gene_mean": gene_mean, "effect": effect, "targets": targets}


def _init_pool(model: dict) -> None:
    _MODEL.update(model)


def _sim_chunk(task):
    """log1p(normalised NB counts) of one chunk of rows, as CSR float32 (rows in file order)."""
    import numpy as np
    import scipy.sparse as sp

    seed, k, groups = task
    rng = np.random.default_rng([seed, 1, k])
    size = rng.lognormal(0.0, 0.3, (groups.size, 1))
    lam = _MODEL["gene_mean"][None, :] * _MODEL["effect"][groups] * size
    counts = rng.poisson(rng.gamma(2.0, lam / 2.0)).astype(np.float32)  # NB, dispersion 2
    del lam
    total = counts.sum(axis=1, keepdims=True)
    total[total == 0] = 1
    np.log1p(counts / total * np.float32(TARGET_SUM), out=counts)
    return sp.csr_matrix(counts)


def _pred_chunk(block, groups, shift, rng):
    """The prediction of a CSR chunk of real cells (same layout): shrunk effects + noise.

    ``shift[g]`` is the part of group g's mean effect (log space) the prediction drops
    (``(1 - s_g) * (mean_g - mean_control)``, 0 for the controls). Only expressed values change.
    """
    import numpy as np

    block = block.copy()
    rows = np.repeat(groups, np.diff(block.indptr))
    vals = block.data - shift[rows, block.indices].astype(np.float32)
    vals += rng.normal(0.0, NOISE_SD, vals.size).astype(np.float32)
    np.maximum(vals, 0, out=vals)
    block.data = vals.astype(np.float32)
    block.eliminate_zeros()
    return block


def _layout(n_perts: int, cells: int, n_ctrl: int, n_genes: int, seed: int):
    """Groups of the cells in file order (shuffled), the group names and the gene names."""
    import numpy as np

    model = _model(n_perts, n_genes, seed)
    genes = np.array([f"G{j:05d}" for j in range(n_genes)], dtype=object)
    names = np.array([CONTROL] + [genes[t] for t in model["targets"]], dtype=object)
    group = np.concatenate([np.zeros(n_ctrl, np.int64), np.repeat(np.arange(1, n_perts + 1), cells)])
    group = np.random.default_rng([seed, 2]).permutation(group)
    return model, group, names, genes


def _obs_var(group, names, genes, prefix: str):
    import pandas as pd

    cats = sorted(names)
    obs = pd.DataFrame(
        {PERT_COL: pd.Categorical(names[group], categories=cats)},
        index=pd.Index([f"{prefix}{i:07d}" for i in range(group.size)]),
    )
    var = pd.DataFrame(index=pd.Index(genes, name=None))
    return obs, var


def _group_shift(sums, counts):
    """``(1 - s_g) * (mean_g - mean_control)`` per group (rows) and gene, float64."""
    import numpy as np

    means = sums / counts[:, None]
    delta = means - means[0]
    keep = np.array([1.0] + [SHRINK[p % len(SHRINK)] for p in range(len(counts) - 1)])
    return (1.0 - keep)[:, None] * delta


def _group_sums(block, groups, n_groups):
    """``[n_groups, n_genes]`` sums of the rows of a CSR block per group."""
    import numpy as np
    import scipy.sparse as sp

    m = block.shape[0]
    ind = sp.csr_matrix((np.ones(m), (groups, np.arange(m))), shape=(n_groups, m))
    return (ind @ block).toarray()


def _chunks(group, seed):
    for k, s in enumerate(range(0, group.size, CHUNK_ROWS)):
        yield seed, k, group[s : s + CHUNK_ROWS]


def simulate_dense(workdir: Path, n_perts: int, cells: int, n_ctrl: int, n_genes: int, seed: int, procs: int) -> dict:
    """Write ``real.h5ad`` and ``pred.h5ad`` (dense float32) into ``workdir``."""
    import multiprocessing as mp

    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    model, group, names, genes = _layout(n_perts, cells, n_ctrl, n_genes, seed)
    n = group.size
    X = np.empty((n, n_genes), np.float32)
    sums = np.zeros((n_perts + 1, n_genes))
    with mp.get_context("fork").Pool(procs, initializer=_init_pool, initargs=(model,)) as pool:
        s = 0
        for block in pool.imap(_sim_chunk, _chunks(group, seed)):
            e = s + block.shape[0]
            X[s:e] = block.toarray()
            sums += _group_sums(block, group[s:e], n_perts + 1)
            s = e
    shift = _group_shift(sums, np.bincount(group, minlength=n_perts + 1).astype(float))
    obs, var = _obs_var(group, names, genes, "c")
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(workdir / "real.h5ad")
    rng = np.random.default_rng([seed, 3])
    for s in range(0, n, CHUNK_ROWS):
        e = min(n, s + CHUNK_ROWS)
        X[s:e] = _pred_chunk(sp.csr_matrix(X[s:e]), group[s:e], shift, rng).toarray()
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(workdir / "pred.h5ad")
    zeros = float((X == 0).mean())
    return {"cells": n, "genes": n_genes, "pred_zero_fraction": zeros}


class _CSRWriter:
    """Appends CSR chunks to the ``X`` group of a new ``.h5ad`` (resizable HDF5 datasets)."""

    def __init__(self, path: Path, n_genes: int, index_dtype):
        import h5py
        import numpy as np

        self.path, self.n_genes, self.index_dtype = path, n_genes, index_dtype
        self.f = h5py.File(path, "w")
        self.f.attrs["encoding-type"] = "anndata"
        self.f.attrs["encoding-version"] = "0.1.0"
        g = self.f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        opts = dict(maxshape=(None,), chunks=(1 << 16,))
        self.g = g
        self.data = g.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
        self.indices = g.create_dataset("indices", shape=(0,), dtype=index_dtype, **opts)
        self.indptr = g.create_dataset("indptr", shape=(1,), dtype=index_dtype, **opts)
        self.indptr[0] = 0
        self.rows = self.nnz = 0

    def append(self, X) -> None:
        import numpy as np

        X.sort_indices()
        m, k = X.shape[0], X.nnz
        if self.nnz + k > np.iinfo(self.index_dtype).max:
            raise SystemExit(f"{self.path}: {self.nnz + k} non-zeros overflow {np.dtype(self.index_dtype)} indices")
        self.data.resize((self.nnz + k,))
        self.indices.resize((self.nnz + k,))
        self.data[self.nnz :] = X.data
        self.indices[self.nnz :] = X.indices
        self.indptr.resize((self.rows + m + 1,))
        self.indptr[self.rows + 1 :] = X.indptr[1:].astype(np.int64) + self.nnz
        self.rows, self.nnz = self.rows + m, self.nnz + k

    def close(self, obs, var) -> None:
        from anndata.io import write_elem

        self.g.attrs["shape"] = (self.rows, self.n_genes)
        write_elem(self.f, "obs", obs)
        write_elem(self.f, "var", var)
        write_elem(self.f, "uns", {})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self.f, key, {})
        self.f.close()


def simulate_csr(workdir: Path, n_perts: int, cells: int, n_ctrl: int, n_genes: int, seed: int, procs: int) -> dict:
    """Write ``real.h5ad`` and ``pred.h5ad`` (CSR float32) chunk by chunk into ``workdir``."""
    import multiprocessing as mp

    import h5py
    import numpy as np
    import scipy.sparse as sp

    model, group, names, genes = _layout(n_perts, cells, n_ctrl, n_genes, seed)
    n = group.size
    obs, var = _obs_var(group, names, genes, "c")
    sums = np.zeros((n_perts + 1, n_genes))
    writer = None
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(procs, initializer=_init_pool, initargs=(model,)) as pool:
        s = 0
        for block in pool.imap(_sim_chunk, _chunks(group, seed)):
            if writer is None:  # int32 indices unless the expected non-zeros would overflow them
                expected = block.nnz / block.shape[0] * n * 1.2
                dtype = np.int32 if expected < np.iinfo(np.int32).max else np.int64
                writer = _CSRWriter(workdir / "real.h5ad.tmp", n_genes, dtype)
            e = s + block.shape[0]
            sums += _group_sums(block, group[s:e], n_perts + 1)
            writer.append(block)
            s = e
            if (s // CHUNK_ROWS) % 20 == 0:
                print(f"  real: {s:,}/{n:,} cells, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    nnz_real = writer.nnz
    writer.close(obs, var)
    os.replace(workdir / "real.h5ad.tmp", workdir / "real.h5ad")
    shift = _group_shift(sums, np.bincount(group, minlength=n_perts + 1).astype(float))
    rng = np.random.default_rng([seed, 3])
    with h5py.File(workdir / "real.h5ad", "r") as f:
        d, ix = f["X/data"], f["X/indices"]
        indptr = f["X/indptr"][:].astype(np.int64)
        writer = _CSRWriter(workdir / "pred.h5ad.tmp", n_genes, ix.dtype)
        for s in range(0, n, CHUNK_ROWS):
            e = min(n, s + CHUNK_ROWS)
            a, b = indptr[s], indptr[e]
            block = sp.csr_matrix((d[a:b], ix[a:b], indptr[s : e + 1] - a), shape=(e - s, n_genes))
            writer.append(_pred_chunk(block, group[s:e], shift, rng))
    nnz_pred = writer.nnz
    writer.close(obs, var)
    os.replace(workdir / "pred.h5ad.tmp", workdir / "pred.h5ad")
    return {"cells": n, "genes": n_genes, "nnz_real": int(nnz_real), "nnz_pred": int(nnz_pred),
            "density_real": nnz_real / (n * n_genes), "density_pred": nnz_pred / (n * n_genes)}


# ============================================================================ comparison (worker)


def compare(vcell_dir: Path, ce_dir: Path) -> dict:
    """Compare vcell's outputs with cell-eval's; returns named checks ``{name: [ok, detail]}``."""
    import numpy as np
    import pandas as pd

    checks: dict[str, list] = {}

    def read(path):
        return pd.read_csv(path)

    def values(frame, cols):
        """Float values and a null mask (empty CSV field); ``NaN`` text stays a NaN, not a null."""
        raw = frame[cols].astype(str).to_numpy() if len(cols) else np.empty((len(frame), 0), str)
        null = raw == ""
        num = np.where(null, "nan", raw).astype(float)
        return num, null

    # results.csv: per perturbation x metric
    def read_text(path):
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    rv, rc = read_text(vcell_dir / "results.csv"), read_text(ce_dir / "results.csv")
    same_cols = list(rv.columns) == list(rc.columns)
    detail = f"columns vcell={list(rv.columns)} cell-eval={list(rc.columns)}"
    key = rc.columns[0]
    ok = same_cols and set(rv[key]) == set(rc[key]) and len(rv) == len(rc)
    worst, bad = 0.0, []
    if ok:
        a = rv.set_index(key).loc[rc[key]]
        b = rc.set_index(key)
        n_null = 0
        for col in b.columns:
            (x, zx), (y, zy) = values(a, [col]), values(b, [col])
            x, zx, y, zy = x[:, 0], zx[:, 0], y[:, 0], zy[:, 0]
            n_null += int(zy.sum())
            nx, ny = np.isnan(x) & ~zx, np.isnan(y) & ~zy
            if not (np.array_equal(zx, zy) and np.array_equal(nx, ny)):
                bad.append(f"{col}: null/NaN pattern differs at {int(((zx != zy) | (nx != ny)).sum())} perturbation(s)")
                continue
            ok_mask = ~(zy | ny)
            d = np.abs(x[ok_mask] - y[ok_mask])
            m = float(d.max()) if d.size else 0.0
            worst = max(worst, m)
            if m > 1e-6:
                bad.append(f"{col}: max |diff| {m:.3g} at {int((d > 1e-6).sum())} perturbation(s)")
        detail = (f"{len(rc)} perturbations x {len(rc.columns) - 1} metric columns "
                  f"({', '.join(map(str, rc.columns[1:]))}); max |diff| {worst:.3g}; nulls {n_null}; same row order: "
                  f"{list(rv[key]) == list(rc[key])}" + (("; " + "; ".join(bad)) if bad else ""))
        ok = not bad
    checks["results.csv values (|diff| <= 1e-6, null = null)"] = [ok, detail]

    # agg_results.csv: layout and values
    av, ac = read_text(vcell_dir / "agg_results.csv"), read_text(ce_dir / "agg_results.csv")
    layout = list(av.columns) == list(ac.columns) and list(av.iloc[:, 0]) == list(ac.iloc[:, 0])
    checks["agg_results.csv layout (columns, statistic rows)"] = [
        layout, f"columns {list(ac.columns)}; rows {list(ac.iloc[:, 0])}" if layout else
        f"vcell columns {list(av.columns)} rows {list(av.iloc[:, 0])}; cell-eval columns {list(ac.columns)} rows {list(ac.iloc[:, 0])}"]
    if layout:
        (x, zx), (y, zy) = values(av, list(av.columns[1:])), values(ac, list(ac.columns[1:]))
        nx, ny = np.isnan(x) | zx, np.isnan(y) | zy
        same = np.array_equal(zx, zy) and np.array_equal(nx, ny)
        d = np.abs(x[~nx] - y[~ny]) if same else None
        m = float(d.max()) if d is not None and d.size else 0.0
        checks["agg_results.csv values (|diff| <= 1e-6)"] = [d is not None and m <= 1e-6,
                                                            "null pattern differs" if d is None else f"max |diff| {m:.3g}"]

    # DE tables
    for name in ("real_de.csv", "pred_de.csv"):
        dv, dc = read(vcell_dir / name), read(ce_dir / name)
        same_rows = (len(dv) == len(dc) and (dv["target"].astype(str).to_numpy() == dc["target"].astype(str).to_numpy()).all()
                     and (dv["feature"].astype(str).to_numpy() == dc["feature"].astype(str).to_numpy()).all())
        if not same_rows:  # align on (target, feature)
            dv = dv.set_index(["target", "feature"]).loc[pd.MultiIndex.from_frame(dc[["target", "feature"]])].reset_index()
        info = [f"{len(dc):,} rows, same order: {same_rows}", f"columns equal: {list(dv.columns) == list(dc.columns)}"]
        rel = {}
        for col in ("p_value", "fdr", "statistic", "log2_fold_change", "target_mean", "ref_mean"):
            x, y = dv[col].to_numpy(float), dc[col].to_numpy(float)
            fin = np.isfinite(x) & np.isfinite(y)
            same_nonfinite = bool(np.array_equal(x[~fin], y[~fin], equal_nan=True))
            r = np.abs(x[fin] - y[fin]) / np.maximum(np.abs(y[fin]), 1e-300)
            rel[col] = (float(r.max()) if r.size else 0.0, same_nonfinite)
        info += [f"{c} max rel {v[0]:.2g}" + ("" if v[1] else " (non-finite differ)") for c, v in rel.items()]
        sig_v, sig_c = dv["fdr"].to_numpy(float) < 0.05, dc["fdr"].to_numpy(float) < 0.05
        info.append(f"significant (fdr < 0.05) {int(sig_c.sum()):,}, same set: {bool(np.array_equal(sig_v, sig_c))}")
        ok = rel["p_value"][0] <= 1e-9 and rel["p_value"][1] and rel["fdr"][0] <= 1e-9 and rel["fdr"][1]
        checks[f"{name} p_value and fdr (rel <= 1e-9)"] = [bool(ok), "; ".join(info)]
    return checks


# ============================================================================ stage breakdown (worker)


def stages(workdir: Path, threads: int, backed: bool, workaround: bool) -> list[dict]:
    """vcell's pipeline (``vcell.eval.run.run``) stage by stage, in this process: seconds, RSS after
    and peak RSS during each stage (VmRSS sampled every 20 ms). Diagnostic only: the timed
    numbers are the CLI runs'.

    ``workaround``: for a backed matrix, replace ``vcell.eval.metrics._inputs.pseudobulk`` by a version that
    sums row blocks read from disk (``weights @ X`` fails on anndata's backed datasets), so the
    stages after it can be measured. Not vcell's code.
    """
    t = time.perf_counter()
    peak = [0.0]
    done = threading.Event()

    def rss():
        return _rss_mib(os.getpid()) or 0.0

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    threading.Thread(target=sampler, daemon=True).start()
    out: list[dict] = []

    def mark(name, t0):
        now = rss()
        out.append({"stage": name, "s": time.perf_counter() - t0, "rss_after": now, "peak": max(peak[0], now)})
        print(f"  {name}: {out[-1]['s']:.2f} s, peak {out[-1]['peak']:,.0f} MiB", file=sys.stderr, flush=True)
        peak[0] = now
        return time.perf_counter()

    import gc

    import vcell.eval.metrics._inputs as metrics_mod  # pseudobulk lives (and is looked up) there
    import vcell.eval.run as run_mod
    from vcell.data.io import atomic_paths, read_h5ad
    from vcell.eval.bands import DEFAULT_BUDGET
    from vcell.eval.csvio import write_de_csv
    from vcell.eval.inputs import check_structure
    from vcell.eval.profiles import profile_metrics
    from vcell.eval.sides import open_side
    from vcell.eval.tiles import Scratch

    t = mark("imports (vcell.eval.run & co.)", t)
    if workaround:
        import numpy as np
        import pandas as pd
        import scipy.sparse as sp

        original = metrics_mod.pseudobulk

        def streamed(X, labels, groups):
            if isinstance(X, np.ndarray) or sp.issparse(X):
                return original(X, labels, groups)
            from vcell.data.matrix import iter_row_chunks

            labels = np.asarray(labels).astype(str)
            groups = np.asarray(list(groups)).astype(str)
            rows = pd.Index(groups).get_indexer(labels)
            sums = np.zeros((groups.size, X.shape[1]))
            for start, block in iter_row_chunks(X, 8192):
                r = rows[start : start + block.shape[0]]
                keep = np.flatnonzero(r >= 0)
                ind = sp.csr_matrix((np.ones(keep.size), (r[keep], keep)), shape=(groups.size, block.shape[0]))
                prod = ind @ block
                sums += prod.toarray() if sp.issparse(prod) else prod
            return sums / np.bincount(rows[rows >= 0], minlength=groups.size)[:, None]

        metrics_mod.pseudobulk = run_mod.pseudobulk = streamed
    try:
        metas = {name: read_h5ad(workdir / f"{name}.h5ad", backed=True) for name in ("pred", "real")}
        perts, _ = check_structure(metas["pred"], metas["real"], PERT_COL, CONTROL, "pred", "real")
        genes = metas["real"].var_names.copy()
        for meta in metas.values():
            meta.file.close()
        t = mark("check_structure (obs/var of both)", t)
        sides = []
        budget = DEFAULT_BUDGET if backed else float("inf")
        with Scratch(workdir / "out_stages") as scratch:
            for name in ("real", "pred"):
                side = open_side(workdir / f"{name}.h5ad", PERT_COL, "auto", None, budget, scratch, backed, name=name)
                t = mark(f"read + value scan {name}" + (" (gene bands on disk)" if backed else " (in memory)"), t)
                sides.append(run_mod.summarise_side(side, CONTROL, perts, True, False, threads, budget))
                t = mark(f"DE + pseudobulk {name} (summarise)" + (" [workaround]" if workaround else ""), t)
                side.close()
                del side
                gc.collect()
        result = run_mod.score_summaries(*sides, perts, genes, profile_metrics("vcc"), {})
        t = mark("metrics (DEData from the DE arrays, vcc profile)", t)
        out_dir = workdir / "out_stages"
        with atomic_paths(out_dir, ["results.csv", "agg_results.csv", "real_de.csv", "pred_de.csv"]) as tmp:
            run_mod.write_csv(result.results, tmp["results.csv"])
            run_mod.write_csv(result.agg, tmp["agg_results.csv"])
            for side, name in zip(sides, ("real", "pred"), strict=True):
                write_de_csv(side.de_result, tmp[f"{name}_de.csv"], threads=threads)
        t = mark("write outputs (DE tables one after the other, not in the background)", t)
    except Exception as exc:  # report where it fails, with the stage's time and memory
        mark(f"FAILED next stage: {type(exc).__name__}: {exc}", t)
    done.set()
    return out


# ============================================================================ orchestration

def _spawn_worker(args: list[str]) -> dict:
    proc = subprocess.run([PY, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {args} failed")
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) CPU time of the whole machine from /proc/stat, in clock ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    steal = v[7] if len(v) > 7 else 0  # time the hypervisor ran something else: not this machine's work
    total = sum(v[:8])  # guest time is already counted in user
    return total - idle - steal, total, steal


def timed_run(name: str, cmd: list[str], log: Path, env: dict, max_rss_mib: float | None, timeout_s: float | None) -> dict:
    """Run ``cmd``; wall time, CPU time and peak RSS (``wait4``) of that child.

    A sampler polls the child's VmRSS (every 0.25 s) for a coarse timeline. If it exceeds
    ``max_rss_mib`` (or the run exceeds ``timeout_s``) the child gets SIGABRT: with
    ``PYTHONFAULTHANDLER=1`` it dumps its Python stacks into the log first.
    """
    load = os.getloadavg()
    busy0, _, steal0 = _cpu_jiffies()
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    result: dict = {}

    def wait():
        _, status, ru = os.wait4(proc.pid, 0)
        result["wall"] = time.perf_counter() - t0
        result["status"], result["ru"] = status, ru

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    samples, aborted = [], None
    while waiter.is_alive():
        rss = _rss_mib(proc.pid)
        now = time.perf_counter() - t0
        if rss is not None:
            samples.append((round(now, 2), round(rss)))
            if aborted is None and max_rss_mib and rss > max_rss_mib:
                aborted = f"RSS {rss:.0f} MiB > limit {max_rss_mib:.0f} MiB at {now:.1f} s"
                os.kill(proc.pid, signal.SIGABRT)
        if aborted is None and timeout_s and now > timeout_s:
            aborted = f"timeout {timeout_s:.0f} s"
            os.kill(proc.pid, signal.SIGABRT)
        waiter.join(0.25)
    busy1, _, steal1 = _cpu_jiffies()
    proc.returncode = os.waitstatus_to_exitcode(result["status"])
    ru = result["ru"]
    cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - cpu)
    steal = (steal1 - steal0) / os.sysconf("SC_CLK_TCK")  # CPU s the hypervisor took from this machine's cores
    peak_t = max(samples, key=lambda s: s[1])[0] if samples else None
    return {
        "name": name, "cmd": cmd, "rc": proc.returncode, "wall_s": result["wall"],
        "cpu_s": cpu, "other_cpu_s": other, "steal_s": steal, "peak_mib": ru.ru_maxrss / 1024, "load_before": load[0],
        "load5_before": load[1], "peak_sample_at_s": peak_t, "aborted": aborted, "log": str(log),
        "timeline": samples,
    }


def clear_numba_cache() -> int:
    n = 0
    for pattern in ("*.nbi", "*.nbc"):
        for path in (REPO / "src" / "vcell").rglob(f"__pycache__/{pattern}"):
            path.unlink(missing_ok=True)
            n += 1
    return n


def numba_cache_files() -> int:
    return sum(1 for _ in (REPO / "src" / "vcell").rglob("__pycache__/*.nbi"))


def busy_cores(seconds: float = 2.0) -> float:
    """Cores busy (whole machine, any process) over the next ``seconds``."""
    b0, t0, _ = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1, _ = _cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0) * os.cpu_count()


def wait_idle(max_busy: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until fewer than ``max_busy`` cores are busy; returns the last reading.

    (The load average is recorded too, but it lags: it still counts this benchmark's previous
    run for a minute or two.)
    """
    t0 = time.time()
    busy = busy_cores()
    while busy > max_busy and time.time() - t0 < max_wait:
        busy = busy_cores()
    return busy


def machine_info() -> str:
    proc = subprocess.run(
        [PY, "-c", "import numpy, numba, scipy, anndata, pandas, polars, importlib.metadata as m\n"
         "try:\n import torch; t = torch.__version__\nexcept Exception: t = 'not installed'\n"
         "print(f'numpy {numpy.__version__}, numba {numba.__version__}, scipy {scipy.__version__}, "
         "anndata {anndata.__version__}, pandas {pandas.__version__}, polars {polars.__version__}, torch {t}, "
         "cell-eval {m.version(\"cell-eval\")}, pdex {m.version(\"pdex\")}')"],
        capture_output=True, text=True)
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return (f"nproc {os.cpu_count()} ({cpu}), RAM {mem}, {platform.platform()}; python {platform.python_version()}, "
            f"{proc.stdout.strip() or proc.stderr.strip()[-300:]}")


def vcell_cmd(pred: Path, real: Path, out: Path, threads: int, backed: bool, budget: float | None = None) -> list[str]:
    return [PY, "-m", "vcell", "eval", "run", "--pred", str(pred), "--real", str(real), "--pert-col", PERT_COL,
            "--control", CONTROL, "--profile", "vcc", "--out", str(out), "--threads", str(threads),
            *(["--backed"] if backed else ["--in-memory"]), *(["--memory-budget", str(budget)] if budget and backed else [])]


def cell_eval_cmd(pred: Path, real: Path, out: Path, threads: int) -> list[str]:
    return [PY, "-m", "cell_eval", "run", "-ap", str(pred), "-ar", str(real), "--control-pert", CONTROL,
            "--pert-col", PERT_COL, "--profile", "vcc", "--num-threads", str(threads), "-o", str(out)]


def show_cmd(cmd: list[str]) -> str:
    return " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)).replace(str(REPO) + "/", "")


def _ensure_data(workdir: Path, kind: str, shape: list[int], seed: int, procs: int) -> dict:
    stamp = workdir / "data.json"
    want = {"kind": kind, "shape": shape, "seed": seed, "version": SIM_VERSION}
    if stamp.exists() and (workdir / "pred.h5ad").exists():
        have = json.loads(stamp.read_text())
        if {k: have.get(k) for k in want} == want:
            print(f"reusing simulated data in {workdir}", file=sys.stderr)
            return have
    stamp.unlink(missing_ok=True)
    print(f"simulating {kind} data in {workdir} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    info = _spawn_worker(["--worker", f"simulate-{kind}", "--workdir", str(workdir), "--perts", str(shape[0]),
                          "--cells", str(shape[1]), "--controls", str(shape[2]), "--genes", str(shape[3]),
                          "--seed", str(seed), "--procs", str(procs)])
    info.update(want, simulate_s=time.perf_counter() - t0)
    info["file_mib"] = {n: (workdir / n).stat().st_size / 2**20 for n in ("real.h5ad", "pred.h5ad")}
    stamp.write_text(json.dumps(info))
    return info


def _disturbed(r: dict) -> bool:
    """Whether other processes (or the hypervisor, as steal time) took more than 10% of a core on
    average during the run."""
    return r["rc"] == 0 and r["other_cpu_s"] + r.get("steal_s", 0.0) > 0.1 * r["wall_s"]


def disturbance(r: dict) -> str:
    """What took CPU from a run: other processes' CPU s and the hypervisor's steal."""
    return f"{r['other_cpu_s']:.1f} CPU s of other processes, {r.get('steal_s', 0.0):.1f} s steal during {r['wall_s']:.1f} s"


def _row(r: dict, ratio: str) -> str:
    name = r["name"] + (f" ({r['attempts']} attempts: the earlier ones disturbed)" if r.get("attempts", 1) > 1 else "")
    return (f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mib']:,.0f} | {r['busy_before']:.2f} | "
            f"{r['other_cpu_s']:.1f} | {r['load_before']:.2f} | {ratio} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vcc-scale", action="store_true", help="VCC scale, CSR, vcell --backed only")
    ap.add_argument("--perts", type=int, default=None, help="default 50 (150 with --vcc-scale)")
    ap.add_argument("--cells", type=int, default=None, help="cells per perturbation; default 200 (1000)")
    ap.add_argument("--controls", type=int, default=None, help="default 2000 (38000)")
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vcell-runs", type=int, default=None,
                    help="vcell runs: the first cold (empty numba cache), the others warm (default 2; 1 with --vcc-scale)")
    ap.add_argument("--keep-numba-cache", action="store_true", help="do not empty the numba cache first (default with --vcc-scale)")
    ap.add_argument("--also-in-memory", action="store_true", help="with --vcc-scale: also run vcell with --in-memory")
    ap.add_argument("--memory-budget", type=float, default=None, help="GB: vcell's --memory-budget with --backed (default: vcell's, 2)")
    ap.add_argument("--skip-cell-eval", action="store_true")
    ap.add_argument("--backed", action="store_true", help="also pass --backed to vcell in the default mode")
    ap.add_argument("--max-rss-gb", type=float, default=16.0, help="abort a run above this RSS (GiB)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="abort a run after this many seconds")
    ap.add_argument("--max-busy", type=float, default=0.15, help="before each run, wait until fewer cores than this are busy")
    ap.add_argument("--max-wait", type=float, default=120.0, help="... for at most this many seconds per run")
    ap.add_argument("--retry-disturbed", type=int, default=2,
                    help="run again (at most this many times) when other processes or steal took > 10%% of a core meanwhile")
    ap.add_argument("--procs", type=int, default=2, help="processes for the simulation")
    ap.add_argument("--workdir", type=Path, default=None, help="keep/reuse data and outputs here (default: temp, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw measurements here")
    ap.add_argument("--stages", action="store_true", help="also time vcell's pipeline stage by stage (in one process)")
    ap.add_argument("--stages-workaround", action="store_true",
                    help="with --stages and a backed run: stream the pseudobulk (diagnostic, not vcell's code)")
    ap.add_argument("--worker", choices=["simulate-dense", "simulate-csr", "compare", "stages"], help=argparse.SUPPRESS)
    ap.add_argument("--a", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--b", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    vcc = args.vcc_scale
    perts = args.perts or (150 if vcc else 50)
    cells = args.cells or (1000 if vcc else 200)
    controls = args.controls or (38000 if vcc else 2000)

    if args.worker in ("simulate-dense", "simulate-csr"):
        fn = simulate_dense if args.worker == "simulate-dense" else simulate_csr
        print(json.dumps(fn(args.workdir, perts, cells, controls, args.genes, args.seed, args.procs)))
        return 0
    if args.worker == "compare":
        print(json.dumps(compare(args.a, args.b)))
        return 0
    if args.worker == "stages":
        print(json.dumps(stages(args.workdir, args.threads, args.backed, args.stages_workaround)))
        return 0

    temp = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vcell_eval_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    kind = "csr" if vcc else "dense"
    n = perts * cells + controls
    try:
        data = _ensure_data(workdir, kind, [perts, cells, controls, args.genes], args.seed, args.procs)
        real, pred = workdir / "real.h5ad", workdir / "pred.h5ad"
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        max_rss = args.max_rss_gb * 1024
        runs: list[dict] = []
        backed = vcc or args.backed
        n_vcell = max(1, args.vcell_runs or (1 if vcc else 2))
        keep_cache = args.keep_numba_cache or vcc
        specs = [backed] * n_vcell + ([False] if vcc and args.also_in_memory else [])
        cleared = None
        for i, run_backed in enumerate(specs):
            if i == 0 and not keep_cache:
                cleared = clear_numba_cache()
            cache = numba_cache_files()
            cold = i == 0 and not keep_cache
            label = f"vcell {'cold' if cold else 'warm'}" + (f" #{i + keep_cache}" if n_vcell > 2 and not cold else "")
            if vcc:
                label = "vcell --backed" + (f" #{i + 1}" if n_vcell > 1 else "") if run_backed else "vcell in memory (--in-memory)"
            out = workdir / f"out_vcell_{i}"
            for attempt in range(1 + args.retry_disturbed):
                shutil.rmtree(out, ignore_errors=True)
                busy = wait_idle(args.max_busy, args.max_wait)
                if cold:  # again after a disturbed attempt, or another process's vcell run (shared cache)
                    clear_numba_cache()
                cache = numba_cache_files()
                print(f"running {label} (busy cores {busy:.2f}, numba cache files {cache}) ...",
                      file=sys.stderr, flush=True)
                r = timed_run(label, vcell_cmd(pred, real, out, args.threads, run_backed, args.memory_budget), workdir / f"log_vcell_{i}.txt",
                              env, max_rss, args.timeout)
                if not _disturbed(r):
                    break
                print(f"  disturbed ({disturbance(r)}): again",
                      file=sys.stderr, flush=True)
            r.update(out=str(out), numba_cache_files_before=cache, cold=cold, busy_before=busy, attempts=attempt + 1)
            runs.append(r)
            print(f"  {label}: rc {r['rc']}, wall {r['wall_s']:.2f} s, peak {r['peak_mib']:.0f} MiB"
                  + (f", ABORTED: {r['aborted']}" if r["aborted"] else ""), file=sys.stderr, flush=True)
            if r["rc"] != 0 and not vcc:
                break
        ce = None
        if not vcc and not args.skip_cell_eval:
            out = workdir / "out_cell_eval"
            shutil.rmtree(out, ignore_errors=True)
            for attempt in range(1 + args.retry_disturbed):
                busy = wait_idle(args.max_busy, args.max_wait)
                print(f"running cell-eval (busy cores {busy:.2f}) ...", file=sys.stderr, flush=True)
                ce = timed_run("cell-eval 0.8.2", cell_eval_cmd(pred, real, out, args.threads),
                               workdir / "log_cell_eval.txt", env, max_rss, args.timeout)
                if not _disturbed(ce):
                    break
                print(f"  disturbed ({disturbance(ce)}): again",
                      file=sys.stderr, flush=True)
            ce.update(out=str(out), busy_before=busy, attempts=attempt + 1)
            print(f"  cell-eval: rc {ce['rc']}, wall {ce['wall_s']:.2f} s, peak {ce['peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)

        # ---------------------------------------------------------------- report
        ok_all = True
        title = ("VCC scale (CSR, backed)" if vcc else "dense") + f": {n:,} cells ({perts} perturbations x {cells:,} + " \
                f"{controls:,} controls) x {args.genes:,} genes, float32 log1p, profile vcc, {args.threads} threads"
        print(f"\n## Evaluator speed, {title}\n")
        print(f"machine: {machine_info()}")
        print(f"data: {json.dumps({k: v for k, v in data.items() if k not in ('version',)})}")
        print(f"numba cache: {cleared} files deleted before the first vcell run" if cleared is not None else
              "numba cache: kept")
        print("\ncommands:")
        for r in runs + ([ce] if ce else []):
            print(f"    {show_cmd(r['cmd'])}")
        print("\n| tool | wall s | CPU s | peak RSS MiB | busy cores before | other processes' CPU s during | "
              "load avg before | cell-eval wall / this wall |")
        print("|---|---|---|---|---|---|---|---|")
        for r in runs:
            ratio = f"{ce['wall_s'] / r['wall_s']:.1f}x" if ce and ce["rc"] == 0 and r["rc"] == 0 else ""
            print(_row(r, ratio))
        if ce:
            print(_row(ce, "1.0x"))
        for r in runs + ([ce] if ce else []):
            if r["rc"] != 0 or r["aborted"]:
                ok_all = False
                print(f"\nFAIL {r['name']} exited with {r['rc']}" + (f" (aborted: {r['aborted']})" if r["aborted"] else "")
                      + f"; log {r['log']}, last lines:")
                print("".join(open(r["log"], errors="replace").readlines()[-40:]))
        print("\nRSS timeline (sampled every 0.25 s; seconds: MiB):")
        for r in runs + ([ce] if ce else []):
            tl = r["timeline"]
            step = max(1, len(tl) // 24)
            pts = tl[::step] + ([tl[-1]] if tl and (len(tl) - 1) % step else [])
            print(f"    {r['name']}: " + ", ".join(f"{t:.1f}: {m:,}" for t, m in pts))
        print()
        good = [r for r in runs if r["rc"] == 0]
        if good:
            last = good[-1]
            try:
                timings = [line for line in open(last["log"]) if line.startswith("timings:")]
                print(f"vcell stage timings ({last['name']}): {timings[-1].strip() if timings else 'n/a'}")
            except OSError:
                pass
            peak = max(good, key=lambda r: r["peak_mib"])
            print(f"vcell peak RSS sample at {peak['peak_sample_at_s']} s of {peak['wall_s']:.1f} s ({peak['name']})")
        if vcc:
            dense_mib = n * args.genes * 4 / 2**20
            for r in runs:
                # issue #15: every step at the challenge's size within 4 GB (the matrix is read in gene bands)
                ok = r["rc"] == 0 and (r["peak_mib"] <= VCC_MEMORY_GATE_MIB or "in memory" in r["name"])
                ok_all &= ok
                print(f"{'PASS' if ok else 'FAIL'} VCC scale, {r['name']}: exit {r['rc']}, {r['wall_s']:.1f} s, peak RSS "
                      f"{r['peak_mib']:,.0f} MiB (gate <= 4 GB = {VCC_MEMORY_GATE_MIB:,.0f} MiB with --backed) vs dense matrix "
                      f"{dense_mib:,.0f} MiB ({r['peak_mib'] / dense_mib:.2f}x); CSR on disk {data['file_mib']['real.h5ad']:,.0f} MiB per file")
        if ce and ce["rc"] == 0 and good:
            for r in good:
                ratio = ce["wall_s"] / r["wall_s"]
                ok = ratio >= SPEED_GATE
                ok_all &= ok
                print(f"{'PASS' if ok else 'FAIL'} speed ({r['name']}): {ratio:.1f}x faster wall-clock than cell-eval "
                      f"(gate >= {SPEED_GATE:.0f}x); CPU {ce['cpu_s'] / r['cpu_s']:.1f}x")
            mx = max(r["peak_mib"] for r in good)
            ok = mx <= MEMORY_GATE_MIB
            ok_all &= ok
            print(f"{'PASS' if ok else 'FAIL'} memory: vcell peak RSS {mx:,.0f} MiB (gate <= 1.5 GB = {MEMORY_GATE_MIB:,.0f} MiB); "
                  f"cell-eval {ce['peak_mib']:,.0f} MiB")
            checks = _spawn_worker(["--worker", "compare", "--a", good[-1]["out"], "--b", ce["out"]])
            for name, (ok, detail) in checks.items():
                ok_all &= bool(ok)
                print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if args.stages:
            busy = wait_idle(args.max_busy, args.max_wait)
            print(f"running the stage breakdown (busy cores {busy:.2f}) ...", file=sys.stderr, flush=True)
            st = _spawn_worker(["--worker", "stages", "--workdir", str(workdir), "--threads", str(args.threads),
                                *(["--backed"] if backed else []), *(["--stages-workaround"] if args.stages_workaround else [])])
            print(f"\nvcell stage by stage (one process, {'backed' if backed else 'in memory'}"
                  f"{', pseudobulk workaround' if args.stages_workaround else ''}):\n")
            print("| stage | s | RSS after MiB | peak during MiB |")
            print("|---|---|---|---|")
            for row in st:
                print(f"| {row['stage']} | {row['s']:.2f} | {row['rss_after']:,.0f} | {row['peak']:,.0f} |")
            print(f"| total | {sum(r['s'] for r in st):.2f} | | {max(r['peak'] for r in st):,.0f} |")
        print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; workdir {workdir}"
              + (" (removed)" if temp else ""))
        if args.json:
            args.json.write_text(json.dumps({"data": data, "runs": runs, "cell_eval": ce}, indent=1, default=str))
        return 0 if ok_all else 1
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
