"""`vcell data preprocess` streams the file in row blocks and writes what the in-memory pipeline gives.

The file path (:func:`preprocess_file`) and the AnnData path (:func:`preprocess`) share one plan;
here the file is read in many small blocks and the outputs are compared value for value: X to the
last bit, layers, obs, var, uns and the summary. Highly variable genes and normalisation are
also checked against scanpy itself.
"""

from __future__ import annotations

import contextlib
import json
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import vcell.data.preprocess_stream as stream
from vcell.data.h5write import H5adWriter
from vcell.data.preprocess import normalize_log1p, preprocess, preprocess_file, select_hvg
from vcell.data.simulate import simulate_perturbseq
from vcell.data.spec import DataSpec

SPEC = DataSpec(pert_col="target_gene", control="non-targeting", context_col="cell_type", expression="counts")
QC = dict(knockdown_qc=True, residual_expression=0.2, cell_residual_expression=0.5, min_cells=20)


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    a = simulate_perturbseq(n_genes=240, n_contexts=2, n_perturbations=12, n_combinations=3,
                            cells_per_perturbation=40, n_controls=150, seed=1)
    a.layers["extra"] = a.X * 2  # another layer: subset and carried like X
    a.obsm["pos"] = np.arange(2 * a.n_obs, dtype=np.float64).reshape(-1, 2)
    return a


