"""A validated perturbation dataset: the AnnData, its column spec, and a compact cell index."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from vcell.data.io import read_h5ad
from vcell.data.labels import factorize
from vcell.data.layout import check_stored_matrices
from vcell.data.spec import SINGLE_CONTEXT, DataSpec
from vcell.data.validate import ExpressionInfo, validate
from vcell.errors import VcellError


@dataclass
class CellIndex:
    """Integer codes of every cell's perturbation, context, batch and dataset.

    Only ``.obs`` is needed to build it, so it is cheap even for a backed file of millions of
    cells; splits and cell-set samplers work on these arrays, never on the matrix.
    """

    pert_codes: np.ndarray
    perts: np.ndarray
    context_codes: np.ndarray
    contexts: np.ndarray
    batch_codes: np.ndarray
    batches: np.ndarray
    dataset_codes: np.ndarray
    datasets: np.ndarray
    control_code: int
    named_by_file: bool = False  # no dataset column: the one dataset is named after the file (or the caller)

    @classmethod
    def from_obs(cls, obs: pd.DataFrame, spec: DataSpec, dataset_col: str | None = None, dataset_name: str = "data") -> CellIndex:
        """Build the index from ``obs``; ``dataset_col`` (if present in ``obs``) names each cell's dataset."""
        n = len(obs)

        def codes(col: str | None, default: str) -> tuple[np.ndarray, np.ndarray]:
            if col is None or col not in obs.columns:
                return np.zeros(n, np.int32), np.array([default], dtype=object)
            return factorize(obs[col])

        pert_codes, perts = codes(spec.pert_col, "")
        context_codes, contexts = codes(spec.context_col, SINGLE_CONTEXT)
        batch_codes, batches = codes(spec.batch_col, SINGLE_CONTEXT)
        dataset_codes, datasets = codes(dataset_col, dataset_name)
        matches = np.flatnonzero(perts == spec.control)
        control_code = int(matches[0]) if matches.size else -1
        return cls(
            pert_codes=pert_codes,
            perts=perts,
            context_codes=context_codes,
            contexts=contexts,
            batch_codes=batch_codes,
            batches=batches,
            dataset_codes=dataset_codes,
            datasets=datasets,
            control_code=control_code,
            named_by_file=dataset_col is None or dataset_col not in obs.columns,
        )

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return len(self.pert_codes)

    @property
    def is_control(self) -> np.ndarray:
        """Boolean mask of control cells."""
        return self.pert_codes == self.control_code

    @property
    def context_key_names(self) -> np.ndarray:
        """Every possible ``"dataset.context"`` key, indexed by :attr:`context_key_codes`."""
        return np.array([f"{d}.{c}" for d in self.datasets for c in self.contexts], dtype=object)

    @property
    def context_key_codes(self) -> np.ndarray:
        """Each cell's (dataset, context) as one integer code into :attr:`context_key_names`."""
        return self.dataset_codes * len(self.contexts) + self.context_codes

    def context_keys(self) -> np.ndarray:
        """Each cell's ``"dataset.context"`` key as a string (one object per cell: small data only)."""
        return self.context_key_names[self.context_key_codes]

    def groups(self, mask: np.ndarray | None = None, by_batch: bool = False) -> pd.DataFrame:
        """Perturbed (non-control) groups: one row per (dataset, context, perturbation[, batch]).

        Columns: ``dataset``, ``context``, ``perturbation``, ``batch`` (if ``by_batch``),
        ``n_cells`` and ``cells`` (the cell row indices, sorted). ``mask`` restricts the cells.
        """
        mask = ~self.is_control if mask is None else (~self.is_control & mask)
        rows = np.flatnonzero(mask)
        codes = {
            "dataset": self.dataset_codes[rows],
            "context": self.context_codes[rows],
            "perturbation": self.pert_codes[rows],
        }
        if by_batch:
            codes["batch"] = self.batch_codes[rows]
        df = pd.DataFrame({f"{k}_code": v for k, v in codes.items()})
        df["row"] = rows
        keys = list(df.columns[:-1])
        if df.empty:
            return pd.DataFrame(columns=list(codes) + keys + ["cells", "n_cells"])
        out = df.groupby(keys, sort=True)["row"].apply(lambda r: np.sort(r.to_numpy())).reset_index(name="cells")
        names = {"dataset": self.datasets, "context": self.contexts, "perturbation": self.perts, "batch": self.batches}
        for k in codes:
            out[k] = names[k][out[f"{k}_code"].to_numpy()]
        out["n_cells"] = out["cells"].map(len)
        return out


