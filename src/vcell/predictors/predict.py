"""One way to predict: a context's perturbations from a dataset, for ``vcell predict``, ``vcell bench`` and Python.

The output is log1p (predicted cells, then the context's real controls) or, with
``output="counts"``, integral raw counts of the predicted cells only (:mod:`vcell.predictors.counts`).
``uns["vcell"]`` says which: ``model_space`` (what the model predicts in), ``expression`` and
``output`` (what the object holds), and for counts the library-size rule, depth and seed.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell._heap import cycles_collected_promptly, release_freed_heap
from vcell.data.dataset import PerturbationData
from vcell.data.h5write import H5adWriter
from vcell.data.io import atomic_files, check_output_path
from vcell.data.rows import H5Rows
from vcell.data.spec import DataSpec
from vcell.errors import VcellError, preview
from vcell.predictors.all_genes import GeneFill
from vcell.predictors.base import Predictor, _require_controls, assemble_cells, cell_count, control_obs
from vcell.predictors.counts import CONTROL_CELL_COL, CountsDraw, control_library_sizes, library_source, parse_depth, parse_output
from vcell.predictors.request import cell_mask, context_cells, requested_perturbations
from vcell.train.display import task

#: Predicted cells :func:`write_prediction` holds at a time (about 160 MB at 2,000 genes).
PIECE_CELLS = 20_000
#: Control cells whose counts are summed at a time (library sizes from a backed file).
CHUNK_CELLS = 4096
#: The files :func:`write_prediction` writes: the output, and the log1p cells of a counts output.
OUT, LOG1P = "out", "log1p"


def predict_context(
    predictor: Predictor,
    data: PerturbationData,
    context: str,
    perturbations: str | Sequence[str] = "data",
    cells_per_perturbation: int | Mapping[str, int] | None = None,
    seed: int = 0,
    cells: np.ndarray | None = None,
    output: str = "log1p",
    depth: int | str = "controls",
    all_genes: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Predicted cells of ``context``'s perturbations from its real control cells in ``data``.

    Parameters
    ----------
    predictor
        A fitted predictor (:func:`~vcell.predictors.registry.make_model` + ``fit``, or
        :meth:`~vcell.predictors.st.STPredictor.from_checkpoint`).
    data
        The dataset holding the context's control cells (log1p).
    context
        The context to predict (a value of ``data.spec.context_col``).
    perturbations
        ``"data"``: the perturbations with cells of the context in ``data`` (in order of first
        appearance), each predicted with as many cells as observed; ``"all"``: every perturbation
        the model was trained on; or a list of labels.
    cells_per_perturbation
        Cells per perturbation; default: as observed (``"data"``) or 100.
    seed
        Seed of the control cells drawn (and of the counts drawn).
    cells
        The cells looked at (e.g. a split's test and control cells): a boolean mask over
        ``data``'s cells, their positions, or their obs names.
    output
        ``"log1p"`` (default) or ``"counts"``: integral raw counts per predicted cell, controls
        dropped, as the Virtual Cell Challenge 2026 takes them (:func:`~vcell.predictors.counts.to_counts`).
    depth
        With ``output="counts"``: ``"controls"`` (each cell at the library size of the control cell
        it started from, or one drawn from the controls'; needs the raw counts of ``data``'s
        controls in ``layers["counts"]`` or an obs total column) or counts per cell (e.g. 20000).
    all_genes
        A raw-count ``.h5ad`` (the file ``data`` was preprocessed from): the output holds every gene
        of it, in its order; the genes the model does not predict are taken from the control cell
        each predicted cell started from (:mod:`vcell.predictors.all_genes`), as a full challenge
        submission needs.

    Returns
    -------
    The predicted cells, then the context's real control cells (log1p), with ``data.spec``'s
    perturbation and context columns and control label; column ``control_cell`` names the real
    control each predicted cell started from when the model says so. ``output="counts"``: the
    predicted cells only, as counts. The same cells as :func:`write_prediction` writes.
    """
    job = _Job(predictor, data, context, perturbations, cells_per_perturbation, seed, cells, output, depth, all_genes=all_genes)
    pieces = [piece for _, piece in job.pieces()]
    X = sp.vstack([p.X for p in pieces], format="csr") if len(pieces) > 1 else pieces[0].X
    pred = ad.AnnData(X=X, obs=job.obs([p.obs for p in pieces]), var=pd.DataFrame(index=pieces[0].var_names.copy()))
    pred.uns["vcell"] = job.uns
    return pred


