"""Metrics computed from the pseudobulk expression (kind ``"expression"``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from vcell.eval.metrics._inputs import ExpressionData
from vcell.eval.metrics._registry import MetricUndefined, register
from vcell.eval.metrics._stats import _pearson

__all__ = ["clustering_agreement", "discrimination_score", "pearson_edistance"]


def _rowwise(x: ExpressionData, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], use_delta: bool) -> pd.Series:
    pred, real = (x.pred_effect, x.real_effect) if use_delta else (x.pred, x.real)
    return pd.Series(fn(pred, real), index=pd.Index(x.perturbations, name="perturbation"), dtype=np.float64)


def _mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.mean((a - b) ** 2, axis=1)


def _mae(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.mean(np.abs(a - b), axis=1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([_pearson(u, v) for u, v in zip(a, b)])


register("pearson_delta", kind="expression", best=1.0, description="Pearson correlation of predicted and real effects",
         fn=_pearson_rows, use_delta=True)(_rowwise)  # fmt: skip
register("mse", kind="expression", best=0.0, description="Mean squared error of the pseudobulks",
         fn=_mse, use_delta=False)(_rowwise)  # fmt: skip
register("mae", kind="expression", best=0.0, description="Mean absolute error of the pseudobulks",
         fn=_mae, use_delta=False)(_rowwise)  # fmt: skip
register("mse_delta", kind="expression", best=0.0, description="Mean squared error of the effects",
         fn=_mse, use_delta=True)(_rowwise)  # fmt: skip
register("mae_delta", kind="expression", best=0.0, description="Mean absolute error of the effects",
         fn=_mae, use_delta=True)(_rowwise)  # fmt: skip


def _l1(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.abs(real - pred).sum(axis=1)


def _l2(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.sqrt(((real - pred) ** 2).sum(axis=1))


def _cosine(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    # A zero vector has no direction: similarity 0, distance 1 (scikit-learn's convention).
    norms = np.linalg.norm(real, axis=1)
    unit_real = real / np.where(norms == 0, 1.0, norms)[:, None]
    norm = np.linalg.norm(pred)
    sim = unit_real @ (pred / (norm if norm else 1.0))
    return np.clip(1.0 - sim, 0.0, 2.0)


_DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"l1": _l1, "l2": _l2, "cosine": _cosine}


def discrimination_score(x: ExpressionData, metric: str = "l1") -> pd.Series:
    """Perturbation discrimination: how close each predicted effect is to its own real effect.

    For perturbation t: distances from the predicted effect of t to the real effect of every
    perturbation, over all genes except those named t; rank = position of t in
    ``numpy.argsort`` of the distances (so ties fall as numpy's sort leaves them); score
    ``1 - rank / n_perts`` (1 is best).
    """
    distance = _DISTANCES[metric]
    real, pred, n = x.real_effect, x.pred_effect, x.perturbations.size
    scores = np.empty(n)
    for t, p in enumerate(x.perturbations):
        keep = x.genes != p
        d = distance(real, pred[t]) if keep.all() else distance(real[:, keep], pred[t, keep])
        rank = np.flatnonzero(np.argsort(d) == t)[0]
        scores[t] = 1.0 - rank / n
    return pd.Series(scores, index=pd.Index(x.perturbations, name="perturbation"))


for _distance in _DISTANCES:
    register(
        f"discrimination_score_{_distance}",
        kind="expression",
        best=1.0,
        description=f"Normalised rank of each prediction among the real effects ({_distance} distance)",
        metric=_distance,
    )(discrimination_score)


@register("pearson_edistance", kind="expression", best=1.0)
def pearson_edistance(x: ExpressionData) -> float:
    """Pearson correlation, across perturbations, of the energy distance to the controls
    (pred cells vs pred controls against real cells vs real controls)."""
    if x.perturbations.size < 2:
        raise MetricUndefined("pearson_edistance needs at least two perturbations")
    energy = x.energy_distances
    return _pearson(energy.real, energy.pred)


@register("clustering_agreement", kind="expression", best=1.0)
def clustering_agreement(
    x: ExpressionData,
    real_resolution: float = 1.0,
    pred_resolutions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0),
    n_neighbors: int = 15,
) -> float:
    """Agreement of Leiden clusterings of the real and the predicted perturbation pseudobulks.

    The real pseudobulks are clustered once (kNN graph, Leiden at ``real_resolution``), the
    predicted ones at each of ``pred_resolutions``; the score is the best adjusted mutual
    information (floored at 0). Uses scanpy's neighbours and its igraph Leiden (needs
    ``igraph``), exactly as cell-eval calls them.
    """
    try:
        import igraph  # noqa: F401
    except ImportError:
        raise MetricUndefined("clustering_agreement needs the igraph package (pip install igraph)") from None
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_mutual_info_score

    if x.perturbations.size < 2:
        raise MetricUndefined("clustering_agreement needs at least two perturbations")

    def clusters(bulk: np.ndarray, resolutions: Iterable[float]) -> list[np.ndarray]:
        adata = ad.AnnData(X=bulk.copy())
        sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, adata.n_obs - 1), use_rep="X")
        labels = []
        for r in resolutions:
            sc.tl.leiden(adata, resolution=r, key_added="leiden", flavor="igraph", n_iterations=2)
            labels.append(np.asarray(adata.obs["leiden"]))
        return labels

    try:
        (real_labels,) = clusters(x.real, [real_resolution])
        pred_labels = clusters(x.pred, pred_resolutions)
    except ValueError as err:  # e.g. two perturbations: the kNN graph cannot be built
        raise MetricUndefined(f"clustering_agreement: the Leiden clustering failed ({err})") from None
    best = 0.0
    for labels in pred_labels:
        best = max(best, float(adjusted_mutual_info_score(real_labels, labels)))
    return best