@dataclass
class PerturbationData:
    """A validated dataset ready for splitting and sampling."""

    adata: ad.AnnData
    spec: DataSpec
    expression: ExpressionInfo
    index: CellIndex
    path: Path | None = None

    @property
    def backed(self) -> bool:
        """True when the matrix stays on disk."""
        return bool(self.adata.isbacked)


def missing_obsm_error(where, key: str, have) -> VcellError:
    """The one-line error for a missing ``.obsm[key]`` (``have``: the keys the data does hold)."""
    have = ", ".join(map(repr, have)) or "none"
    return VcellError(f"{where or 'data'}: no .obsm[{key!r}] cell embeddings (have: {have}); "
                      f"write them with `vcell embed --key {key}`")


def obsm_matrix(adata: ad.AnnData, key: str, where, width: int | None = None) -> np.ndarray:
    """``adata.obsm[key]`` as a float32 cells x dims array, checked: present, 2-D, ``width`` wide
    (when given) and finite, each problem a one-line error naming ``where`` (the file) and ``key``."""
    if key not in adata.obsm:
        raise missing_obsm_error(where, key, adata.obsm.keys())
    values = np.asarray(adata.obsm[key], dtype=np.float32)
    where = where or "data"
    if values.ndim != 2 or values.shape[1] < 1:
        raise VcellError(f"{where}: .obsm[{key!r}] must be a cells x dims matrix, got shape {values.shape}")
    if width is not None and values.shape[1] != width:
        raise VcellError(f"{where}: .obsm[{key!r}] has {values.shape[1]} dimensions per cell; the model expects {width} dimensions")
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise VcellError(f"{where}: .obsm[{key!r}] has NaN/inf in {int(bad.sum())} cell(s), "
                         f"e.g. {adata.obs_names[int(np.flatnonzero(bad)[0])]!r}")
    return values


def read_slots(path: str | os.PathLike, obsm: Sequence[str] = ()) -> ad.AnnData:
    """``X``, ``obs``, ``var``, ``uns`` and the ``obsm`` keys named of an ``.h5ad``, in memory.

    Layers, ``obsp``, ``varm``, ``varp`` and other ``.obsm`` entries are not read: a training
    run needs none of them, and a raw-counts layer alone can be as large as ``X``.
    """
    from anndata.io import read_elem

    path = Path(path)
    if not path.is_file() or not h5py.is_hdf5(path):
        read_h5ad(path, backed=True)  # raises the usual one-line error naming the file
    try:
        with h5py.File(path, "r") as f:
            check_stored_matrices(path, f)
            stored = list(f["obsm"].keys()) if "obsm" in f else []
            missing = [key for key in obsm if key not in stored]
            parts = {} if missing else {name: read_elem(f[name]) for name in ("X", "obs", "var", "uns") if name in f}
            parts["obsm"] = {} if missing else {key: read_elem(f["obsm"][key]) for key in obsm}
    except VcellError:
        raise
    except Exception:  # e.g. an old on-disk layout: anndata's full reader knows more of them
        full = read_h5ad(path)  # or its one-line error naming the file
        stored, missing = list(full.obsm.keys()), [key for key in obsm if key not in full.obsm]
        parts = {"X": full.X, "obs": full.obs, "var": full.var, "uns": full.uns,
                 "obsm": {key: full.obsm[key] for key in obsm if key in full.obsm}}
    if missing:
        raise missing_obsm_error(path, missing[0], stored)
    return ad.AnnData(**parts)


