"""The six VCC 2026 metrics and the diagnostics cell-eval2 writes with them, on arrays.

Definitions: cell-eval2 0.20.0, preset ``vcc2026`` (see ``/work/shared/reference/vcc2026.md``
and cell-eval2's ``docs/vcc2026_metrics``); parity with it is tested to 1e-9. Inputs are the
two sides' :class:`~vcell.eval.vcc2026.summary.SideSummary` (perturbations in the same order)
and the reference's :class:`~vcell.eval.vcc2026.summary.Control`:

* pseudobulk profiles ``log1p(sums * (5e4 / total))``; effects against the reference control;
* ``pds_cosine``: rank of the true perturbation among all real effects by cosine distance of
  the predicted effect, midrank ties, all panel target genes removed from every vector;
* ``expr_*``: squared profile error with the jackknife sampling correction removed, each row
  without its own target gene; ``expr_mse_unbiased_capped_norm`` is the ratio of the panel sums
  of ``expr_mse_unbiased_capped`` and ``expr_distance_unbiased``;
* ``de_wilcoxon_*``: from the two DE tables (tested genes, own target gene removed).
"""

from __future__ import annotations

import numpy as np

from vcell.eval.vcc2026.summary import BULK_TARGET_SUM

#: The six scored metrics, in cell-eval2's order.
SCORED = (
    "pds_cosine",
    "expr_mse_unbiased_capped_norm",
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_sig_jaccard",
    "de_wilcoxon_lfc_nmae",
)
#: The four metrics from the DE tables.
DE_METRICS = ("de_wilcoxon_direction_fidelity_yield_raw", "de_wilcoxon_direction_reach_raw", "de_wilcoxon_sig_jaccard",
              "de_wilcoxon_lfc_nmae")
#: Per-perturbation diagnostics written beside them.
DIAGNOSTICS = ("expr_mse_unbiased", "expr_mse_unbiased_capped", "expr_distance_unbiased", "expr_real_mass_ratio")
#: Every metric of the profile (``expr_mse_unbiased_capped_norm`` has no per-perturbation value).
METRICS = tuple(sorted(SCORED + DIAGNOSTICS))
#: Significance threshold on the BH-adjusted p-value (strict).
ALPHA = 0.05
#: Sign purity a prefix of the reach ranking must keep.
REACH_PURITY = 0.9
#: Fewest gated genes for a fold-change error.
MIN_LFC_GATE = 10
#: Pseudocount of the fold changes.
EPSILON = 1e-9


def bulk_profiles(raw_sums: np.ndarray) -> np.ndarray:
    """``log1p(sums * (5e4 / total))`` per row (an empty row stays 0)."""
    raw_sums = np.atleast_2d(raw_sums)
    totals = raw_sums.sum(axis=1)
    scale = np.zeros_like(totals)
    ok = totals > 0
    scale[ok] = BULK_TARGET_SUM / totals[ok]
    return np.log1p(raw_sums * scale[:, None])


