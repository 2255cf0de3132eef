"""Property-based tests: the loaders and validators on random small AnnData files.

Every example is a random ``.h5ad`` (integer or float matrix, dense, CSR or CSC, random sparsity,
NaN/inf/negative values in random places, label columns of random strings: empty, whitespace,
unicode, numbers as strings, missing values, categorical or object or numeric; columns missing,
cell and gene names duplicated, expression metadata present, absent or wrong). Whatever the
input, the loaders and validators either succeed or stop with a :class:`VcellError` whose
message is one non-empty line; any other exception is a bug.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vcell.data.dataset import from_anndata, load_dataset
from vcell.data.io import read_h5ad
from vcell.data.preprocess import preprocess
from vcell.data.spec import DataSpec
from vcell.data.split_files import read_split_toml
from vcell.data.splits import apply_split, holdout_config, select_cells
from vcell.data.validate import check, check_expression, infer_expression_type, validate
from vcell.errors import VcellError
from vcell.eval.inputs import check_pair

# VCELL_HYPOTHESIS_EXAMPLES=2000 hunts longer (the suite keeps to ~50 per test: seconds, not minutes)
EXAMPLES = int(os.environ.get("VCELL_HYPOTHESIS_EXAMPLES", "50"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# the generated data is odd on purpose (duplicated names, values cast to small dtypes): anndata and numpy say so
pytestmark = pytest.mark.filterwarnings("ignore:.* names are not unique:UserWarning", "ignore::RuntimeWarning")

CONTROL = "ctrl"
# labels a real file might hold, and the ones that break naive code
LABELS = [CONTROL, CONTROL, "A", "B", "A+B", "B+A", "", " ", "\t", "nan", "None", "NaN", "1", "1.0", "0", "-1",
          "é", "名前", "ctrl ", "Ctrl", "+", "A+", "a b", "x" * 40, "'", '"', "\\", "ü+ctrl"]
NAMES = ["c", "c", "g", "", " ", "1", "名", "é", "nan", "0"]
SPECIAL = [float("nan"), float("inf"), float("-inf"), -1.0, -0.5, 1e7, 0.5, 1e-4]


def one_line(exc: VcellError) -> None:
    """A VcellError's message: non-empty, one line."""
    message = str(exc)
    assert message.strip(), "VcellError with an empty message"
    assert "\n" not in message, f"VcellError message on several lines: {message!r}"


def must_not_crash(fn, *args, **kwargs):
    """``fn(...)``'s result, or ``None`` if it raised a (well-formed) VcellError; any other exception fails."""
    try:
        result = fn(*args, **kwargs)
    except VcellError as exc:
        one_line(exc)
        event(f"{fn.__name__}: VcellError")
        return None
    event(f"{fn.__name__}: ok")
    return result


@st.composite
def matrices(draw, n_obs: int, n_vars: int):
    """A cells x genes matrix: dtype, storage, value kind, sparsity and special values at random."""
    dtype = draw(st.sampled_from(["int32", "int64", "float32", "float64", "uint16", "int8"]))
    kind = draw(st.sampled_from(["counts", "log1p", "wild"]))
    if np.dtype(dtype).kind in "iu":
        low = -3 if kind == "wild" and np.dtype(dtype).kind == "i" else 0
        elements = st.integers(low, 100)
    elif kind == "counts":
        elements = st.integers(0, 60).map(float)
    elif kind == "log1p":
        elements = st.floats(0, 9, width=32)
    else:
        elements = st.one_of(st.floats(0, 20, width=32), st.sampled_from(SPECIAL))
    X = draw(arrays(dtype, (n_obs, n_vars), elements=elements))
    if n_obs and n_vars:
        zero = draw(arrays(bool, (n_obs, n_vars)))
        X[zero] = 0
    storage = draw(st.sampled_from(["dense", "csr", "csc"]))
    return X if storage == "dense" else (sp.csr_matrix(X) if storage == "csr" else sp.csc_matrix(X))


@st.composite
def label_columns(draw, n: int, pool=LABELS):
    """One obs column: strings from ``pool`` (maybe missing values, maybe numbers), object or categorical."""
    style = draw(st.sampled_from(["object", "category", "numeric", "with_missing"]))
    if style == "numeric":
        return pd.Series(draw(st.lists(st.integers(-2, 3), min_size=n, max_size=n)), dtype="int64")
    values = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    if style == "with_missing" and n:
        holes = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        values = [None if h else v for v, h in zip(values, holes, strict=True)]
        return pd.Series(pd.Categorical(values))  # anndata writes missing labels only in categoricals
    return pd.Series(values, dtype="category" if style == "category" else object)


