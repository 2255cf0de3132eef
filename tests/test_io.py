"""Reading with a memory-mapped X, the fast matrix scan, and all-or-nothing multi-file writes."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.data.io import atomic_paths, read_h5ad, read_h5ad_mapped
from vcell.data.matrix import block_values, iter_row_chunks, locate
from vcell.data.validate import MatrixStats, scan_matrix, scan_values
from vcell.errors import VcellError


def _adata(X) -> ad.AnnData:
    n, g = X.shape
    return ad.AnnData(X=X, obs=pd.DataFrame({"p": ["a"] * n}, index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


def test_dense_x_is_mapped_read_only(tmp_path):
    X = np.random.default_rng(0).random((30, 7)).astype(np.float32)
    path = tmp_path / "d.h5ad"
    _adata(X).write_h5ad(path)
    mapped = read_h5ad_mapped(path)
    assert isinstance(mapped.X, np.memmap) and not mapped.X.flags.writeable
    np.testing.assert_array_equal(np.asarray(mapped.X), X)
    assert list(mapped.obs["p"]) == ["a"] * 30 and list(mapped.var_names) == [f"g{j}" for j in range(7)]
    with pytest.raises(ValueError):
        mapped.X[0, 0] = 1.0  # the input cannot be modified through the map


@pytest.mark.parametrize("kind", ["csr", "compressed"])
def test_unmappable_x_is_read_normally(kind, tmp_path):
    X = np.random.default_rng(1).random((20, 5)).astype(np.float32)
    path = tmp_path / "x.h5ad"
    if kind == "csr":
        _adata(sp.csr_matrix(X)).write_h5ad(path)
    else:
        _adata(X).write_h5ad(path, compression="gzip")
    out = read_h5ad_mapped(path)
    assert not isinstance(out.X, np.memmap)
    np.testing.assert_allclose(out.X.toarray() if sp.issparse(out.X) else out.X, X)


def _reference_scan(X, chunk_rows: int) -> MatrixStats:
    """The plain one-pass scan, block by block, as the definition of what scan_matrix reports."""
    stats = MatrixStats()
    for start, block in iter_row_chunks(X, chunk_rows):
        vals = np.ascontiguousarray(block_values(block)).reshape(-1)
        if vals.size == 0:
            continue
        stats.n_values += vals.size
        bad, neg, nonint, frac, vmax, pmax = scan_values(vals, 1e-3)
        if bad >= 0 and stats.nan is None:
            stats.nan = tuple(v + o for v, o in zip(locate(block, bad), (start, 0)))
        if neg >= 0 and stats.negative is None:
            r, c = locate(block, neg)
            stats.negative = (start + r, c, float(vals[neg]))
        if nonint >= 0:
            stats.all_integer = False
            if stats.non_integer is None:
                r, c = locate(block, nonint)
                stats.non_integer = (start + r, c, float(vals[nonint]))
        stats.has_fraction = stats.has_fraction or frac >= 0
        if pmax >= 0 and (vmax > stats.max_value or stats.max_pos is None):
            r, c = locate(block, pmax)
            stats.max_value, stats.max_pos = float(vmax), (start + r, c)
    return stats


def test_threaded_fast_scan_matches_the_plain_scan():
    rng = np.random.default_rng(0)
    specials = [np.nan, np.inf, -np.inf, -0.5, -3.0, 2.0000001, 7.5, 1e6, 1e-4]
    for _ in range(150):
        n, g = int(rng.integers(1, 50)), int(rng.integers(1, 30))
        X = rng.poisson(1.0, (n, g)).astype(rng.choice([np.float32, np.float64]))
        if rng.random() < 0.5:
            X = np.log1p(X)
        if rng.random() < 0.2:
            X[:] = 0
        for _ in range(int(rng.integers(0, 3))):
            X[rng.integers(n), rng.integers(g)] = rng.choice(specials)
        for M in (X, sp.csr_matrix(X)):
            for chunk_rows in (1, 7, 4096):
                for threads in (1, 2):
                    assert scan_matrix(M, chunk_rows=chunk_rows, threads=threads) == _reference_scan(M, chunk_rows)


def test_a_backed_csr_file_is_scanned_from_its_stored_values_alone(tmp_path, monkeypatch):
    """An uncompressed backed CSR matrix is scanned from its ``data`` read straight from the file (no row
    blocks built: iter_row_chunks is never called), with the plain scan's findings and positions; a
    compressed one falls back to row blocks, with the same findings."""
    from vcell.data import matrix

    rng = np.random.default_rng(1)
    specials = [np.nan, np.inf, -0.5, -3.0, 2.0000001, 7.5, 1e6, 1e-4]
    monkeypatch.setattr(matrix, "DIRECT_VALUES", 5)  # many blocks, the threads' merge in order
    for case in range(40):
        n, g = int(rng.integers(1, 40)), int(rng.integers(1, 25))
        dtype = [np.float32, np.float64, np.int32, np.uint16][case % 4]
        X = rng.poisson(1.0, (n, g)).astype(np.float64)
        if case % 3 == 1:
            X = np.log1p(X)
        if case % 7 == 6:
            X[:] = 0
        for _ in range(int(rng.integers(0, 3))):
            X[rng.integers(n), rng.integers(g)] = rng.choice(specials)
        if np.dtype(dtype).kind in "iu":
            X = np.nan_to_num(np.floor(X), posinf=9, neginf=-9)
            X = np.abs(X) if np.dtype(dtype).kind == "u" else X
        M = sp.csr_matrix(X.astype(dtype))
        want = _reference_scan(M, 4096)
        for compression in (None, "gzip"):
            path = tmp_path / f"m{case}_{compression}.h5ad"
            ad.AnnData(X=M).write_h5ad(path, compression=compression)
            backed = read_h5ad(path, backed=True)
            try:
                with monkeypatch.context() as m:
                    if compression is None:
                        m.setattr(matrix, "iter_row_chunks", lambda *a, **k: pytest.fail("read as row blocks"))
                    for threads in (1, 2):
                        assert scan_matrix(backed.X, threads=threads) == want, (case, compression, threads)
            finally:
                backed.file.close()


def test_atomic_paths_all_or_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with atomic_paths(out, ["a.csv", "b.csv"]) as tmp:
            tmp["a.csv"].write_text("a")
            raise RuntimeError("boom")
    assert not out.exists()  # the folder this call created is removed again
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "a.csv").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_paths(existing, ["a.csv"]) as tmp:
            tmp["a.csv"].write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in existing.iterdir()] == ["a.csv"] and (existing / "a.csv").read_text() == "old"
    with atomic_paths(existing, ["a.csv", "b.csv"]) as tmp:
        tmp["a.csv"].write_text("A")
        tmp["b.csv"].write_text("B")
    assert sorted(p.name for p in existing.iterdir()) == ["a.csv", "b.csv"] and (existing / "a.csv").read_text() == "A"


def test_backed_read_leaves_sparse_layers_on_disk(tmp_path):
    """anndata's backed mode loads every layer; vcell's keeps a CSR layer lazy and reads only the rows asked for."""
    from anndata.abc import CSRDataset

    X = sp.random(40, 6, density=0.5, format="csr", random_state=0, dtype=np.float32)
    a = ad.AnnData(X=X, layers={"counts": (X * 3).tocsr(), "dense": X.toarray()})
    a.write_h5ad(tmp_path / "a.h5ad")
    b = read_h5ad(tmp_path / "a.h5ad", backed=True)
    try:
        assert b.isbacked and isinstance(b.layers["counts"], CSRDataset)
        rows = np.arange(40) % 4 == 1
        sub = b[rows].to_memory()
        np.testing.assert_array_equal(sub.layers["counts"].toarray(), (X * 3).toarray()[rows])
        np.testing.assert_array_equal(sub.layers["dense"], X.toarray()[rows])
    finally:
        b.file.close()


def test_check_writable_probes_what_access_cannot_tell(tmp_path, monkeypatch):
    """A folder access() calls writable that takes no file (a read-only mount, /proc as root): refused
    before the work, naming it; the probe leaves nothing behind."""
    import errno
    import tempfile

    from vcell.data import io as vio
    from vcell.errors import VcellError

    assert vio.check_writable(tmp_path / "out.h5ad") and list(tmp_path.iterdir()) == []

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(VcellError, match=r"out\.h5ad: cannot write there: folder .* does not take files \(Read-only file system\)"):
        vio.check_writable(tmp_path / "out.h5ad")


def test_staged_folder_replaces_every_earlier_output_only_on_success(tmp_path):
    """The outputs are written aside and put in place at the end: a failure leaves the earlier ones as
    they were; success replaces all of them (one this run did not write too), and no staging is left."""
    from vcell.data.staging import staged_folder

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "old.txt").write_text("old")
    (out / "report.html").write_text("old report")
    (out / "mine.txt").write_text("not an output")
    with pytest.raises(RuntimeError), staged_folder(out, ["runs", "report.html"]) as stage:
        (stage / "runs").mkdir()
        (stage / "runs" / "new.txt").write_text("new")
        raise RuntimeError("failed halfway")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "report.html", "runs"]
    assert (out / "runs" / "old.txt").read_text() == "old"
    with staged_folder(out, ["runs", "report.html"]) as stage:
        (stage / "runs").mkdir()
        (stage / "runs" / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [".vcell-written.json", "mine.txt", "runs"]  # the earlier report went with its run
    assert [p.name for p in (out / "runs").iterdir()] == ["new.txt"]
    assert json.loads((out / ".vcell-written.json").read_text()) == {"files": ["runs/new.txt"]}  # what --overwrite may replace
    from vcell.data.staging import check_replaceable

    check_replaceable(out, ["runs", "report.html"])
    (out / "runs" / "notes.txt").write_text("a user's")
    with pytest.raises(VcellError, match=r"replaces runs/ whole, and 'runs/notes.txt' in it was not written by vcell"):
        check_replaceable(out, ["runs", "report.html"])


def test_an_output_that_appears_while_it_is_written_is_kept_not_replaced(tmp_path):
    """Two commands writing one file without --overwrite both passed the "already exists" check, and
    the last rename won in silence (a preprocess with 500 genes replaced by one with 1,500): the
    second to finish is now refused and the first's file kept. With --overwrite the last one wins."""
    from vcell.data.io import atomic_path, check_output_dir, check_output_path

    out = tmp_path / "p.h5ad"
    check_output_path(out)
    with pytest.raises(VcellError, match="p.h5ad: appeared while this command was writing it"):
        with atomic_path(out) as tmp:
            tmp.write_text("mine")
            out.write_text("theirs")  # the other command's rename, meanwhile
    assert out.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["p.h5ad"]
    check_output_path(out, overwrite=True)
    with atomic_path(out) as tmp:
        tmp.write_text("mine")
    assert out.read_text() == "mine"
    with pytest.raises(VcellError, match="already exists"):  # a refused check leaves nothing that refuses later writes
        check_output_path(out)
    with atomic_path(out) as tmp:
        tmp.write_text("again")
    assert out.read_text() == "again"
    from vcell.data.staging import staged_folder

    check_output_dir(tmp_path / "b", ["report.html"])  # bench's check, its report placed from a staging folder,
    with staged_folder(tmp_path / "b", ["report.html"]) as stage:
        (stage / "report.html").write_text("bench's")
    with atomic_path(tmp_path / "b" / "report.html") as tmp:  # then rewritten in the same process (build_report)
        tmp.write_text("report's")
    assert (tmp_path / "b" / "report.html").read_text() == "report's"
    fresh = tmp_path / "q.h5ad"
    check_output_path(fresh)
    with atomic_path(fresh) as tmp:  # nothing appeared: written as usual
        tmp.write_text("q")
    assert fresh.read_text() == "q" and sorted(p.name for p in tmp_path.iterdir()) == ["b", "p.h5ad", "q.h5ad"]