def load_dataset(
    path: str | os.PathLike | ad.AnnData,
    spec: DataSpec = DataSpec(),
    backed: bool = False,
    dataset_col: str | None = "dataset",
    dataset_name: str | None = None,
    require_context_controls: bool | None = True,
    only_obsm: Sequence[str] | None = None,
) -> PerturbationData:
    """Read and validate an ``.h5ad`` perturbation dataset.

    Raises a one-line :class:`~vcell.errors.VcellError` naming the file and the offending
    column or value on any problem. ``dataset_col`` (if present in ``.obs``) gives each cell's
    dataset name for split files; otherwise the name is ``dataset_name`` or the file's stem (dots
    made underscores: a split names a context ``dataset.context``).
    ``require_context_controls=False`` accepts contexts without control cells (with a warning;
    ``None``: said at debug level only); splits then leave their perturbed cells unused.
    ``only_obsm`` (in memory only): read just ``X``, ``obs``, ``var``, ``uns`` and these
    ``.obsm`` keys (:func:`read_slots`). An in-memory ``AnnData`` in place of ``path`` is
    validated and wrapped as it is (:func:`from_anndata`; its dataset name ``dataset_name`` or
    ``"data"``).
    """
    _check_spec(spec)
    if isinstance(path, ad.AnnData):
        if backed or only_obsm is not None:
            raise VcellError("backed and only_obsm read a file: give its path, not an AnnData")
        return from_anndata(path, spec, dataset_col, dataset_name or "data", require_context_controls)
    if not isinstance(path, str | os.PathLike):
        raise VcellError(f"load_dataset: give the path of an .h5ad or an AnnData (got {type(path).__name__})")
    path = Path(path)
    if only_obsm is not None and not backed:
        adata = read_slots(path, only_obsm)
    else:
        adata = read_h5ad(path, backed=backed)
    if not backed:  # half precision stored: computed in float32 (exact), as a float32 file of the same values
        for name, matrix in [("X", adata.X), *adata.layers.items()]:
            if getattr(matrix, "dtype", None) == np.float16:
                if name == "X":
                    adata.X = matrix.astype(np.float32)
                else:
                    adata.layers[name] = matrix.astype(np.float32)
    expression = validate(adata, spec, path, require_context_controls)
    spec = spec.with_(expression=expression.type)
    index = CellIndex.from_obs(adata.obs, spec, dataset_col, dataset_name or file_dataset_name(path))
    return PerturbationData(adata=adata, spec=spec, expression=expression, index=index, path=path)


def file_dataset_name(path: str | os.PathLike) -> str:
    """The dataset name of a file without a dataset column: its stem, dots made underscores (a split
    names a context ``dataset.context``, cut at its first dot, as cell-load cuts it)."""
    return Path(path).stem.replace(".", "_")


def _check_spec(spec) -> None:
    if not isinstance(spec, DataSpec):
        raise VcellError(f"spec must be a vcell.DataSpec (e.g. DataSpec(pert_col=..., control=...)), got {type(spec).__name__}")


def from_anndata(
    adata: ad.AnnData,
    spec: DataSpec = DataSpec(),
    dataset_col: str | None = "dataset",
    dataset_name: str = "data",
    require_context_controls: bool | None = True,
    path: str | os.PathLike | None = None,
) -> PerturbationData:
    """Validate an in-memory AnnData and wrap it like :func:`load_dataset` (``path``: the file it
    came from, named in errors and warnings)."""
    _check_spec(spec)
    if adata.isbacked and adata.is_view:  # its rows would be streamed from the file by their positions in the view
        raise VcellError(f"{path or 'AnnData'}: a view of a file read with backed='r' (adata[...]) cannot be streamed: "
                         "pass adata[...].to_memory(), or write those cells to a file (`vcell data subset`) and load it")
    expression = validate(adata, spec, path, require_context_controls)
    spec = spec.with_(expression=expression.type)
    index = CellIndex.from_obs(adata.obs, spec, dataset_col, dataset_name)
    return PerturbationData(adata=adata, spec=spec, expression=expression, index=index, path=None)
