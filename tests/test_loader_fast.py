"""The fast row reader (direct ``pread`` of uncompressed HDF5) and batched cell-set loading.

Rows read straight from the file must equal the in-memory matrix's for every layout anndata,
h5py and vcell's chunked writer produce, in any order and with repeats; compressed files fall
back to HDF5 reads with the same values; DataLoader workers (fork and spawn) deliver the same
batches as the main process.
"""

from __future__ import annotations

import logging
import os
import pickle

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from vcell.data import h5direct, h5write
from vcell.data.cellsets import CellSetDataset, CellSetSampler, SetBatch, collate_cell_sets
from vcell.data.dataset import load_dataset
from vcell.data.h5write import H5adWriter
from vcell.data.rows import H5Rows, MemoryRows, row_source
from vcell.data.simulate import simulate_perturbseq
from vcell.data.spec import DataSpec
from vcell.errors import VcellError

pytestmark = pytest.mark.skipif(not h5direct.AVAILABLE, reason="direct reads need pread (POSIX)")


@pytest.fixture(scope="module")
def sim():
    a = simulate_perturbseq(n_genes=300, n_contexts=2, n_perturbations=8, n_combinations=0,
                            cells_per_perturbation=40, n_controls=120, n_batches=2, seed=3)  # fmt: skip
    a.X = a.X.tocsr()
    a.X.data = np.log1p(a.X.data)
    a.uns = {"vcell": {"expression": "log1p"}}
    return a


@pytest.fixture(scope="module")
def files(sim, tmp_path_factory):
    """The same matrix in every layout: anndata CSR and dense, vcell's chunked writer, h5py
    row-chunked dense, float64 dense, and gzip-compressed CSR."""
    d = tmp_path_factory.mktemp("layouts")
    out = {"csr": d / "csr.h5ad", "dense": d / "dense.h5ad", "gzip": d / "gzip.h5ad", "chunked": d / "chunked.h5ad"}
    sim.write_h5ad(out["csr"])
    sim.write_h5ad(out["gzip"], compression="gzip")
    dense = sim.copy()
    dense.X = sim.X.toarray()
    dense.write_h5ad(out["dense"])
    chunk, h5write._CHUNK = h5write._CHUNK, 1000  # chunks far smaller than the default, so rows cross them
    try:
        with H5adWriter(out["chunked"], sim.n_vars) as w:
            for start in range(0, sim.n_obs, 97):
                w.append(X=sim.X[start : start + 97])
            w.finish(sim.obs, sim.var, uns=dict(sim.uns))
    finally:
        h5write._CHUNK = chunk
    with h5py.File(out["chunked"], "r") as f:
        assert f["X/data"].chunks == (1000,) and f["X/data"].shape[0] > 20 * 1000
    for name, dtype, chunks in (("rowchunk", np.float32, (7, sim.n_vars)), ("f64", np.float64, None)):
        out[name] = d / f"{name}.h5ad"
        dense.write_h5ad(out[name])
        with h5py.File(out[name], "r+") as f:
            attrs = dict(f["X"].attrs)
            del f["X"]
            f.create_dataset("X", data=dense.X.astype(dtype), chunks=chunks)
            f["X"].attrs.update(attrs)
    return out


def _rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, 400)
    rows[:6] = rows[0]  # repeats
    rows[6:30] = np.arange(50, 74)  # a run of neighbouring rows (merged reads)
    rows[30:40] = np.arange(90, 80, -1)  # and a descending one
    return rows


@pytest.mark.parametrize("layout", ["csr", "dense", "chunked", "rowchunk", "f64"])
def test_direct_reads_equal_memory(sim, files, layout):
    reader = H5Rows(files[layout])
    assert reader.direct, reader.why_not_direct
    want = MemoryRows(sim.X)
    for seed in range(3):
        rows = _rows(sim.n_obs, seed)
        np.testing.assert_array_equal(reader.read(rows), want.read(rows))
    np.testing.assert_array_equal(reader.read([]), np.zeros((0, sim.n_vars), np.float32))
    np.testing.assert_array_equal(reader.read([sim.n_obs - 1]), want.read([sim.n_obs - 1]))
    assert want.read(rows).dtype == np.float32
    np.testing.assert_array_equal(want.read(rows), sim.X[rows].toarray().astype(np.float32))


def test_compressed_file_falls_back_with_same_values(sim, files, caplog, monkeypatch):
    from vcell.data import rows as rows_module

    # a small matrix (this one) is read fast either way: the slow path is said only at debug level
    monkeypatch.setattr(rows_module, "_warned", set())
    with caplog.at_level(logging.DEBUG, logger="vcell.data.rows"):
        assert not H5Rows(files["gzip"]).direct
    assert [r.levelno for r in caplog.records if "read through HDF5" in r.message] == [logging.DEBUG]
    caplog.clear()
    monkeypatch.setattr(rows_module, "_warned", set())
    monkeypatch.setattr(rows_module, "SLOW_READ_WARN_BYTES", 0)  # as if it were large
    reader = H5Rows(files["gzip"])
    with caplog.at_level(logging.WARNING, logger="vcell.data.rows"):
        assert not reader.direct
    assert "gzip" in reader.why_not_direct
    assert "read through HDF5" in caplog.text
    rows = _rows(sim.n_obs)
    np.testing.assert_array_equal(reader.read(rows), MemoryRows(sim.X).read(rows))


