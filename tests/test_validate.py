"""Reading and validation: real files read cleanly; every bad input gets one clear line and no output."""

from __future__ import annotations

import hashlib
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.data.dataset import load_dataset
from vcell.data.io import read_h5ad
from vcell.data.spec import DataSpec
from vcell.data.validate import check, infer_expression_type, validate
from vcell.errors import VcellError

from conftest import KANG, MCFALINE, PAPALEXI, real_data, run_cli, shared_path

MCF_SPEC = DataSpec(pert_col="perturbation", control="control", context_col="cell_type")
KANG_SPEC = DataSpec(pert_col="stim", control="CTRL", context_col="seurat_annotations")
PAP_SPEC = DataSpec(pert_col="target", control="non-targeting", context_col=None)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "name, spec, expression, n_cells, n_genes",
    [
        (MCFALINE, MCF_SPEC, "log1p", 5961, 500),
        (KANG, KANG_SPEC, "counts", 2000, 13215),
        (PAPALEXI, PAP_SPEC, "counts", 20729, 290),
    ],
)
@pytest.mark.parametrize("backed", [False, True])
def test_real_files_read_and_validate(name, spec, expression, n_cells, n_genes, backed, caplog):
    path = shared_path(name)
    with caplog.at_level(logging.INFO):
        # Kang's Eryth cells are all stimulated: allowed here with a warning, an error by default
        data = load_dataset(path, spec, backed=backed, require_context_controls=(name != KANG))
    assert data.backed == backed
    assert (data.adata.n_obs, data.adata.n_vars) == (n_cells, n_genes)
    assert data.expression.type == expression and data.expression.how == "inferred"
    # inferred, never silently: the log names the type and the reason
    assert any("inferred as" in r.getMessage() and expression in r.getMessage() for r in caplog.records)
    assert data.index.n_cells == n_cells
    assert data.index.is_control.sum() == (data.adata.obs[spec.pert_col] == spec.control).sum()


@pytest.fixture
def kang():
    """The Kang file, else its small subset in tests/data (Eryth without controls, as in the full file)."""
    return real_data(KANG)


@pytest.fixture
def papalexi():
    """The Papalexi file, else its small subset in tests/data (overrides conftest's full-file-only fixture)."""
    return real_data(PAPALEXI)


def test_context_without_controls(kang, caplog):
    with pytest.raises(VcellError, match="context 'Eryth' .* has no control cells labelled 'CTRL'"):
        load_dataset(kang, KANG_SPEC, backed=True)
    with caplog.at_level(logging.WARNING):
        data = load_dataset(kang, KANG_SPEC, backed=True, require_context_controls=False)
    assert any("Eryth" in r.getMessage() for r in caplog.records)
    from vcell.data.splits import apply_split, holdout_config

    split = apply_split(data.index, holdout_config(data.index, ["CD14 Mono"]))
    eryth = data.index.context_keys() == f"{data.index.datasets[0]}.Eryth"
    assert eryth.sum() == (data.adata.obs["seurat_annotations"] == "Eryth").sum() > 0
    assert (split.roles[eryth] == "unused").all()


def test_expression_inference_reasons(papalexi, mcfaline):
    info = infer_expression_type(read_h5ad(papalexi, backed=True))
    assert (info.type, info.how) == ("counts", "inferred") and "integer" in info.reason
    info = infer_expression_type(read_h5ad(mcfaline, backed=True))
    assert info.type == "log1p" and "uns['log1p']" in info.reason
    declared = infer_expression_type(read_h5ad(mcfaline, backed=True), declared="log1p")
    assert declared.how == "declared"
    with pytest.raises(VcellError, match="unknown expression type 'logs'"):
        infer_expression_type(read_h5ad(mcfaline, backed=True), declared="logs")


def test_dense_and_sparse_give_the_same_report(papalexi):
    a = ad.read_h5ad(papalexi)[:3000].copy()
    dense = a.copy()
    dense.X = a.X.toarray()
    r1, r2 = check(a, PAP_SPEC), check(dense, PAP_SPEC)
    assert r1.ok and r2.ok
    assert r1.expression == r2.expression
    assert r1.storage == "csr" and r2.storage == "dense"


def test_check_collects_every_problem(papalexi):
    a = ad.read_h5ad(papalexi)[:500].copy()
    a.X = a.X.toarray()
    a.X[3, 4] = np.nan
    a.X[5, 6] = -1
    a.var_names = ["G"] * 2 + list(a.var_names[2:])
    report = check(a, PAP_SPEC.with_(control="nt"))
    kinds = {p.kind for p in report.problems}
    assert {"nan", "negative", "duplicated_genes", "control_absent"} <= kinds
    with pytest.raises(VcellError, match=r"more problem\(s\)"):
        validate(a, PAP_SPEC.with_(control="nt"))