@st.composite
def anndatas(draw, n_obs=None, n_vars=None, var_names=None):
    """A random small AnnData (``pert``, ``ctx``, ``batch`` obs columns, each possibly absent)."""
    n_obs = draw(st.integers(0, 14)) if n_obs is None else n_obs
    n_vars = draw(st.integers(0, 6)) if n_vars is None else n_vars
    X = draw(matrices(n_obs, n_vars))
    obs = pd.DataFrame(index=pd.Index([f"{draw(st.sampled_from(NAMES))}{i if draw(st.booleans()) else ''}" for i in range(n_obs)], dtype=object))
    for col in ("pert", "ctx", "batch"):
        if draw(st.integers(0, 9)) > 0:
            pool = LABELS if col == "pert" else ["K562", "k562", "T98G", "", " ", "1", "名", "nan"]
            obs[col] = draw(label_columns(n_obs, pool)).to_numpy()
    if var_names is None:
        var_names = [f"{draw(st.sampled_from(NAMES))}{j if draw(st.integers(0, 3)) else ''}" for j in range(n_vars)]
    uns = draw(st.sampled_from([{}, {"log1p": {"base": None}}, {"vcell": {"expression": "counts"}},
                                {"vcell": {"expression": "log1p"}}, {"vcell": {"expression": "bogus"}}, {"vcell": "text"}]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(var_names, dtype=object)), uns=dict(uns))
    return adata


CONTEXTS = ["K562", "k562", "T98G", "1", "名", "a.b", "a b", "0"]
PERTS = ["A", "B", "A+B", "B+A", "1", "0", "-1", "é", "名前", "a b", "x" * 40, "'", '"', "\\", "Ctrl", "ctrl ", "+", "A+", "G1"]
GENES = ["A", "B", "G1", "名", "1", "é", "a b", "G2", "G3", "x" * 30]
BLANK = ["", " ", "\t", "nan", "None"]
MUTATIONS = ["nan", "inf", "negative", "fraction", "huge", "blank_label", "missing_label", "numeric_column", "drop_column",
             "no_controls_in_a_context", "no_controls", "duplicate_cells", "duplicate_genes", "no_genes", "no_cells",
             "uns", "float16", "int_dtype", "csc", "explicit_zeros", "one_cell"]


def _set_value(adata: ad.AnnData, draw, value: float) -> None:
    """``X[r, c] = value`` at a random position (the matrix becomes float64 if it must)."""
    if not adata.n_obs or not adata.n_vars:
        return
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    fits = np.isfinite(value) and float(value).is_integer() and (value >= 0 or X.dtype.kind == "i") and abs(value) < 100
    if X.dtype.kind != "f" and not fits:
        X = X.astype(np.float64)
    X[draw(st.integers(0, adata.n_obs - 1)), draw(st.integers(0, adata.n_vars - 1))] = value
    adata.X = sp.csr_matrix(X) if sp.issparse(adata.X) else X


def _mutate(adata: ad.AnnData, draw, how: str) -> ad.AnnData:
    """One thing wrong (or merely unusual) with an otherwise valid dataset."""
    n = adata.n_obs
    col = draw(st.sampled_from(["pert", "ctx"]))
    if how in ("nan", "inf", "negative", "fraction", "huge"):
        _set_value(adata, draw, {"nan": np.nan, "inf": draw(st.sampled_from([np.inf, -np.inf])), "negative": -1.0,
                                 "fraction": 0.5, "huge": 1e7}[how])
    elif how in ("blank_label", "missing_label") and n and col in adata.obs:
        labels = adata.obs[col].astype(str).to_numpy(dtype=object)
        labels[draw(st.integers(0, n - 1))] = draw(st.sampled_from(BLANK)) if how == "blank_label" else None
        adata.obs[col] = pd.Categorical(labels)
    elif how == "numeric_column" and col in adata.obs:
        adata.obs[col] = np.arange(n) % 2
    elif how == "drop_column" and col in adata.obs:
        del adata.obs[col]
    elif how in ("no_controls_in_a_context", "no_controls") and "pert" in adata.obs and "ctx" in adata.obs and n:
        labels = adata.obs["pert"].astype(str).to_numpy(dtype=object)
        hit = labels == CONTROL
        if how == "no_controls_in_a_context":
            hit &= adata.obs["ctx"].astype(str).to_numpy() == str(adata.obs["ctx"].iloc[0])
        labels[hit] = "A"
        adata.obs["pert"] = pd.Categorical(labels)
    elif how == "duplicate_cells" and n > 1:
        adata.obs_names = ["c0"] * 2 + list(adata.obs_names[2:])
    elif how == "duplicate_genes" and adata.n_vars > 1:
        adata.var_names = [adata.var_names[0]] * 2 + list(adata.var_names[2:])
    elif how == "no_genes":
        adata = adata[:, :0].copy()
    elif how == "no_cells":
        adata = adata[:0].copy()
    elif how == "one_cell" and n:
        adata = adata[:1].copy()
    elif how == "uns":
        adata.uns = draw(st.sampled_from([{}, {"log1p": {"base": None}}, {"vcell": {"expression": "counts"}},
                                          {"vcell": {"expression": "log1p"}}, {"vcell": {"expression": "bogus"}}, {"vcell": "text"}]))
    elif how == "float16":  # dense only: scipy.sparse has no float16
        adata.X = (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float16)
    elif how == "int_dtype":
        X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        X = X.astype(draw(st.sampled_from([np.int8, np.uint16, np.int64])))
        adata.X = sp.csr_matrix(X) if sp.issparse(adata.X) else X
    elif how == "csc" and np.asarray(adata.X[:0]).dtype != np.float16:  # scipy.sparse has no float16
        adata.X = sp.csc_matrix(adata.X)
    elif how == "explicit_zeros" and sp.issparse(adata.X) and adata.X.nnz:
        X = sp.csr_matrix(adata.X, copy=True)
        X.data[0] = 0  # stored, but zero
        adata.X = X
    return adata