def test_bad_rows_and_files_refused(sim, files, tmp_path):
    reader = H5Rows(files["csr"])
    with pytest.raises(VcellError, match=f"row {sim.n_obs} is out of range"):
        reader.read([0, sim.n_obs])
    with pytest.raises(VcellError, match="row -1 is out of range"):
        MemoryRows(sim.X).read([-1])
    # a column index past the gene count in the file
    bad = tmp_path / "bad.h5ad"
    sim.write_h5ad(bad)
    with h5py.File(bad, "r+") as f:
        f["X/indices"][5] = sim.n_vars + 3
    row = int(np.searchsorted(sim.X.indptr, 5, side="right") - 1)
    with pytest.raises(VcellError, match="column index is out of range"):
        H5Rows(bad).read([row])
    # ranges past the end of the file: the reader reports, never returns garbage
    ext = h5direct.Extents(np.dtype(np.float32), 10, np.array([os.path.getsize(bad) - 8], np.int64))
    fd = os.open(bad, os.O_RDONLY)
    try:
        buf = np.zeros(10, np.float32)
        assert not h5direct.read_ranges(fd, ext, np.array([0]), np.array([10]), buf, np.array([0]))
    finally:
        os.close(fd)


def test_changed_file_is_refused(sim, files, tmp_path):
    path = tmp_path / "moving.h5ad"
    sim.write_h5ad(path)
    reader = H5Rows(path)
    first = reader.read([1, 2])
    reader.close()
    sim[::-1].copy().write_h5ad(path)  # replaced under the reader (as a new run would write it)
    with pytest.raises(VcellError, match="changed after it was opened"):
        reader.read([1, 2])
    assert first.shape == (2, sim.n_vars)


def test_reader_pickles_without_data(files):
    reader = H5Rows(files["csr"])
    reader.read([0, 1, 2])  # opened: fd, indptr and extents now live in this process
    blob = pickle.dumps(reader)
    assert len(blob) < 1000  # the file's indptr alone is 7 kB
    assert all(reader.__getstate__()[k] is None for k in ("_fd", "_indptr", "_ext", "_file"))
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read([3, 0]), reader.read([3, 0]))


def _dataset(path, backed: bool) -> CellSetDataset:
    data = load_dataset(path, DataSpec(batch_col="gem_group"), backed=backed)
    sampler = CellSetSampler(data.index, None, "train", 16, "batch", True, seed=4)
    return CellSetDataset(sampler, row_source(data.adata, data.path), epoch=1)


def test_batched_items_equal_single_items(sim, files):
    ds = _dataset(files["csr"], backed=True)
    idx = [3, 0, 7, 5]
    batch = ds.__getitems__(idx)
    assert isinstance(batch, SetBatch)
    fast = collate_cell_sets(batch)
    slow = collate_cell_sets([ds[i] for i in idx])
    assert fast.keys() == slow.keys()
    for key in slow:
        assert torch.equal(fast[key], slow[key]), key
    for item, i in zip(batch, idx):  # the list items are the sets themselves (for other collate functions)
        assert torch.equal(item["target"], ds[i]["target"])
    mem = _dataset(files["csr"], backed=False)
    assert torch.equal(collate_cell_sets(mem.__getitems__(idx))["basal"], fast["basal"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_deliver_the_same_batches(files, context):
    ds = _dataset(files["chunked"], backed=True)

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_cell_sets,
                            multiprocessing_context=context if workers else None)  # fmt: skip
        return list(loader)

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) > 2
    for a, b in zip(single, multi, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    s = ds.sets[0]
    want = MemoryRows(ad.read_h5ad(files["csr"]).X)
    np.testing.assert_array_equal(single[0]["target"][0].numpy(), want.read(s.pert_rows))
    np.testing.assert_array_equal(single[0]["basal"][0].numpy(), want.read(s.control_rows))


def test_empty_rows_and_mixed_index_dtypes(tmp_path):
    X = sp.random(60, 30, density=0.3, format="csr", dtype=np.float32, random_state=0)
    X = sp.csr_matrix(sp.diags((~np.isin(np.arange(60), [0, 5, 6, 7, 59])).astype(np.float32)) @ X)  # empty rows
    X.eliminate_zeros()
    assert X.getnnz(axis=1)[[0, 5, 6, 7, 59]].sum() == 0 and X.nnz
    path = tmp_path / "empty_rows.h5ad"
    ad.AnnData(X).write_h5ad(path)
    rows = np.array([5, 4, 6, 0, 59, 7, 8, 5, 58])
    np.testing.assert_array_equal(H5Rows(path).read(rows), X[rows].toarray())
    X.indptr = X.indptr.astype(np.int64)  # mixed 32/64-bit index arrays, as some files hold
    mem = MemoryRows(X)
    assert mem.X.indices.dtype == np.int32  # no copy of the index array
    np.testing.assert_array_equal(mem.read(rows), X[rows].toarray())
    assert MemoryRows(X.toarray().astype(np.float64)).read([1]).dtype == np.float32


def test_chunk_table_without_chunk_iter(files):
    """HDF5 < 1.14 has no chunk iteration: the chunks are queried one by one, to the same table."""

    class OldId:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "chunk_iter":
                raise AttributeError(name)
            return getattr(self._inner, name)

    class OldDataset:
        def __init__(self, inner):
            self._inner, self.id = inner, OldId(inner.id)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    with h5py.File(files["chunked"], "r") as f:
        new, _ = h5direct.extents(f["X/data"])
        old, _ = h5direct.extents(OldDataset(f["X/data"]))
    assert len(new.offsets) > 20 and new.chunk_len == old.chunk_len == 1000
    np.testing.assert_array_equal(new.offsets, old.offsets)