def test_labels_equal_but_for_case_spaces_or_punctuation_are_named(papalexi, caplog, tmp_path):
    """'IRF1 ' beside 'IRF1' (a trailing space) was trained on while IRF1 was held out, and a third
    of the controls spelled 'non_targeting' became a perturbation, each with "no problems found":
    `data check` lists them, every other command warns (they stay what the file says)."""
    a = ad.read_h5ad(papalexi)[:2000].copy()
    labels = a.obs["target"].astype(str).to_numpy().copy()
    irf1, nt = np.flatnonzero(labels == "IRF1"), np.flatnonzero(labels == "non-targeting")
    labels[irf1[::2]] = "IRF1 "
    labels[nt[::3]] = "non_targeting"
    a.obs["target"] = pd.Categorical(labels)
    similar = [p.message for p in check(a, PAP_SPEC).problems if p.kind == "similar_labels"]
    assert len(similar) == 2, similar
    assert any(f"'IRF1' ({len(irf1) - len(irf1[::2]):,} cells), 'IRF1 ' ({len(irf1[::2]):,} cells)" in m for m in similar)
    assert any("'non-targeting'" in m and "'non_targeting'" in m and "not the control 'non-targeting'" in m for m in similar)
    with caplog.at_level(logging.WARNING):
        validate(a, PAP_SPEC)  # warned, not refused
    assert caplog.text.count("differ only in case, spaces or punctuation") == 2
    a.write_h5ad(tmp_path / "similar.h5ad")
    proc = run_cli("data", "check", tmp_path / "similar.h5ad", "--pert-col", "target", "--control", "non-targeting",
                   "--context-col", "none")
    assert proc.returncode == 1 and "differ only in case" in " ".join(proc.stdout.split() + proc.stderr.split())
    assert not [p for p in check(ad.read_h5ad(papalexi)[:2000].copy(), PAP_SPEC).problems if p.kind == "similar_labels"]
    doses = ad.read_h5ad(papalexi)[:40].copy()  # a dose's decimal point is no punctuation: 1.0 is not 10
    doses.obs["target"] = pd.Categorical(["non-targeting"] * 10 + ["Dex_1.0"] * 10 + ["Dex_10"] * 10 + ["Dex_1_0"] * 10)
    assert not [p for p in check(doses, PAP_SPEC).problems if p.kind == "similar_labels"]


# --- bad inputs through the real CLI: one line naming file + column/value, no output written ---


@pytest.fixture(scope="module")
def base_adata() -> ad.AnnData:
    """A real counts dataset with the default column names: papalexi, two contexts from bio_rep."""
    a = ad.read_h5ad(real_data(PAPALEXI))  # the full file, else its small subset in tests/data
    rng = np.random.default_rng(0)
    a = a[np.sort(rng.choice(a.n_obs, 1500, replace=False))].copy()
    obs = pd.DataFrame(index=a.obs_names)
    obs["target_gene"] = a.obs["target"].astype(str).to_numpy()
    obs["cell_type"] = np.where(a.obs["bio_rep"].astype(str) == "rep_1", "ctxA", "ctxB")
    return ad.AnnData(X=sp.csr_matrix(a.X), obs=obs, var=pd.DataFrame(index=a.var_names))


def _dense(a):
    a = a.copy()
    a.X = a.X.toarray()
    return a


def _set(a, r, c, v):
    a = _dense(a)
    a.X[r, c] = v
    return a


def _dup_genes(a):
    a = a.copy()
    names = list(a.var_names)
    names[7] = names[3]
    a.var_names = names
    return a


def _no_ctrl_in_ctxB(a):
    keep = ~((a.obs["cell_type"] == "ctxB") & (a.obs["target_gene"] == "non-targeting")).to_numpy()
    return a[keep].copy()


def _empty_label(a):
    a = a.copy()
    labels = a.obs["target_gene"].astype(object).to_numpy()
    labels[[10, 20]] = np.nan
    a.obs["target_gene"] = labels
    return a


def _fractional(a):
    a = _dense(a)
    a.X[2, 2] = 1.5
    return a