def test_a_full_disk_is_said_before_it_is_hit_naming_the_output(tmp_path, monkeypatch):
    """A full disk met by HDF5 crashed the interpreter (exit 139) or gave tracebacks; each writer
    checks its device's free space first (one line naming the output, not its temporary file), and
    an OSError met inside an atomic write names the output."""
    import os
    from types import SimpleNamespace

    import torch

    from vcell.data.io import atomic_path, write_h5ad
    from vcell.data.tensors import write_safetensors

    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=1000, f_frsize=1024, f_blocks=10**6))  # ~1 MB free
    a = ad.AnnData(np.ones((100, 10), np.float32))
    with pytest.raises(VcellError, match=r"x\.h5ad: not enough free space on its device \(1\.0 MB free"):
        write_h5ad(a, tmp_path / "x.h5ad")
    with pytest.raises(VcellError, match=r"/w\.safetensors: not enough free space"):
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            write_safetensors({"v": torch.zeros(4)}, tmp)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "y.csv"):
            raise OSError(28, "No space left on device")
    assert caught.value.filename == str(tmp_path / "y.csv") and not list(tmp_path.iterdir())
    write_h5ad(a, tmp_path / "x.h5ad")  # room enough: written
    assert ad.read_h5ad(tmp_path / "x.h5ad").shape == (100, 10)


