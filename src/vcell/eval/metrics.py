"""The Virtual Cell Challenge metrics, computed exactly as cell-eval 0.8.2 computes them.

Each metric is a small function registered under its cell-eval name with its kind (``"de"``:
computed from the differential-expression tables; ``"expression"``: from pseudobulk expression)
and its best value (``0.0`` for errors, ``1.0`` for agreement scores, ``None`` for quantities
that are not compared with a baseline). Profiles (:mod:`vcell.eval.profiles`) are lists of these
names; :func:`vcell.eval.profiles.compute_results` runs a profile and builds cell-eval's
``results`` table; :mod:`vcell.eval.scoring` aggregates it and scores it against a baseline.

Inputs are two plain objects that a pipeline builds once:

* :class:`ExpressionData`: per-perturbation pseudobulks (mean over cells of the log1p
  expression) of the prediction and of the real data, ``[n_perts, n_genes]``, the two control
  pseudobulks, the gene and perturbation names and, for ``pearson_edistance``, the energy
  distance of each perturbation's cells to the control cells (or a callable computing them on
  demand, one perturbation block at a time: see :func:`energy_distances`).
  :meth:`ExpressionData.from_anndata` builds it from two in-memory AnnData objects.
* :class:`DEData`: the real and predicted differential-expression tables in pdex's long layout
  (``target``, ``feature``, ``log2_fold_change``, ``p_value``, ``fdr``, ...), aligned once into
  ``[n_perts, n_features]`` arrays.

A metric returns either one value per perturbation (a :class:`pandas.Series` indexed by
perturbation; a perturbation missing from the index is a *null* in ``results``, a NaN value is a
NaN, exactly as in cell-eval's polars tables), one value for all perturbations (a float), or
several named values per perturbation (a :class:`pandas.DataFrame`, one column per sub-metric,
written as ``<name>_<column>``). A metric raises :class:`MetricUndefined` where cell-eval's
computation fails and cell-eval therefore leaves the metric out of its tables (e.g.
``pearson_edistance`` with a single perturbation).

Behaviour of cell-eval reproduced on purpose (see each function for details): DE values are cast
to float32 before any comparison or ranking; significance is ``fdr < 0.05`` on those float32
values; the perturbation's own gene column is excluded from the discrimination distances; the
rank in the discrimination score is the position in ``numpy.argsort`` of the distances; ties in
Spearman correlations get average ranks and NaN ranks above every number; ``pr_auc`` /
``roc_auc`` score genes by ``-log10`` of the float32-clipped predicted FDR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from vcell.data.aggregate import group_sums
from vcell.errors import VcellError

__all__ = [
    "DEData",
    "EnergyDistances",
    "ExpressionData",
    "FDR_THRESHOLD",
    "Metric",
    "MetricUndefined",
    "REGISTRY",
    "energy_distance",
    "energy_distances",
    "get_metric",
    "list_metrics",
    "mean_pairwise_distance",
    "pseudobulk",
    "register",
]

Kind = Literal["de", "expression"]
KINDS: tuple[str, ...] = ("de", "expression")

#: A gene is significant when its (float32) FDR is strictly below this, with no fold-change cut.
FDR_THRESHOLD = 0.05

#: Lower clip of the predicted FDR before ``-log10`` in ``pr_auc`` / ``roc_auc``.
_AUC_FDR_FLOOR = np.float32(1e-10)


class MetricUndefined(Exception):
    """The metric has no value for these inputs; cell-eval drops it from its tables."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """A registered metric: ``func(data, **kwargs)`` with ``data`` a :class:`DEData` (kind
    ``"de"``) or an :class:`ExpressionData` (kind ``"expression"``)."""

    name: str
    kind: str
    best: float | None
    func: Callable[..., Any]
    description: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, data: DEData | ExpressionData, **overrides: Any) -> pd.Series | pd.DataFrame | float:
        return self.func(data, **{**self.kwargs, **overrides})


#: Every metric, by name, in registration order (the order of cell-eval's ``full`` profile
#: within each kind).
REGISTRY: dict[str, Metric] = {}


def register(name: str, *, kind: Kind, best: float | None, description: str = "", **kwargs: Any):
    """Decorator registering ``func`` as metric ``name``; ``kwargs`` are bound to every call.

    ``best`` is ``0.0`` (an error: lower is better), ``1.0`` (an agreement: higher is better) or
    ``None`` (not scored against a baseline).
    """
    if kind not in KINDS:
        raise ValueError(f"metric {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if best not in (0.0, 1.0, None):
        raise ValueError(f"metric {name!r}: best must be 0.0, 1.0 or None, got {best!r}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        REGISTRY[name] = Metric(name, kind, best, func, description or (func.__doc__ or "").split("\n")[0], dict(kwargs))
        return func

    return decorate


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise VcellError(f"unknown metric {name!r}; known metrics: {known}") from None


def list_metrics(kind: Kind | None = None) -> list[str]:
    """Names of the registered metrics (of one kind), in registration order."""
    return [name for name, m in REGISTRY.items() if kind is None or m.kind == kind]


# --------------------------------------------------------------------------------------------
# Expression inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnergyDistances:
    """Energy distance of each perturbation's cells to the control cells, ``[n_perts]`` each,
    computed within the prediction (pred cells vs pred controls) and within the real data."""

    real: np.ndarray
    pred: np.ndarray


@dataclass(frozen=True, eq=False)
class ExpressionData:
    """Pseudobulk expression of the prediction and the real data.

    Parameters
    ----------
    perturbations
        ``[n_perts]`` perturbation labels, control excluded, in the order of the rows (cell-eval
        sorts them; :meth:`from_anndata` does too).
    genes
        ``[n_genes]`` gene names (``var_names``); a gene named like a perturbation is left out of
        that perturbation's discrimination distances.
    real, pred
        ``[n_perts, n_genes]`` mean over each perturbation's cells of the log1p expression.
    real_control, pred_control
        ``[n_genes]`` mean over the control cells of each AnnData (pred effects use the pred
        controls, real effects the real controls, as in cell-eval 0.8).
    energy
        For ``pearson_edistance``: an :class:`EnergyDistances`, or a callable returning one
        (called once, when the metric is first computed), or ``None`` when not available.
    """

    perturbations: np.ndarray
    genes: np.ndarray
    real: np.ndarray
    pred: np.ndarray
    real_control: np.ndarray
    pred_control: np.ndarray
    energy: EnergyDistances | Callable[[], EnergyDistances] | None = None

    def __post_init__(self) -> None:
        set_ = partial(object.__setattr__, self)
        set_("perturbations", np.asarray(self.perturbations).astype(str))
        set_("genes", np.asarray(self.genes).astype(str))
        n_perts, n_genes = self.perturbations.size, self.genes.size
        for name in ("real", "pred"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (n_perts, n_genes):
                raise VcellError(
                    f"ExpressionData.{name} has shape {arr.shape}; expected (perturbations, genes) = ({n_perts}, {n_genes})"
                )
            set_(name, arr)
        for name in ("real_control", "pred_control"):
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (n_genes,):
                raise VcellError(f"ExpressionData.{name} has {arr.size} values; expected one per gene ({n_genes})")
            set_(name, arr)
        if np.unique(self.perturbations).size != n_perts:
            raise VcellError("ExpressionData.perturbations has duplicate labels")

    @cached_property
    def real_effect(self) -> np.ndarray:
        """``[n_perts, n_genes]`` real pseudobulk minus the real control pseudobulk."""
        return self.real - self.real_control

    @cached_property
    def pred_effect(self) -> np.ndarray:
        """``[n_perts, n_genes]`` predicted pseudobulk minus the predicted control pseudobulk."""
        return self.pred - self.pred_control

    @cached_property
    def energy_distances(self) -> EnergyDistances:
        """The energy distances, computed on first use when ``energy`` is a callable."""
        energy = self.energy() if callable(self.energy) else self.energy
        if energy is None:
            raise VcellError(
                "pearson_edistance needs the energy distances of each perturbation to the control "
                "cells: build ExpressionData with from_anndata(...) or pass energy="
            )
        real = np.asarray(energy.real, dtype=np.float64).reshape(-1)
        pred = np.asarray(energy.pred, dtype=np.float64).reshape(-1)
        if real.size != self.perturbations.size or pred.size != self.perturbations.size:
            raise VcellError(
                f"energy distances have {real.size} (real) and {pred.size} (pred) values; "
                f"expected one per perturbation ({self.perturbations.size})"
            )
        return EnergyDistances(real=real, pred=pred)

    @classmethod
    def from_anndata(
        cls,
        real,
        pred,
        pert_col: str = "target_gene",
        control: str = "non-targeting",
        energy: bool = True,
    ) -> ExpressionData:
        """Pseudobulks (and, lazily, energy distances) of two in-memory AnnData objects.

        ``real`` and ``pred`` must hold log1p expression in ``X`` (dense or sparse), the same genes
        in the same order and the same perturbation labels, control included. Sparse matrices are
        never densified as a whole: means are sparse products and the energy distances are
        computed one perturbation block at a time when ``pearson_edistance`` is first needed.
        """
        genes = np.asarray(real.var_names).astype(str)
        if not np.array_equal(genes, np.asarray(pred.var_names).astype(str)):
            raise VcellError("real and pred have different genes or gene order (var_names); reorder pred to the real genes")
        labels = {}
        for name, adata in (("real", real), ("pred", pred)):
            if pert_col not in adata.obs.columns:
                raise VcellError(f"perturbation column {pert_col!r} not found in {name} obs")
            labels[name] = np.asarray(adata.obs[pert_col]).astype(str)
            if control not in labels[name]:
                raise VcellError(f"control label {control!r} not found in {name} obs[{pert_col!r}]")
        groups_real, groups_pred = np.unique(labels["real"]), np.unique(labels["pred"])
        if not np.array_equal(groups_real, groups_pred):
            only = sorted(set(groups_real) ^ set(groups_pred))[:5]
            raise VcellError(f"real and pred have different perturbations in obs[{pert_col!r}] (e.g. {', '.join(only)})")
        perts = groups_real[groups_real != control]
        order = np.append(perts, control)
        bulk_real = as_cell_eval_bulk(pseudobulk(real.X, labels["real"], order), real.X.dtype)
        bulk_pred = as_cell_eval_bulk(pseudobulk(pred.X, labels["pred"], order), pred.X.dtype)
        energy_fn = None
        if energy:
            energy_fn = partial(_energy_from_anndata, real.X, pred.X, labels["real"], labels["pred"], perts, control)
        return cls(
            perturbations=perts,
            genes=genes,
            real=bulk_real[:-1],
            pred=bulk_pred[:-1],
            real_control=bulk_real[-1],
            pred_control=bulk_pred[-1],
            energy=energy_fn,
        )


def pseudobulk(X, labels: np.ndarray, groups: Iterable[str]) -> np.ndarray:
    """``[len(groups), n_genes]`` float64 mean of the rows of ``X`` (dense, sparse or backed) per group."""
    labels = np.asarray(labels).astype(str)
    groups = np.asarray(list(groups)).astype(str)
    rows = pd.Index(groups).get_indexer(labels)
    counts = np.bincount(rows[rows >= 0], minlength=groups.size).astype(np.float64)
    if np.any(counts == 0):
        missing = groups[counts == 0][:5]
        raise VcellError(f"no cells for group(s) {', '.join(missing)}")
    return group_sums(X, rows, groups.size) / counts[:, None]


def as_cell_eval_bulk(bulk: np.ndarray, dtype) -> np.ndarray:
    """cell-eval's (polars') group means of float32 data are the float64 means rounded to
    float32; keep that rounding so near-equal distances order as in cell-eval."""
    return bulk.astype(np.float32).astype(np.float64) if dtype == np.float32 else bulk


def as_rows(X, idx: np.ndarray):
    """Rows ``idx`` of ``X`` in their own dtype: sparse as CSR, anything else dense."""
    block = X[idx]
    return sparse.csr_matrix(block) if sparse.issparse(block) else np.asarray(block)


def _float64(a):
    return a.astype(np.float64) if sparse.issparse(a) else np.asarray(a, dtype=np.float64)


def _sq_norms(a) -> np.ndarray:
    if sparse.issparse(a):
        return np.asarray(a.multiply(a).sum(axis=1)).reshape(-1)
    return np.einsum("ij,ij->i", a, a)


def _squared_distances(a, b, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    gram = a @ b.T
    d2 = -2.0 * (gram.toarray() if sparse.issparse(gram) else np.asarray(gram))
    d2 += na[:, None]
    d2 += nb[None, :]
    return d2


def mean_pairwise_distance(a, b=None, chunk: int = 2048):
    """Mean Euclidean distance over all pairs (rows of ``a``) x (rows of ``b``).

    With ``b`` omitted: over all ordered pairs of rows of ``a``, the zero diagonal included (as
    cell-eval's ``pairwise_distances(x).mean()``). Dense or CSR input.

    Precision follows the input, as cell-eval's scikit-learn call does: float64 input is summed
    in float64, ``chunk`` rows at a time; when both inputs are float32, each distance is rounded
    to float32 (squared distance computed in float64) and the mean is taken in float32 over the
    whole ``[n_a, n_b]`` float32 matrix (which is therefore held in memory), returning a
    ``numpy.float32``.
    """
    same = b is None
    b = a if same else b
    float32 = a.dtype == np.float32 and b.dtype == np.float32
    a64 = _float64(a)
    b64 = a64 if same else _float64(b)
    na = _sq_norms(a64)
    nb = na if same else _sq_norms(b64)
    n_a, n_b = a64.shape[0], b64.shape[0]
    if float32:
        dist = np.empty((n_a, n_b), dtype=np.float32)
        for start in range(0, n_a, chunk):
            stop = min(start + chunk, n_a)
            dist[start:stop] = _squared_distances(a64[start:stop], b64, na[start:stop], nb)
        np.maximum(dist, 0, out=dist)
        if same:
            np.fill_diagonal(dist, 0)
        return np.sqrt(dist, out=dist).mean()
    total = 0.0
    for start in range(0, n_a, chunk):
        stop = min(start + chunk, n_a)
        d2 = _squared_distances(a64[start:stop], b64, na[start:stop], nb)
        np.maximum(d2, 0.0, out=d2)
        if same:
            rows = np.arange(stop - start)
            d2[rows, rows + start] = 0.0
        total += float(np.sqrt(d2).sum())
    return total / (n_a * n_b)


def energy_distance(cells, control_cells, control_spread=None):
    """Energy distance ``2 E|x - y| - E|x - x'| - E|y - y'|`` between two cell sets.

    ``control_spread`` is ``mean_pairwise_distance(control_cells)``, reusable across
    perturbations. Evaluated in float32 arithmetic for float32 cells, as in cell-eval.
    """
    if control_spread is None:
        control_spread = mean_pairwise_distance(control_cells)
    return 2 * mean_pairwise_distance(cells, control_cells) - mean_pairwise_distance(cells) - control_spread


def energy_distances(
    perturbations: Iterable[str],
    cells: Callable[[str], Any],
    control_cells: Any,
) -> np.ndarray:
    """Energy distance of every perturbation to the controls within one dataset.

    ``cells(p)`` returns the cells (rows: cells, dense or CSR) of perturbation ``p``; only one
    perturbation block is held at a time, so a pipeline can stream blocks from disk.
    """
    spread = mean_pairwise_distance(control_cells)
    return np.array([energy_distance(cells(p), control_cells, spread) for p in perturbations], dtype=np.float64)


def _energy_from_anndata(X_real, X_pred, labels_real, labels_pred, perts, control) -> EnergyDistances:
    out = {}
    for name, X, labels in (("real", X_real, labels_real), ("pred", X_pred, labels_pred)):
        out[name] = energy_distances(
            perts,
            lambda p, X=X, labels=labels: as_rows(X, np.flatnonzero(labels == p)),
            as_rows(X, np.flatnonzero(labels == control)),
        )
    return EnergyDistances(real=out["real"], pred=out["pred"])


# --------------------------------------------------------------------------------------------
# DE inputs
# --------------------------------------------------------------------------------------------


class _DESide:
    """One DE table aligned to ``[n_perts, n_features]`` float32 arrays (NaN where absent)."""

    def __init__(self, table: pd.DataFrame, perts: np.ndarray, features: pd.Index, cols: dict[str, str]):
        t_idx = pd.Index(perts).get_indexer(table[cols["target"]].astype(str))
        f_idx = features.get_indexer(table[cols["feature"]].astype(str))
        shape = (perts.size, features.size)
        self.present = np.zeros(shape, dtype=bool)
        self.present[t_idx, f_idx] = True
        if int(self.present.sum()) != len(table):
            raise VcellError("a DE table has duplicate (target, feature) rows")
        # cell-eval casts the numeric DE columns to float32 before anything else.
        lfc = table[cols["lfc"]].to_numpy(dtype=np.float64)
        abs_lfc = table[cols["abs_lfc"]].to_numpy(dtype=np.float64) if cols["abs_lfc"] in table else np.abs(lfc)
        self.lfc = self._fill(shape, t_idx, f_idx, lfc)
        self.abs_lfc = self._fill(shape, t_idx, f_idx, abs_lfc)
        self.fdr = self._fill(shape, t_idx, f_idx, table[cols["fdr"]].to_numpy(dtype=np.float64))
        # Row position within the table: polars' ranking keeps this order among equal values.
        self.row = np.full(shape, -1, dtype=np.int64)
        self.row[t_idx, f_idx] = np.arange(len(table))
        self._ranked: dict[float, list[np.ndarray]] = {}

    @classmethod
    def from_arrays(cls, targets, lfc: np.ndarray, fdr: np.ndarray, perts: np.ndarray) -> _DESide:
        """The same alignment from ``[n_targets, n_features]`` arrays (rows in ``targets`` order,
        features in ``features`` order), as their long table in target-major order would give."""
        t_idx = pd.Index(perts).get_indexer(pd.Series(targets, dtype=object).astype(str))
        if (t_idx < 0).any():
            raise VcellError("a DE result has targets outside the perturbations")
        n_t, n_f = lfc.shape
        shape = (perts.size, n_f)
        side = cls.__new__(cls)
        side.present = np.zeros(shape, dtype=bool)
        side.present[t_idx] = True
        if int(side.present.sum()) != n_t * n_f:
            raise VcellError("a DE result has duplicate targets")
        lfc32 = lfc.astype(np.float32)  # abs commutes with the rounding to float32
        side.lfc = cls._fill_rows(shape, t_idx, lfc32)
        side.abs_lfc = cls._fill_rows(shape, t_idx, np.abs(lfc32))
        side.fdr = cls._fill_rows(shape, t_idx, fdr.astype(np.float32))
        side.row = np.full(shape, -1, dtype=np.int64)
        side.row[t_idx] = np.arange(n_t * n_f, dtype=np.int64).reshape(n_t, n_f)
        side._ranked = {}
        return side

    @staticmethod
    def _fill_rows(shape, t_idx, values: np.ndarray) -> np.ndarray:
        if values.shape == shape and np.array_equal(t_idx, np.arange(shape[0])):
            return values
        out = np.full(shape, np.nan, dtype=np.float32)
        out[t_idx] = values
        return out

    @staticmethod
    def _fill(shape, t_idx, f_idx, values) -> np.ndarray:
        out = np.full(shape, np.nan, dtype=np.float32)
        out[t_idx, f_idx] = values.astype(np.float32)
        return out

    def significant(self, fdr_threshold: float) -> np.ndarray:
        """``[n_perts, n_features]``: present and float32 FDR below the threshold (NaN is not)."""
        with np.errstate(invalid="ignore"):
            return self.present & (self.fdr < np.float32(fdr_threshold))

    def ranked_significant(self, fdr_threshold: float) -> list[np.ndarray]:
        """Per perturbation, its significant feature indices by |log2FC| descending.

        NaN |log2FC| ranks first (polars orders NaN above every number); equal values keep
        table order. (cell-eval ranks with polars' unstable sort, so its order among equal
        values in sets above ~20 genes is arbitrary; this is the stable choice.)
        """
        if fdr_threshold not in self._ranked:
            sig = self.significant(fdr_threshold)
            ranked = []
            for p in range(sig.shape[0]):
                idx = np.flatnonzero(sig[p])
                a = self.abs_lfc[p, idx]
                nan = np.isnan(a)
                order = np.lexsort((self.row[p, idx], -np.where(nan, 0.0, a), ~nan))
                ranked.append(idx[order])
            self._ranked[fdr_threshold] = ranked
        return self._ranked[fdr_threshold]


@dataclass(frozen=True, eq=False)
class DEData:
    """Real and predicted differential-expression tables, pdex's long layout.

    Each table has one row per (perturbation, gene) with at least the columns named by
    ``target_col``, ``feature_col``, ``lfc_col`` and ``fdr_col`` (pdex: ``target``,
    ``feature``, ``log2_fold_change``, ``fdr``; its other columns are ignored). An
    ``abs_log2_fold_change`` column is used when present, otherwise derived. Both tables must
    cover the same perturbations (the control excluded).
    """

    real: pd.DataFrame
    pred: pd.DataFrame
    target_col: str = "target"
    feature_col: str = "feature"
    lfc_col: str = "log2_fold_change"
    fdr_col: str = "fdr"
    abs_lfc_col: str = "abs_log2_fold_change"
    # Derived in __post_init__: the sorted perturbations, the union of the features, and each
    # table aligned to [n_perts, n_features] arrays.
    perturbations: np.ndarray = field(init=False, repr=False)
    features: pd.Index = field(init=False, repr=False)
    real_side: _DESide = field(init=False, repr=False)
    pred_side: _DESide = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cols = {
            "target": self.target_col,
            "feature": self.feature_col,
            "lfc": self.lfc_col,
            "fdr": self.fdr_col,
            "abs_lfc": self.abs_lfc_col,
        }
        tables = {}
        for name in ("real", "pred"):
            table = getattr(self, name)
            if hasattr(table, "to_pandas") and not isinstance(table, pd.DataFrame):
                table = table.to_pandas()
            if not isinstance(table, pd.DataFrame):
                raise VcellError(f"the {name} DE table must be a pandas DataFrame, got {type(table).__name__}")
            missing = [c for k, c in cols.items() if k != "abs_lfc" and c not in table.columns]
            if missing:
                has = ", ".join(map(str, table.columns))
                raise VcellError(f"the {name} DE table lacks column(s) {', '.join(missing)} (has: {has})")
            tables[name] = table
        perts_real = np.sort(pd.unique(tables["real"][self.target_col].astype(str).to_numpy()))
        perts_pred = np.sort(pd.unique(tables["pred"][self.target_col].astype(str).to_numpy()))
        if not np.array_equal(perts_real, perts_pred):
            only = sorted(set(perts_real) ^ set(perts_pred))[:5]
            raise VcellError(f"the real and pred DE tables cover different perturbations (e.g. {', '.join(only)})")
        features = pd.Index(
            pd.unique(pd.concat([tables["real"][self.feature_col], tables["pred"][self.feature_col]]).astype(str))
        )
        object.__setattr__(self, "perturbations", perts_real)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "real_side", _DESide(tables["real"], perts_real, features, cols))
        object.__setattr__(self, "pred_side", _DESide(tables["pred"], perts_real, features, cols))

    @classmethod
    def from_results(cls, real, pred, real_table: pd.DataFrame | None = None, pred_table: pd.DataFrame | None = None) -> DEData:
        """From the DE engine's arrays (two :class:`vcell.eval.de.DEResult`), without re-deriving
        them from the long tables: the same object as ``DEData(real.to_frame(), pred.to_frame())``.

        ``real_table`` / ``pred_table`` are those long tables when the caller already has them.
        """
        real_table = real.to_frame() if real_table is None else real_table
        pred_table = pred.to_frame() if pred_table is None else pred_table
        features = pd.Index(pd.unique(pd.Series(real.features, dtype=object).astype(str)))
        same_features = len(features) == len(real.features) and np.array_equal(
            np.asarray(real.features, dtype=object), np.asarray(pred.features, dtype=object)
        )
        if not same_features:  # genes differ or repeat: align row by row
            return cls(real_table, pred_table)
        perts = [np.sort(pd.unique(pd.Series(r.targets, dtype=object).astype(str).to_numpy())) for r in (real, pred)]
        if not np.array_equal(perts[0], perts[1]):
            only = sorted(set(perts[0]) ^ set(perts[1]))[:5]
            raise VcellError(f"the real and pred DE tables cover different perturbations (e.g. {', '.join(only)})")
        data = cls.__new__(cls)
        for name, value in (
            ("real", real_table),
            ("pred", pred_table),
            ("perturbations", perts[0]),
            ("features", features),
            ("real_side", _DESide.from_arrays(real.targets, real.log2_fold_change, real.fdr, perts[0])),
            ("pred_side", _DESide.from_arrays(pred.targets, pred.log2_fold_change, pred.fdr, perts[0])),
        ):
            object.__setattr__(data, name, value)
        return data


# --------------------------------------------------------------------------------------------
# Small numerical helpers with cell-eval's (polars / scipy / sklearn) semantics
# --------------------------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged; NaN ranks above every number and NaNs tie (polars)."""
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    order = np.lexsort((np.where(nan, 0.0, x), nan))
    xs = x[order]
    same = (xs[1:] == xs[:-1]) | (np.isnan(xs[1:]) & np.isnan(xs[:-1]))
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN for fewer than two values or a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()
    nx, ny = np.linalg.norm(xm), np.linalg.norm(ym)
    if nx == 0 or ny == 0 or not np.isfinite(nx * ny):
        return math.nan
    return float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation as polars computes it (average ranks, NaN ranked highest)."""
    if len(x) < 2:
        return math.nan
    return _pearson(_average_ranks(x), _average_ranks(y))


def _binary_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each distinct score threshold, highest score first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last]
    return tps, (last + 1) - tps


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    tps, fps = _binary_curve(labels, scores)
    precision = tps / (tps + fps)
    recall_step = np.diff(np.r_[0.0, tps]) / tps[-1]
    return float(np.sum(recall_step * precision))


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    tps, fps = _binary_curve(labels, scores)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _neg_log10_float32(q: np.ndarray) -> np.ndarray:
    """``-log10(q)`` of float32 values, evaluated in float32 as polars does
    (``ln(q) / ln(10)``, both rounded to float32)."""
    ln = np.log(q.astype(np.float64)).astype(np.float32)
    return -(ln / np.float32(math.log(10.0)))


# --------------------------------------------------------------------------------------------
# DE metrics
# --------------------------------------------------------------------------------------------


def _per_pert(de: DEData, values: Iterable[float]) -> pd.Series:
    return pd.Series(list(values), index=pd.Index(de.perturbations, name="perturbation"), dtype=np.float64)


def de_overlap(
    de: DEData,
    k: int | None,
    metric: Literal["overlap", "precision"] = "overlap",
    fdr_threshold: float = FDR_THRESHOLD,
) -> pd.Series:
    """Overlap of the top significant genes (by |log2FC|) of the real and predicted DE.

    ``overlap``: ``k_eff = min(k or n_real, n_real)``; ``precision``:
    ``k_eff = min(k or n_pred, n_pred)``; score = |top-k_eff(real) & top-k_eff(pred)| / k_eff,
    0 when ``k_eff`` is 0. So ``overlap_at_N`` compares all real significant genes with the top
    ``n_real`` predicted ones, and ``precision_at_N`` all predicted significant genes with the
    top ``n_pred`` real ones. When either table has no significant gene at all, every
    perturbation scores 0. Genes with equal |log2FC| (often +-inf) keep table order at the cut;
    cell-eval's order there is arbitrary (see :meth:`_DESide.ranked_significant`).
    """
    real = de.real_side.ranked_significant(fdr_threshold)
    pred = de.pred_side.ranked_significant(fdr_threshold)
    if sum(r.size for r in real) == 0 or sum(p.size for p in pred) == 0:
        return _per_pert(de, [0.0] * de.perturbations.size)
    scores = []
    for r, p in zip(real, pred):
        size = r.size if metric == "overlap" else p.size
        k_eff = min(k or size, size)
        scores.append(0.0 if k_eff == 0 else np.intersect1d(r[:k_eff], p[:k_eff]).size / k_eff)
    return _per_pert(de, scores)


for _metric in ("overlap", "precision"):
    for _k in (None, 50, 100, 200, 500):
        register(
            f"{_metric}_at_{_k or 'N'}",
            kind="de",
            best=1.0,
            description=f"{_metric.capitalize()} of the top {_k or 'N'} significant DE genes",
            k=_k,
            metric=_metric,
        )(de_overlap)


@register("de_spearman_sig", kind="de", best=1.0)
def de_spearman_sig(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> float:
    """Spearman correlation, across perturbations, of the number of significant genes.

    Only perturbations with at least one real significant gene take part; 1.0 when there is
    none; one value for every perturbation.
    """
    n_real = de.real_side.significant(fdr_threshold).sum(axis=1)
    n_pred = de.pred_side.significant(fdr_threshold).sum(axis=1)
    keep = n_real > 0
    if not keep.any():
        return 1.0
    return _spearman(n_real[keep].astype(np.float64), n_pred[keep].astype(np.float64))


@register("de_direction_match", kind="de", best=1.0)
def de_direction_match(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.Series:
    """Share of the real significant genes whose predicted log2FC has the same sign.

    Over real significant genes present in the predicted table; ``sign(0) = 0``; NaN matches
    NaN. Null for perturbations without real significant genes.
    """
    real, pred = de.real_side, de.pred_side
    pairs = real.significant(fdr_threshold) & pred.present
    sr, sp = np.sign(real.lfc), np.sign(pred.lfc)
    match = (sr == sp) | (np.isnan(sr) & np.isnan(sp))
    out = {}
    for i, p in enumerate(de.perturbations):
        if pairs[i].any():
            out[p] = float(match[i, pairs[i]].mean())
    return pd.Series(out, dtype=np.float64)


@register("de_spearman_lfc_sig", kind="de", best=1.0)
def de_spearman_lfc_sig(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.Series:
    """Spearman correlation of real vs predicted log2FC over the real significant genes.

    A gene missing from the predicted table counts as log2FC 0. NaN for a single gene or a
    constant side; null for perturbations without real significant genes.
    """
    real, pred = de.real_side, de.pred_side
    sig = real.significant(fdr_threshold)
    pred_lfc = np.where(pred.present, pred.lfc, np.float32(0.0))
    out = {}
    for i, p in enumerate(de.perturbations):
        if sig[i].any():
            out[p] = _spearman(real.lfc[i, sig[i]], pred_lfc[i, sig[i]])
    return pd.Series(out, dtype=np.float64)


@register("de_sig_genes_recall", kind="de", best=1.0)
def de_sig_genes_recall(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.Series:
    """|real significant & predicted significant| / |real significant|; null without real ones."""
    real = de.real_side.significant(fdr_threshold)
    both = real & de.pred_side.significant(fdr_threshold)
    n_real, n_both = real.sum(axis=1), both.sum(axis=1)
    keep = n_real > 0
    return pd.Series(n_both[keep] / n_real[keep], index=de.perturbations[keep], dtype=np.float64)


@register("de_nsig_counts", kind="de", best=None)
def de_nsig_counts(de: DEData, fdr_threshold: float = FDR_THRESHOLD) -> pd.DataFrame:
    """Number of significant genes per perturbation: columns ``real`` and ``pred``."""
    return pd.DataFrame(
        {
            "real": de.real_side.significant(fdr_threshold).sum(axis=1).astype(np.float64),
            "pred": de.pred_side.significant(fdr_threshold).sum(axis=1).astype(np.float64),
        },
        index=pd.Index(de.perturbations, name="perturbation"),
    )


def de_auc(de: DEData, method: Literal["pr", "roc"]) -> pd.Series:
    """Recovery of the real significant genes (label: real FDR < 0.05) from the predicted FDR.

    Score of a gene: ``-log10(clip(pred FDR, 1e-10, 1))`` in float32, a gene missing from the
    predicted table scoring as FDR 1. Per perturbation over the genes of its real table;
    ``pr``: average precision, ``roc``: area under the ROC curve; NaN when all labels agree.
    """
    real, pred = de.real_side, de.pred_side
    with np.errstate(invalid="ignore"):
        labels = real.fdr < np.float32(0.05)
    # A missing predicted gene counts as FDR 1 (cell-eval: fill_null(1.0)); so does a NaN here,
    # since a pandas table cannot tell a missing value from NaN.
    q = np.where(pred.present & ~np.isnan(pred.fdr), pred.fdr, np.float32(1.0)).astype(np.float32)
    scores = _neg_log10_float32(np.clip(q, _AUC_FDR_FLOOR, np.float32(1.0)))
    area = _average_precision if method == "pr" else _roc_auc
    out = []
    for i in range(de.perturbations.size):
        rows = real.present[i]
        y, s = labels[i, rows], scores[i, rows]
        n_pos = int(y.sum())
        out.append(math.nan if not (0 < n_pos < y.size) else area(y, s))
    return _per_pert(de, out)


register("pr_auc", kind="de", best=1.0, description="Average precision of significant-gene recovery", method="pr")(de_auc)
register("roc_auc", kind="de", best=1.0, description="ROC AUC of significant-gene recovery", method="roc")(de_auc)


# --------------------------------------------------------------------------------------------
# Expression metrics
# --------------------------------------------------------------------------------------------


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
