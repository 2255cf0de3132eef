"""The evaluator's shortcuts give what the plain paths give: DE inputs of the metrics built from the
DE arrays, pseudobulks taken from the DE's sums, and DE tables written straight from the arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.errors import VcellError
from vcell.eval.csvio import write_de_csv
from vcell.eval.de import de_arrays
from vcell.eval.metrics import DEData, as_cell_eval_bulk, pseudobulk
from vcell.eval.run import summarise

from eval_cases import simulated


def _shuffled(adata, col, seed=0):
    """Rows shuffled and the labels made categorical in a non-sorted category order."""
    out = adata[np.random.default_rng(seed).permutation(adata.n_obs)].copy()
    cats = sorted(out.obs[col].unique(), reverse=True)
    out.obs[col] = pd.Categorical(out.obs[col], categories=cats)
    return out


@pytest.fixture(scope="module")
def case():
    real, pred, col, control = simulated()
    return real, _shuffled(pred, col), col, control


@pytest.mark.parametrize("storage", ["dense", "csr", "float64"])
def test_pseudobulk_from_the_de_sums_is_bit_identical(case, storage):
    real, pred, col, control = case
    for adata in (real, pred):
        adata = adata.copy()
        if storage == "csr":
            adata.X = sp.csr_matrix(adata.X)
        elif storage == "float64":
            adata.X = adata.X.astype(np.float64)
        labels = adata.obs[col].astype(str).to_numpy()
        perts = sorted(set(labels) - {control})
        side = summarise(adata, col, control, perts, need_de=True, need_energy=False, threads=2)
        plain = as_cell_eval_bulk(pseudobulk(adata.X, labels, [*perts, control]), adata.X.dtype)
        assert side.de_result is not None and side.de_result.log_sums is not None
        np.testing.assert_array_equal(side.bulk, plain)
        without_de = summarise(adata, col, control, perts, need_de=False, need_energy=False, threads=2)
        np.testing.assert_array_equal(without_de.bulk, plain)


def test_de_data_from_arrays_equals_from_tables(case):
    real, pred, col, control = case
    res = [de_arrays(a.X, a.obs[col], control, var_names=a.var_names, threads=2) for a in (real, pred)]
    # pred's targets come in reverse category order: the alignment must reorder them
    assert list(res[1].targets) == sorted(res[1].targets, reverse=True)
    fast = DEData.from_results(*res)
    plain = DEData(res[0].to_frame(), res[1].to_frame())
    np.testing.assert_array_equal(fast.perturbations, plain.perturbations)
    assert fast.perturbations.dtype == plain.perturbations.dtype
    assert fast.features.equals(plain.features)
    for side in ("real_side", "pred_side"):
        a, b = getattr(fast, side), getattr(plain, side)
        for name in ("present", "lfc", "abs_lfc", "fdr", "row"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{side}.{name}")
        assert a.ranked_significant(0.05) and all(
            np.array_equal(x, y) for x, y in zip(a.ranked_significant(0.05), b.ranked_significant(0.05), strict=True)
        )
    other = de_arrays(real.X[:, ::-1], real.obs[col], control, var_names=real.var_names[::-1], threads=1)
    mixed = DEData.from_results(res[0], other)  # genes in another order: aligned row by row
    np.testing.assert_array_equal(mixed.pred_side.lfc, plain.real_side.lfc)
    with pytest.raises(VcellError, match="different perturbations"):
        keep = real.obs[col].to_numpy() != "G3"
        DEData.from_results(res[0], de_arrays(real.X[keep], real.obs[col].to_numpy()[keep], control, var_names=real.var_names))


@pytest.mark.parametrize("threads", [1, 2])
def test_de_csv_from_arrays_is_the_table_text(case, tmp_path, threads):
    real, _, col, control = case
    res = de_arrays(real.X, real.obs[col], control, var_names=real.var_names, threads=2)
    res.target_mean[0, :4] = np.nan  # written as empty fields: pdex's NaN reaches polars as null
    write_de_csv(res.to_frame(), tmp_path / "table.csv", chunk_rows=1000)
    write_de_csv(res, tmp_path / "arrays.csv", chunk_rows=333, threads=threads)
    text = (tmp_path / "table.csv").read_bytes()
    assert text == (tmp_path / "arrays.csv").read_bytes()
    assert text.startswith(b"target,feature,target_mean,") and b",," in text
    assert len(text.splitlines()) == res.p_value.size + 1


def test_de_csv_text_is_polars_text(tmp_path):
    """A DE table is written as cell-eval's polars writes it: whole floats keep ``.0`` (pyarrow
    wrote ``735``, so polars read a prediction's tie-free statistics as integers and failed on
    the first ``.5`` after its first 100 rows), polars' notation at both ends of positional
    floats, labels quoted only where needed, NaN as an empty field."""
    pl = pytest.importorskip("polars", reason="polars (a cell-eval dependency) writes the reference text")
    values = np.array([735.0, 735.5, -0.0, 1.0, 2.5e-6, 9.99e-6, 1e-5, 1.5e-8, 3e10, 1.2e15, 1e16, np.inf, -np.inf, np.nan, 0.1])
    n = len(values)
    frame = pd.DataFrame({
        "target": ["plain", "a,b", 'q"t', "plain", "x", "x", "x", "x", "x", "x", "x", "x", "x", "x", "x"][:n],
        "feature": [f"G{i}" for i in range(n)],
        "target_mean": (values * 0.5).astype(np.float32),
        "target_membership": np.arange(n, dtype=np.int64),
        "statistic": values,
    })
    write_de_csv(frame, tmp_path / "ours.csv", chunk_rows=4, threads=2)
    expected = pl.from_pandas(frame, nan_to_null=True).write_csv()
    assert (tmp_path / "ours.csv").read_text() == expected

    plain = frame.assign(target="plain")
    write_de_csv(plain, tmp_path / "plain.csv")
    assert (tmp_path / "plain.csv").read_text() == pl.from_pandas(plain, nan_to_null=True).write_csv()

    labels = frame.assign(target=["", None, "x"] * 5, members=pd.array([1, None, 3] * 5, dtype="Int64"),
                          kept=pd.array([True, None, False] * 5, dtype="boolean"),
                          score=pd.array([0.5, None, 2.0] * 5, dtype="Float64"))
    write_de_csv(labels, tmp_path / "labels.csv", chunk_rows=4)  # an empty text is "", a missing one empty
    assert (tmp_path / "labels.csv").read_text() == pl.from_pandas(labels, nan_to_null=True).write_csv()

    whole_first = pd.DataFrame({"target": ["P"] * 150, "feature": [f"G{i}" for i in range(150)],
                                "statistic": np.r_[np.arange(149.0), 7.5]})
    write_de_csv(whole_first, tmp_path / "whole.csv")
    assert pl.read_csv(tmp_path / "whole.csv")["statistic"].dtype == pl.Float64
