"""``agg_results``, the baseline-scaled score and the CSV format, against cell-eval 0.8.2 and
polars (cell-eval's ``agg_results.csv`` is a polars ``describe()``)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

pl = pytest.importorskip("polars", reason="polars (a cell-eval dependency) is the oracle for describe() and CSV")
pytest.importorskip("cell_eval", reason="cell-eval 0.8.2 (test extra) is the oracle for the score")

from vcell.errors import VcellError  # noqa: E402
from vcell.eval.profiles import PERTURBATION_COLUMN, PROFILES  # noqa: E402
from vcell.eval.scoring import STATISTICS, agg_results, read_csv, score, write_csv  # noqa: E402

FULL_COLUMNS = [
    c for m in PROFILES["full"] for c in ((f"{m}_real", f"{m}_pred") if m == "de_nsig_counts" else (m,))
]


def _random_results(rng: np.random.Generator, n: int, columns: list[str], special: bool = True) -> pl.DataFrame:
    """A polars results table with nulls, NaN and infinities sprinkled in."""
    data = {PERTURBATION_COLUMN: [f"P{i}" for i in range(n)]}
    for name in columns:
        values = rng.normal(0.5, 0.3, n).round(int(rng.integers(1, 4)))
        column = values.tolist()
        if special:
            for i in range(n):
                u = rng.random()
                column[i] = None if u < 0.08 else math.nan if u < 0.13 else math.inf if u < 0.15 else column[i]
        data[name] = column
    return pl.DataFrame(data, schema={PERTURBATION_COLUMN: pl.Utf8, **{c: pl.Float64 for c in columns}})


def _to_pandas(table: pl.DataFrame) -> pd.DataFrame:
    """A polars table in vcell's layout: text columns as object, numbers as nullable Float64
    with null kept distinct from NaN."""
    out = pd.DataFrame({table.columns[0]: pd.Series(table[table.columns[0]].to_list(), dtype=object)})
    for name in table.columns[1:]:
        column = table[name]
        out[name] = pd.arrays.FloatingArray(column.fill_null(0.0).to_numpy().astype(np.float64), column.is_null().to_numpy())
    return out


def _assert_frames_equal(reference: pl.DataFrame, ours: pd.DataFrame, rel: float = 1e-12) -> None:
    assert list(ours.columns) == reference.columns
    assert ours.iloc[:, 0].tolist() == reference[reference.columns[0]].to_list()
    for name in reference.columns[1:]:
        ref = reference[name]
        ref_null = ref.is_null().to_numpy()
        array = ours[name].array
        assert np.array_equal(np.asarray(array._mask), ref_null), name
        a = ref.fill_null(0.0).to_numpy().astype(np.float64)
        b = np.asarray(array._data, dtype=np.float64)
        same = (np.isnan(a) & np.isnan(b)) | (a == b) | np.isclose(a, b, rtol=rel, atol=0)
        assert np.all(same | ref_null), f"{name}: {a} != {b}"


def test_agg_results_is_polars_describe():
    rng = np.random.default_rng(11)
    for n in [1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 50]:
        table = _random_results(rng, n, ["a", "b", "c", "d"])
        _assert_frames_equal(table.drop(PERTURBATION_COLUMN).describe(), agg_results(_to_pandas(table)))
    # all-null and all-NaN columns, a single value, integers
    table = pl.DataFrame(
        {
            PERTURBATION_COLUMN: ["A", "B", "C"],
            "nulls": [None, None, None],
            "nans": [math.nan, math.nan, math.nan],
            "one": [None, 0.3, None],
            "mixed": [math.inf, -math.inf, 1.0],
        },
        schema={PERTURBATION_COLUMN: pl.Utf8, "nulls": pl.Float64, "nans": pl.Float64, "one": pl.Float64, "mixed": pl.Float64},
    )
    agg = agg_results(_to_pandas(table))
    _assert_frames_equal(table.drop(PERTURBATION_COLUMN).describe(), agg)
    assert agg["statistic"].tolist() == list(STATISTICS)
    # plain float64 columns (NaN is NaN, nothing is null) work too
    plain = pd.DataFrame({PERTURBATION_COLUMN: ["A", "B"], "x": [1.0, math.nan]})
    assert agg_results(plain)["x"].isna().sum() == 0


def test_agg_results_rejects_text_columns():
    with pytest.raises(VcellError, match="not numeric"):
        agg_results(pd.DataFrame({PERTURBATION_COLUMN: ["A"], "note": ["x"]}))


def _agg_pair(rng: np.random.Generator) -> tuple[pl.DataFrame, pl.DataFrame]:
    user = _random_results(rng, 12, FULL_COLUMNS, special=False)
    base = _random_results(rng, 12, FULL_COLUMNS, special=False)
    return user.drop(PERTURBATION_COLUMN).describe(), base.drop(PERTURBATION_COLUMN).describe()


def test_score_matches_cell_eval():
    from cell_eval import score_agg_metrics

    rng = np.random.default_rng(2)
    for trial in range(6):
        user, base = _agg_pair(rng)
        if trial == 1:  # undefined and infinite ratios: NaN user mean, zero baseline error, baseline at best
            mean = pl.col("statistic") == "mean"
            user = user.with_columns(pl.when(mean).then(math.nan).otherwise(pl.col("pearson_delta")).alias("pearson_delta"))
            base = base.with_columns(
                pl.when(mean).then(0.0).otherwise(pl.col("mae")).alias("mae"),
                pl.when(mean).then(1.0).otherwise(pl.col("overlap_at_N")).alias("overlap_at_N"),
            )
        reference = score_agg_metrics(user, base)
        ours = score(_to_pandas(user), _to_pandas(base))
        assert ours["metric"].tolist() == reference["metric"].to_list()
        np.testing.assert_allclose(ours["from_baseline"], reference["from_baseline"].to_numpy(), rtol=1e-12, atol=0)
        # unclipped: the same before the clip at 0
        clipped = np.clip(ours["unclipped"].to_numpy(), 0, None)
        np.testing.assert_allclose(clipped[:-1], ours["from_baseline"].to_numpy()[:-1], rtol=1e-12)
        assert ours["unclipped"].iloc[-1] == pytest.approx(ours["unclipped"].iloc[:-1].mean())
        assert list(ours.columns) == ["metric", "from_baseline", "unclipped"]
        assert "de_nsig_counts_real" not in ours["metric"].tolist()


def test_vcc_score_example():
    """The three VCC 2025 metrics against the published validation baseline."""
    from cell_eval import score_agg_metrics

    def agg(mae, pds, des):
        results = pl.DataFrame({PERTURBATION_COLUMN: ["A"], "overlap_at_N": [des], "mae": [mae], "discrimination_score_l1": [pds]})
        return results.drop(PERTURBATION_COLUMN).describe()

    user, base = agg(0.030, 0.87, 0.35), agg(0.027, 0.514, 0.106)
    ours = score(_to_pandas(user), _to_pandas(base)).set_index("metric")
    assert ours.index.tolist() == ["mae", "overlap_at_N", "discrimination_score_l1", "avg_score"]
    assert ours.loc["mae", "from_baseline"] == 0.0
    assert ours.loc["mae", "unclipped"] == pytest.approx(1 - 0.030 / 0.027)
    assert ours.loc["overlap_at_N", "from_baseline"] == pytest.approx((0.35 - 0.106) / (1 - 0.106))
    assert ours.loc["discrimination_score_l1", "from_baseline"] == pytest.approx((0.87 - 0.514) / (1 - 0.514))
    assert 100 * ours.loc["avg_score", "from_baseline"] == pytest.approx(33.5, abs=0.1)
    reference = score_agg_metrics(user, base)
    np.testing.assert_allclose(ours["from_baseline"].to_numpy(), reference["from_baseline"].to_numpy(), rtol=1e-12)


def test_score_warns_of_unknown_columns_only(caplog):
    """de_nsig_counts' real/pred columns are known and unscored: no warning on every call; a column
    no metric writes is named."""
    rng = np.random.default_rng(0)
    user, base = (_to_pandas(t) for t in _agg_pair(rng))
    assert "de_nsig_counts_real" in user.columns
    with caplog.at_level(logging.WARNING, logger="vcell"):
        score(user, base)
    assert "not a registered metric" not in caplog.text
    user["mystery"], base["mystery"] = 0.5, 0.5
    with caplog.at_level(logging.WARNING, logger="vcell"):
        score(user, base)
    assert caplog.text.count("not a registered metric") == 1 and "mystery" in caplog.text


def test_score_of_a_profile_scores_its_metrics_alone(caplog):
    """`eval score --profile vcc` on tables of more metrics averaged all of them (the VCC score of a
    full-profile bench's files read 18.55 where its leaderboard said 28.61): a profile scores its own
    metrics, as if the tables held only them; absent ones are said; none is an error."""
    rng = np.random.default_rng(3)
    user, base = (_to_pandas(t) for t in _agg_pair(rng))
    vcc = ["statistic", "mae", "discrimination_score_l1", "overlap_at_N"]
    alone = score(user[[c for c in user.columns if c in vcc]], base[[c for c in base.columns if c in vcc]])
    assert len(score(user, base)) > len(alone) == 4
    pd.testing.assert_frame_equal(score(user, base, profile="vcc"), alone)
    with caplog.at_level(logging.WARNING, logger="vcell"):
        partial = score(user.drop(columns="mae"), base.drop(columns="mae"), profile="vcc")
    assert partial["metric"].tolist() == ["overlap_at_N", "discrimination_score_l1", "avg_score"]
    assert caplog.text.count("no column for 'mae' of profile 'vcc'") == 1
    with pytest.raises(VcellError, match="none of the metrics of profile 'pds'"):
        score(user.drop(columns="discrimination_score_l1"), base.drop(columns="discrimination_score_l1"), profile="pds")


def test_score_rejects_mismatched_tables():
    rng = np.random.default_rng(0)
    user, base = _agg_pair(rng)
    with pytest.raises(VcellError, match="different columns"):
        score(_to_pandas(user), _to_pandas(base.drop("mae")))
    with pytest.raises(VcellError, match="no 'statistic' column"):
        score(_to_pandas(user).drop(columns="statistic"), _to_pandas(base))
    with pytest.raises(VcellError, match="statistic 'median'"):
        score(_to_pandas(user), _to_pandas(base), statistic="median")


def test_csv_is_written_as_cell_eval_writes_it(tmp_path):
    rng = np.random.default_rng(4)
    results = _random_results(rng, 40, ["a", "b", "c"])
    magnitudes = 10.0 ** rng.uniform(-9, 18, 40) * rng.choice([-1, 1], 40)
    results = results.with_columns(pl.Series("d", np.round(magnitudes, int(rng.integers(0, 8)))), pl.Series("e", magnitudes))
    results = results.with_columns(pl.Series("f", [1e-5, 1.5e-5, 3e-7, 1e15, 1e16, 0.0, -0.0, 1.0, 2 / 3, 123456789.0] * 4))
    for table in (results, results.drop(PERTURBATION_COLUMN).describe()):
        ours_path, ref_path = tmp_path / "ours.csv", tmp_path / "ref.csv"
        table.write_csv(ref_path)
        write_csv(_to_pandas(table), ours_path)
        assert ours_path.read_text() == ref_path.read_text()
        back = read_csv(ref_path)
        _assert_frames_equal(table, back, rel=0)