CASES = {
    # name: (make bad AnnData or None, extra CLI args, substrings of the error line)
    "missing_column": (None, ["--pert-col", "target_genes"], ["column 'target_genes' not found", "did you mean 'target_gene'"]),
    "missing_context_column": (None, ["--context-col", "celltype"], ["context column 'celltype' not found", "a file of one context: --context-col none"]),
    "missing_batch_column": (None, ["--batch-col", "gem_group"], ["batch column 'gem_group' not found"]),
    "control_absent": (None, ["--control", "NT"], ["control label 'NT' not found in column 'target_gene'"]),
    "control_absent_in_context": (_no_ctrl_in_ctxB, [], ["context 'ctxB'", "no control cells labelled 'non-targeting'"]),
    "duplicated_genes": (_dup_genes, [], ["duplicated gene names"]),
    "nan": (lambda a: _set(a, 4, 5, np.nan), [], ["NaN or infinite", "gene"]),
    "inf": (lambda a: _set(a, 4, 5, np.inf), [], ["NaN or infinite"]),
    "negative": (lambda a: _set(a, 6, 1, -2.0), [], ["negative values", "-2"]),
    "non_integer_counts": (_fractional, ["--expression", "counts"], ["declared as counts", "1.5"]),
    "log_too_large": (None, ["--expression", "log1p"], ["expression is log1p", "more than 30"]),
    "empty_group": (_empty_label, [], ["column 'target_gene' has 2 cells with an empty label"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_error_and_no_output(case, base_adata, tmp_path):
    make, args, expected = CASES[case]
    bad = tmp_path / "bad.h5ad"
    (make(base_adata) if make else base_adata).write_h5ad(bad)
    before = _sha(bad)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("data", "preprocess", bad, out_dir / "pre.h5ad", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert str(bad) in line
    for text in expected:
        assert text in line, line
    assert "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []  # nothing written, no temp file left
    assert _sha(bad) == before  # input untouched


@pytest.mark.parametrize("content", [b"this is not an h5ad file\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 64])
def test_unreadable_file(content, tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(content)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("data", "preprocess", bad, out_dir / "pre.h5ad")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{bad}: unreadable" in errors[0]
    assert list(out_dir.iterdir()) == []


def test_missing_file_and_check_command(tmp_path, mcfaline):
    result = run_cli("data", "check", tmp_path / "nope.h5ad")
    assert result.returncode == 2 and "nope.h5ad: file not found" in result.stderr
    ok = run_cli("data", "check", mcfaline, "--pert-col", "perturbation", "--control", "control")
    assert ok.returncode == 0, ok.stderr
    for text in ("cells: 5,961", "genes: 500", "log1p", "U87MG", "no problems found"):
        assert text in ok.stdout
    bad = run_cli("data", "check", mcfaline)  # default column target_gene is absent
    assert bad.returncode == 1
    assert "perturbation column 'target_gene' not found" in bad.stdout
    assert "perturbations: ? (column 'target_gene'" in bad.stdout  # unknown, not 0
    no_ctx = run_cli("data", "check", mcfaline, "--pert-col", "perturbation", "--control", "control", "--context-col", "line")
    assert no_ctx.returncode == 1
    n = ok.stdout.split("perturbations: ")[1].split(" ")[0]
    assert int(n.replace(",", "")) > 0 and f"perturbations: {n} " in no_ctx.stdout  # counted though another column is missing


def test_the_log1p_limits_at_their_exact_values():
    """cell-eval's rules refuse log1p data reaching 15 (vcell's own allow up to 30); a declared
    log1p whose values are all integers is counts as soon as one of them is 1 (all zeros says nothing)."""
    from vcell.data.validate import expression_problems, infer_expression_type, scan_matrix

    def kinds(X, cell_eval=False, declared=None):
        adata = ad.AnnData(np.asarray(X, dtype=np.float32))
        stats = scan_matrix(adata.X)
        info = infer_expression_type(adata, declared, stats, cell_eval=cell_eval)
        return [p.kind for p in expression_problems(adata, stats, info, "f.h5ad", cell_eval=cell_eval)]

    assert kinds([[0.5, 14.99], [1.5, 0.0]], cell_eval=True) == []
    assert kinds([[0.5, 15.0], [1.5, 0.0]], cell_eval=True) == ["log_too_large"]
    assert kinds([[0.5, 30.0], [1.5, 0.0]]) == [] and kinds([[0.5, 30.5], [1.5, 0.0]]) == ["log_too_large"]
    assert kinds([[0.0, 1.0], [1.0, 0.0]], declared="log1p") == ["integer_log1p"]
    assert kinds([[0.0, 0.0], [0.0, 0.0]], declared="log1p") == []
