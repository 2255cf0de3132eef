"""The VCC 2026 score: each metric placed between the baseline (0) and the replicate (1).

For a metric whose aggregate is ``u``, with baseline ``b`` and replicate ``r``:
``s = (u - b) / (r - b)`` (for the two lower-is-better metrics the same line written as
``1 - (u - r) / (b - r)``, cell-eval2's arithmetic). ``expr_mse_unbiased_capped_norm`` is
clamped to [0, 1] and ``de_wilcoxon_lfc_nmae`` floored at -6; the other four are not clamped.
A non-finite ``u`` scores the clamp (or, unclamped, the metric's floor of 0). A context's score
is the mean of the six; contexts are scored separately and averaged. ``from_baseline`` is the
same with the metric's perfect value (1, or 0 when lower is better) in place of ``r``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vcell.errors import VcellError
from vcell.eval.vcc2026.metrics import SCORED

#: metric -> (lower is better, perfect value, clamp low, clamp high); None: not clamped.
POLICY: dict[str, tuple[bool, float, float | None, float]] = {
    "expr_mse_unbiased_capped_norm": (True, 0.0, 0.0, 1.0),
    "de_wilcoxon_lfc_nmae": (True, 0.0, -6.0, math.inf),
    "pds_cosine": (False, 1.0, None, math.inf),
    "de_wilcoxon_direction_fidelity_yield_raw": (False, 1.0, None, math.inf),
    "de_wilcoxon_direction_reach_raw": (False, 1.0, None, math.inf),
    "de_wilcoxon_sig_jaccard": (False, 1.0, None, math.inf),
}
#: A scale is unresolved when its replicate lies within this many standard errors of its baseline: :func:`unresolved`.
UNRESOLVED_SE = 2.0
#: Order of the score table's rows: lower-is-better metrics, then the others, by name.
ORDER = sorted(m for m in SCORED if POLICY[m][0]) + sorted(m for m in SCORED if not POLICY[m][0])


def _clip(x: float, lo: float, hi: float) -> float:
    if not math.isfinite(x) or x <= lo:
        return lo
    return hi if x >= hi else x


def _is_degenerate(metric: str, b: float, top: float) -> bool:
    span = (b - top) if POLICY[metric][0] else (top - b)
    return not (math.isfinite(b) and math.isfinite(span) and span > 0)


def scaled(metric: str, u: float, b: float, top: float) -> float:
    """One metric's value on the scale from ``b`` (0) to ``top`` (1), clamped as the challenge does."""
    lower, _, clamp_lo, hi = POLICY[metric]
    if _is_degenerate(metric, b, top):
        why = ("the baseline's value is undefined" if not math.isfinite(b) else "the top end is undefined" if not math.isfinite(top)
               else "the baseline is not worse than the top end")
        raise VcellError(f"{metric}: the scale is degenerate (baseline {b!r}, top {top!r}): {why}")

    def line(x: float) -> float:
        return 1.0 - (x - top) / (b - top) if lower else (x - b) / (top - b)

    lo = -math.inf if clamp_lo is None else clamp_lo
    if u is None or not math.isfinite(float(u)):
        return clamp_lo if clamp_lo is not None else _clip(line(0.0), lo, hi)
    s = line(float(u))
    if not math.isfinite(s):
        return clamp_lo if clamp_lo is not None else _clip(line(0.0), lo, hi)
    return _clip(s, lo, hi)


def score_context(user: dict[str, float], baseline: dict[str, float], replicate: dict[str, float] | None,
                  strict: bool = True) -> pd.DataFrame:
    """The score table of one context: one row per scored metric, then ``avg_score``.

    Columns: ``metric``, ``value`` (the model's aggregate), ``baseline``, ``replicate``,
    ``from_baseline`` and ``score`` (against the replicate; NaN without one). A degenerate
    scale (the baseline not worse than the top end, or not finite) is an error, as in
    cell-eval2; with ``strict=False`` that metric scores NaN and ``avg_score`` is the mean of
    the others (the caller says which, once per scale: :func:`degenerate`).
    """

    def scaled_or_nan(m, u, b, top):
        if not strict and _is_degenerate(m, b, top):
            return math.nan
        return scaled(m, u, b, top)

    rows = []
    for m in ORDER:
        for name, table in (("model", user), ("baseline", baseline)):
            if m not in table:
                raise VcellError(f"the {name}'s aggregate has no {m!r}: was it computed with --profile vcc2026?")
        u, b = user[m], baseline[m]
        r = replicate.get(m, math.nan) if replicate is not None else math.nan
        rows.append({
            "metric": m, "value": u, "baseline": b, "replicate": r,
            "from_baseline": scaled_or_nan(m, u, b, POLICY[m][1]),
            "score": scaled_or_nan(m, u, b, r) if replicate is not None else math.nan,
        })
    table = pd.DataFrame(rows)
    avg = {"metric": "avg_score", "value": math.nan, "baseline": math.nan, "replicate": math.nan,
           "from_baseline": _mean_of_scored(table["from_baseline"]), "score": _mean_of_scored(table["score"])}
    return pd.concat([table, pd.DataFrame([avg])], ignore_index=True)


