"""Synthetic Perturb-seq data with planted, known perturbation effects (the data of ``vcell demo``)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from vcell.data.spec import COMBO_SEP
from vcell.errors import VcellError

CONTROL_LABEL = "non-targeting"
_CHUNK = 2048  # cells sampled per block: bounds memory to a few (chunk x genes) arrays
_MAX_ABS_LFC = 5.0


def _context_name(i: int) -> str:
    """0 -> ctx_A, 25 -> ctx_Z, 26 -> ctx_AA."""
    s, i = "", i + 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return f"ctx_{s}"


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise VcellError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise VcellError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _check_float(name: str, value, lo: float, hi: float, hi_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VcellError(f"{name} must be a number, got {value!r}") from None
    if not (lo <= v <= hi) or (hi_open and v == hi):
        raise VcellError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return v


def _unit_rms(v: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(v**2, axis=-1, keepdims=True))
    return v / np.maximum(rms, 1e-12)


def simulate_perturbseq(
    *,
    n_genes: int = 2000,
    n_contexts: int = 3,
    n_perturbations: int = 40,
    n_combinations: int = 10,
    cells_per_perturbation: int = 100,
    cell_jitter: float = 0.4,
    n_controls: int = 600,
    n_batches: int = 2,
    n_programs: int = 12,
    context_effect_share: float = 0.3,
    knockdown_residual: tuple[float, float] = (0.05, 0.3),
    null_fraction: float = 0.2,
    interaction_sd: float = 0.1,
    batch_sd: float = 0.2,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate a CRISPRi Perturb-seq screen in several cell contexts, with known true effects.

    Parameters
    ----------
    n_genes
        Number of genes (``var``).
    n_contexts
        Number of cell contexts (``obs["cell_type"]``: ``ctx_A``, ``ctx_B``, ...).
    n_perturbations
        Single-gene perturbations; each label is the name of its target gene.
    n_combinations
        Two-gene perturbations ``"A+B"`` drawn from pairs of single targets.
    cells_per_perturbation
        Mean cells per perturbation and context; each group's size is scaled by a uniform
        factor in ``[1 - cell_jitter, 1 + cell_jitter]``.
    cell_jitter
        Relative spread of group sizes, in ``[0, 1)``.
    n_controls
        Control cells (``"non-targeting"``) per context.
    n_batches
        Batches (``obs["gem_group"]``); cells are assigned at random within each context.
    n_programs
        Latent gene programs that perturbation effects are built from.
    context_effect_share
        Fraction of each perturbation's effect variance that is context-specific: effects in two
        contexts correlate at about ``1 - context_effect_share``.
    knockdown_residual
        ``(low, high)``: the target gene keeps a uniform fraction in this range of its expression.
    null_fraction
        Fraction of perturbations with near-null downstream effects (knockdown only, mostly).
    interaction_sd
        Scale of the non-additive term of combinations (natural-log units).
    batch_sd
        Standard deviation of the per-batch, per-gene log expression factor.
    seed
        Seed of :func:`numpy.random.default_rng`; the same seed gives identical output.

    Returns
    -------
    anndata.AnnData
        ``X``: CSR float32 raw counts. ``obs``: categorical ``target_gene``, ``cell_type``,
        ``gem_group``, ``dataset``. ``uns["simulation"]``: parameters and ground truth, notably
        ``true_lfc`` (float32 ``[context, label, gene]``, natural log, vs. control of the same
        context) with its axes ``contexts`` and ``labels``, ``targets`` and their
        ``knockdown_residual``, ``strength``, ``base_mean`` ``[context, gene]``, ``batch_lfc``
        ``[batch, gene]`` and ``theta`` (NB dispersion per gene).
    """
    n_genes = _check_int("n_genes", n_genes, 1)
    n_contexts = _check_int("n_contexts", n_contexts, 1)
    n_perturbations = _check_int("n_perturbations", n_perturbations, 1)
    if n_perturbations > n_genes:
        raise VcellError(f"n_perturbations ({n_perturbations}) must be <= n_genes ({n_genes})")
    n_combinations = _check_int("n_combinations", n_combinations, 0)
    max_pairs = n_perturbations * (n_perturbations - 1) // 2
    if n_combinations > max_pairs:
        raise VcellError(
            f"n_combinations ({n_combinations}) exceeds the {max_pairs} pairs of {n_perturbations} perturbations"
        )
    cells_per_perturbation = _check_int("cells_per_perturbation", cells_per_perturbation, 1)
    cell_jitter = _check_float("cell_jitter", cell_jitter, 0.0, 1.0, hi_open=True)
    n_controls = _check_int("n_controls", n_controls, 1)
    n_batches = _check_int("n_batches", n_batches, 1)
    n_programs = _check_int("n_programs", n_programs, 1)
    share = _check_float("context_effect_share", context_effect_share, 0.0, 1.0)
    try:
        kd_lo, kd_hi = (float(x) for x in knockdown_residual)
    except (TypeError, ValueError):
        raise VcellError(f"knockdown_residual must be a (low, high) pair, got {knockdown_residual!r}") from None
    if not 0.0 < kd_lo <= kd_hi <= 1.0:
        raise VcellError(f"knockdown_residual must satisfy 0 < low <= high <= 1, got {knockdown_residual!r}")
    null_fraction = _check_float("null_fraction", null_fraction, 0.0, 1.0)
    interaction_sd = _check_float("interaction_sd", interaction_sd, 0.0, np.inf)
    batch_sd = _check_float("batch_sd", batch_sd, 0.0, np.inf)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    G, C, P = n_genes, n_contexts, n_perturbations

    # Baseline: log-normal means (many low genes, few high), shifted per context.
    width = max(4, len(str(G)))
    genes = np.array([f"GENE{i + 1:0{width}d}" for i in range(G)])
    shared_log_mean = np.clip(rng.normal(np.log(0.3), 1.5, G), np.log(0.005), np.log(200.0))
    base_log_mean = shared_log_mean + rng.normal(0.0, 0.4, (C, G))
    # Gene-wise dispersion grows with the mean: low genes are overdispersed.
    theta = np.clip(np.exp(np.log(2.0) + 0.4 * shared_log_mean + rng.normal(0.0, 0.3, G)), 0.5, 20.0)

    # Targets: drawn from the better-expressed half, as screens target expressed genes.
    pool = np.argsort(-shared_log_mean)[: max(P, G // 2)]
    target_idx = np.sort(rng.choice(pool, P, replace=False))
    targets = genes[target_idx]
    residual = rng.uniform(kd_lo, kd_hi, P)

    # Sparse gene programs: each covers a few percent of genes with signed weights.
    member = rng.random((n_programs, G)) < rng.uniform(0.03, 0.12, (n_programs, 1))
    programs = member * rng.normal(0.0, 1.0, (n_programs, G))

    def loadings(n: int) -> np.ndarray:
        """Each of ``n`` rows loads on 1-3 random programs with signed weights."""
        w = np.zeros((n, n_programs))
        for row, k in zip(w, rng.integers(1, 4, n)):
            row[rng.choice(n_programs, min(k, n_programs), replace=False)] = rng.normal(0.0, 1.0, min(k, n_programs))
        return w

    strength = rng.lognormal(np.log(0.3), 0.5, P) * np.where(rng.random(P) < null_fraction, 0.05, 1.0)
    shared_eff = _unit_rms(loadings(P) @ programs)  # [P, G]
    ctx_eff = _unit_rms((loadings(C * P) @ programs).reshape(C, P, G))
    single = strength[:, None] * (np.sqrt(1.0 - share) * shared_eff + np.sqrt(share) * ctx_eff)  # [C, P, G]

    pairs = np.stack(np.triu_indices(P, 1), axis=1)
    pairs = pairs[np.sort(rng.choice(len(pairs), n_combinations, replace=False))]
    a, b = pairs[:, 0], pairs[:, 1]
    # Interaction acts only where either partner has an effect, shared across contexts.
    touched = (np.abs(single[:, a]) + np.abs(single[:, b])).max(axis=0) > 0  # [K, G]
    interaction = interaction_sd * rng.normal(0.0, 1.0, (n_combinations, G)) * touched
    combo = single[:, a] + single[:, b] + interaction
    lfc = np.concatenate([single, combo], axis=1)  # [C, L, G]
    k_single, k_combo = np.arange(P), np.arange(P, P + n_combinations)
    lfc[:, k_single, target_idx] = np.log(residual)
    lfc[:, k_combo, target_idx[a]] = np.log(residual[a])
    lfc[:, k_combo, target_idx[b]] = np.log(residual[b])
    lfc = np.clip(lfc, -_MAX_ABS_LFC, _MAX_ABS_LFC)
    labels = list(targets) + [f"{targets[i]}{COMBO_SEP}{targets[j]}" for i, j in pairs]
    L = len(labels)

    # Cells: group (context, label; label index L = control), batch, size factor.
    jitter = rng.uniform(1 - cell_jitter, 1 + cell_jitter, (C, L))
    sizes = np.maximum(1, np.rint(cells_per_perturbation * jitter)).astype(int)
    sizes = np.concatenate([sizes, np.full((C, 1), n_controls)], axis=1)
    cell_ctx = np.repeat(np.repeat(np.arange(C), L + 1), sizes.ravel())
    cell_lab = np.repeat(np.tile(np.arange(L + 1), C), sizes.ravel())
    n_cells = len(cell_ctx)
    cell_batch = rng.integers(0, n_batches, n_cells)
    ctx_depth = rng.lognormal(0.0, 0.2, C)
    size_factor = ctx_depth[cell_ctx] * rng.lognormal(-0.06, 0.35, n_cells)
    batch_lfc = rng.normal(0.0, batch_sd, (n_batches, G))
    order = rng.permutation(n_cells)  # interleave groups, as in a real cell barcode order
    cell_ctx, cell_lab, cell_batch, size_factor = (v[order] for v in (cell_ctx, cell_lab, cell_batch, size_factor))

    group_log_mean = base_log_mean[:, None, :] + np.concatenate([lfc, np.zeros((C, 1, G))], axis=1)  # [C, L+1, G]
    blocks = []
    for start in range(0, n_cells, _CHUNK):
        s = slice(start, start + _CHUNK)
        mu = np.exp(group_log_mean[cell_ctx[s], cell_lab[s]] + batch_lfc[cell_batch[s]]) * size_factor[s, None]
        counts = rng.poisson(rng.gamma(theta, mu / theta))  # gamma-Poisson = negative binomial
        blocks.append(sparse.csr_matrix(counts.astype(np.float32)))
    X = sparse.vstack(blocks, format="csr", dtype=np.float32)

    contexts = [_context_name(c) for c in range(C)]
    batches = [f"gem{i + 1}" for i in range(n_batches)]
    all_labels = [CONTROL_LABEL] + labels
    obs = pd.DataFrame(
        {
            "target_gene": pd.Categorical.from_codes(np.where(cell_lab == L, 0, cell_lab + 1), categories=all_labels),
            "cell_type": pd.Categorical.from_codes(cell_ctx, categories=contexts),
            "gem_group": pd.Categorical.from_codes(cell_batch, categories=batches),
            "dataset": pd.Categorical(["synthetic"] * n_cells),
        },
        index=pd.Index([f"cell{i:06d}" for i in range(n_cells)]),
    )
    params = {
        "n_genes": G, "n_contexts": C, "n_perturbations": P, "n_combinations": n_combinations,
        "cells_per_perturbation": cells_per_perturbation, "cell_jitter": cell_jitter,
        "n_controls": n_controls, "n_batches": n_batches, "n_programs": n_programs,
        "context_effect_share": share, "knockdown_residual_low": kd_lo, "knockdown_residual_high": kd_hi,
        "null_fraction": null_fraction, "interaction_sd": interaction_sd, "batch_sd": batch_sd, "seed": seed,
    }  # fmt: skip
    truth = {
        "params": params,
        "control": CONTROL_LABEL,
        "contexts": contexts,
        "labels": labels,
        "targets": list(targets),
        "knockdown_residual": residual.astype(np.float32),
        "strength": strength.astype(np.float32),
        "true_lfc": lfc.astype(np.float32),
        "base_mean": np.exp(base_log_mean).astype(np.float32),
        "batch_lfc": batch_lfc.astype(np.float32),
        "theta": theta.astype(np.float32),
    }
    return ad.AnnData(
        X=X,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes)),
        uns={"simulation": truth, "vcell": {"expression": "counts"}},
    )