@st.composite
def datasets(draw):
    """A valid small perturbation dataset (every context with controls), then 0-2 things wrong with it.

    Labels and names are unusual on purpose: unicode, numbers as strings, dots, spaces, '+'.
    """
    contexts = draw(st.lists(st.sampled_from(CONTEXTS), min_size=1, max_size=3, unique=True))
    perts, ctxs = [], []
    for ctx in contexts:
        groups = [CONTROL] + draw(st.lists(st.sampled_from(PERTS), max_size=3, unique=True))
        for label in groups:
            k = draw(st.integers(1, 3))
            perts += [label] * k
            ctxs += [ctx] * k
    n_obs, n_vars = len(perts), draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["counts", "log1p"]))
    dtype = draw(st.sampled_from(["int32", "int64", "float32", "float64"])) if kind == "counts" else draw(st.sampled_from(["float32", "float64"]))
    elements = st.integers(0, 60) if kind == "counts" else st.floats(0, 9, width=32)
    X = draw(arrays(dtype, (n_obs, n_vars), elements=elements))
    X[draw(arrays(bool, (n_obs, n_vars)))] = 0
    if draw(st.booleans()):
        X = sp.csr_matrix(X)
    style = draw(st.sampled_from(["category", "object"]))
    obs = pd.DataFrame({"pert": perts, "ctx": ctxs}, index=[f"c{i}" for i in range(n_obs)])
    if style == "category":
        obs = obs.astype("category")
    if draw(st.booleans()):
        obs["dataset"] = draw(st.sampled_from(["d", "d.x", "名", "1"]))
    genes = draw(st.lists(st.sampled_from(GENES), min_size=n_vars, max_size=n_vars, unique=True))
    uns = draw(st.sampled_from([{}, {"vcell": {"expression": kind}}] + ([{"log1p": {"base": None}}] if kind == "log1p" else [])))
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes), uns=uns)
    for how in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        adata = _mutate(adata, draw, how)
    return adata


any_data = st.one_of(datasets(), datasets(), anndatas())

specs = st.one_of(
    st.just(DataSpec(pert_col="pert", control=CONTROL, context_col="ctx")),
    st.builds(
        DataSpec,
        pert_col=st.sampled_from(["pert", "pert", "missing_col"]),
        control=st.sampled_from([CONTROL, CONTROL, "", "nan", "1", "ctrl "]),
        context_col=st.sampled_from(["ctx", "ctx", None, "no_such", "dataset"]),
        batch_col=st.sampled_from([None, None, "ctx", "batch", "gone"]),
        expression=st.sampled_from([None, None, "counts", "log1p"]),
    ),
)