@pytest.fixture(scope="module")
def sim_file(sim, tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "sim.h5ad"
    sim.write_h5ad(path)
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    """Read files in blocks of at most 4,000 values and 101 rows: many blocks even on small files."""
    monkeypatch.setattr(stream, "BLOCK_VALUES", 4000)
    monkeypatch.setattr(stream, "MAX_BLOCK_ROWS", 101)


class Lines:
    """A progress factory that records each line's description, total and advances."""

    def __init__(self):
        self.lines: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, description, total=None, unit=""):
        line = {"description": description, "total": total, "steps": []}
        self.lines.append(line)

        class _Line:
            def advance(self, n=1):
                line["steps"].append(n)

        yield _Line()


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _same_uns(a, b, where="uns"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _same_uns(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, np.ndarray | list | tuple):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _assert_same(from_file: ad.AnnData, in_memory: ad.AnnData, file_summary: dict, memory_summary: dict) -> None:
    assert from_file.shape == in_memory.shape
    assert sparse.issparse(from_file.X) and from_file.X.format == "csr"
    assert from_file.X.dtype == in_memory.X.dtype
    np.testing.assert_array_equal(_dense(from_file.X), _dense(in_memory.X))  # to the last bit
    assert sorted(from_file.layers) == sorted(in_memory.layers)
    for key in in_memory.layers:
        assert from_file.layers[key].dtype == in_memory.layers[key].dtype, key
        np.testing.assert_array_equal(_dense(from_file.layers[key]), _dense(in_memory.layers[key]))
    pd.testing.assert_frame_equal(from_file.obs, in_memory.obs, check_exact=True)
    pd.testing.assert_frame_equal(from_file.var, in_memory.var, check_exact=True)
    _same_uns(dict(from_file.uns), dict(in_memory.uns))
    assert sorted(from_file.obsm) == sorted(in_memory.obsm)
    for key in in_memory.obsm:
        np.testing.assert_array_equal(_dense(from_file.obsm[key]), _dense(in_memory.obsm[key]))
    file_summary = {k: v for k, v in file_summary.items() if k not in ("input", "output")}
    assert json.dumps(file_summary, default=str) == json.dumps(memory_summary, default=str)


def test_streamed_qc_and_hvg_equal_the_in_memory_pipeline(sim, sim_file, tmp_path, small_blocks):
    lines = Lines()
    out = tmp_path / "pre.h5ad"
    summary = preprocess_file(sim_file, out, SPEC, n_top_genes=50, progress=lines, **QC)
    mem, mem_summary = preprocess(sim, SPEC, n_top_genes=50, **QC)
    back = ad.read_h5ad(out)
    _assert_same(back, mem, summary, mem_summary)

    # the run did something worth comparing: QC dropped groups and single cells, HVGs + targets kept
    assert summary["n_groups_dropped_qc"] > 0 and summary["n_cells_dropped_qc"] > 0
    statuses = {r["status"] for r in summary["knockdown_report"]}
    assert {"kept", "not_knocked_down", "control"} <= statuses
    assert summary["n_target_genes_kept"] > 0 and back.var["highly_variable"].sum() == 50
    assert back.n_vars == 50 + int((~back.var["highly_variable"]).sum())
    kept = sim[back.obs_names, back.var_names]
    np.testing.assert_array_equal(_dense(back.layers["counts"]), _dense(kept.X))
    expected = np.log1p(_dense(kept.X) / _dense(sim[back.obs_names].X).sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(_dense(back.X), expected, rtol=1e-6, atol=1e-6)
    assert isinstance(back.obs["target_gene"].dtype, pd.CategoricalDtype)

    # three passes (QC, HVG, write), each over every row, in many blocks
    assert [ln["description"].split(" (")[0] for ln in lines.lines] == ["knockdown QC", "highly variable genes", "writing pre.h5ad"]
    assert all("/3)" in ln["description"] for ln in lines.lines)
    for ln in lines.lines:
        assert ln["total"] == sim.n_obs == sum(ln["steps"]) and len(ln["steps"]) >= 10


def test_hvg_and_normalisation_equal_scanpy(sim):
    log = normalize_log1p(sim)
    ref = sim.copy()
    ref.X = ref.X.astype(np.float32)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert log.X.dtype == np.float32
    np.testing.assert_array_equal(log.X.toarray(), ref.X.toarray())
    for batch_key in (None, "gem_group", "cell_type"):
        mine = select_hvg(log, n_top_genes=60, subset=False, batch_key=batch_key)
        theirs = log.copy()
        sc.pp.highly_variable_genes(theirs, n_top_genes=60, flavor="seurat", batch_key=batch_key)
        added = [c for c in theirs.var.columns if c not in log.var.columns]
        assert "dispersions_norm" in added and ("highly_variable_nbatches" in added) == (batch_key is not None)
        pd.testing.assert_frame_equal(mine.var[added], theirs.var[added], check_exact=False, rtol=1e-9)
        assert mine.var["highly_variable"].equals(theirs.var["highly_variable"])
        assert mine.uns["hvg"] == theirs.uns["hvg"]


@pytest.mark.parametrize(("then_expm1", "depth"), [(False, 1), (True, 1), (True, 30)])
def test_tabulated_log1p_is_the_plain_expression_to_the_bit(then_expm1, depth):
    """log1p_normalize looks small whole counts up in per-row tables: the same float32 bits as the plain
    numpy expression on every value (large and fractional counts, a zero-total row, ints and float64 in;
    ``depth`` 30: most counts above the tables)."""
    from vcell.data import normalize

    rng = np.random.default_rng(3)
    counts = depth * rng.negative_binomial(2, 0.15, size=(300, 200)).astype(np.float64)  # depth 1: ~90% below 16
    counts[rng.random(counts.shape) < 0.002] += 0.5  # a few fractional values
    counts[7] = 0
    seen = []
    for dtype in (np.float32, np.float64, np.int64):
        block = sparse.csr_matrix(counts.astype(dtype) if dtype is not np.int64 else np.floor(counts).astype(dtype))
        assert block.nnz >= normalize.TABLE_COUNTS * block.shape[0]  # the tabulated path
        totals = normalize.row_totals(block)
        got = normalize.log1p_normalize(block, totals, 1e4, then_expm1=then_expm1)
        scale = totals / np.float32(1e4)
        scale = scale + (scale == 0)
        data = block.data.astype(np.float32) / np.repeat(scale, np.diff(block.indptr))
        want = np.expm1(np.log1p(data)) if then_expm1 else np.log1p(data)
        assert got.data.dtype == np.float32 and got.data.tobytes() == want.tobytes()
        np.testing.assert_array_equal(got.indices, block.indices)
        dense = normalize.log1p_normalize(block.toarray(), totals, 1e4, then_expm1=then_expm1)
        assert dense.tobytes() == got.toarray().tobytes()
        seen.append(int((block.data >= normalize.TABLE_COUNTS).sum()))
        wide = normalize.log1p_normalize(block, totals.astype(np.float64), 1e4, then_expm1=then_expm1)  # float64 totals
        scale64 = totals.astype(np.float64) / 1e4
        data64 = block.data.astype(np.float32) / np.repeat(scale64 + (scale64 == 0), np.diff(block.indptr))
        want64 = np.expm1(np.log1p(data64)) if then_expm1 else np.log1p(data64)
        assert wide.data.dtype == np.float64 and wide.data.tobytes() == want64.tobytes()
    assert min(seen) > (100 if depth == 1 else counts.size // 2)  # values outside the tables were computed too


def test_log1p_input_gene_list_and_flagged_hvgs_stream(sim, tmp_path, small_blocks):
    log = normalize_log1p(sim)  # log1p X with layers counts and extra, uns log1p
    log.X = log.X.astype(np.float64)  # the dtype of X is kept for log1p input
    path = tmp_path / "log.h5ad"
    log.write_h5ad(path)
    spec = SPEC.with_(expression="log1p")
    for options in (dict(n_top_genes=40, **QC), dict(genes=list(sim.var_names[[30, 4, 200]])),
                    dict(n_top_genes=40, subset_hvg=False), dict(n_top_genes=1000)):
        out = tmp_path / "out.h5ad"
        summary = preprocess_file(path, out, spec, overwrite=True, **options)
        mem, mem_summary = preprocess(log, spec, **options)
        back = ad.read_h5ad(out)
        _assert_same(back, mem, summary, mem_summary)
        assert back.X.dtype == np.float64 and sorted(back.layers) == ["counts", "extra"]
        assert summary["normalized"] is False
    assert list(ad.read_h5ad(tmp_path / "out.h5ad").var_names) == list(sim.var_names)  # 1000 >= genes: all kept


def test_dense_matrix_streams(sim, tmp_path, small_blocks):
    dense = sim.copy()
    dense.X = dense.X.toarray()
    del dense.layers["extra"]
    path = tmp_path / "dense.h5ad"
    dense.write_h5ad(path)
    summary = preprocess_file(path, tmp_path / "out.h5ad", SPEC, n_top_genes=30)
    mem, mem_summary = preprocess(dense, SPEC, n_top_genes=30)
    assert isinstance(mem.X, np.ndarray)
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), mem.X)
    np.testing.assert_array_equal(back.layers["counts"].toarray(), mem.layers["counts"])
    pd.testing.assert_frame_equal(back.var, mem.var)
    assert summary["n_genes_after"] == mem_summary["n_genes_after"] == back.n_vars


def test_a_half_precision_file_streams_as_its_float32_twin(sim, tmp_path, small_blocks):
    """float16 X (counts below 2,048 are exact in it) crashed the writer: scipy.sparse has no float16.
    It preprocesses as the float32 file of the same values; the direct reader leaves it to h5py."""
    import h5py

    from vcell.data.h5direct import extents

    outs = {}
    for dtype in (np.float32, np.float16):
        a = sim.copy()
        a.X = np.minimum(a.X.toarray(), 2000).astype(dtype)
        del a.layers["extra"]
        a.write_h5ad(tmp_path / f"{np.dtype(dtype).name}.h5ad")
        preprocess_file(tmp_path / f"{np.dtype(dtype).name}.h5ad", tmp_path / f"out_{np.dtype(dtype).name}.h5ad", SPEC,
                        n_top_genes=30)
        outs[dtype] = ad.read_h5ad(tmp_path / f"out_{np.dtype(dtype).name}.h5ad")
    np.testing.assert_array_equal(outs[np.float16].X.toarray(), outs[np.float32].X.toarray())
    with h5py.File(tmp_path / "float16.h5ad", "r") as f:
        assert extents(f["X"]) == (None, "values are float16")


def test_an_interrupted_write_leaves_nothing(sim_file, tmp_path, monkeypatch, small_blocks):
    real, calls = H5adWriter.append, []

    def failing(self, **blocks):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, **blocks)

    monkeypatch.setattr(H5adWriter, "append", failing)
    out = tmp_path / "out" / "pre.h5ad"
    with pytest.raises(KeyboardInterrupt):
        preprocess_file(sim_file, out, SPEC, n_top_genes=50)
    assert len(calls) == 3 and os.listdir(out.parent) == []