def test_a_stop_among_the_renames_of_several_files_leaves_all_new_and_says_so(tmp_path, monkeypatch):
    """`eval baseline --de-out`, `predict --log1p-out`, `eval run`: a Ctrl-C between two renames left
    one file new and one old (or one missing) and said "nothing written"; now both are in place first."""
    import os
    import signal

    from vcell.data.io import atomic_files
    from vcell.errors import Interrupted

    a, b = tmp_path / "a.h5ad", tmp_path / "sub" / "b.csv"
    a.write_text("old a")
    replace = os.replace

    def replace_then_stop(src, dst):
        replace(src, dst)
        if str(dst) == str(a):
            signal.raise_signal(signal.SIGINT)  # Python's own handler: a KeyboardInterrupt, held here

    monkeypatch.setattr(os, "replace", replace_then_stop)
    with pytest.raises(Interrupted, match="interrupted once .*a.h5ad, .*b.csv were written whole") as stop:
        with atomic_files([a, b]) as (ta, tb):
            ta.write_text("new a")
            tb.write_text("new b")
    assert a.read_text() == "new a" and b.read_text() == "new b" and stop.value.signum is None
    assert stop.value.written == [a, b]
    with pytest.raises(RuntimeError):  # a failure before the renames: every file as it was
        with atomic_files([a, b]) as (ta, tb):
            ta.write_text("newer a")
            raise RuntimeError("boom")
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.h5ad", "b.csv"]


