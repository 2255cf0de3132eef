"""The inputs of the metrics: :class:`ExpressionData` (pseudobulks) and :class:`DEData` (DE tables)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, partial

import numpy as np
import pandas as pd

from vcell.data.aggregate import group_sums
from vcell.errors import VcellError
from vcell.eval.metrics._energy import EnergyDistances, _energy_from_anndata

__all__ = ["DEData", "ExpressionData", "as_cell_eval_bulk", "pseudobulk"]


# --------------------------------------------------------------------------------------------
# Expression inputs
# --------------------------------------------------------------------------------------------


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