def test_real_files_stream_like_in_memory(tmp_path, small_blocks):
    from conftest import PAPALEXI, shared_path

    spec = DataSpec(pert_col="target", control="non-targeting", context_col=None, expression="counts")
    path = shared_path(PAPALEXI)  # 20,729 cells x 290 genes, obsm grna_counts (sparse), uns grna_names
    out = tmp_path / "pre.h5ad"
    summary = preprocess_file(path, out, spec, n_top_genes=100, knockdown_qc=True)
    mem, mem_summary = preprocess(ad.read_h5ad(path), spec, n_top_genes=100, knockdown_qc=True)
    back = ad.read_h5ad(out)
    _assert_same(back, mem, summary, mem_summary)
    assert back.shape == (20729, 100) and "grna_counts" in back.obsm and summary["n_targets_not_measured_qc"] == 25


def test_cli_preprocess_streams_and_says_what_it_wrote(sim_file, tmp_path, capsys, cli_in_process, small_blocks):
    out = tmp_path / "pre.h5ad"
    with contextlib.suppress(SystemExit):
        cli_in_process(["data", "preprocess", str(sim_file), str(out), "--n-top-genes", "50", "--knockdown-qc",
                        "--residual-expression", "0.2"])
    line = capsys.readouterr().out.strip()
    back = ad.read_h5ad(out)
    assert line.startswith(f"wrote {out} in ") and f"-> {back.n_obs:,} cells x {back.n_vars:,} genes" in line
    assert "50 highly variable genes" in line and "knockdown QC dropped" in line and "\n" not in line