def write_prediction(
    out: str | os.PathLike,
    predictor: Predictor,
    data: PerturbationData,
    context: str,
    perturbations: str | Sequence[str] = "data",
    cells_per_perturbation: int | Mapping[str, int] | None = None,
    seed: int = 0,
    cells: np.ndarray | None = None,
    output: str = "log1p",
    depth: int | str = "controls",
    all_genes: str | os.PathLike | None = None,
    piece_cells: int = PIECE_CELLS,
    log1p_out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ad.AnnData:
    """:func:`predict_context` written to ``out`` (``.h5ad``, atomically) piece by piece: about
    ``piece_cells`` predicted cells are held at a time, whatever the number predicted.

    With ``output="counts"``, ``log1p_out`` also receives the log1p cells the counts were drawn
    from, over the model's own genes, the context's real controls appended (what ``output="log1p"``
    without ``all_genes`` writes): one prediction, two files, so a 2025 score of ``log1p_out``
    and a 2026 score of ``out`` judge the same predicted cells.

    Each piece is a run of whole perturbations; each perturbation's control cells, counts and
    library sizes are drawn as for the whole (:func:`~vcell.predictors.base.control_draws`,
    :class:`~vcell.predictors.counts.CountsDraw`), so the file holds :func:`predict_context`'s
    cells: exactly for the shift baselines, to float32 rounding for ST (a forward pass batches
    other cell sets together, which changes a matmul's summation order).

    An existing ``out`` (or ``log1p_out``) is refused unless ``overwrite``; that, and that it can
    be written, is checked before any work.

    Returns the written file's annotations (obs, var and uns; no matrix). The other parameters
    are :func:`predict_context`'s.
    """
    check_log1p_out(out, log1p_out, output)
    inputs = [p for p in (data.path, all_genes) if p is not None]
    for path in (log1p_out, out):
        if path is not None:
            check_output_path(path, inputs, overwrite=overwrite)
    job = _Job(predictor, data, context, perturbations, cells_per_perturbation, seed, cells, output, depth, piece_cells, all_genes,
               log1p_too=log1p_out is not None)
    files = {OUT: _Output(OUT, out)} | ({LOG1P: _Output(LOG1P, log1p_out)} if log1p_out is not None else {})
    with contextlib.ExitStack() as stack:
        temps = stack.enter_context(atomic_files([f.path for f in files.values()]))  # both files or neither
        for f, tmp in zip(files.values(), temps):
            f.tmp = tmp
        stack.enter_context(cycles_collected_promptly())
        for f in files.values():
            stack.callback(f.close)
        for name, piece in job.pieces():
            files[name].append(piece)
            del piece
            gc.collect()  # the piece and its intermediates (AnnData cycles) are freed before the next is predicted
        for f in files.values():
            f.finish(job)
    return files[OUT].annotations


def _whole(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise VcellError(f"{what} must be a whole number of cells >= 1, got {value!r}")
    if value < 1:
        raise VcellError(f"{what} must be >= 1, got {value!r}")
    return int(value)


def _cell_counts(given: int | Mapping[str, int], perturbations: Sequence[str]) -> int | dict[str, int]:
    """``cells_per_perturbation`` checked: a whole number >= 1, or one for every predicted perturbation."""
    if not isinstance(given, Mapping):
        return _whole(given, "cells_per_perturbation")
    missing = [p for p in perturbations if p not in given]
    if missing:
        raise VcellError(f"cells_per_perturbation: no number of cells for {len(missing)} predicted perturbation(s) "
                         f"({preview(missing, 3)})")
    return {p: _whole(given[p], f"cells_per_perturbation[{p!r}]") for p in perturbations}


def check_log1p_out(out: str | os.PathLike, log1p_out: str | os.PathLike | None, output: str) -> None:
    """A one-line :class:`VcellError` unless ``log1p_out`` (``--log1p-out``) can go with ``out`` and ``output``:
    it comes with a counts output only, and is another file than ``out``."""
    if log1p_out is None:
        return
    if parse_output(output) != "counts":
        raise VcellError("--log1p-out (log1p_out): a second, log1p file of a counts prediction; "
                         "add --output counts (output='counts')")
    if Path(log1p_out).resolve() == Path(out).resolve():
        raise VcellError(f"--log1p-out (log1p_out) {log1p_out}: the same file as --out (the output); give another path")


class _Output:
    """One file :func:`write_prediction` writes: its pieces appended, then its annotations."""

    def __init__(self, name: str, path: str | os.PathLike):
        self.name, self.path, self.tmp = name, path, None
        self.writer: H5adWriter | None = None
        self.frames: list[pd.DataFrame] = []
        self.var = None
        self.annotations: ad.AnnData | None = None

    def append(self, piece: ad.AnnData) -> None:
        self.writer = self.writer or H5adWriter(self.tmp, piece.n_vars)
        self.writer.append(X=piece.X)
        self.frames.append(piece.obs)
        self.var = piece.var_names

    def finish(self, job: _Job) -> None:
        frame = job.obs(self.frames, self.name)
        uns = {"vcell": job.uns if self.name == OUT else job.log1p_uns}
        self.writer.finish(frame, pd.DataFrame(index=self.var.copy()), uns)
        self.annotations = ad.AnnData(obs=frame, var=pd.DataFrame(index=self.var.copy()), uns=uns)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Job:
    """One prediction, made piece by piece: the checks, the controls read, then :meth:`pieces`.

    With ``log1p_too`` (counts output), :meth:`pieces` also yields the log1p cells each counts
    piece was drawn from, then the real controls over the model's genes (the second file of
    :func:`write_prediction`).
    """

    def __init__(self, predictor, data, context, perturbations, cells_per_perturbation, seed, cells, output, depth, piece_cells=None,
                 all_genes=None, log1p_too=False):
        if not isinstance(data, PerturbationData):
            hint = " (vcell.load_dataset(adata, spec))" if isinstance(data, ad.AnnData) else ""
            raise VcellError(f"data must be the dataset vcell.load_dataset returns{hint}, got {type(data).__name__}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise VcellError(f"seed must be a whole number, got {seed!r}")
        spec, index = data.spec, data.index
        where = str(data.path) if data.path is not None else "the data"
        output = parse_output(output)
        depth = parse_depth(depth)
        if all_genes is not None and not isinstance(all_genes, str | os.PathLike):
            raise VcellError(f"all_genes: the path of the raw-count .h5ad with every gene (got {type(all_genes).__name__})")
        if output != "counts" and depth != "controls":
            raise VcellError(f"depth {depth}: the depth of drawn counts; add output='counts' (the default output is log1p)")
        context, in_ctx = context_cells(index, context, where)
        if cells is not None:
            in_ctx &= cell_mask(cells, data.adata.obs_names, "cells")
        controls_mask = in_ctx & index.is_control
        if not controls_mask.any():
            raise VcellError(f"{where}: context {context!r} has no control cells ({spec.control!r}) to predict from")
        perts, sizes = requested_perturbations(predictor, data, in_ctx, context, perturbations, where)
        if cells_per_perturbation is not None:
            sizes = _cell_counts(cells_per_perturbation, perts)
        release_freed_heap()  # what loading and validating the data freed: not part of what prediction holds
        controls = _control_cells(data, controls_mask)
        _require_controls(controls, context)
        try:
            self.prepared = predictor.prepare_controls(controls)
        except VcellError as exc:  # e.g. genes other than the model's: the message names the model, here the file
            raise VcellError(f"{where}: {exc}") from None
        del controls  # the prepared copy is the one kept (when the genes were reordered, a second one)
        self.fill = None
        if all_genes is not None:
            if predictor.source_controls(self.prepared.n_obs, [str(p) for p in perts[:1]], 1, seed) is None:
                raise VcellError(f"model {predictor.name!r} does not start each predicted cell from a control cell: "
                                 "the other genes cannot be taken from one (all_genes, --all-genes)")
            meta = data.adata.uns.get("vcell", {})
            target_sum = meta.get("target_sum") if isinstance(meta, Mapping) else None
            self.fill = GeneFill(all_genes, self.prepared.var_names, output, target_sum=target_sum, depth=depth, seed=seed)
            self.fill.require_cells(self.prepared.obs_names, self.prepared.X[:64])
            release_freed_heap()  # what reading the raw file's annotations freed
            if piece_cells:  # a piece's cells now hold every gene: fewer of them, the same bytes
                piece_cells = max(1, piece_cells * self.prepared.n_vars // len(self.fill.var_names))
        self.totals = None
        if output == "counts" and depth == "controls" and all_genes is None:
            if library_source(data.adata) is None:
                raise VcellError(f"{where}: context {context!r}: no raw counts to take the control cells' library sizes from "
                                 "(no layers['counts'], no obs total-count column): give a fixed depth (--depth 20000, depth=20000)")
            self.totals = _control_totals(data, controls_mask, self.prepared.var_names, where)
        self.predictor, self.spec, self.context, self.seed = predictor, spec, context, seed
        self.perts, self.sizes, self.output = [str(p) for p in perts], sizes, output
        self.piece_cells = piece_cells
        space = getattr(predictor, "space", "log1p")
        self.uns = {"expression": space, "output": space, "model_space": space, "seed": int(seed)}
        if getattr(predictor, "effect_anchor", None) is not None:
            self.uns["effect_anchor"] = predictor.effect_anchor
        self.depth, self.space = depth, space
        self.draw: CountsDraw | None = None
        self.log1p_too = log1p_too  # (a counts output: write_prediction checked)
        self.log1p_uns = dict(self.uns)

    def _groups(self) -> list[list[str]]:
        """The perturbations cut into runs of about ``piece_cells`` cells (one run: all at once)."""
        if not self.piece_cells:
            return [self.perts]
        groups, n = [[]], 0
        for p in self.perts:
            k = cell_count(self.sizes, p)
            if groups[-1] and n + k > self.piece_cells:
                groups.append([])
                n = 0
            groups[-1].append(p)
            n += k
        return groups

    def pieces(self):
        """``(file, piece)`` pairs: the output's rows (file :data:`OUT`) piece by piece (AnnData with X
        and obs), the predicted cells, then (log1p) the controls; with ``log1p_too``, each counts
        piece follows its log1p cells (file :data:`LOG1P`), and the controls come last."""
        spec, prepared, fill = self.spec, self.prepared, self.fill
        if self.output == "counts":
            n_cells = sum(cell_count(self.sizes, p) for p in self.perts)
            totals, source = self.totals if self.totals is not None else (None, "")
            self.draw = CountsDraw(totals, n_cells, totals_source=source, depth=self.depth, seed=self.seed, pert_col=spec.pert_col,
                                   control=spec.control, model_space=self.space, genes=prepared.var_names,
                                   sizes_from=None if fill is None else f"{fill.path.name}: the control cell's raw counts")
        first = 0
        with task(f"predicting {self.context}", len(self.perts), "perturbations") if len(self._groups()) > 1 else contextlib.nullcontext() as line:
            for group in self._groups():
                # yielded without a local name: a piece is freed as soon as the caller has written it,
                # before the next one is predicted
                cells = self._cells(group, first)
                if self.log1p_too:
                    yield LOG1P, cells
                yield OUT, self._as_output(cells)
                del cells
                first += sum(cell_count(self.sizes, p) for p in group)
                if line is not None:
                    line.advance(len(group))
        if self.output != "counts" or self.log1p_too:  # the real controls, in pieces of the predicted cells' size
            step = self.piece_cells or prepared.n_obs
            for start in range(0, prepared.n_obs, step):
                part = prepared[start:start + step]
                ctrl = ad.AnnData(X=_csr(part.X), obs=control_obs(spec, part.obs_names, self.context),
                                  var=pd.DataFrame(index=prepared.var_names.copy()))
                if self.log1p_too:
                    yield LOG1P, ctrl
                else:
                    yield OUT, (ctrl if fill is None else fill.widen(ctrl, fill.sources(ctrl, CONTROL_CELL_COL)))
        if self.draw is not None:
            self.uns = {**self.uns, **self.draw.meta}
        if fill is not None:
            self.uns = {**self.uns, **fill.meta}

    def _cells(self, group: list[str], first: int) -> ad.AnnData:
        """The predicted cells of the perturbations ``group`` (the first named ``pred{first}``), log1p over the model's genes."""
        predictor, prepared = self.predictor, self.prepared
        cells = predictor.predict_cells(prepared, group, self.context, self.sizes, self.seed)
        piece = assemble_cells(predictor._spec, prepared.var_names, self.context, cells, first)
        del cells
        sources = predictor.source_controls(prepared.n_obs, group, self.sizes, self.seed)
        _name_sources(piece, sources, prepared.obs_names)
        piece = _relabel(piece, predictor.spec, self.spec)
        piece.uns["vcell"] = dict(self.uns)
        return piece

    def _as_output(self, piece: ad.AnnData) -> ad.AnnData:
        """Predicted cells (:meth:`_cells`) as the output holds them: widened to every gene, drawn as counts."""
        if self.fill is not None:
            return self.fill.widen(piece, self.fill.sources(piece, CONTROL_CELL_COL), self.draw)
        if self.draw is None:
            return piece
        out = self.draw.convert(piece, model=self.predictor)
        if "counts_basis" in out.uns["vcell"]:  # what the counts were drawn from, when not the cells themselves
            self.uns["counts_basis"] = out.uns["vcell"]["counts_basis"]
        return out

    def obs(self, frames: list[pd.DataFrame], file: str = "out") -> pd.DataFrame:
        """The pieces' obs of ``file`` (:data:`OUT` or :data:`LOG1P`) as one frame, the perturbation column
        categorical (as one prediction's)."""
        obs = pd.concat(frames)
        obs[self.spec.pert_col] = pd.Categorical(obs[self.spec.pert_col].astype(str))
        if CONTROL_CELL_COL in obs.columns and (self.output != "counts" or file == LOG1P):  # a control row started from itself
            missing = obs[CONTROL_CELL_COL].isna().to_numpy()
            obs.loc[missing, CONTROL_CELL_COL] = obs.index[missing]
        return obs


def _control_cells(data: PerturbationData, mask: np.ndarray) -> ad.AnnData:
    """The control cells ``mask`` selects, in memory.

    From a backed file only what prediction uses is read: ``X`` as stored (CSR rows straight from
    the file, :class:`~vcell.data.rows.H5Rows`), obs and obsm; the counts layer is summed where it
    is read (:func:`_control_totals`). What is held is one copy of the controls' expression
    (~7 KB a cell at 2,000 genes and 40 % non-zeros), not anndata's read of every slot.
    """
    adata = data.adata
    if not adata.isbacked:
        return adata[mask].copy()
    rows = np.flatnonzero(mask)
    try:
        reader = H5Rows(adata.filename)
    except VcellError:  # a layout H5Rows does not stream (CSC): anndata reads it
        return adata[mask].to_memory()
    try:
        X = reader.read_csr(rows) if reader.sparse else reader.read(rows)
    finally:
        reader.close()
    view = adata[mask]
    return ad.AnnData(X=X, obs=view.obs.copy(), var=view.var.copy(), obsm={k: _held(v) for k, v in view.obsm.items()},
                      uns=adata.uns)


def _held(value):
    """An obsm entry of a backed view, in memory as the type it has (sparse and tables stay so)."""
    if sp.issparse(value) or isinstance(value, pd.DataFrame):
        return value.copy()
    return np.array(value)


def _control_totals(data: PerturbationData, mask: np.ndarray, genes: pd.Index, where: str) -> tuple[pd.Series, str]:
    """The control cells' library sizes over ``genes`` (:func:`~vcell.predictors.counts.control_library_sizes`),
    a backed file's counts layer read 4,096 cells at a time."""
    adata = data.adata
    if not adata.isbacked or library_source(adata) != "layers['counts']":
        return control_library_sizes(adata[mask], genes, where)
    rows = np.flatnonzero(mask)
    try:
        reader = H5Rows(adata.filename, "layers/counts")
    except VcellError:
        return control_library_sizes(adata[mask].to_memory(), genes, where)
    parts, source = [], None
    try:
        for start in range(0, rows.size, CHUNK_CELLS):
            take = rows[start:start + CHUNK_CELLS]
            block = ad.AnnData(obs=adata.obs.iloc[take], var=adata.var, layers={"counts": reader.read_csr(take)})
            totals, source = control_library_sizes(block, genes, where)
            parts.append(totals)
    finally:
        reader.close()
    return pd.concat(parts), source


def _csr(X) -> sp.csr_matrix:
    """``X`` as float32 CSR without explicit zeros."""
    m = sp.csr_matrix(X, dtype=np.float32)
    m.eliminate_zeros()
    return m


def _name_sources(pred: ad.AnnData, sources: list[np.ndarray] | None, names: pd.Index) -> None:
    """Column :data:`CONTROL_CELL_COL` of predicted cells: the real control each started from."""
    if sources is None or CONTROL_CELL_COL in pred.obs.columns:
        return
    names = np.asarray(names.astype(str))
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in sources] + [np.empty(0, np.int64)])
    if len(rows) != pred.n_obs:  # a predictor whose cells do not line up with its draws: say nothing
        return
    pred.obs[CONTROL_CELL_COL] = names[rows]


def _relabel(pred: ad.AnnData, model_spec: DataSpec | None, spec: DataSpec) -> ad.AnnData:
    """``pred`` with the data's column names and control label where the model's differ."""
    if model_spec is None:
        return pred
    model_ctx, ctx = model_spec.context_col or "context", spec.context_col or "context"
    obs = pred.obs
    if model_spec.control != spec.control:
        labels = obs[model_spec.pert_col].astype(str)
        obs[model_spec.pert_col] = pd.Categorical(labels.where(labels != model_spec.control, spec.control))
    pred.obs = obs.rename(columns={model_spec.pert_col: spec.pert_col, model_ctx: ctx})
    return pred