def write(adata: ad.AnnData, folder: str, name: str = "data.h5ad") -> Path:
    """Write to ``folder/name`` (quietly: anndata warns about names and object columns)."""
    path = Path(folder) / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_logs():
    """The validators log warnings about the data; they are not what these tests look at."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@SETTINGS
@given(adata=any_data, spec=specs, backed=st.booleans(), require=st.booleans())
def test_load_dataset_and_validators(adata, spec, backed, require):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write(adata, tmp)
        data = must_not_crash(load_dataset, path, spec, backed=backed, require_context_controls=require)
        must_not_crash(from_anndata, adata, spec, require_context_controls=require)
        loaded = read_h5ad(path, backed=backed)
        report = must_not_crash(check, loaded, spec, path, require_context_controls=require)
        if report is not None:
            assert all(p.message.strip() and "\n" not in p.message for p in report.problems)
        must_not_crash(validate, loaded, spec, path, require_context_controls=require)
        must_not_crash(infer_expression_type, loaded, spec.expression, path=path)
        must_not_crash(infer_expression_type, loaded, None, path=path, cell_eval=True)
        must_not_crash(check_expression, loaded, spec.expression, path=path)
        if backed:
            loaded.file.close()
        if data is not None:
            # a dataset that loads can be split by any of its contexts (or an unknown one)
            contexts = [str(c) for c in data.index.contexts] + ["no_such_context"]
            for name in contexts[:3]:
                cfg = must_not_crash(holdout_config, data.index, [name])
                if cfg is not None:
                    split = must_not_crash(apply_split, data.index, cfg)
                    if split is not None:
                        must_not_crash(select_cells, data.index, split, ["test"], [name])
            if data.backed:
                data.adata.file.close()


@SETTINGS
@given(adata=any_data, spec=specs, n_top=st.sampled_from([None, 1, 2, 50]), genes=st.booleans(), qc=st.booleans())
def test_preprocess(adata, spec, n_top, genes, qc):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = read_h5ad(write(adata, tmp))
        info = must_not_crash(validate, loaded, spec, "data.h5ad")
        if info is None:
            return
        gene_list = list(loaded.var_names[:2]) + ["NOT_A_GENE"] if genes else None
        must_not_crash(preprocess, loaded, spec.with_(expression=info.type), n_top_genes=n_top, genes=gene_list,
                       knockdown_qc=qc, min_cells=1)


@st.composite
def eval_pairs(draw):
    """(pred, real): often the same genes and perturbations (values, gene order, labels changed), sometimes unrelated."""
    real = draw(any_data)
    how = draw(st.sampled_from(["same", "same", "values", "shuffled_genes", "fewer_genes", "relabel", "unrelated"]))
    if how == "unrelated":
        return draw(any_data), real
    if how == "same":
        pred = real.copy()
        if pred.n_obs:
            pred = pred[np.roll(np.arange(pred.n_obs), 1)].copy()  # each cell's values under another label
    else:
        pred = draw(anndatas(n_obs=real.n_obs, n_vars=real.n_vars, var_names=list(real.var_names)))
    pred.obs = real.obs.copy()
    if how == "shuffled_genes" and real.n_vars > 1:
        pred = pred[:, list(reversed(range(real.n_vars)))].copy()
    elif how == "fewer_genes" and real.n_vars:
        pred = pred[:, : real.n_vars - 1].copy()
    elif how == "relabel" and "pert" in pred.obs and real.n_obs:
        labels = pred.obs["pert"].astype(str).to_numpy(dtype=object)
        labels[0] = draw(st.sampled_from(LABELS))
        pred.obs["pert"] = pd.Categorical(labels)
    return pred, real


@SETTINGS
@given(pair=eval_pairs(), pert_col=st.sampled_from(["pert", "pert", "missing_col"]),
       control=st.sampled_from([CONTROL, CONTROL, "", "1"]), input_type=st.sampled_from(["auto", "auto", "log1p", "counts", "bogus"]),
       backed=st.booleans())
def test_eval_check_pair(pair, pert_col, control, input_type, backed):
    pred, real = pair
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred_path, real_path = write(pred, tmp, "pred.h5ad"), write(real, tmp, "real.h5ad")
        pred_in, real_in = read_h5ad(pred_path, backed=backed), read_h5ad(real_path, backed=backed)
        must_not_crash(check_pair, pred_in, real_in, pert_col, control, input_type, str(pred_path), str(real_path))
        if backed:
            pred_in.file.close()
            real_in.file.close()


TOML_PIECES = ['[datasets]\nd = "x.h5ad"\n', "[training]\nd = \"train\"\n", '[training]\nd = "test"\n', '[zeroshot]\n"d.K562" = "test"\n',
               '[zeroshot]\nK562 = "test"\n', '[fewshot."d.T98G"]\nval = ["A"]\ntest = ["A"]\n', '[fewshot."d.T98G"]\ntest = "A"\n',
               "[other]\n", "[zeroshot\n", "x = \n", '[zeroshot]\n"d.k562" = 3\n', "\x00", "é = 1\n", ""]


@SETTINGS
@given(pieces=st.lists(st.sampled_from(TOML_PIECES), max_size=4))
def test_read_split_toml(pieces):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.toml"
        path.write_text("".join(pieces))
        must_not_crash(read_split_toml, path)