def degenerate(baseline: dict[str, float], replicate: dict[str, float] | None) -> list[str]:
    """The scored metrics whose scale is degenerate, each as ``"metric (baseline b, replicate r)"``.

    Checked against the replicate (``score``) and the metric's perfect value (``from_baseline``);
    these are the metrics :func:`score_context` leaves out with ``strict=False``.
    """
    out = []
    for m in ORDER:
        b = baseline.get(m, math.nan)
        r = replicate.get(m, math.nan) if replicate is not None else None
        if _is_degenerate(m, b, POLICY[m][1]) or (r is not None and _is_degenerate(m, b, r)):
            out.append(f"{m} (baseline {b:.4g}" + (f", replicate {r:.4g})" if r is not None else ")"))
    return out


def standard_errors(anchor_agg: pd.DataFrame, n_splits: int) -> dict[str, float]:
    """Each metric's standard error of the replicate (the mean over ``n_splits`` splits) from the
    anchor's aggregate table (``metric``, ``replicate_sd``: the sd over the splits, ddof 0):
    ``sd / sqrt(n_splits - 1)``; empty for fewer than two splits."""
    if n_splits < 2:
        return {}
    return {str(m): float(sd) / math.sqrt(n_splits - 1) for m, sd in zip(anchor_agg["metric"], anchor_agg["replicate_sd"])}


def unresolved(baseline: dict[str, float], replicate: dict[str, float], se: dict[str, float]) -> list[str]:
    """The scored metrics whose replicate lies within :data:`UNRESOLVED_SE` standard errors of the
    baseline (``se``: :func:`standard_errors`), each as ``"metric (baseline b, replicate r, standard error e)"``.

    There the length of the scale, ``|r - b|``, is not told apart from zero by the anchor's splits,
    and a scaled value, ``(u - b) / (r - b)``, is the model's distance from the baseline magnified
    by an arbitrary factor: averaged with the other metrics, or over contexts or folds, it can
    outweigh all of them. The numbers stay cell-eval2's; the caller warns. Degenerate scales are
    :func:`degenerate`'s and not named here.
    """
    out = []
    for m in ORDER:
        b, r, e = baseline.get(m, math.nan), replicate.get(m, math.nan), se.get(m, math.nan)
        if _is_degenerate(m, b, r) or not math.isfinite(e):
            continue
        if abs(r - b) <= UNRESOLVED_SE * e:
            out.append(f"{m} (baseline {b:.4g}, replicate {r:.4g}, standard error {e:.2g})")
    return out


def degenerate_note(names: list[str]) -> str:
    """The warning about the :func:`degenerate` metrics ``names`` (without where it applies, nor what follows)."""
    return f"the vcc2026 scale of {', '.join(names)} is degenerate (an end undefined, or the baseline not worse than the top end)"


def unresolved_note(names: list[str]) -> str:
    """The warning about the :func:`unresolved` metrics ``names`` (without where it applies)."""
    return (f"the vcc2026 scale of {', '.join(names)} is not resolved: the replicate is within {UNRESOLVED_SE:g} standard "
            "errors of the baseline over the anchor's splits, so a scaled value there is the model's distance from the "
            "baseline magnified by an arbitrary factor (more cells per perturbation, or more perturbations, resolve it)")


def _mean_of_scored(values: pd.Series) -> float:
    """``nanmean`` of ``values``; NaN without numpy's empty-slice warning when no metric could be scaled."""
    scored = values.to_numpy(dtype=float)
    scored = scored[~np.isnan(scored)]
    return float(scored.mean()) if scored.size else math.nan


def average_contexts(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Context score tables stacked (column ``context``) with their mean as context ``mean``."""
    stacked = pd.concat([t.assign(context=c) for c, t in tables.items()], ignore_index=True)
    if len(tables) > 1:
        mean = stacked.groupby("metric", sort=False)[["from_baseline", "score"]].mean().reset_index()
        for col in ("value", "baseline", "replicate"):
            mean[col] = math.nan
        stacked = pd.concat([stacked, mean.assign(context="mean")], ignore_index=True)
    return stacked[["context", "metric", "value", "baseline", "replicate", "from_baseline", "score"]]