def test_cli_knockdown_qc_with_a_context_without_controls(tmp_path, capsys, cli_in_process):
    """--allow-missing-controls holds for --knockdown-qc: the context without controls is kept untested
    and the summary line says so (the QC refused the file that the rest of preprocess accepts)."""
    X = np.array([[10.0, 9990.0]] * 40 + [[1.0, 9999.0]] * 80)
    obs = pd.DataFrame({"gene": ["non-targeting"] * 40 + ["A"] * 80, "cell_type": ["X"] * 80 + ["Y"] * 40},
                       index=[f"c{i}" for i in range(120)])
    path, out = tmp_path / "noctrl.h5ad", tmp_path / "pre.h5ad"
    ad.AnnData(sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=["A", "FILL"])).write_h5ad(path)
    with contextlib.suppress(SystemExit):
        cli_in_process(["data", "preprocess", str(path), str(out), "--pert-col", "gene", "--expression", "counts",
                        "--n-top-genes", "2", "--knockdown-qc", "--allow-missing-controls"])
    captured = capsys.readouterr()
    assert "knockdown QC dropped 0 perturbation(s), 0 cells, kept 1 group(s) untested)" in captured.out, captured
    back = ad.read_h5ad(out)
    assert back.n_obs == 120 and back.uns["vcell"]["knockdown_qc"]["n_groups_untested"] == 1