def test_stop_signals_are_held_through_renames_and_raised_after(tmp_path):
    """A SIGTERM (the command line's handler: a Ctrl-C) landing among the renames that set a run
    aside waits for them, then stops the command (it was dropped: training went on for hours)."""
    import signal

    from vcell.data.io import atomic_path, check_output_path, stop_signals_held

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop_signals_held(redeliver=True):
                signal.raise_signal(signal.SIGTERM)
                done.append("renamed")  # the body ends first
        assert done == ["renamed"]
        with stop_signals_held() as held:  # report only: complete results need no stop
            signal.raise_signal(signal.SIGTERM)
        assert held == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    link = tmp_path / "out.h5ad"  # a dangling link is absent to the check, and replaced by the write
    link.symlink_to(tmp_path / "gone.h5ad")
    check_output_path(link)
    with atomic_path(link) as tmp:
        tmp.write_text("x")
    assert link.read_text() == "x" and not link.is_symlink()


def test_safetensors_files_are_the_same_bytes_run_after_run(tmp_path):
    """safetensors writes its metadata in hash order: two identical runs gave files that differed
    (a checksum of a gene table or checkpoint changed while no value did)."""
    import subprocess
    import sys

    code = ("import sys, torch; from vcell.data.tensors import write_safetensors; "
            "write_safetensors({'b': torch.arange(5.0), 'a': torch.ones(3, 2)}, sys.argv[1], {f'k{j}': str(j) for j in range(20)})")
    for i in range(3):  # a process each: a new hash seed each
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True)
    blobs = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(3)}
    assert len(blobs) == 1
    from safetensors.torch import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata()["k7"] == "7" and f.get_tensor("a").shape == (3, 2)


