"""A challenge-sized synthetic Perturb-seq screen (``vcell data simulate --preset vcc``), written chunk by chunk.

The dataset has the shape of the Virtual Cell Challenge data: 300,000 cells x 18,080 genes, 300
CRISPRi knockdowns (~150 training, 50 validation and 100 held-out test perturbations, the lists kept
in ``uns["simulation"]["roles"]``), ~38,000 ``non-targeting`` controls, batches in ``gem_group`` and
~20,000 UMI per cell. The effect model is that of :mod:`vcell.data.simulate` (sparse gene programs,
a context-specific share, a knocked-down target); counts are negative binomial. Cells are drawn in
fixed blocks of :data:`CHUNK_CELLS`, each from its own seed, by a pool of threads, and appended in
order to the ``.h5ad`` file: memory holds a few blocks, never the matrix (only the per-cell
annotations grow with the cells, ~60 bytes each), and the file is the same whatever the number of threads.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pandas as pd
from scipy import sparse

from vcell.data.h5write import H5adWriter
from vcell.data.io import atomic_path, free_space, human_size
from vcell.data.simulate import _MAX_ABS_LFC, CONTROL_LABEL, _check_float, _check_int, _context_name, _unit_rms
from vcell.errors import VcellError

#: Cells drawn per block: each block gets its own random stream, so the output does not depend on threads.
CHUNK_CELLS = 256
_DRAW_ROWS = 32  # uniforms are drawn for this many cells at a time (4.6 MB at 18,080 genes)

#: The sizes of ``--preset vcc`` (the 2025/2026 Virtual Cell Challenge training data).
VCC_PRESET = {
    "n_cells": 300_000,
    "n_genes": 18_080,
    "n_contexts": 1,
    "n_perturbations": 300,
    "n_controls": 38_000,
    "n_batches": 8,
    "umi_per_cell": 20_000.0,
}


@dataclass(frozen=True)
class SimulationSummary:
    """What :func:`write_vcc_simulation` wrote."""

    n_cells: int
    n_genes: int
    n_contexts: int
    n_perturbations: int
    n_controls: int
    roles: dict[str, int]
    nnz: int
    median_umi: float


def _counts(n_perturbations: int, n_val: int | None, n_test: int | None) -> tuple[int, int, int]:
    """(train, val, test) perturbation counts: by default a third held out for test and a sixth for validation."""
    P = n_perturbations
    n_test = round(P / 3) if n_test is None else _check_int("n_test_perturbations", n_test, 0)
    n_val = round(P / 6) if n_val is None else _check_int("n_val_perturbations", n_val, 0)
    if n_test + n_val >= P:
        raise VcellError(f"n_val_perturbations + n_test_perturbations ({n_val} + {n_test}) must leave at least one "
                         f"of the {P} perturbations for training")
    return P - n_val - n_test, n_val, n_test


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainders), same shape."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w.ravel() / w.sum()
    n = np.floor(exact).astype(np.int64)
    n[np.argsort(-(exact - n), kind="stable")[: total - int(n.sum())]] += 1
    return n.reshape(w.shape)


@numba.njit(cache=True, nogil=True)
def _nb_rows(mean, batch_factor, theta, log_theta, ctx, lab, batch, size_factor, u, data, indices, indptr, totals, nnz):  # pragma: no cover - compiled
    """Negative-binomial counts of cells by inverse CDF, appended as CSR rows from ``data[nnz]`` on.

    ``u`` holds one uniform per entry. The mean of cell ``i``, gene ``j`` is ``mean[ctx, lab, j] *
    batch_factor[batch, j] * size_factor``; the search walks the pmf recurrence from 0, so its cost is
    one step per count drawn. Each cell's UMI total goes to ``totals``. Returns the new ``nnz``.
    """
    for i in range(u.shape[0]):
        c, lb, b, s = ctx[i], lab[i], batch[i], size_factor[i]
        total = 0
        for j in range(u.shape[1]):
            mu = mean[c, lb, j] * batch_factor[b, j] * s
            x = u[i, j]
            if x <= 1.0 - mu:  # P(0) = (1 + mu/th)^-th >= 1 - mu: most zeros are decided without a log
                continue
            th = theta[j]
            pmf = math.exp(th * (log_theta[j] - math.log(th + mu)))  # P(0)
            if x <= pmf:
                continue
            q, cdf, k = mu / (mu + th), pmf, 0
            while x > cdf and pmf > 0.0:  # pmf > 0: rounding can leave the cdf just below 1
                pmf *= (k + th) / (k + 1) * q
                k += 1
                cdf += pmf
            data[nnz] = k
            indices[nnz] = j
            nnz += 1
            total += k
        indptr[i + 1] = nnz
        totals[i] = total
    return nnz


class _Model:
    """Ground truth and per-cell design of one simulation (everything but the count matrix)."""

    def __init__(self, n_cells, n_genes, n_contexts, n_perturbations, n_controls, n_batches, umi_per_cell,
                 roles, cell_jitter, n_programs, context_effect_share, knockdown_residual, null_fraction, batch_sd, seed):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        G, C, P = n_genes, n_contexts, n_perturbations
        width = max(4, len(str(G)))
        self.genes = np.array([f"GENE{i + 1:0{width}d}" for i in range(G)])

        # Baseline as in simulate.py, rescaled to umi_per_cell UMIs in all.
        shared = np.clip(rng.normal(np.log(0.3), 1.5, G), np.log(0.005), np.log(200.0))
        base = shared + rng.normal(0.0, 0.4, (C, G))
        base += np.log(umi_per_cell) - np.log(np.exp(base).sum(axis=1, keepdims=True))
        self.theta = np.clip(np.exp(np.log(2.0) + 0.4 * shared + rng.normal(0.0, 0.3, G)), 0.5, 20.0)

        pool = np.argsort(-shared)[: max(P, G // 2)]
        target_idx = np.sort(rng.choice(pool, P, replace=False))
        self.targets = list(self.genes[target_idx])
        self.residual = rng.uniform(*knockdown_residual, P)

        member = rng.random((n_programs, G)) < rng.uniform(0.03, 0.12, (n_programs, 1))
        programs = (member * rng.normal(0.0, 1.0, (n_programs, G))).astype(np.float32)

        def loadings(n: int) -> np.ndarray:
            k = min(3, n_programs)
            w = np.zeros((n, n_programs), dtype=np.float32)
            for row, m in zip(w, rng.integers(1, k + 1, n)):
                row[rng.choice(n_programs, m, replace=False)] = rng.normal(0.0, 1.0, m)
            return w

        # float32 and in place: at 300 x 18,080 each [C, P, G] temporary is 21 MB per context
        self.strength = rng.lognormal(np.log(0.3), 0.5, P) * np.where(rng.random(P) < null_fraction, 0.05, 1.0)
        shared_eff = _unit_rms(loadings(P) @ programs)
        lfc = _unit_rms((loadings(C * P) @ programs).reshape(C, P, G))  # the context-specific part
        lfc *= np.float32(np.sqrt(context_effect_share))
        lfc += np.float32(np.sqrt(1.0 - context_effect_share)) * shared_eff
        lfc *= self.strength.astype(np.float32)[:, None]
        lfc[:, np.arange(P), target_idx] = np.log(self.residual)
        self.lfc = np.clip(lfc, -_MAX_ABS_LFC, _MAX_ABS_LFC, out=lfc)  # [C, P, G]
        self.base_mean = np.exp(base)
        # [C, P + 1, G]: the mean expression of each group at size factor 1; row P is the controls
        self.mean = np.empty((C, P + 1, G), dtype=np.float32)
        np.add(base[:, None, :], self.lfc, out=self.mean[:, :P], casting="same_kind")
        self.mean[:, P] = base
        np.exp(self.mean, out=self.mean)
        self.batch_lfc = rng.normal(0.0, batch_sd, (n_batches, G)).astype(np.float32)
        self.batch_factor = np.exp(self.batch_lfc)

        order = rng.permutation(P)
        n_train, n_val, n_test = roles
        self.roles = {name: sorted(self.targets[k] for k in order[lo:hi]) for name, lo, hi in
                      (("train", n_test + n_val, P), ("val", n_test, n_test + n_val), ("test", 0, n_test))}

        # Cells: each (context, perturbation) group gets 1 + a jittered share of the rest; controls split evenly.
        jitter = rng.uniform(1 - cell_jitter, 1 + cell_jitter, (C, P))
        sizes = 1 + _allocate(n_cells - n_controls - C * P, jitter)
        sizes = np.concatenate([sizes, _allocate(n_controls, np.ones((C, 1)))], axis=1)  # [C, P + 1]
        ctx = np.repeat(np.repeat(np.arange(C, dtype=np.int32), P + 1), sizes.ravel())
        lab = np.repeat(np.tile(np.arange(P + 1, dtype=np.int32), C), sizes.ravel())
        order = rng.permutation(n_cells)  # interleave groups, as in a real cell barcode order
        self.ctx, self.lab = ctx[order], lab[order]
        self.batch = rng.integers(0, n_batches, n_cells).astype(np.int32)
        ctx_depth = rng.normal(0.0, 0.2, C)
        self.size_factor = np.exp(ctx_depth - ctx_depth.mean())[self.ctx] * rng.lognormal(0.0, 0.35, n_cells)
        # Effects and batches move depth a little (exp of a centred shift has mean > 1): bring the median
        # expected UMI per cell back to umi_per_cell.
        group_umi = (self.mean.reshape(-1, G) @ self.batch_factor.T).reshape(C, P + 1, n_batches)
        self.size_factor *= umi_per_cell / np.median(self.size_factor * group_umi[self.ctx, self.lab, self.batch])

    def expected_nnz(self) -> float:
        """Expected non-zeros per cell of a control cell of size factor 1 (for a disk-space estimate)."""
        mu = self.base_mean.mean(axis=0)
        return float(np.sum(1.0 - (self.theta / (self.theta + mu)) ** self.theta))


class _Worker:
    """Draws the counts of one block of cells; buffers are kept per thread."""

    def __init__(self, model: _Model, seed: int):
        self.m, self.seed = model, seed
        self.log_theta = np.log(model.theta)
        self._local = threading.local()

    def _buffers(self):
        loc = self._local
        if not hasattr(loc, "u"):
            G = self.m.mean.shape[2]
            loc.u = np.empty((_DRAW_ROWS, G))
            loc.data = np.empty(CHUNK_CELLS * G, dtype=np.float32)
            loc.indices = np.empty(CHUNK_CELLS * G, dtype=np.int32)
        return loc.u, loc.data, loc.indices

    def __call__(self, i: int) -> tuple[sparse.csr_matrix, np.ndarray]:
        """Block ``i``: its CSR counts and each cell's UMI total."""
        m = self.m
        s = slice(i * CHUNK_CELLS, min((i + 1) * CHUNK_CELLS, len(m.ctx)))
        rows = s.stop - s.start
        u, data, indices = self._buffers()
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, i)))
        indptr = np.zeros(rows + 1, dtype=np.int64)
        totals = np.empty(rows)
        nnz = 0
        for r in range(0, rows, _DRAW_ROWS):
            part = slice(s.start + r, min(s.start + r + _DRAW_ROWS, s.stop))
            draws = u[: part.stop - part.start]
            rng.random(out=draws)  # one stream per block, however it is cut
            nnz = _nb_rows(m.mean, m.batch_factor, m.theta, self.log_theta, m.ctx[part], m.lab[part], m.batch[part],
                           m.size_factor[part], draws, data, indices, indptr[r:], totals[r:], nnz)
        return sparse.csr_matrix((data[:nnz].copy(), indices[:nnz].copy(), indptr), shape=(rows, u.shape[1])), totals


