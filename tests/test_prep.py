"""Submission prep: parity with ``cell-eval prep`` 0.8.2 (the oracle) on real data, and clean errors.

The oracle is run in-process through its own CLI argument parser (``cell_eval._cli._prep``), so the
gene file is read the way ``cell-eval prep -g`` reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.errors import VcellError
from vcell.eval import prep
from vcell.eval.prep import prepare_submission, read_gene_list, read_submission

from conftest import PAPALEXI, real_data

N_CELLS = 400


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pap_small() -> ad.AnnData:
    """400 real THP-1 cells x 290 genes, raw counts, with the perturbation in ``target_gene``."""
    src = ad.read_h5ad(real_data(PAPALEXI))  # the full file, else its small subset in tests/data
    rng = np.random.default_rng(7)
    idx = np.sort(rng.choice(src.n_obs, N_CELLS, replace=False))
    small = src[idx].copy()
    small.obs["target_gene"] = small.obs["target"].astype(str)
    assert (small.obs["target_gene"] == "non-targeting").any()
    assert sp.issparse(small.X) and small.n_vars == 290
    return small


def _log1p(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    X = sp.csr_matrix(out.X, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags(1e4 / np.maximum(totals, 1)) @ X
    X.data = np.log1p(X.data)
    out.X = X  # float64: the prep must cast to float32
    return out


def _write_genes(path: Path, genes) -> Path:
    pd.Series(list(genes)).to_csv(path, header=False, index=False)
    return path


def _make_case(tmp_path: Path, small: ad.AnnData, kind: str) -> tuple[Path, Path]:
    """(prediction .h5ad, gene list .csv) for ``kind`` in counts / log1p / reordered / dense."""
    adata = small.copy() if kind == "counts" else _log1p(small)
    genes = list(small.var_names)
    if kind == "reordered":
        perm = np.random.default_rng(1).permutation(adata.n_vars)
        adata = adata[:, perm].copy()
    if kind == "dense":
        adata.X = adata.X.toarray()
    pred = tmp_path / f"pred_{kind}.h5ad"
    adata.write_h5ad(pred)
    return pred, _write_genes(tmp_path / "genes.csv", genes)


def _cell_eval_prep(pred: Path, genes: Path, out: Path, *extra: str) -> None:
    """Run the oracle exactly as ``cell-eval prep -i PRED -g GENES -o OUT ...`` would."""
    cli = pytest.importorskip("cell_eval._cli._prep", reason="cell-eval (test oracle) not installed")
    for tool in ("zstd", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"cell-eval prep needs the '{tool}' command, not on PATH")
    parser = argparse.ArgumentParser()
    cli.parse_args_prep(parser)
    args = parser.parse_args(["-i", str(pred), "-g", str(genes), "-o", str(out), *extra])
    cli.run_prep(args)
    assert out.exists(), "cell-eval prep wrote nothing"


def _members(path: Path) -> list[tuple[str, bool]]:
    with tarfile.open(path, "r:") as tar:  # "r:" = uncompressed tar only
        return [(m.name, m.isfile()) for m in tar.getmembers()]


def _member_bytes(path: Path, name: str) -> bytes:
    with tarfile.open(path, "r:") as tar:
        return tar.extractfile(name).read()


def _assert_same_submission(ours: ad.AnnData, theirs: ad.AnnData) -> None:
    for a in (ours, theirs):
        assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    assert ours.shape == theirs.shape
    assert list(ours.var_names) == list(theirs.var_names)
    assert list(ours.var.columns) == list(theirs.var.columns) == []
    assert list(ours.obs.columns) == list(theirs.obs.columns)
    assert list(ours.obs_names) == list(theirs.obs_names)
    pd.testing.assert_frame_equal(ours.obs, theirs.obs)
    a, b = ours.X.copy(), theirs.X.copy()
    a.sort_indices()
    b.sort_indices()
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)  # bit-identical values
    assert sorted(ours.uns.keys()) == sorted(theirs.uns.keys())
    assert list(ours.layers.keys()) == list(theirs.layers.keys()) == []
    assert list(ours.obsm.keys()) == list(theirs.obsm.keys()) == []


@pytest.mark.parametrize("kind", ["log1p", "counts", "reordered", "dense"])
def test_matches_cell_eval_prep(tmp_path, pap_small, kind, caplog):
    pred, genes = _make_case(tmp_path, pap_small, kind)
    before = _sha(pred)
    ours_path = tmp_path / "ours.vcc"
    with caplog.at_level(logging.INFO, logger="vcell.eval.prep"):
        got = prepare_submission(pred, ours_path, genes=genes)
    assert got == ours_path and ours_path.exists()
    theirs_path = tmp_path / "theirs.vcc"
    _cell_eval_prep(pred, genes, theirs_path)
    assert _sha(pred) == before, "the input file was modified"

    # same tar layout: the same members, in the same order, both regular files
    assert _members(ours_path) == _members(theirs_path) == [("pred.h5ad.zst", True), ("watermark.txt", True)]
    assert _member_bytes(ours_path, "watermark.txt") == _member_bytes(theirs_path, "watermark.txt") == b"vcc-prep"

    ours, theirs = read_submission(ours_path), read_submission(theirs_path)
    _assert_same_submission(ours, theirs)
    assert list(ours.var_names) == list(pap_small.var_names)  # the gene list's order
    assert list(ours.obs.columns) == ["target_gene"]
    assert list(ours.obs["target_gene"].astype(str)) == list(pap_small.obs["target_gene"])

    messages = " ".join(r.getMessage() for r in caplog.records)
    if kind == "reordered":
        assert "another order; reordering" in messages
    else:
        assert "reordering" not in messages
    if kind == "counts":
        assert "integer-valued (counts); normalising" in messages
        # the counts became log1p(normalised to the median total)
        assert 0 < ours.X.max() < 15 and np.any(np.modf(ours.X.data)[0] > 1e-3)
    else:
        assert "normalising" not in messages
        src = _log1p(pap_small).X.astype(np.float32).toarray()
        np.testing.assert_array_equal(ours.X.toarray(), src)
    # the 290-gene list is not the VCC 2025 list: warned, as cell-eval does, not refused
    assert "not the 18,080 expected" in messages


def test_archive_opens_with_standard_tools(tmp_path, pap_small):
    """Our .vcc unpacks with the system ``tar`` and ``zstd`` into the same h5ad we read back."""
    for tool in ("zstd", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"the '{tool}' command is not on PATH")
    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    out = prepare_submission(pred, tmp_path / "sub.vcc", genes=genes)
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(unpack)], check=True)
    assert sorted(p.name for p in unpack.iterdir()) == ["pred.h5ad.zst", "watermark.txt"]
    subprocess.run(["zstd", "-q", "-d", str(unpack / "pred.h5ad.zst")], check=True)
    a = ad.read_h5ad(unpack / "pred.h5ad")
    _assert_same_submission(a, read_submission(out))


def test_zstd_command_fallback(tmp_path, pap_small, monkeypatch):
    """Without the zstandard package the zstd command compresses, to the same content."""
    if shutil.which("zstd") is None:
        pytest.skip("the 'zstd' command is not on PATH")
    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    a = prepare_submission(pred, tmp_path / "a.vcc", genes=genes)

    def no_zstandard():
        raise ImportError("no zstandard")

    monkeypatch.setattr(prep, "_import_zstandard", no_zstandard)
    b = prepare_submission(pred, tmp_path / "b.vcc", genes=genes)
    assert prep.zstd_compress(genes, tmp_path / "g.zst") == "zstd"
    _assert_same_submission(read_submission(a), read_submission(b))
    monkeypatch.setattr(prep.shutil, "which", lambda name: None)
    with pytest.raises(VcellError, match="needs the 'zstandard' Python package"):
        prepare_submission(pred, tmp_path / "c.vcc", genes=genes)
    assert not (tmp_path / "c.vcc").exists()


def test_a_disk_full_while_compressing_names_the_output(tmp_path, pap_small, monkeypatch):
    """The compressor's "No space left on device" names no file: the error names the archive, and
    nothing is left beside it."""
    import errno

    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    out = tmp_path / "out" / "sub.vcc"

    def full(src, dst, level=3):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep, "zstd_compress", full)
    with pytest.raises(OSError) as exc:
        prepare_submission(pred, out, genes=genes)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(out)
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# errors: one line naming the culprit, and no output at all


def _assert_refused(tmp_path: Path, pred: Path, out: Path, match: str, **kwargs) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    out_sha = _sha(out) if out.exists() else None  # an existing output must stay as it was
    sha = _sha(pred) if pred.exists() else None
    with pytest.raises(VcellError, match=match) as exc:
        prepare_submission(pred, out, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    assert (_sha(out) if out.exists() else None) == out_sha
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "temporary or output files left behind"
    assert (_sha(pred) if pred.exists() else None) == sha
    return msg


def test_gene_set_differs(tmp_path, pap_small):
    pred, _ = _make_case(tmp_path, pap_small, "log1p")
    genes = list(pap_small.var_names)
    listed = genes[3:] + ["NOTAGENE1", "NOTAGENE2"]
    gfile = _write_genes(tmp_path / "other_genes.csv", listed)
    msg = _assert_refused(tmp_path, pred, tmp_path / "x.vcc", "genes differ from", genes=gfile)
    assert str(pred) in msg and str(gfile) in msg
    assert "2 gene(s) of the list missing ('NOTAGENE1', 'NOTAGENE2')" in msg
    assert f"3 gene(s) not in the list ({', '.join(repr(g) for g in genes[:3])})" in msg
    assert f"exactly the {len(listed)} listed genes" in msg
    # the oracle refuses it too
    with pytest.raises(ValueError, match="does not match anndata gene names"):
        _cell_eval_prep(pred, gfile, tmp_path / "theirs.vcc")


def test_many_missing_genes_are_previewed(tmp_path, pap_small):
    pred, _ = _make_case(tmp_path, pap_small, "log1p")
    listed = [f"G{i}" for i in range(50)] + list(pap_small.var_names)[:100]
    msg = _assert_refused(tmp_path, pred, tmp_path / "x.vcc", "genes differ", genes=listed)
    assert "50 gene(s) of the list missing ('G0', 'G1', 'G2', 'G3', 'G4', ... (50 in all))" in msg
    assert "190 gene(s) not in the list" in msg and "(190 in all)" in msg


@pytest.mark.parametrize(
    "value, match",
    [
        (np.nan, r"X has 1 NaN value\(s\), first at cell '(\S+)' \(row 5\), gene '(\S+)'"),
        (np.inf, r"X has 1 infinite value\(s\).*first at cell .* \(row 5\)"),
        (-0.5, r"X has 1 negative value\(s\), first -0.5 at cell .* \(row 5\)"),
    ],
)
def test_bad_values_refused(tmp_path, pap_small, value, match):
    bad = _log1p(pap_small)
    X = bad.X.tolil()
    col = int(np.flatnonzero(X[5].toarray().ravel())[0])
    X[5, col] = value
    bad.X = X.tocsr()
    pred = tmp_path / "bad.h5ad"
    bad.write_h5ad(pred)
    genes = _write_genes(tmp_path / "genes.csv", pap_small.var_names)
    msg = _assert_refused(tmp_path, pred, tmp_path / "x.vcc", match, genes=genes)
    assert f"cell {bad.obs_names[5]!r}" in msg and f"gene {bad.var_names[col]!r}" in msg


def test_missing_pert_column(tmp_path, pap_small):
    adata = _log1p(pap_small)
    del adata.obs["target_gene"]
    pred = tmp_path / "nocol.h5ad"
    adata.write_h5ad(pred)
    genes = _write_genes(tmp_path / "genes.csv", pap_small.var_names)
    msg = _assert_refused(tmp_path, pred, tmp_path / "x.vcc", r"obs column 'target_gene' \(pert_col\) not found", genes=genes)
    assert str(pred) in msg and "did you mean 'target'" in msg
    # naming the right column works, and it is written as target_gene
    out = prepare_submission(pred, tmp_path / "ok.vcc", genes=genes, pert_col="target")
    assert list(read_submission(out).obs.columns) == ["target_gene"]
    # a missing cell-type column is named too
    _assert_refused(tmp_path, pred, tmp_path / "y.vcc", r"'cell_line' \(celltype_col\) not found", genes=genes,
                    pert_col="target", celltype_col="cell_line")


def test_missing_control_label(tmp_path, pap_small):
    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    msg = _assert_refused(tmp_path, pred, tmp_path / "x.vcc", "no control cells labelled 'control'", genes=genes,
                          control="control")
    assert "obs column 'target_gene'" in msg
    with pytest.raises(ValueError, match="negative control name"):
        _cell_eval_prep(pred, genes, tmp_path / "theirs.vcc", "--ntc-name", "control")


def test_too_many_cells(tmp_path, pap_small):
    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    msg = _assert_refused(tmp_path, pred, tmp_path / "x.vcc", f"{N_CELLS} cells exceed the submission cap of 100",
                          genes=genes, max_cells=100)
    assert "max_cells" in msg
    with pytest.raises(ValueError, match="exceeds maximum cell dimension"):
        _cell_eval_prep(pred, genes, tmp_path / "theirs.vcc", "--max-cell-dim", "100")
    # exactly at the cap is fine, and None lifts it
    assert prepare_submission(pred, tmp_path / "a.vcc", genes=genes, max_cells=N_CELLS).exists()
    assert prepare_submission(pred, tmp_path / "b.vcc", genes=genes, max_cells=None).exists()
    assert prep.MAX_CELLS == 200_000 and prep.VCC_N_GENES == 18_080


def test_log1p_range_and_allow_discrete(tmp_path, pap_small):
    adata = _log1p(pap_small)
    adata.X = adata.X * 3.0  # decimals, and values above 15: neither counts nor log1p
    pred = tmp_path / "scaled.h5ad"
    adata.write_h5ad(pred)
    genes = _write_genes(tmp_path / "genes.csv", pap_small.var_names)
    _assert_refused(tmp_path, pred, tmp_path / "x.vcc", "neither counts nor log1p-normalised", genes=genes)
    with pytest.raises(ValueError, match="exceeds log1p threshold"):
        _cell_eval_prep(pred, genes, tmp_path / "theirs.vcc")
    at_limit = _log1p(pap_small)
    at_limit.X = at_limit.X / at_limit.X.max() * 15.0  # exactly 15 at the top: refused by both, the limit is exclusive
    assert at_limit.X.max() == 15.0
    at_limit.write_h5ad(tmp_path / "at15.h5ad")
    _assert_refused(tmp_path, tmp_path / "at15.h5ad", tmp_path / "y.vcc", "first >= 15 at row", genes=genes)
    with pytest.raises(ValueError, match="exceeds log1p threshold"):
        _cell_eval_prep(tmp_path / "at15.h5ad", genes, tmp_path / "theirs15.vcc")
    out = prepare_submission(pred, tmp_path / "ok.vcc", genes=genes, allow_discrete=True)
    np.testing.assert_array_equal(read_submission(out).X.toarray(), adata.X.astype(np.float32).toarray())
    # counts kept as counts with allow_discrete
    counts, _ = _make_case(tmp_path, pap_small, "counts")
    out = prepare_submission(counts, tmp_path / "counts.vcc", genes=genes, allow_discrete=True, encoding=64)
    got = read_submission(out).X
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got.toarray(), pap_small.X.toarray())


def test_output_paths(tmp_path, pap_small):
    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    # default name, as cell-eval's: <input>.prep.vcc beside the input
    out = prepare_submission(pred, None, genes=genes)
    assert out == tmp_path / "pred_log1p.prep.vcc" and out.exists()
    _assert_refused(tmp_path, pred, out, "already exists", genes=genes)
    assert prepare_submission(pred, out, genes=genes, overwrite=True) == out
    _assert_refused(tmp_path, pred, pred, "output path is the input file", genes=genes, overwrite=True)
    _assert_refused(tmp_path, pred, tmp_path / "x.vcc", "encoding 16 is not supported", genes=genes, encoding=16)
    _assert_refused(tmp_path, tmp_path / "nope.h5ad", tmp_path / "x.vcc", "nope.h5ad: file not found", genes=genes)
    assert prep.default_output_path("a/b.pred") == Path("a/b.pred.prep.vcc")


def test_gene_list_file(tmp_path):
    f = tmp_path / "genes.csv"
    f.write_text("\ufeffA,first\r\nB\r\n\r\n  C  \r\n", encoding="utf-8")
    assert read_gene_list(f) == ["A", "B", "C"]
    assert read_gene_list(("X", "Y")) == ["X", "Y"]
    f.write_text("A\nB\nA\nC\nB\n")
    with pytest.raises(VcellError, match=r"genes.csv: 2 duplicated gene name\(s\): 'A', 'B'"):
        read_gene_list(f)
    f.write_text("\n\n")
    with pytest.raises(VcellError, match="gene list is empty"):
        read_gene_list(f)
    with pytest.raises(VcellError, match="missing.csv: gene list file not found"):
        read_gene_list(tmp_path / "missing.csv")


def test_failure_while_writing_leaves_nothing(tmp_path, pap_small, monkeypatch):
    """A failure halfway through the archive leaves no output, no temporary file, and an old output intact."""
    pred, genes = _make_case(tmp_path, pap_small, "log1p")
    out = tmp_path / "sub.vcc"
    real_add = tarfile.TarFile.add

    def add_then_fail(self, name, arcname=None, **kw):
        real_add(self, name, arcname=arcname, **kw)
        if arcname == "pred.h5ad.zst":
            raise OSError("disk full")

    monkeypatch.setattr(tarfile.TarFile, "add", add_then_fail)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        prepare_submission(pred, out, genes=genes)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.undo()

    out.write_bytes(b"previous submission")
    monkeypatch.setattr(prep, "zstd_compress", lambda *a, **k: (_ for _ in ()).throw(VcellError("zstd broke")))
    with pytest.raises(VcellError, match="zstd broke"):
        prepare_submission(pred, out, genes=genes, overwrite=True)
    assert out.read_bytes() == b"previous submission"
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["sub.vcc"]