def test_a_failed_write_of_several_files_removes_the_subfolders_it_made(tmp_path):
    """Per-context outputs (OUT/CONTEXT/...) of a failed run left empty CONTEXT/ folders behind."""
    from vcell.data.io import atomic_paths

    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with atomic_paths(out, ["A/results.csv", "B/deep/results.csv", "kept/x.csv", "top.csv"]) as tmp:
            for path in tmp.values():
                path.write_text("partial")
            raise RuntimeError("a context failed")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["kept"]
    with pytest.raises(RuntimeError):
        with atomic_paths(tmp_path / "new", ["A/r.csv"]) as tmp:
            raise RuntimeError("before anything")
    assert not (tmp_path / "new").exists()


def test_spare_capacity_past_indptr_is_read_as_before(tmp_path):
    """Entries stored past ``indptr[-1]`` (scipy can keep spare capacity, and anndata writes it) are
    unused, not corruption: the structural check accepts them, and the matrix reads as without them."""
    import h5py

    X = sp.random(20, 8, density=0.3, format="csr", dtype=np.float32, random_state=1)
    path = tmp_path / "spare.h5ad"
    ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]), var=pd.DataFrame(index=[f"g{j}" for j in range(8)])).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        for key, extra in (("data", np.float32(5.0)), ("indices", np.int32(99))):  # 99: no gene, but never read
            values = np.append(f["X"][key][()], [extra] * 3)
            del f["X"][key]
            f["X"].create_dataset(key, data=values)
    np.testing.assert_array_equal(read_h5ad(path).X.toarray(), X.toarray())


def test_raw_counts_beside_x_are_checked_too(tmp_path):
    """``raw.X`` (Seurat's and scanpy's counts beside a normalised X, read by ``predict --depth
    controls``) gets the same structural check as X: a gene index past raw's genes is one line."""
    import h5py

    X = sp.random(12, 6, density=0.5, format="csr", dtype=np.float32, random_state=2)
    adata = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(12)]), var=pd.DataFrame(index=[f"g{j}" for j in range(6)]))
    adata.raw = adata.copy()
    path = tmp_path / "raw.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["raw/X/indices"][0] = 40
    with pytest.raises(VcellError, match=r"raw.h5ad: raw/X/indices names gene 40 in cell 0, but the matrix has 6 genes"):
        read_h5ad(path)


def test_a_new_file_in_an_input_folder_is_fine_an_existing_one_is_not(tmp_path):
    """A prediction may be written into the model's run folder (an input of predict), as long as it
    replaces nothing there: an existing file of an input folder is refused even with --overwrite."""
    from vcell.data.io import check_output_path
    from vcell.errors import VcellError

    run = tmp_path / "run"
    run.mkdir()
    assert check_output_path(run / "pred.h5ad", [run]) == run / "pred.h5ad"
    (run / "pred.h5ad").write_text("x")
    with pytest.raises(VcellError, match="is a file of the input folder"):
        check_output_path(run / "pred.h5ad", [run], overwrite=True)