def _check_disk(path: Path, n_bytes: float) -> None:
    """Refuse before computing when the disk holding ``path`` has clearly too little room."""
    free = free_space(path.parent)
    if free is not None and free < n_bytes:
        raise VcellError(f"{path}: the file needs about {human_size(int(n_bytes))} but its device has "
                         f"{human_size(free)} free (give fewer --n-cells or --n-genes, or another folder)")


def write_vcc_simulation(
    path: str | os.PathLike,
    *,
    n_cells: int = VCC_PRESET["n_cells"],
    n_genes: int = VCC_PRESET["n_genes"],
    n_contexts: int = VCC_PRESET["n_contexts"],
    n_perturbations: int = VCC_PRESET["n_perturbations"],
    n_val_perturbations: int | None = None,
    n_test_perturbations: int | None = None,
    n_controls: int = VCC_PRESET["n_controls"],
    n_batches: int = VCC_PRESET["n_batches"],
    umi_per_cell: float = VCC_PRESET["umi_per_cell"],
    cell_jitter: float = 0.4,
    n_programs: int = 20,
    context_effect_share: float = 0.3,
    knockdown_residual: tuple[float, float] = (0.05, 0.3),
    null_fraction: float = 0.2,
    batch_sd: float = 0.2,
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SimulationSummary:
    """Simulate a challenge-sized CRISPRi screen and write it to ``path`` (atomically), block by block.

    Parameters
    ----------
    path
        Output ``.h5ad``: CSR float32 raw counts in ``X``; ``obs`` with categorical ``target_gene``
        (the knocked-down gene's name, or ``non-targeting``), ``cell_type``, ``gem_group``, ``dataset``.
    n_cells
        Cells in all, controls included, split between the contexts.
    n_genes, n_contexts, n_perturbations
        Genes, cell contexts (``ctx_A``, ...) and single-gene knockdowns (each in every context).
    n_val_perturbations, n_test_perturbations
        Perturbations given the validation and test roles (default: a sixth and a third); the rest train.
    n_controls
        Control cells in all, split evenly between the contexts.
    n_batches
        Batches (``gem_group``), assigned to cells at random.
    umi_per_cell
        Median over cells of the expected UMIs per cell.
    cell_jitter
        Relative spread of group sizes, in ``[0, 1)``.
    n_programs, context_effect_share, knockdown_residual, null_fraction, batch_sd
        The effect model, as in :func:`vcell.data.simulate.simulate_perturbseq`.
    threads
        Threads drawing blocks (default: every CPU this process may use); the file does not depend on it.
    seed
        The same seed gives the same file.
    progress
        Called with the number of cells of each block once it is written.

    Returns
    -------
    SimulationSummary
        Sizes, non-zeros and the median UMI per cell of what was written. ``uns["simulation"]``
        holds the ground truth: ``true_lfc`` (float32 ``[context, label, gene]``, natural log, vs.
        control), ``labels``, ``targets``, ``knockdown_residual``, ``strength``, ``base_mean``,
        ``batch_lfc``, ``theta``, ``roles`` (``train``/``val``/``test`` label lists) and ``params``.
    """
    path = Path(path)
    G = _check_int("n_genes", n_genes, 1)
    C = _check_int("n_contexts", n_contexts, 1)
    P = _check_int("n_perturbations", n_perturbations, 1)
    if P > G:
        raise VcellError(f"n_perturbations ({P}) must be <= n_genes ({G})")
    n_controls = _check_int("n_controls", n_controls, C)
    n_cells = _check_int("n_cells", n_cells, 1)
    if n_cells < n_controls + C * P:
        raise VcellError(f"n_cells ({n_cells:,}) must be >= n_controls + one cell per perturbation and context "
                         f"({n_controls:,} + {C * P:,})")
    n_batches = _check_int("n_batches", n_batches, 1)
    umi = _check_float("umi_per_cell", umi_per_cell, 1.0, np.inf)
    cell_jitter = _check_float("cell_jitter", cell_jitter, 0.0, 1.0, hi_open=True)
    n_programs = _check_int("n_programs", n_programs, 1)
    share = _check_float("context_effect_share", context_effect_share, 0.0, 1.0)
    try:
        kd = tuple(float(x) for x in knockdown_residual)
    except (TypeError, ValueError):
        kd = ()
    if len(kd) != 2 or not 0.0 < kd[0] <= kd[1] <= 1.0:
        raise VcellError(f"knockdown_residual must be a (low, high) pair with 0 < low <= high <= 1, got {knockdown_residual!r}")
    null_fraction = _check_float("null_fraction", null_fraction, 0.0, 1.0)
    batch_sd = _check_float("batch_sd", batch_sd, 0.0, np.inf)
    threads = len(os.sched_getaffinity(0)) if threads is None else _check_int("threads", threads, 1)
    seed = _check_int("seed", seed, 0)
    roles = _counts(P, n_val_perturbations, n_test_perturbations)

    params = {"preset": "vcc", "n_cells": n_cells, "n_genes": G, "n_contexts": C, "n_perturbations": P,
              "n_controls": n_controls, "n_batches": n_batches, "umi_per_cell": umi, "cell_jitter": cell_jitter,
              "n_programs": n_programs, "context_effect_share": share, "knockdown_residual_low": kd[0],
              "knockdown_residual_high": kd[1], "null_fraction": null_fraction, "batch_sd": batch_sd, "seed": seed}
    model = _Model(n_cells, G, C, P, n_controls, n_batches, umi, roles, cell_jitter, n_programs, share, kd,
                   null_fraction, batch_sd, seed)
    _check_disk(path, n_cells * model.expected_nnz() * 8.0 * 0.9)
    obs = _obs(model, C, P, n_batches)
    nnz, totals = 0, []
    with atomic_path(path) as tmp, H5adWriter(tmp, n_vars=G) as writer, ThreadPoolExecutor(threads) as pool:
        for block, umi in _blocks(pool, _Worker(model, seed), -(-n_cells // CHUNK_CELLS), threads):
            writer.append(X=block)
            nnz += block.nnz
            totals.append(umi)
            if progress is not None:
                progress(block.shape[0])
        writer.finish(obs, pd.DataFrame(index=pd.Index(model.genes)), _uns(model, params))
    return SimulationSummary(n_cells, G, C, P, n_controls, dict(zip(("train", "val", "test"), roles)), nnz,
                             float(np.median(np.concatenate(totals))))


def _blocks(pool: ThreadPoolExecutor, worker: _Worker, n_chunks: int, threads: int):
    """The blocks in order, at most ``threads + 1`` drawn ahead of the writer (so memory stays bounded)."""
    pending: deque = deque()
    try:
        for i in range(n_chunks):
            pending.append(pool.submit(worker, i))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def _obs(model: _Model, C: int, P: int, n_batches: int) -> pd.DataFrame:
    n = len(model.ctx)
    width = max(6, len(str(n - 1)))
    labels = [CONTROL_LABEL] + model.targets
    return pd.DataFrame(
        {
            "target_gene": pd.Categorical.from_codes(np.where(model.lab == P, 0, model.lab + 1), categories=labels),
            "cell_type": pd.Categorical.from_codes(model.ctx, categories=[_context_name(c) for c in range(C)]),
            "gem_group": pd.Categorical.from_codes(model.batch, categories=[f"gem{i + 1}" for i in range(n_batches)]),
            "dataset": pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=["synthetic"]),
        },
        index=pd.Index([f"cell{i:0{width}d}" for i in range(n)]),
    )


def _uns(model: _Model, params: dict) -> dict:
    truth = {
        "params": params,
        "control": CONTROL_LABEL,
        "contexts": [_context_name(c) for c in range(params["n_contexts"])],
        "labels": model.targets,
        "targets": model.targets,
        "roles": {k: np.array(v, dtype=object) for k, v in model.roles.items()},
        "knockdown_residual": model.residual.astype(np.float32),
        "strength": model.strength.astype(np.float32),
        "true_lfc": model.lfc,
        "base_mean": model.base_mean.astype(np.float32),
        "batch_lfc": model.batch_lfc,
        "theta": model.theta.astype(np.float32),
    }
    return {"simulation": truth, "vcell": {"expression": "counts"}}


def simulated_roles(uns, where) -> dict[str, list[str]]:
    """The perturbation labels of each role (``train``/``val``/``test``) that :func:`write_vcc_simulation`
    recorded in ``uns["simulation"]["roles"]`` (kept by ``vcell data preprocess``)."""
    sim = uns.get("simulation", {})
    roles = sim.get("roles") if hasattr(sim, "get") else None
    if not roles or "test" not in roles:
        raise VcellError(f"{where}: no uns['simulation']['roles'] (a file `vcell data simulate --preset vcc` wrote, or its "
                         "preprocessed copy); give --holdout-perturbations")
    return {role: [str(p) for p in roles.get(role, [])] for role in ("train", "val", "test")}


def challenge_list_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """Where ``vcell data simulate --preset vcc`` writes the two lists beside ``path``:
    ``STEM.gene_names.csv`` and ``STEM.pert_counts.csv``."""
    path = Path(path)
    stem = path.name.removesuffix(".h5ad")
    return path.with_name(f"{stem}.gene_names.csv"), path.with_name(f"{stem}.pert_counts.csv")


def write_challenge_lists(path: str | os.PathLike, role: str = "test") -> tuple[Path, Path]:
    """Write, beside a simulated file, the two lists the challenge hands out with its data.

    Parameters
    ----------
    path
        A file :func:`write_vcc_simulation` wrote (read backed: only ``obs``, ``var`` and ``uns``).
    role
        The perturbations listed: ``test`` (the held-out ones, as the challenge's list) or ``val``.

    Returns
    -------
    tuple of Path
        ``STEM.gene_names.csv`` (the genes in the file's order, one per line, no header: ``vcell eval
        prep --genes``) and ``STEM.pert_counts.csv`` (``target_gene,n_cells``: the role's
        perturbations and their cells in the file, summed over its contexts: ``eval prep
        --perturbations``, ``vcell predict --perturbations``), each written atomically.
    """
    from vcell.data.io import read_h5ad

    genes_csv, perts_csv = challenge_list_paths(path)
    adata = read_h5ad(path, backed=True)
    try:
        labels = adata.obs["target_gene"].astype(str).to_numpy()
        listed = simulated_roles(adata.uns, str(path))[role]
        genes = list(adata.var_names)
    finally:
        adata.file.close()
    counts = pd.Series(labels).value_counts()
    table = pd.DataFrame({"target_gene": listed, "n_cells": [int(counts.get(p, 0)) for p in listed]})
    with atomic_path(genes_csv) as tmp:
        tmp.write_text("".join(f"{g}\n" for g in genes))
    with atomic_path(perts_csv) as tmp:
        table.to_csv(tmp, index=False)
    return genes_csv, perts_csv
