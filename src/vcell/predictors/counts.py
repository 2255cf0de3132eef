"""A log1p prediction as integral raw counts: what the Virtual Cell Challenge 2026 takes.

Each predicted cell's log1p profile fixes its expected composition; its counts are one seeded
multinomial draw of ``L`` molecules from it (:func:`vcell.data.counts.sample_counts`), so the
cell's total is exactly ``L`` (a cell predicted all zero gets none). The library size ``L``
(``depth``) is either

* ``"controls"`` (default): that of a real control cell of the context. When the predictor
  reports which control cell each predicted cell started from (:meth:`Predictor.source_controls
  <vcell.predictors.base.Predictor.source_controls>`: the shift baselines and the State
  Transition model, column ``control_cell`` of the prediction), the cell gets *that* cell's
  library size, so a composition that came from a shallow cell is drawn shallow, as the real
  cell was; otherwise (``cell_mean``, whose cells start from no control) the sizes are drawn
  with replacement from the controls' library sizes, seeded. The library sizes are the controls'
  raw-count totals **over the predicted genes**: ``layers["counts"]`` (which ``vcell data
  preprocess`` keeps, subset to the same genes as ``X``), else an ``obs`` total-count column
  (:data:`TOTAL_COLUMNS`), which covers every gene measured, times the share of it the
  predicted genes hold (:func:`predicted_share`, from the log1p values). The 2026 scorer
  normalises each cell over the genes in the submitted file (per-cell CPM for the DE tests,
  pseudobulk to 5e4), and the real cells it compares with hold only those genes too, so the
  total over the predicted genes is what keeps a predicted cell as deep as a real one;
* a whole number (e.g. ``20000``, the challenge's median depth): every predicted cell gets
  exactly that many counts (at most 1e6, the challenge's cap per cell).

The counts output holds the predicted cells only: a 2026 submission has no control rows (the
reference's controls are used on both sides). ``uns["vcell"]`` records the model's space, the
file's (``expression``/``output``), the library-size rule, its source, the depth and the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.counts import draw_library_sizes, sample_counts
from vcell.data.labels import label_rng
from vcell.data.matrix import scan_matrix
from vcell.data.validate import check_unique_genes
from vcell.errors import VcellError, control_hint, preview

log = logging.getLogger(__name__)

__all__ = ["CONTROL_CELL_COL", "OUTPUTS", "TOTAL_COLUMNS", "CountsDraw", "control_library_sizes", "parse_depth", "parse_output", "to_counts"]

#: What a prediction can be written as.
OUTPUTS = ("log1p", "counts")
#: obs column of a prediction naming the real control cell each predicted cell started from.
CONTROL_CELL_COL = "control_cell"
#: obs columns read as a cell's total raw count when there is no ``layers["counts"]``.
TOTAL_COLUMNS = ("total_counts", "nCount_RNA", "n_counts", "ncounts")
#: The largest fixed depth: the challenge's cap on one cell's counts.
MAX_DEPTH = 1_000_000
_DEPTH_HINT = f"use 'controls' or a whole number of counts per cell from 1 to {MAX_DEPTH:,} (e.g. 20000)"


def parse_output(value: str, name: str = "output") -> str:
    """``"log1p"`` or ``"counts"`` (case-insensitive); anything else is a one-line error naming ``name``."""
    out = str(value).strip().lower()
    if out not in OUTPUTS:
        raise VcellError(f"{name} {value!r}: use 'log1p' (the default) or 'counts'")
    return out


def parse_depth(value: int | str, name: str = "depth") -> int | str:
    """``"controls"`` or a whole number of counts per cell in ``1..1e6`` (``"20000"`` is read as 20000)."""
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if text.lower() == "controls":
            return "controls"
        if not text.isdigit():
            raise VcellError(f"{name} {value!r}: {_DEPTH_HINT}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise VcellError(f"{name} {value!r}: {_DEPTH_HINT}")
    if not 1 <= int(value) <= MAX_DEPTH:
        raise VcellError(f"{name} {value}: {_DEPTH_HINT}")
    return int(value)


def _total_column(controls: ad.AnnData) -> str | None:
    return next((col for col in TOTAL_COLUMNS if col in controls.obs.columns), None)


def library_source(controls: ad.AnnData) -> str | None:
    """Where :func:`control_library_sizes` reads the controls' totals: ``"layers['counts']"``,
    ``"raw.X"`` (Seurat's and many scanpy files' place for the counts, when it holds integers), an
    obs column, or ``None``."""
    if "counts" in controls.layers:
        return "layers['counts']"
    if _raw_counts(controls) is not None:
        return "raw.X"
    col = _total_column(controls)
    return None if col is None else f"obs[{col!r}]"


def _raw_counts(controls: ad.AnnData):
    """``controls.raw`` when its ``X`` holds non-negative integers (its first cells tell: a ``.raw``
    of log1p values, scanpy's other habit, has fractions in every cell), else ``None``."""
    raw = getattr(controls, "raw", None)
    if raw is None or controls.n_obs == 0:
        return None
    stats = scan_matrix(raw.X[: min(64, controls.n_obs)], threads=1)
    return raw if stats.n_values and stats.all_integer and stats.nan is None and stats.negative is None else None


def _check_sizes(totals: pd.Series, source: str, where: str) -> pd.Series:
    values = totals.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VcellError(f"{where}: control cell {totals.index[i]!r} has library size {float(values[i])!r} ({source}); expected a count >= 0")
    return pd.Series(values, index=totals.index)


def _no_source(where: str) -> VcellError:
    return VcellError(
        f"{where}: no raw counts to take the control cells' library sizes from (no layers['counts'], no .raw of counts, no obs column "
        f"{', '.join(TOTAL_COLUMNS)}): give a fixed depth instead (--depth 20000, depth=20000)"
    )


def control_library_sizes(controls: ad.AnnData, genes=None, where: str = "the data") -> tuple[pd.Series, str]:
    """The control cells' library sizes (raw-count totals) and where they came from.

    Parameters
    ----------
    controls
        The context's real control cells with ``layers["counts"]`` or an obs total column
        (:data:`TOTAL_COLUMNS`).
    genes
        The predicted genes: the counts layer is summed over these only (all, by default).
    where
        Names the data in errors.

    Returns
    -------
    pandas.Series
        One total per control cell, indexed by the cells' obs names.
    str
        The source, e.g. ``"layers['counts'] over 2000 predicted genes"``.
    """
    source = library_source(controls)
    if source is None:
        raise _no_source(where)
    if source in ("layers['counts']", "raw.X"):
        raw = controls.raw if source == "raw.X" else None  # library_source checked it holds counts
        layer = controls.layers["counts"] if raw is None else raw.X
        if raw is not None and genes is None:
            genes = pd.Index(controls.var_names.astype(str))  # .raw may hold more genes than X: the predicted ones count
        if genes is not None:
            genes = pd.Index([str(g) for g in genes])
            var = pd.Index((controls.var_names if raw is None else raw.var_names).astype(str))
            check_unique_genes(var, where)
            cols = var.get_indexer(genes)
            if (cols < 0).any():
                missing = genes[cols < 0]
                raise VcellError(f"{where}: {len(missing)} predicted gene(s) not in the control cells' counts ({preview(missing, 5)})")
            layer = layer[:, cols]
            source = f"{source} over {len(genes)} predicted genes"
        totals = np.asarray(layer.sum(axis=1), dtype=np.float64).ravel()
    else:
        totals = pd.to_numeric(controls.obs[_total_column(controls)], errors="coerce").to_numpy(dtype=np.float64)
        _check_sizes(pd.Series(totals, index=controls.obs_names.astype(str)), source, where)
        share = predicted_share(controls, genes, totals, source, where)
        totals = totals * share
        source = f"{source} x the predicted genes' share of each cell (from X; median {np.median(share):.3g})"
        if np.median(share) < 0.9:
            log.warning("%s: %s counts every gene measured; the %s predicted genes hold a median %.1f%% of it (from the "
                        "log1p values), so the library sizes are scaled to that share (layers['counts'] gives them exactly)",
                        where, library_source(controls), f"{controls.n_vars if genes is None else len(genes):,}",
                        100 * float(np.median(share)))
    return _check_sizes(pd.Series(totals, index=controls.obs_names.astype(str)), source, where), source


#: Share of control cells whose implied normalisation total must lie within 1% of the median.
_SAME_TOTAL_SHARE = 0.25


def predicted_share(controls: ad.AnnData, genes, totals: np.ndarray, source: str, where: str) -> np.ndarray:
    """Each control cell's share of its library (``totals``, over every gene measured) that the
    predicted ``genes`` hold, from its log1p values.

    ``X`` = log1p(counts / total x T) gives ``expm1(X)`` = counts x T / total; a gene with one count
    has the cell's smallest non-zero value, so T = that value x total, the same for every cell of a
    ``normalize_total`` (the median over the cells is taken: a cell whose genes all hold two or more
    counts overstates it). The share is then the predicted genes' ``expm1(X)`` sum over T. When
    fewer than a quarter of the cells agree on T (within 1%), ``X`` is not a per-cell normalised
    log1p and the share cannot be told: a one-line error.
    """
    if controls.isbacked:  # a backed file's control cells (a view of it cannot be sliced again)
        controls = controls.to_memory()
    cols = None
    if genes is not None:
        var = pd.Index(controls.var_names.astype(str))
        check_unique_genes(var, where)
        genes = pd.Index([str(g) for g in genes])
        cols = var.get_indexer(genes)
        if (cols < 0).any():
            raise VcellError(f"{where}: {int((cols < 0).sum())} predicted gene(s) not in the control cells' genes "
                             f"({preview(genes[cols < 0], 5)})")
    smallest = np.full(controls.n_obs, np.nan)
    sums = np.zeros(controls.n_obs)
    for lo in range(0, controls.n_obs, 4096):
        block = controls[lo:lo + 4096].X
        block = sp.csr_matrix(block, dtype=np.float64) if sp.issparse(block) else sp.csr_matrix(np.asarray(block, dtype=np.float64))
        block.data = np.expm1(block.data)
        block.eliminate_zeros()
        if (block.data < 0).any() or not np.isfinite(block.data).all():
            raise VcellError(f"{where}: the control cells' X is not log1p (negative, NaN or infinite values): {source} cannot "
                             "be brought to the predicted genes; give layers['counts'] or a fixed depth")
        filled = np.diff(block.indptr) > 0
        smallest[lo:lo + block.shape[0]][filled] = np.minimum.reduceat(block.data, block.indptr[:-1][filled])
        sums[lo:lo + block.shape[0]] = np.asarray((block if cols is None else block[:, cols]).sum(axis=1)).ravel()
    implied = smallest * totals
    known = np.isfinite(implied) & (implied > 0)
    T = float(np.median(implied[known])) if known.any() else np.nan
    if not known.any() or np.mean(np.abs(implied[known] / T - 1) <= 0.01) < _SAME_TOTAL_SHARE:
        raise VcellError(f"{where}: {source} counts every gene measured, and X does not tell which share of it the predicted "
                         f"genes hold (X is not log1p of counts normalised per cell by {source}); give layers['counts'] or a fixed "
                         "depth")
    return np.minimum(sums / T, 1.0)


def _paired_sizes(pred: ad.AnnData, rows: np.ndarray, totals: pd.Series) -> np.ndarray | None:
    """Each predicted cell's own control's library size, when the prediction names it (``None``
    when it does not). A named control cell missing from ``totals`` is an error: the controls given
    are not those the prediction started from (another context's, or some left out)."""
    if CONTROL_CELL_COL not in pred.obs.columns:
        return None
    names = pred.obs[CONTROL_CELL_COL].to_numpy()[rows]
    unnamed = pd.isna(names)
    if unnamed.all():  # a model whose cells start from no control (cell_mean)
        return None
    if unnamed.any():
        raise VcellError(f"counts: {int(unnamed.sum()):,} of {unnamed.size:,} predicted cells name no control cell "
                         f"(column {CONTROL_CELL_COL!r}); name one for every cell, or none, or give a fixed depth")
    names = names.astype(str)
    if not totals.index.is_unique:  # a cell is paired by name: a name two controls share names neither
        dup = totals.index[totals.index.duplicated()].unique()
        log.warning("counts: the control cells have duplicated names (%s): library sizes are drawn from the controls' "
                    "instead of each cell's own control's; make the names unique (adata.obs_names_make_unique()) to pair them",
                    preview(list(dup), 3))
        return None
    pos = totals.index.get_indexer(names)
    if (pos < 0).any():
        missing = pd.unique(names[pos < 0])
        raise VcellError(f"counts: {int((pos < 0).sum()):,} predicted cell(s) started from control cells not among the controls "
                         f"given ({preview(list(missing), 3)}; column {CONTROL_CELL_COL!r}): give the "
                         "context's control cells the prediction was made from, or a fixed depth")
    return np.rint(totals.to_numpy()[pos]).astype(np.int64)


def _holds_real_controls(pred: ad.AnnData) -> bool:
    """Whether ``pred`` holds real control rows, as :func:`~vcell.predictors.predict.predict_context`
    appends them: cells whose ``control_cell`` is their own name."""
    if CONTROL_CELL_COL not in pred.obs.columns:
        return False
    return bool((pred.obs[CONTROL_CELL_COL].astype(str).to_numpy() == pred.obs_names.to_numpy().astype(str)).any())


def to_counts(
    pred: ad.AnnData,
    controls: ad.AnnData | pd.Series | None = None,
    *,
    depth: int | str = "controls",
    seed: int = 0,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    model_space: str = "log1p",
    model=None,
    totals_source: str = "library sizes given",
) -> ad.AnnData:
    """A log1p prediction's predicted cells as integral raw counts (module docstring: the rules).

    Parameters
    ----------
    pred
        The prediction (:func:`~vcell.predictors.predict.predict_context`): predicted cells in
        log1p, the real controls (labelled ``control``) after them, which are dropped.
    controls
        With ``depth="controls"``: the context's real control cells (their raw counts in
        ``layers["counts"]`` or an obs total column), or their library sizes as a Series indexed
        by cell name.
    depth
        ``"controls"`` or a whole number of counts per predicted cell (1 to 1e6).
    seed
        Seed of the draws (same seed, same counts).
    pert_col, control
        The perturbation column and the control label.
    model_space
        The space the model predicted in (recorded; only log1p can be converted).
    totals_source : str
        Where a Series of library sizes given as ``controls`` came from (recorded in ``uns`` and logged).
    model : Predictor, optional
        The model that made ``pred``: counts are drawn from its
        :meth:`~vcell.predictors.base.Predictor.counts_basis` (``cell_mean``'s mean composition
        rather than its log1p vector), as ``predict_context(output="counts")`` draws them.

    Returns
    -------
    anndata.AnnData
        The predicted cells (obs as in ``pred``), CSR float32 integral counts, ``uns["vcell"]``
        saying how they were made.
    """
    if pert_col not in pred.obs.columns:
        raise VcellError(f"the prediction has no perturbation column {pert_col!r} (columns: {preview(pred.obs.columns, 10)})")
    meta = pred.uns.get("vcell", {})
    if isinstance(meta, Mapping) and meta.get("output") == "counts":
        raise VcellError("the prediction is counts already (uns['vcell']['output'] == 'counts'); to_counts draws counts from log1p")
    labels = pred.obs[pert_col].astype(str).to_numpy()
    if str(control) not in labels and _holds_real_controls(pred):  # they would be drawn as predicted cells
        hint = control_hint(str(control), pd.unique(labels)).replace("pass --control ", "pass control=")
        raise VcellError(f"the prediction has no {control!r} cells in column {pert_col!r}, but it holds real control cells "
                         f"(their {CONTROL_CELL_COL!r} is their own name){hint}")
    n = int((labels != str(control)).sum())
    draw = CountsDraw(controls, n, depth=depth, seed=seed, pert_col=pert_col, control=control, model_space=model_space, genes=pred.var_names,
                      totals_source=totals_source)
    return draw.convert(pred, model=model)


class CountsDraw:
    """The counts of a prediction's predicted cells, drawn piece after piece (a prediction written
    as it is made): the pieces together are what :func:`to_counts` draws for them at once.

    Parameters
    ----------
    controls, depth, seed, pert_col, control, model_space
        As for :func:`to_counts`.
    n_cells
        Predicted cells in all the pieces (library sizes drawn from the controls' are drawn for
        all of them at once, as for the whole).
    genes
        The prediction's genes (the library sizes are the controls' totals over them).
    sizes_from
        Set when the caller passes each piece's library sizes to :meth:`convert` (e.g.
        :class:`~vcell.predictors.all_genes.GeneFill`): says where they come from; ``controls``
        is then not read.
    totals_source
        When ``controls`` is a Series of library sizes: where they were read (recorded in ``uns``).
    """

    def __init__(self, controls: ad.AnnData | pd.Series | None, n_cells: int, *, depth: int | str = "controls", seed: int = 0,
                 pert_col: str = "target_gene", control: str = "non-targeting", model_space: str = "log1p", genes=None,
                 sizes_from: str | None = None, totals_source: str = "library sizes given"):
        self.depth = parse_depth(depth)
        if model_space != "log1p":
            raise VcellError(f"model space {model_space!r}: counts are drawn from log1p predictions only")
        self.n_cells, self.seed, self.pert_col, self.control = int(n_cells), int(seed), pert_col, str(control)
        self.meta: dict = {"expression": "counts", "output": "counts", "model_space": model_space, "seed": int(seed),
                           "controls": "dropped (a 2026 submission holds none; the scorer uses the reference's)"}
        self.totals = None
        self.sizes_from = sizes_from
        if sizes_from is not None:
            self.meta.update(library_size="controls" if self.depth == "controls" else "depth", library_source=sizes_from,
                             library_pairing="each predicted cell's own control cell")
            if self.depth != "controls":
                self.meta["depth"] = int(self.depth)
        elif self.depth == "controls":
            if controls is None:
                raise VcellError("depth 'controls' needs the context's control cells (their raw counts); or give a whole-number depth")
            if isinstance(controls, pd.Series):
                source = totals_source
                self.totals = _check_sizes(controls.set_axis(controls.index.astype(str)), source, "the library sizes")
            else:
                self.totals, source = control_library_sizes(controls, genes, "controls")
            if self.totals.empty:
                raise VcellError("no control cells to take library sizes from; give a whole-number depth")
            self.meta.update(library_size="controls", library_source=source)
        else:
            self.meta.update(library_size="depth", depth=int(self.depth))
        self._rngs: dict[tuple[str, int], np.random.Generator] = {}  # per perturbation and stream, continued across pieces
        self.done = 0  # predicted cells drawn so far

    def _generator(self, label: str, stream: int) -> np.random.Generator:
        """The generator of ``label``'s counts (``stream`` 1) or drawn library sizes (2), seeded by the
        seed and the label (:func:`~vcell.data.labels.label_rng`; its control cells are stream-less):
        a perturbation's counts depend neither on the others drawn nor on their order, nor on how its
        cells are split over calls."""
        if (label, stream) not in self._rngs:
            self._rngs[label, stream] = label_rng(self.seed, label, stream)
        return self._rngs[label, stream]

    def predicted_rows(self, pred: ad.AnnData) -> np.ndarray:
        """Positions of ``pred``'s predicted (not control) rows."""
        if self.pert_col not in pred.obs.columns:
            raise VcellError(f"the prediction has no perturbation column {self.pert_col!r} (columns: {preview(pred.obs.columns, 10)})")
        return np.flatnonzero(pred.obs[self.pert_col].astype(str).to_numpy() != self.control)

    def convert(self, pred: ad.AnnData, sizes: np.ndarray | None = None, model=None) -> ad.AnnData:
        """The next piece: ``pred``'s predicted cells (its control rows dropped) as counts.

        ``sizes``: each predicted cell's library size, when the draw was made with ``sizes_from``.
        ``model``: the predictor that made ``pred``; the counts are drawn from its
        :meth:`~vcell.predictors.base.Predictor.counts_basis` (its ``uns["vcell"]`` says when that is not ``pred``).
        """
        rows = self.predicted_rows(pred)
        if model is not None:
            predicted = np.zeros(pred.n_obs, dtype=bool)
            predicted[rows] = True
            pred = model.counts_basis(pred, predicted)
        if self.done + len(rows) > self.n_cells:
            raise VcellError(f"counts: {self.done + len(rows)} predicted cells drawn, {self.n_cells} announced")
        if (sizes is None) != (self.sizes_from is None):
            raise VcellError("counts: library sizes are given to convert() exactly when the draw was made with sizes_from")
        drawn = False  # library sizes drawn from the controls' (per perturbation, below)
        if sizes is not None:
            sizes = np.asarray(sizes, dtype=np.int64)
        elif self.depth == "controls":
            sizes = _paired_sizes(pred, rows, self.totals)
            pairing = "each predicted cell's own control cell"
            if sizes is None:
                drawn, sizes = True, np.zeros(len(rows), dtype=np.int64)
                pairing = "drawn with replacement from the control cells (seeded)"
            self.meta.setdefault("library_pairing", pairing)
        else:
            sizes = np.full(len(rows), self.depth, dtype=np.int64)
        codes, labels = pd.factorize(pred.obs[self.pert_col].astype(str).to_numpy()[rows])
        order = np.argsort(codes, kind="stable")  # each perturbation's cells together, in row order
        blocks = []
        for label, mine in zip(labels, np.split(order, np.cumsum(np.bincount(codes, minlength=len(labels)))[:-1])):
            if drawn:
                sizes[mine] = draw_library_sizes(self.totals.to_numpy(), mine.size, self._generator(label, 2))
            blocks.append(sample_counts(pred.X, sizes[mine], self._generator(label, 1), rows=rows[mine]))
        if not blocks:
            counts = sp.csr_matrix((0, pred.n_vars), dtype=np.float32)
        else:
            counts = sp.vstack(blocks, format="csr")[np.argsort(order)] if len(blocks) > 1 else blocks[0]
        first = self.done == 0
        self.done += len(rows)
        obs = pred.obs.iloc[rows].copy()
        for col in obs.columns:
            if isinstance(obs[col].dtype, pd.CategoricalDtype):
                obs[col] = obs[col].cat.remove_unused_categories()  # the control label goes with its cells
        out = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pred.var_names.copy()))
        base = pred.uns.get("vcell", {})
        out.uns["vcell"] = {**(dict(base) if isinstance(base, Mapping) else {}), **self.meta}
        if first:  # once per prediction, not once per piece (a full-size one is written in dozens)
            log.info("counts: %s predicted cells, library sizes: %s", f"{self.n_cells:,}",
                     f"{self.depth:,} each" if self.depth != "controls" and self.sizes_from is None
                     else f"{self.meta['library_pairing']} ({self.meta['library_source']})")
        return out