def fold_changes(cpm_mean: np.ndarray, ctrl_cpm: np.ndarray) -> np.ndarray:
    """``log2((mean_pert + eps) / (mean_ctrl + eps))`` of mean CPM values."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2((cpm_mean + EPSILON) / (ctrl_cpm + EPSILON))


# --------------------------------------------------------------------------------------------
# expression profiles
# --------------------------------------------------------------------------------------------


def pds_cosine(pred_eff: np.ndarray, real_eff: np.ndarray, panel_cols: np.ndarray) -> np.ndarray:
    """Perturbation discrimination score per perturbation from profile effects (rows aligned),
    the genes ``panel_cols`` (every perturbation's target) left out of every vector."""
    n_genes = real_eff.shape[1]
    keep = np.ones(n_genes, dtype=bool)
    keep[panel_cols] = False
    if keep.all():
        pe, re_ = pred_eff, real_eff
    else:
        pe, re_ = pred_eff[:, keep], real_eff[:, keep]
    sim = pe @ re_.T
    pn = np.einsum("ig,ig->i", pe, pe)
    rn = np.einsum("jg,jg->j", re_, re_)
    den = np.sqrt(pn)[:, None] * np.sqrt(rn)[None, :]
    cs = np.zeros_like(sim)
    nz = den != 0
    cs[nz] = sim[nz] / den[nz]
    dist = np.clip(1.0 - cs, 0.0, 2.0)
    n = real_eff.shape[0]
    out = np.empty(n)
    for i in range(n):
        row = dist[i]
        own = row[i]
        if np.isnan(own):
            less = int(np.count_nonzero(~np.isnan(row)))
            equal = row.size - less
        else:
            less = int(np.count_nonzero(row < own))
            equal = int(np.count_nonzero(row == own))
        rank = less + (equal - 1) / 2.0
        out[i] = 1.0 if n <= 1 else 1.0 - rank / (n - 1)
    return out


def _corrected_sq(a, b, ca, cb, targets):
    """Per row: (sum of squared differences without the row's target gene - ca - cb) / genes used."""
    d = a - b
    s = np.einsum("ij,ij->i", d, d) - ca - cb
    used = np.full(a.shape[0], float(a.shape[1]))
    for k, col in enumerate(targets):
        if col >= 0:
            s[k] -= (a[k, col] - b[k, col]) ** 2
            used[k] -= 1
    return np.divide(s, used, out=np.full(s.shape, np.nan), where=used > 0)


def _budget(pred_bulk: np.ndarray, targets: np.ndarray, w: np.ndarray) -> float:
    """Across-perturbation spread of the predicted profiles (weights ``w``, own target gene out)."""
    n_rows, n_genes = pred_bulk.shape
    dev = pred_bulk - pred_bulk.mean(axis=0)
    s1 = np.einsum("ij,i->j", dev, w)
    s2 = np.einsum("ij,ij,i->j", dev, dev, w)
    wsum = np.full(n_genes, float(w.sum()))
    cnt = np.full(n_genes, float(n_rows))
    for k, col in enumerate(targets):
        if col >= 0:
            v = dev[k, col]
            s1[col] -= w[k] * v
            s2[col] -= w[k] * v * v
            wsum[col] -= w[k]
            cnt[col] -= 1.0
    ok = (cnt >= 2.0) & (wsum > 0.0)
    if not ok.any():
        return 0.0
    ss = s2[ok] - s1[ok] ** 2 / wsum[ok]
    return float(np.maximum(ss, 0.0).sum())


def expression_errors(
    pred_bulk: np.ndarray, pred_jack: np.ndarray, real_bulk: np.ndarray, real_jack: np.ndarray,
    ctrl_bulk: np.ndarray, ctrl_jack: float, targets: np.ndarray,
) -> dict[str, np.ndarray]:
    """``expr_mse_unbiased``, ``expr_mse_unbiased_capped``, ``expr_distance_unbiased`` and
    ``expr_real_mass_ratio`` per perturbation; ``targets[k]`` is row k's target gene column (-1: none)."""
    out = {"expr_mse_unbiased": _corrected_sq(pred_bulk, real_bulk, pred_jack, real_jack, targets)}
    used = np.where(targets >= 0, pred_bulk.shape[1] - 1.0, float(pred_bulk.shape[1]))
    w = np.divide(1.0, used, out=np.zeros_like(used), where=used > 0)
    credit = np.minimum(pred_jack, 1.0 * real_jack)
    claim = float((credit * w).sum())
    if claim > 0.0:
        ratio = _budget(pred_bulk, targets, w) / claim
        if ratio < 1.0:
            credit = credit * ratio
    out["expr_mse_unbiased_capped"] = _corrected_sq(pred_bulk, real_bulk, credit, real_jack, targets)
    ctrl = np.broadcast_to(ctrl_bulk, real_bulk.shape)
    out["expr_distance_unbiased"] = _corrected_sq(real_bulk, ctrl, real_jack, np.full(real_bulk.shape[0], ctrl_jack), targets)
    out["expr_real_mass_ratio"] = np.expm1(real_bulk).sum(axis=1) / BULK_TARGET_SUM
    return out


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """``expr_mse_unbiased_capped_norm``: sum of the numerators over sum of the denominators
    (NaN when the denominators do not sum to a positive number), and that denominator sum."""
    ok = np.isfinite(num) & np.isfinite(den)
    d = float(np.sum(den[ok]))
    return (float(np.sum(num[ok])) / d if d > 0 else float("nan")), d


# --------------------------------------------------------------------------------------------
# DE tables
# --------------------------------------------------------------------------------------------


def de_metrics(
    real_lfc: np.ndarray, real_padj: np.ndarray, pred_lfc: np.ndarray, pred_padj: np.ndarray, pred_p: np.ndarray,
    gene_rank: np.ndarray, targets: np.ndarray,
) -> dict[str, np.ndarray]:
    """The four DE metrics per perturbation (NaN where undefined; ``lfc_nmae`` NaN = omitted).

    Arrays are ``(perturbations, genes)``; a NaN adjusted p-value marks a gene the side did not
    test (each side tests the genes its control expresses; with the reference's controls on
    both sides, the same genes). A NaN fold change is never significant. ``gene_rank`` orders the
    genes by name (the last tie-break of the reach ranking); ``targets[k]`` is the column of row
    ``k``'s target gene (-1: none).
    """
    n_p, n_g = real_lfc.shape
    avail_r = ~np.isnan(real_padj)
    avail_p = ~np.isnan(pred_padj)
    own = np.zeros((n_p, n_g), dtype=bool)
    rows = np.flatnonzero(targets >= 0)
    own[rows, targets[rows]] = True
    with np.errstate(invalid="ignore"):
        sig_r = avail_r & (real_padj < ALPHA) & ~np.isnan(real_lfc) & ~own
        sig_p = avail_p & (pred_padj < ALPHA) & ~np.isnan(pred_lfc) & ~own
    defined_r = ~np.isnan(real_lfc) & (real_lfc != 0)
    defined_p = ~np.isnan(pred_lfc) & (pred_lfc != 0)
    match = defined_r & defined_p & (np.sign(real_lfc) == np.sign(pred_lfc))
    joined = avail_r & avail_p
    n_conf = sig_r.sum(axis=1)
    called = sig_p & defined_r & joined
    n_pred = called.sum(axis=1)
    k = (called & match).sum(axis=1)
    den = np.maximum(n_pred, n_conf)
    fidelity = np.divide(k, den, out=np.full(n_p, np.nan), where=den > 0)
    union = (sig_r | sig_p).sum(axis=1)
    inter = (sig_r & sig_p).sum(axis=1)
    jaccard = np.divide(inter, union, out=np.ones(n_p), where=union > 0)
    reach = np.full(n_p, np.nan)
    nmae = np.full(n_p, np.nan)
    abs_p = np.where(np.isnan(pred_lfc), -np.inf, np.abs(pred_lfc))
    p_key = np.where(np.isnan(pred_lfc), 1.0, pred_padj)  # a NaN fold change is read as p_adj = 1
    p_key = np.where(np.isnan(p_key), np.inf, p_key)
    raw_key = np.where(np.isnan(pred_p), np.inf, pred_p)
    pool_mask = sig_r & joined
    for t in range(n_p):
        if n_conf[t] == 0:
            continue
        pool = np.flatnonzero(pool_mask[t])
        order = np.lexsort((gene_rank[pool], -abs_p[t, pool], raw_key[t, pool], p_key[t, pool], ~sig_p[t, pool]))
        ranked = pool[order]
        nd = np.cumsum(defined_r[t, ranked])
        nm = np.cumsum(match[t, ranked])
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = (nd > 0) & (nm / np.maximum(nd, 1) >= REACH_PURITY)
        reach[t] = (nd[ok][-1] if ok.any() else 0) / n_conf[t]
        gate = sig_r[t] & np.isfinite(real_lfc[t])
        if gate.sum() >= MIN_LFC_GATE:
            nmae[t] = _nmae(real_lfc[t, gate], np.where(avail_p[t, gate], pred_lfc[t, gate], 0.0))
    return {
        "de_wilcoxon_direction_fidelity_yield_raw": fidelity,
        "de_wilcoxon_direction_reach_raw": reach,
        "de_wilcoxon_sig_jaccard": jaccard,
        "de_wilcoxon_lfc_nmae": nmae,
    }


def _nmae(real: np.ndarray, pred: np.ndarray) -> float:
    """sum |pred - real| / sum |real| (as means); a non-finite prediction counts as 0; NaN if undefined."""
    pred = np.where(np.isfinite(pred), pred, 0.0)
    d = np.abs(real).mean()
    if not np.isfinite(d) or d == 0.0:
        return float("nan")
    return float(np.abs(pred - real).mean()) / float(d)
