"""``--profile vcc2026``: parity with cell-eval2 0.20.0 (preset ``vcc2026``) and behaviour.

The oracle is cell-eval2 itself (test extra, with pdex), called in-process through its CLI entry
point ``cell_eval2.cli.main`` so its files are the ones a user gets. cell-eval2 needs the
prediction to carry control rows: every oracle run gets the reference's control cells appended,
while vcell scores the prediction without them (it ignores a prediction's controls).

Parity: every per-perturbation value of every metric and every aggregate within 1e-9, on
(a) Papalexi THP-1 raw counts with its real targets, (b) Kang raw counts with stimulation x cell
type as perturbations and --no-target-genes, (c) a simulated pair whose perturbations are
measured genes, (d) edge cases (one-cell groups, a pasted-control prediction, an empty predicted
group, ties, a gene absent from the controls, lfc gates below 10 genes, and a panel where no
perturbation reaches the lfc gate); the baseline and replicate-anchor aggregates
and the final scaled score on the simulated reference. Behaviour: bad inputs through the real CLI
(exit 2, one ``error:`` line, nothing written) and a two-context reference scored per context
and averaged.

Data is kept small (the whole file runs in well under two minutes on two cores).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import KANG, PAPALEXI, error_line, real_data, run_cli

TOL = 1e-9
CONTROL = "non-targeting"
PERT_COL = "target_gene"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _write(path: Path, X, labels, genes, pert_col: str = PERT_COL, obs: dict | None = None, categorical: bool = True) -> Path:
    """An .h5ad of raw counts (float32 CSR) with one label per row."""
    X = sp.csr_matrix(np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32))
    labels = np.asarray(labels, dtype=object).astype(str)
    frame = pd.DataFrame({pert_col: pd.Categorical(labels) if categorical else labels},
                         index=[f"{path.stem}_{i}" for i in range(len(labels))])
    for k, v in (obs or {}).items():
        frame[k] = v
    a = ad.AnnData(X, obs=frame, var=pd.DataFrame(index=pd.Index([str(g) for g in genes])))
    a.write_h5ad(path)
    return path


def _with_controls(pred: Path, real: Path, out: Path, pert_col: str = PERT_COL, control: str = CONTROL) -> Path:
    """The prediction with the reference's control cells appended (cell-eval2 requires them)."""
    p, r = ad.read_h5ad(pred), ad.read_h5ad(real)
    ctrl = r[r.obs[pert_col].astype(str) == control]
    X = sp.vstack([sp.csr_matrix(p.X), sp.csr_matrix(ctrl.X)]).tocsr()
    labels = np.concatenate([p.obs[pert_col].astype(str).to_numpy(), ctrl.obs[pert_col].astype(str).to_numpy()])
    return _write(out, X, labels, p.var_names, pert_col)


def _oracle(*argv) -> None:
    """cell-eval2's command line, in-process."""
    from cell_eval2.cli import main

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some cells have zero counts")     # the edge prediction's empty cells
        main([str(a) for a in argv])


def _oracle_run(pred: Path, real: Path, out: Path, *extra, pert_col: str = PERT_COL, control: str = CONTROL) -> Path:
    """``cell-eval2 run --preset vcc2026`` on the prediction with the reference's controls appended."""
    full = _with_controls(pred, real, out.parent / f"{out.name}_pred_wc.h5ad", pert_col, control)
    _oracle("run", "-ap", full, "-ar", real, "--preset", "vcc2026", "--pert-col", pert_col, "--control", control,
            "-o", out, *extra)
    return out


def _vcell_run(pred: Path, real: Path, out: Path, **opts) -> dict:
    from vcell.eval.vcc2026.files import Options, run

    return run(pred, real, out, Options(**opts))


def _read_results(path: Path) -> pd.DataFrame:
    # missing values in the value column only: a perturbation may be named "nan" or "NA"
    return pd.read_csv(path, dtype={"perturbation": str, "metric": str}, keep_default_na=False, na_values={"value": ["NaN", "nan", ""]})


def _close(a, b, tol: float = TOL) -> np.ndarray:
    """Element-wise: both NaN, or equal within ``tol`` (infinities must match exactly)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (np.isnan(a) & np.isnan(b)) | (a == b) | (np.abs(a - b) <= tol)


def assert_results_equal(mine: Path, theirs: Path, mine_name: str = "results.csv", theirs_name: str = "results.csv") -> pd.DataFrame:
    """Every (perturbation, metric) row on both sides, values within 1e-9 (NaN where NaN)."""
    a, b = _read_results(mine / mine_name), _read_results(theirs / theirs_name)
    assert len(a) and not a.duplicated(["perturbation", "metric"]).any()
    m = a.merge(b, on=["perturbation", "metric"], how="outer", suffixes=("", "_o"), indicator=True)
    only = m[m["_merge"] != "both"]
    assert only.empty, f"rows on one side only:\n{only.head(20)}"
    ok = _close(m["value"], m["value_o"])
    assert ok.all(), f"values differ:\n{m.loc[~ok, ['perturbation', 'metric', 'value', 'value_o']].head(20)}"
    return m


def assert_agg_equal(mine: Path, theirs: Path) -> None:
    """Every statistic of every metric of two wide aggregate tables within 1e-9."""
    a = pd.read_csv(mine).set_index("statistic")
    b = pd.read_csv(theirs).set_index("statistic")
    assert sorted(a.columns) == sorted(b.columns)
    assert list(a.index) == list(b.index)
    b = b[a.columns]
    ok = _close(a.to_numpy(), b.to_numpy())
    bad = [(a.index[i], a.columns[j], a.iat[i, j], b.iat[i, j]) for i, j in zip(*np.nonzero(~ok), strict=True)]
    assert not bad, f"aggregates differ (statistic, metric, vcell, cell-eval2): {bad[:10]}"


def assert_no_infinity(out: Path) -> None:
    """No +-inf anywhere in vcell's tables: fold changes cannot be infinite (the pseudocount is 1e-9
    and every tested gene has a control mean above 5 CPM), so no metric inherits one."""
    res = _read_results(out / "results.csv")
    assert not np.isinf(res["value"].to_numpy()).any()
    agg = pd.read_csv(out / "agg_results.csv").set_index("statistic")
    assert not np.isinf(agg.to_numpy(dtype=np.float64)).any()


def _poisson_like(X: np.ndarray, rows: np.ndarray, n: int, rng: np.random.Generator, jitter: float = 0.3) -> np.ndarray:
    """``n`` cells of Poisson counts around the mean of ``rows`` with a per-gene log-normal jitter."""
    m = X[rows].mean(axis=0) * np.exp(rng.normal(0.0, jitter, X.shape[1]))
    return rng.poisson(m, size=(n, X.shape[1])).astype(np.float32)


def _simulated(seed: int, n_perts: int, cells: int, n_genes: int, n_controls: int, n_contexts: int = 1):
    import vcell

    a = vcell.simulate_perturbseq(seed=seed, n_genes=n_genes, n_perturbations=n_perts, n_combinations=0, n_contexts=n_contexts,
                                  cells_per_perturbation=cells, n_controls=n_controls)
    return (sp.csr_matrix(a.X).toarray().astype(np.float32), a.obs[PERT_COL].astype(str).to_numpy(),
            a.var_names.copy(), a.obs["cell_type"].astype(str).to_numpy())


def _oracle_module():
    return pytest.importorskip("cell_eval2", reason="cell-eval2 0.20.0 (test extra, with pdex) is the oracle of the vcc2026 profile; not installed")


# --------------------------------------------------------------------------------------------
# (c) + (d) + scale: one simulated reference with edge cases built in
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A simulated reference (30 perturbations named by measured genes, ~40 cells, 500 genes,
    150 controls) with edge cases, an honest prediction and an edge-case prediction."""
    d = tmp_path_factory.mktemp("vcc2026_sim")
    X, labels, genes, _ = _simulated(seed=6, n_perts=30, cells=40, n_genes=500, n_controls=150)
    perts = sorted(set(labels) - {CONTROL})
    assert set(perts) <= set(genes)
    # two perturbations with identical real cells (ties among the real effects)
    dup, src = perts[1], perts[2]
    X = np.vstack([X[labels != dup], X[labels == src]])
    labels = np.concatenate([labels[labels != dup], np.full((labels == src).sum(), dup, dtype=object)])
    ctrl = labels == CONTROL
    # a well expressed gene (no target) absent from every control cell
    expressed = np.argsort(-X[~ctrl].sum(axis=0))
    absent = int(next(g for g in expressed if genes[g] not in set(perts)))
    X[ctrl, absent] = 0.0
    real = _write(d / "real.h5ad", X, labels, genes)
    # the edge reference: besides, one perturbation keeps a single cell (cell-eval2's anchor refuses
    # such a reference, so the scale ends are computed on the one above)
    one = perts[0]
    keep = np.setdiff1d(np.arange(len(labels)), np.flatnonzero(labels == one)[1:])
    real_edge = _write(d / "real_edge.h5ad", X[keep], labels[keep], genes)

    rng = np.random.default_rng(1)
    rows, obs = [], []
    for p in perts:
        rows.append(_poisson_like(X, np.flatnonzero(labels == p), 30, rng))
        obs += [p] * 30
    honest = _write(d / "pred_honest.h5ad", np.vstack(rows), obs, genes)

    rows, obs = [], []
    pasted = perts[3:5]          # the reference's control cells pasted: zero effect, all distances tie
    same = perts[5:8]            # one identical block for three perturbations
    single = perts[8]            # a single predicted cell
    empty = perts[9]             # three cells without a count
    block = _poisson_like(X, np.flatnonzero(labels == perts[5]), 25, rng)
    for p in perts:
        if p in pasted:
            Y = X[ctrl]
        elif p in same:
            Y = block
        elif p == single:
            Y = _poisson_like(X, np.flatnonzero(labels == p), 1, rng)
        elif p == empty:
            Y = np.zeros((3, X.shape[1]), np.float32)
        else:
            Y = _poisson_like(X, np.flatnonzero(labels == p), 20, rng)
        rows.append(Y)
        obs += [p] * len(Y)
    order = rng.permutation(sum(len(r) for r in rows))      # rows shuffled, labels as plain strings
    edge = _write(d / "pred_edge.h5ad", np.vstack(rows)[order], np.asarray(obs, dtype=object)[order], genes, categorical=False)
    return {"dir": d, "real": real, "real_edge": real_edge, "honest": honest, "edge": edge, "perts": perts, "genes": genes, "one": one,
            "dup": dup, "src": src, "absent": genes[absent], "pasted": pasted, "same": same, "single": single, "empty": empty}


@pytest.fixture(scope="module")
def sim_oracle(sim):
    """cell-eval2 on the simulated reference: the honest run with its anchor, the edge run, the baseline, the score."""
    _oracle_module()
    d = sim["dir"]
    honest = _oracle_run(sim["honest"], sim["real"], d / "ce2_honest", "--anchor")
    edge = _oracle_run(sim["edge"], sim["real_edge"], d / "ce2_edge")
    base = d / "ce2_base"
    _oracle("baseline", "-ar", sim["real"], "--preset", "vcc2026", "--pert-col", PERT_COL, "-o", base)
    _oracle("score", "--user-agg", honest / "agg_results.csv", "--baseline-agg", base / "baseline_agg.csv",
            "--anchor", honest, "-o", d / "ce2_score.csv")
    return {"honest": honest, "edge": edge, "base": base, "score": d / "ce2_score.csv"}


@pytest.fixture(scope="module")
def sim_vcell(sim):
    """vcell on the simulated reference: both runs, the scale ends, the score."""
    from vcell.eval.vcc2026.files import Options, scale_ends
    from vcell.eval.vcc2026.score_files import score

    d = sim["dir"]
    _vcell_run(sim["honest"], sim["real"], d / "v_honest")
    _vcell_run(sim["edge"], sim["real_edge"], d / "v_edge")
    scale_ends(sim["real"], d / "v_scale", Options())
    table = score(d / "v_honest", d / "v_scale", d / "v_score.csv")
    return {"honest": d / "v_honest", "edge": d / "v_edge", "scale": d / "v_scale", "score": table}


def test_simulated_parity(sim, sim_oracle, sim_vcell):
    """(c) perturbations that are measured genes: every value and aggregate as cell-eval2."""
    m = assert_results_equal(sim_vcell["honest"], sim_oracle["honest"])
    assert_agg_equal(sim_vcell["honest"] / "agg_results.csv", sim_oracle["honest"] / "agg_results.csv")
    assert_no_infinity(sim_vcell["honest"])
    # every perturbation is scored on the five per-perturbation scored metrics
    scored = m[m["metric"] == "pds_cosine"]
    assert set(scored["perturbation"]) == set(sim["perts"])
    # the prediction is informative: far above the 0.5 of a random ranking
    assert scored["value"].mean() > 0.8


def test_edge_case_parity(sim, sim_oracle, sim_vcell):
    """(d) one-cell groups on both sides, pasted controls, identical predictions, real effects that
    tie, a gene absent from the controls, lfc gates under 10 genes: still cell-eval2's numbers."""
    m = assert_results_equal(sim_vcell["edge"], sim_oracle["edge"])
    assert_agg_equal(sim_vcell["edge"] / "agg_results.csv", sim_oracle["edge"] / "agg_results.csv")
    assert_no_infinity(sim_vcell["edge"])
    v = m.pivot(index="perturbation", columns="metric", values="value")
    n = len(sim["perts"])
    # every perturbation is scored, the one-cell reference group and the one-cell prediction too
    assert v["pds_cosine"].notna().all() and len(v) == n
    assert v.loc[[sim["one"], sim["single"]], "de_wilcoxon_sig_jaccard"].notna().all()
    # a zero predicted effect is at cosine distance 1 from every real effect: all tie, midrank 0.5
    for p in sim["pasted"]:
        assert v.loc[p, "pds_cosine"] == pytest.approx(0.5, abs=1e-12)
    # the duplicated real effect ties with its source: neither can rank above a midrank of the pair
    assert v.loc[sim["src"], "pds_cosine"] <= 1.0 - 0.5 / (n - 1) + 1e-12
    # the gene absent from the controls is measured elsewhere but fails the 5 CPM gate of the tests
    from vcell.eval.vcc2026.evaluate import resolve_targets, summarise_reference
    from vcell.eval.vcc2026.inputs import read_cells

    real = read_cells(sim["real_edge"], PERT_COL)
    col = real.genes.get_loc(sim["absent"])
    assert real.X[real.labels == CONTROL][:, col].nnz == 0 and real.X[real.labels != CONTROL][:, col].nnz > 0
    ref = summarise_reference(real, CONTROL, sim["perts"], resolve_targets(sim["perts"], real.genes))
    assert not ref.ctrl.keep[col] and ref.ctrl.keep.sum() > 100
    # the lfc gate leaves some perturbations out (fewer than 10 significant genes), the same ones
    nmae = set(m.loc[m["metric"] == "de_wilcoxon_lfc_nmae", "perturbation"])
    assert 0 < len(nmae) < n


def test_no_lfc_gate_anywhere(tmp_path):
    """(d) every perturbation below the lfc gate: no fold-change error row, the column still in the aggregate."""
    _oracle_module()
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(40)]
    base = rng.uniform(20, 30, len(genes))
    rows, labels = [rng.poisson(base, size=(60, len(genes)))], [CONTROL] * 60
    for k, p in enumerate(genes[:4]):
        m = base.copy()
        j = 4 + 4 * k      # counts moved between four genes: library size kept, at most 4 significant genes
        m[j] += m[j + 1:j + 4].sum()
        m[j + 1:j + 4] = 0.2
        rows.append(rng.poisson(m, size=(30, len(genes))))
        labels += [p] * 30
    X = np.vstack(rows).astype(np.float32)
    real = _write(tmp_path / "real.h5ad", X, labels, genes)
    pred = _write(tmp_path / "pred.h5ad", X[60:], labels[60:], genes)
    oracle = _oracle_run(pred, real, tmp_path / "ce2")
    _vcell_run(pred, real, tmp_path / "v")
    m = assert_results_equal(tmp_path / "v", oracle)
    assert "de_wilcoxon_lfc_nmae" not in set(m["metric"])
    assert_agg_equal(tmp_path / "v" / "agg_results.csv", oracle / "agg_results.csv")


def test_prediction_controls_ignored(sim, sim_vcell, tmp_path):
    """A prediction's own control rows change nothing: the reference's controls are the origin."""
    full = _with_controls(sim["honest"], sim["real"], tmp_path / "pred_wc.h5ad")
    _vcell_run(full, sim["real"], tmp_path / "out")
    assert_results_equal(tmp_path / "out", sim_vcell["honest"])
    assert_agg_equal(tmp_path / "out" / "agg_results.csv", sim_vcell["honest"] / "agg_results.csv")


def test_baseline_parity(sim, sim_oracle, sim_vcell):
    """The mean-response baseline scored: per perturbation and aggregated, as cell-eval2 baseline."""
    assert_results_equal(sim_vcell["scale"], sim_oracle["base"], "baseline_results.csv", "baseline_results.csv")
    assert_agg_equal(sim_vcell["scale"] / "baseline_agg_results.csv", sim_oracle["base"] / "baseline_agg.csv")


def test_anchor_parity(sim, sim_oracle, sim_vcell):
    """The split-half replicate anchor: every split's aggregate and the replicate mean over splits."""
    mine = pd.read_csv(sim_vcell["scale"] / "anchor_agg.csv").set_index("metric")
    theirs = pd.read_parquet(sim_oracle["honest"] / "anchor_agg.parquet").set_index("metric")
    assert sorted(mine.index) == sorted(theirs.index)
    theirs = theirs.loc[mine.index]
    for col in ("replicate", "replicate_sd", "replicate_min", "replicate_max"):
        ok = _close(mine[col], theirs[col])
        assert ok.all(), f"{col}: vcell {mine.loc[~ok, col].to_dict()} cell-eval2 {theirs.loc[~ok, col].to_dict()}"
    splits = pd.read_csv(sim_vcell["scale"] / "anchor_splits.csv")
    osplits = pd.read_parquet(sim_oracle["honest"] / "anchor_splits.parquet")
    j = splits.merge(osplits, on=["split_index", "metric"], suffixes=("", "_o"), how="outer", indicator=True)
    assert (j["_merge"] == "both").all() and j["split_index"].nunique() == 5
    assert (j["seed"] == j["seed_o"]).all()
    assert _close(j["value"], j["value_o"]).all()
    assert _close(j["n_perturbations"], j["n_perturbations_o"], 0).all()
    assert j["n_perturbations"].max() <= len(sim["perts"])


def test_score_parity(sim, sim_oracle, sim_vcell):
    """The scaled score of every metric and avg_score: cell-eval2 score's from_replicate and from_baseline."""
    theirs = pd.read_csv(sim_oracle["score"]).set_index("metric")
    mine = sim_vcell["score"].set_index("metric")
    assert set(theirs.index) == set(mine.index) == set(pd.read_csv(sim["dir"] / "v_score.csv")["metric"])
    theirs = theirs.loc[mine.index]
    assert _close(mine["score"], theirs["from_replicate"]).all(), pd.concat([mine["score"], theirs["from_replicate"]], axis=1)
    assert _close(mine["from_baseline"], theirs["from_baseline"]).all()
    assert math.isfinite(mine.loc["avg_score", "score"])
    assert mine.loc["avg_score", "score"] == pytest.approx(mine.drop("avg_score")["score"].mean(), abs=1e-12)


# --------------------------------------------------------------------------------------------
# (a) Papalexi THP-1 and (b) Kang IFN-beta, real raw counts
# --------------------------------------------------------------------------------------------


#: Knockouts with a visible effect on the file's 290 genes (the IFN-gamma pathway and a few more).
PAPALEXI_TARGETS = ("BRD4", "CUL3", "IFNGR1", "IFNGR2", "IRF1", "JAK2", "SMAD4", "STAT1", "STAT2")


@pytest.fixture(scope="module")
def papalexi(tmp_path_factory):
    """Up to 9 knockouts (150 reference + 40 other predicted cells each), up to 400 controls, all
    290 genes.

    The knockouts barely move these 290 random genes: with fewer cells the panel's summed unbiased
    distance comes out negative and cell-eval2 refuses the reference ("no measurable aggregate
    effect"), hence 150 cells of targets with an effect. The file's genes include no target, so
    each target's name is given to one measured, well expressed gene: the labels then name genes
    and the target-gene exclusion is active on both sides (cell-eval2 matches labels to var names
    the same way)."""
    data = ad.read_h5ad(real_data(PAPALEXI))
    d = tmp_path_factory.mktemp("vcc2026_papalexi")
    rng = np.random.default_rng(0)
    lab = data.obs["target"].astype(str).to_numpy()
    sizes = pd.Series(lab).value_counts()
    targets = [t for t in PAPALEXI_TARGETS if sizes.get(t, 0) >= 190]
    assert len(targets) >= 6
    X = sp.csr_matrix(data.X)
    ctrl = np.flatnonzero(lab == CONTROL)
    ref_rows, pred_rows = [rng.choice(ctrl, min(400, ctrl.size), replace=False)], []
    for t in targets:
        r = rng.permutation(np.flatnonzero(lab == t))
        ref_rows.append(r[:150])
        pred_rows.append(r[150:190])
    ref_rows, pred_rows = np.concatenate(ref_rows), np.concatenate(pred_rows)
    genes = data.var_names.astype(str).to_numpy().copy()
    assert not set(targets) & set(genes)
    expressed = np.argsort(-np.asarray(X[ref_rows].sum(axis=0)).ravel())
    genes[expressed[5:5 + len(targets)]] = targets
    real = _write(d / "real.h5ad", X[ref_rows], lab[ref_rows], genes, "target")
    pred = _write(d / "pred.h5ad", X[pred_rows], lab[pred_rows], genes, "target")
    return {"dir": d, "real": real, "pred": pred, "targets": targets, "genes": pd.Index(genes)}


def test_papalexi_parity(papalexi):
    """(a) real CRISPR knockouts on raw counts, targets excluded by name: cell-eval2's numbers."""
    _oracle_module()
    from vcell.eval.vcc2026.evaluate import resolve_targets

    d = papalexi["dir"]
    oracle = _oracle_run(papalexi["pred"], papalexi["real"], d / "ce2", pert_col="target")
    _vcell_run(papalexi["pred"], papalexi["real"], d / "v", pert_col="target")
    assert_results_equal(d / "v", oracle)
    assert_agg_equal(d / "v" / "agg_results.csv", oracle / "agg_results.csv")
    assert_no_infinity(d / "v")
    # the exclusion is active: every label names a gene, and excluding nothing changes the numbers
    assert (resolve_targets(papalexi["targets"], papalexi["genes"]).cols >= 0).all()
    _vcell_run(papalexi["pred"], papalexi["real"], d / "v_none", pert_col="target", no_target_genes=True)
    a, b = _read_results(d / "v" / "results.csv"), _read_results(d / "v_none" / "results.csv")
    j = a.merge(b, on=["perturbation", "metric"], suffixes=("", "_none"))
    diff = (j["value"] - j["value_none"]).abs()
    assert diff[j["metric"] == "expr_mse_unbiased"].max() > 1e-6


@pytest.fixture(scope="module")
def kang(tmp_path_factory):
    """Stimulation x cell type as perturbations (labels are not genes), CTRL CD14 monocytes as the
    control group; up to 25 reference cells per group, 20 predicted cells bootstrapped from the
    group; the 600 genes with the most counts."""
    data = ad.read_h5ad(real_data(KANG))
    d = tmp_path_factory.mktemp("vcc2026_kang")
    rng = np.random.default_rng(0)
    group = (data.obs["stim"].astype(str) + "_" + data.obs["seurat_annotations"].astype(str)).to_numpy()
    group[group == "CTRL_CD14 Mono"] = "control"
    sizes = pd.Series(group).value_counts()
    groups = sorted(g for g in sizes.index if g != "control" and sizes[g] >= 8)
    assert len(groups) >= 6
    ctrl = np.flatnonzero(group == "control")
    ref_rows = [rng.choice(ctrl, min(60, ctrl.size), replace=False)]
    pred_rows = []
    for g in groups:
        rows = np.flatnonzero(group == g)
        ref_rows.append(rng.choice(rows, min(25, rows.size), replace=False))
        pred_rows.append(rng.choice(rows, 20, replace=True))
    ref_rows, pred_rows = np.concatenate(ref_rows), np.concatenate(pred_rows)
    X = sp.csr_matrix(data.X)
    top = np.sort(np.argsort(-np.asarray(X[ref_rows].sum(axis=0)).ravel())[:600])
    X = X[:, top]
    genes = data.var_names[top]
    real = _write(d / "real.h5ad", X[ref_rows], group[ref_rows], genes, "group")
    pred = _write(d / "pred.h5ad", X[pred_rows], group[pred_rows], genes, "group")
    return {"dir": d, "real": real, "pred": pred, "groups": groups}


def test_kang_parity(kang):
    """(b) cytokine stimulation per cell type, --no-target-genes, another pert column and control label."""
    _oracle_module()
    d = kang["dir"]
    oracle = _oracle_run(kang["pred"], kang["real"], d / "ce2", "--no-target-genes", pert_col="group", control="control")
    _vcell_run(kang["pred"], kang["real"], d / "v", pert_col="group", control="control", no_target_genes=True)
    m = assert_results_equal(d / "v", oracle)
    assert_agg_equal(d / "v" / "agg_results.csv", oracle / "agg_results.csv")
    assert_no_infinity(d / "v")
    assert set(m["perturbation"]) == set(kang["groups"])
    # labels that are not genes are refused unless declared so
    from vcell.errors import VcellError

    with pytest.raises(VcellError, match="no-target-genes"):
        _vcell_run(kang["pred"], kang["real"], d / "v_refused", pert_col="group", control="control")
    assert not (d / "v_refused" / "results.csv").exists()


def test_kang_scale_parity(kang):
    """The baseline of a panel without target genes (nothing left out of the mean response)."""
    _oracle_module()
    from vcell.eval.vcc2026.files import Options, scale_ends

    d = kang["dir"]
    _oracle("baseline", "-ar", kang["real"], "--preset", "vcc2026", "--pert-col", "group", "--control", "control",
            "--no-target-genes", "-o", d / "ce2_base")
    scale_ends(kang["real"], d / "v_scale", Options(pert_col="group", control="control", no_target_genes=True), anchor=False)
    assert_results_equal(d / "v_scale", d / "ce2_base", "baseline_results.csv", "baseline_results.csv")
    assert_agg_equal(d / "v_scale" / "baseline_agg_results.csv", d / "ce2_base" / "baseline_agg.csv")


# --------------------------------------------------------------------------------------------
# bad inputs through the real CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 perturbations x 5 cells + 10 controls x 20 genes, integer counts."""
    d = tmp_path_factory.mktemp("vcc2026_tiny")
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(20)]
    perts = genes[:3]          # perturbations named by genes
    real_labels = [CONTROL] * 10 + [p for p in perts for _ in range(5)]
    # each perturbation raises six genes eightfold: a panel with a clear effect (a panel without
    # one has no expr_mse_unbiased_capped_norm, and is refused, as by cell-eval2)
    lam = np.full((4, 20), 5.0)
    for k in range(3):
        lam[k + 1, 6 + 4 * k:12 + 4 * k] = 40.0
    X = rng.poisson(lam[[0] * 10 + [k + 1 for k in range(3) for _ in range(5)]]).astype(np.float32)
    pred_labels = [p for p in perts for _ in range(5)]
    P = rng.poisson(lam[[k + 1 for k in range(3) for _ in range(5)]]).astype(np.float32)
    files = {"real": _write(d / "real.h5ad", X, real_labels, genes), "pred": _write(d / "pred.h5ad", P, pred_labels, genes)}
    big = P.copy()
    big[4, 3] = 2e6
    cases = {
        "log1p": (np.log1p(P), pred_labels, genes, None),
        "fractional": (P + 0.5, pred_labels, genes, None),
        "expected_counts": (P * 40 + 0.37, pred_labels, genes, None),
        "over_1e6": (big, pred_labels, genes, None),
        "missing_pert": (P[:10], pred_labels[:10], genes, None),
        "gene_order": (P[:, ::-1], pred_labels, genes[::-1], None),
        "genes_missing": (P[:, :-2], pred_labels, genes[:-2], None),
    }
    unlabelled = pd.Categorical([None, *pred_labels[1:]], categories=perts)  # one cell without a label
    cases["unlabelled"] = (P, pred_labels, genes, {PERT_COL: unlabelled})
    cases["lower_case"] = (P, [p.lower() for p in pred_labels], genes, None)
    for name, (Y, labels, g, obs) in cases.items():
        files[name] = _write(d / f"pred_{name}.h5ad", Y, labels, g, obs=obs)
    files["no_controls"] = _write(d / "real_no_controls.h5ad", X[10:], real_labels[10:], genes)
    files["real_unlabelled"] = _write(d / "real_unlabelled.h5ad", X, real_labels, genes,
                                      obs={PERT_COL: pd.Categorical([*real_labels[:-1], None], categories=[CONTROL, *perts])})
    files["real_ctx"] = _write(d / "real_ctx.h5ad", X, real_labels, genes, obs={"context": ["A"] * len(real_labels)})
    other = [f"H{i:02d}" for i in range(20)]  # a panel without the targets: no label names a measured gene
    files["real_unmeasured"] = _write(d / "real_unmeasured.h5ad", X, real_labels, other)
    files["unmeasured"] = _write(d / "pred_unmeasured.h5ad", P, pred_labels, other)
    return d, files


BAD = {
    # case: (prediction, reference, words of the error line)
    "log1p": ("log1p", "real", "not an integer"),
    "fractional": ("fractional", "real", "(log-normalised values, or expected counts?"),
    "expected_counts": ("expected_counts", "real", "integral draws: `vcell predict --output counts`"),
    "over_1e6": ("over_1e6", "real", "more than"),
    "missing_pert": ("missing_pert", "real", "G02"),
    "gene_order": ("gene_order", "real", "writes a prediction in a list's order"),
    "genes_missing": ("genes_missing", "real", "missing"),
    "no_controls": ("pred", "no_controls", "control"),
    "context_absent_from_pred": ("pred", "real_ctx", "context"),
    "targets_unmeasured": ("unmeasured", "real_unmeasured", "--no-target-genes"),
    "unlabelled": ("unlabelled", "real", "1 cell(s) without a perturbation label (first: cell 0)"),  # was dropped in silence
    "lower_case": ("lower_case", "real", "'g00' (did you mean 'G00'?)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_cli(tiny, tmp_path, case):
    """Exit 2, one ``error:`` line naming the problem, no traceback, nothing in --out."""
    d, files = tiny
    pred, real, words = BAD[case]
    out = tmp_path / "out"
    proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", files[pred], "--real", files[real], "--out", out)
    line = error_line(proc)
    assert words in line, line
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_a_log1p_file_with_its_counts_beside_x_says_where_they_are(tiny, tmp_path):
    """scanpy's layout (log1p X, counts in layers['counts'] and .raw) was refused as 'log-normalised
    values?' without a word of the counts the file holds."""
    _, files = tiny
    a = ad.read_h5ad(files["pred"])
    a.layers["counts"] = a.X.copy()
    a.raw = a.copy()
    a.X = a.X.log1p()
    a.write_h5ad(tmp_path / "scanpy.h5ad")
    proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", tmp_path / "scanpy.h5ad", "--real", files["real"],
                   "--out", tmp_path / "out")
    assert ("the file also holds layers['counts'], raw.X: if those are the raw counts, put them in X "
            "(adata.X = adata.layers['counts'])") in error_line(proc)


def test_an_unlabelled_reference_cell_is_refused_by_the_baseline(tiny, tmp_path):
    """The scale's two ends are not computed on a reference with a cell dropped in silence."""
    _, files = tiny
    out = tmp_path / "scale"
    proc = run_cli("eval", "baseline", "--profile", "vcc2026", "--real", files["real_unlabelled"], "--out", out)
    assert "1 cell(s) without a perturbation label (first: cell 24)" in error_line(proc)
    assert not out.exists() or not any(out.iterdir())


def test_several_predictions_are_checked_before_any_work(tiny, tmp_path):
    """A bad prediction among several stops the run before the reference is read: nothing written.
    Two files of one name would share a folder."""
    _, files = tiny
    out = tmp_path / "out"
    bad = run_cli("eval", "run", "--profile", "vcc2026", "--pred", files["pred"], "--pred", files["lower_case"],
                  "--real", files["real"], "--out", out)
    assert "did you mean 'G00'" in error_line(bad) and not out.exists()
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / Path(files["pred"]).name
    twin.write_bytes(Path(files["pred"]).read_bytes())
    same = run_cli("eval", "run", "--profile", "vcc2026", "--pred", files["pred"], "--pred", twin, "--real", files["real"], "--out", out)
    assert "would both write to OUT/pred/" in error_line(same) and not out.exists()
    twice = run_cli("eval", "run", "--profile", "vcc2026", "--pred", files["pred"], "--pred", files["pred"], "--real", files["real"],
                    "--out", out)
    assert "is given twice" in error_line(twice) and not out.exists()
    # `eval score` given the folder of several runs (not one run) says which to give
    from vcell.errors import VcellError
    from vcell.eval.run import run_many as run_many_2025
    from vcell.eval.vcc2026.files import Options, run_many, scale_ends

    for bad, words in (({"a/b": files["pred"]}, "prediction name 'a/b' cannot name an output folder"),
                       ({"..": files["pred"]}, "cannot name an output folder"),
                       ({"": files["pred"], "b": twin}, "only for one output")):
        for scorer in (lambda p: run_many(p, files["real"], out, Options()), lambda p: run_many_2025(p, files["real"], out)):
            with pytest.raises(VcellError, match=words):
                scorer(bad)
            assert not out.exists()

    run_many({"a": files["pred"], "b": twin}, files["real"], out, Options())
    scale_ends(files["real"], tmp_path / "scale", Options())
    score = run_cli("eval", "score", "--profile", "vcc2026", "--user", out, "--baseline", tmp_path / "scale")
    assert f"score one of them: --user {out / 'a'}" in error_line(score)


def test_python_api_gives_the_commands_numbers(tmp_path):
    """vcell.evaluate_2026 / scale_2026 / score_2026 on AnnData objects: the files `eval run`,
    `eval baseline` and `eval score` write, to the last digit; several predictions at once too."""
    import vcell
    from vcell.errors import VcellError
    from vcell.eval.vcc2026.files import Options, scale_ends
    from vcell.eval.vcc2026.score_files import score

    X, labels, genes, _ = _simulated(seed=5, n_perts=30, cells=40, n_genes=500, n_controls=150)  # a defined scale
    rng = np.random.default_rng(2)
    perts = sorted(set(labels) - {CONTROL})
    rows = np.vstack([_poisson_like(X, np.flatnonzero(labels == p), 15, rng) for p in perts])
    files = {"real": _write(tmp_path / "real.h5ad", X, labels, genes),
             "pred": _write(tmp_path / "pred.h5ad", rows, np.repeat(perts, 15), genes)}
    pred, real = ad.read_h5ad(files["pred"]), ad.read_h5ad(files["real"])
    res, agg = vcell.evaluate_2026(pred, real, pert_col=PERT_COL, control=CONTROL)
    out = tmp_path / "run"
    _vcell_run(files["pred"], files["real"], out, pert_col=PERT_COL, control=CONTROL)
    pd.testing.assert_frame_equal(res.reset_index(drop=True), _read_results(out / "results.csv"), check_dtype=False)
    pd.testing.assert_frame_equal(agg, pd.read_csv(out / "agg_results.csv"), check_dtype=False)
    doubled = pred.copy()
    doubled.X = doubled.X * 2
    both = vcell.evaluate_2026({"a": pred, "b": doubled}, real, pert_col=PERT_COL, control=CONTROL)
    pd.testing.assert_frame_equal(both["a"].agg, agg)  # named as vcell.evaluate's result names them
    pd.testing.assert_frame_equal(both["a"].results, res)
    pd.testing.assert_frame_equal(both["b"][1], vcell.evaluate_2026(doubled, real, pert_col=PERT_COL, control=CONTROL).agg)
    scale = vcell.scale_2026(real, pert_col=PERT_COL, control=CONTROL)
    scale_ends(files["real"], tmp_path / "scale", Options(pert_col=PERT_COL, control=CONTROL))
    table = vcell.score_2026(agg, scale)
    expected = score(out, tmp_path / "scale")
    np.testing.assert_allclose(table["score"].to_numpy(float), expected["score"].to_numpy(float), rtol=0, atol=1e-12)

    # scanpy's layout: log1p in X, the counts in layers['counts']; layer= reads them, its absence is hinted at
    layered = real.copy()
    layered.layers["counts"] = real.X.copy()
    layered.X = layered.X.copy()
    layered.X.data = np.log1p(layered.X.data / 7).astype(np.float32)
    with pytest.raises(VcellError, match=r"real: .*not an integer.*pass layer='counts'"):
        vcell.evaluate_2026(pred, layered, pert_col=PERT_COL, control=CONTROL)
    pd.testing.assert_frame_equal(vcell.evaluate_2026(pred, layered, pert_col=PERT_COL, control=CONTROL, layer="counts")[1], agg)
    with pytest.raises(VcellError, match=r"real: no layers\['raw'\] \(layers: 'counts'\)"):
        vcell.evaluate_2026(pred, layered, pert_col=PERT_COL, control=CONTROL, layer="raw")
    again = vcell.scale_2026(layered, pert_col=PERT_COL, control=CONTROL, layer="counts")
    pd.testing.assert_frame_equal(again.baseline_agg, scale.baseline_agg)
    # a degenerate scale (replicate at the baseline): an error, as cell-eval2; strict=False scores it NaN
    b, _ = scale.ends()
    rows = scale.anchor.agg["metric"] == "pds_cosine"
    scale.anchor.agg.loc[rows, "replicate"] = b["pds_cosine"]
    with pytest.raises(VcellError, match="pds_cosine"):
        vcell.score_2026(agg, scale)
    loose = vcell.score_2026(agg, scale, strict=False).set_index("metric")
    assert np.isnan(loose.loc["pds_cosine", "score"]) and np.isfinite(loose.loc["avg_score", "score"])
    with pytest.raises(VcellError, match=r"agg: the agg_results DataFrame .* got tuple"):
        vcell.score_2026((res, agg), scale)


def test_tiny_pair_accepted(tiny, tmp_path):
    """The tiny pair itself is accepted (so the failures above are the defects, not the files)."""
    _, files = tiny
    _vcell_run(files["pred"], files["real"], tmp_path / "out")
    assert (tmp_path / "out" / "results.csv").is_file()
    # targets the panel lacks: accepted once declared (nothing to exclude)
    _vcell_run(files["unmeasured"], files["real_unmeasured"], tmp_path / "out2", no_target_genes=True)
    assert (tmp_path / "out2" / "results.csv").is_file()


# --------------------------------------------------------------------------------------------
# several contexts
# --------------------------------------------------------------------------------------------


def test_two_contexts(tmp_path):
    """Contexts scored separately into OUT/A and OUT/B (each as if alone), `score` averaging them."""
    from vcell.eval.vcc2026.files import Options, scale_ends

    # two simulations (seeds whose split halves still carry a positive summed effect, so the
    # replicate end of expr_mse_unbiased_capped_norm is defined) on one gene axis
    XA, labels_a, genes, _ = _simulated(seed=5, n_perts=30, cells=40, n_genes=500, n_controls=150)
    XB, labels_b, genes_b, _ = _simulated(seed=6, n_perts=30, cells=40, n_genes=500, n_controls=150)
    assert genes.equals(genes_b)
    X, labels = np.vstack([XA, XB]), np.concatenate([labels_a, labels_b])
    ctx = np.array(["A"] * len(labels_a) + ["B"] * len(labels_b))
    real = _write(tmp_path / "real.h5ad", X, labels, genes, obs={"context": ctx})
    rng = np.random.default_rng(2)
    rows, obs, pctx = [], [], []
    for c in ("A", "B"):
        for p in sorted(set(labels[ctx == c]) - {CONTROL}):
            rows.append(_poisson_like(X, np.flatnonzero((labels == p) & (ctx == c)), 15, rng))
            obs += [p] * 15
            pctx += [c] * 15
    pred = _write(tmp_path / "pred.h5ad", np.vstack(rows), obs, genes, obs={"context": pctx})
    out, scale = tmp_path / "out", tmp_path / "scale"
    proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["A", "B"]
    assert "scored 30 + 30 perturbations in 2 contexts in " in proc.stdout and f"wrote {out}" in proc.stdout, proc.stdout[-500:]
    scale_ends(real, scale, Options())
    assert sorted(p.name for p in scale.iterdir()) == ["A", "B"]
    assert json.loads((scale / "A" / "scale.json").read_text())["context"] == "A"

    # each context is scored as if it were alone: its own controls, its own perturbations
    for c in ("A", "B"):
        sel, psel = ctx == c, np.asarray(pctx) == c
        r1 = _write(tmp_path / f"real_{c}.h5ad", X[sel], labels[sel], genes)
        p1 = _write(tmp_path / f"pred_{c}.h5ad", np.vstack(rows)[psel], np.asarray(obs)[psel], genes)
        _vcell_run(p1, r1, tmp_path / f"alone_{c}")
        assert_results_equal(out / c, tmp_path / f"alone_{c}")
        assert_agg_equal(out / c / "agg_results.csv", tmp_path / f"alone_{c}" / "agg_results.csv")
    # the contexts in vcell's data column (cell_type) but not in --context-col: pooled, and said so
    pooled = _write(tmp_path / "real_cell_type.h5ad", X, labels, genes, obs={"cell_type": ctx})
    proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", pooled, "--out", tmp_path / "pooled")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "column 'cell_type' holds 2 ('A', 'B'): pass --context-col cell_type" in " ".join(proc.stderr.split())

    # several predictions in one run: one pass over the reference, each prediction's files as its own run writes them
    pred2 = _write(tmp_path / "pred2.h5ad", np.vstack(rows)[::-1] * 2, obs[::-1], genes, obs={"context": pctx[::-1]})
    many, alone2 = tmp_path / "many", tmp_path / "alone2"
    proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--pred", pred2, "--real", real, "--out", many)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _vcell_run(pred2, real, alone2)
    assert sorted(p.name for p in many.iterdir()) == ["pred", "pred2"]
    assert "scored 2 predictions x 30 + 30 perturbations in 2 contexts" in proc.stdout and "(pred/, pred2/)" in proc.stdout
    for c in ("A", "B"):
        for f in ("results.csv", "agg_results.csv"):
            assert (many / "pred" / c / f).read_bytes() == (out / c / f).read_bytes()
            assert (many / "pred2" / c / f).read_bytes() == (alone2 / c / f).read_bytes()
    assert (many / "pred" / "A" / "results.csv").read_bytes() != (many / "pred2" / "A" / "results.csv").read_bytes()

    a = _read_results(out / "A" / "results.csv").set_index(["perturbation", "metric"])["value"]
    b = _read_results(out / "B" / "results.csv").set_index(["perturbation", "metric"])["value"]
    assert not np.allclose(a.sort_index().to_numpy(), b.reindex(a.sort_index().index).to_numpy(), equal_nan=True)

    proc = run_cli("eval", "score", "--profile", "vcc2026", "--user", out, "--baseline", scale, "--out", tmp_path / "score.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "score.csv", keep_default_na=False, na_values=["NaN", "nan", ""])
    avg = table[table["metric"] == "avg_score"].set_index("context")["score"]
    assert sorted(avg.index) == ["A", "B", "mean"]
    assert np.isfinite(avg.to_numpy()).all()
    assert avg["A"] != avg["B"]
    assert avg["mean"] == pytest.approx((avg["A"] + avg["B"]) / 2, abs=1e-12)
    # each context's row is its own scale: the mean of its six scored metrics
    for c in ("A", "B"):
        rows_c = table[(table["context"] == c) & (table["metric"] != "avg_score")]
        assert len(rows_c) == 6
        assert avg[c] == pytest.approx(rows_c["score"].mean(), abs=1e-12)


def test_comparison_catches_small_differences(sim, sim_vcell, tmp_path):
    """The parity helpers fail on a 1e-8 change, a missing row and a NaN for a number."""
    res = _read_results(sim_vcell["honest"] / "results.csv")
    for k, change in enumerate((lambda r: r.assign(value=r["value"] + np.where(np.arange(len(r)) == 7, 1e-8, 0.0)),
                                lambda r: r.drop(index=3),
                                lambda r: r.assign(value=np.where(np.arange(len(r)) == 5, np.nan, r["value"])))):
        d = tmp_path / f"m{k}"
        d.mkdir()
        change(res).to_csv(d / "results.csv", index=False)
        with pytest.raises(AssertionError):
            assert_results_equal(sim_vcell["honest"], d)
    agg = pd.read_csv(sim_vcell["honest"] / "agg_results.csv")
    agg.loc[2, "pds_cosine"] += 1e-8
    agg.to_csv(tmp_path / "agg.csv", index=False)
    with pytest.raises(AssertionError):
        assert_agg_equal(sim_vcell["honest"] / "agg_results.csv", tmp_path / "agg.csv")


# --------------------------------------------------------------------------------------------
# what cell-eval2 refuses, vcell refuses (and bench reports instead)
# --------------------------------------------------------------------------------------------


def _null_panel(tmp_path: Path) -> tuple[Path, Path]:
    """A reference whose perturbations change nothing: its corrected effects sum to <= 0."""
    rng = np.random.default_rng(3)
    genes = [f"G{i:02d}" for i in range(60)]
    labels = [CONTROL] * 40 + [g for g in genes[:6] for _ in range(12)]
    X = rng.poisson(8.0, size=(len(labels), len(genes))).astype(np.float32)
    real = _write(tmp_path / "null_real.h5ad", X, labels, genes)
    pred = _write(tmp_path / "null_pred.h5ad", X[40:], labels[40:], genes)
    return real, pred


def test_undefined_panel_ratio_refused(tmp_path):
    """No effect beyond sampling noise: expr_mse_unbiased_capped_norm is undefined; `eval run` says so
    (exit 2, one line, nothing written), the Python scorer in bench mode gives NaN instead."""
    from vcell.eval.vcc2026.evaluate import evaluate_cells, resolve_targets, summarise_reference
    from vcell.eval.vcc2026.inputs import read_cells

    real, pred = _null_panel(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", out)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "expr_mse_unbiased_capped_norm is undefined" in error_line(proc) and "more cells or counts per perturbation" in error_line(proc)
    assert not out.exists()
    cells = read_cells(real, PERT_COL)
    perts = sorted(set(cells.labels) - {CONTROL})
    ref = summarise_reference(cells, CONTROL, perts, resolve_targets(perts, cells.genes))
    values, ratio = evaluate_cells(ref, read_cells(pred, PERT_COL), strict=False)
    assert math.isnan(ratio) and np.isfinite(values["pds_cosine"]).all()


def test_anchor_refuses_single_cell_group(tmp_path):
    """A one-cell perturbation cannot be split in halves: the anchor refuses it (as cell-eval2), naming it."""
    rng = np.random.default_rng(4)
    genes = [f"G{i:02d}" for i in range(30)]
    labels = [CONTROL] * 20 + ["G01"] * 10 + ["G02"]
    lam = np.full((len(labels), len(genes)), 6.0)
    lam[20:30, 5:10] = 40.0
    X = rng.poisson(lam).astype(np.float32)
    real = _write(tmp_path / "real.h5ad", X, labels, genes)
    proc = run_cli("eval", "baseline", "--profile", "vcc2026", "--real", real, "--out", tmp_path / "scale", "--only", "anchor")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "'G02'" in error_line(proc) and "single cell" in error_line(proc)
    assert not (tmp_path / "scale").exists()


# --------------------------------------------------------------------------------------------
# eval prep --profile vcc2026
# --------------------------------------------------------------------------------------------


def test_prep_2026(tiny, tmp_path):
    """The 2026 upload: genes put in the list's order, the listed perturbations and cell counts, no
    control rows, counts kept exactly; every violation one `error:` line and nothing written."""
    d, files = tiny
    src = ad.read_h5ad(files["pred"])
    genes = list(src.var_names)
    (tmp_path / "genes.csv").write_text("\n".join(genes) + "\n")
    counts = src.obs[PERT_COL].astype(str).value_counts()
    # the challenge's list may name its control too: skipped, a submission holds no control rows
    (tmp_path / "perts.csv").write_text("target_gene,n_cells\n" + "".join(f"{p},{n}\n" for p, n in counts.items())
                                        + f"{CONTROL},1000\n")
    shuffled = _write(tmp_path / "shuffled.h5ad", src.X.toarray()[:, ::-1], src.obs[PERT_COL], genes[::-1])
    out = tmp_path / "sub.h5ad"
    proc = run_cli("eval", "prep", "--profile", "vcc2026", "--pred", shuffled, "--genes", tmp_path / "genes.csv",
                   "--perturbations", tmp_path / "perts.csv", "--out", out)
    assert proc.returncode == 0, proc.stderr[-1500:]
    sub = ad.read_h5ad(out)
    assert list(sub.var_names) == genes and sp.issparse(sub.X) and sub.X.dtype == np.float32
    np.testing.assert_array_equal(sub.X.toarray(), src.X.toarray())
    assert list(sub.obs["target_gene"].astype(str)) == list(src.obs[PERT_COL].astype(str))

    wrong_counts = tmp_path / "perts_wrong.csv"
    wrong_counts.write_text("target_gene,n_cells\n" + "".join(f"{p},{n + 1}\n" for p, n in counts.items()))
    extra = tmp_path / "perts_short.csv"
    extra.write_text("target_gene\n" + "".join(f"{p}\n" for p in list(counts.index)[:-1]))
    with_controls = _with_controls(files["pred"], files["real"], tmp_path / "with_controls.h5ad")
    cases = [
        (files["pred"], wrong_counts, "cells, the list asks for"),
        (files["pred"], extra, "not in the list"),
        (with_controls, tmp_path / "perts.csv", "control cell"),
        (files["fractional"], tmp_path / "perts.csv", "not an integer"),
        (files["over_1e6"], tmp_path / "perts.csv", "more than"),
        (files["genes_missing"], tmp_path / "perts.csv", "missing from var"),
    ]
    from vcell.errors import VcellError
    from vcell.eval.vcc2026.submission import prepare_submission_2026

    for pred, perts, words in cases[1:]:  # in-process: the same function the command calls
        target = tmp_path / f"bad_{Path(pred).stem}_{Path(perts).stem}.h5ad"
        with pytest.raises(VcellError, match=words):
            prepare_submission_2026(pred, target, genes=tmp_path / "genes.csv", perturbations=perts)
        assert not target.exists()
    pred, perts, words = cases[0]  # and one through the command line: exit 2, one line, nothing written
    target = tmp_path / "bad_cli.h5ad"
    proc = run_cli("eval", "prep", "--profile", "vcc2026", "--pred", pred, "--genes", tmp_path / "genes.csv",
                   "--perturbations", perts, "--out", target)
    assert proc.returncode == 2, (words, proc.stderr[-1500:])
    assert words in error_line(proc), (words, error_line(proc))
    assert not target.exists()


def test_prep_2026_reads_and_writes_a_block_of_cells_at_a_time(tiny, tmp_path, monkeypatch):
    """Blocks of 4 cells (a full-size submission is ~4 GB as CSR): the file written is the whole
    prediction, genes reordered; a bad value in a later block names the file's row, nothing written."""
    import vcell.eval.vcc2026.submission as submission
    from vcell.errors import VcellError

    monkeypatch.setattr(submission, "CHUNK_CELLS", 4)
    d, files = tiny
    src = ad.read_h5ad(files["pred"])
    genes = list(src.var_names)
    (tmp_path / "genes.csv").write_text("\n".join(genes) + "\n")
    X = src.X.toarray()
    assert X.shape[0] > 3 * 4
    shuffled = _write(tmp_path / "shuffled.h5ad", X[:, ::-1], src.obs[PERT_COL], genes[::-1], obs={"ctx": "c1"})
    out = submission.prepare_submission_2026(shuffled, tmp_path / "sub.h5ad", genes=tmp_path / "genes.csv", context_col="ctx")
    sub = ad.read_h5ad(out)
    assert list(sub.var_names) == genes and sub.X.dtype == np.float32
    np.testing.assert_array_equal(sub.X.toarray(), X)
    assert list(sub.obs["target_gene"].astype(str)) == list(src.obs[PERT_COL].astype(str)) and set(sub.obs["ctx"]) == {"c1"}
    assert sub.uns["vcell"]["prepared_for"] == "vcc2026"
    bad = X.copy()
    bad[13, 2] = 0.5  # in the fourth block
    path = _write(tmp_path / "late.h5ad", bad, src.obs[PERT_COL], genes)
    with pytest.raises(VcellError, match=rf"late\.h5ad: value 0\.5 at row 13 \(a '{src.obs[PERT_COL].astype(str).iloc[13]}' cell\), gene '{genes[2]}'"):
        submission.prepare_submission_2026(path, tmp_path / "late_out.h5ad", genes=tmp_path / "genes.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genes.csv", "late.h5ad", "shuffled.h5ad", "sub.h5ad"]


def test_a_target_gene_map_row_naming_no_perturbation_is_said(tmp_path, caplog):
    """A mistyped perturbation in the map (meant to declare 'no target gene') fell back to the
    label-names-a-gene rule in silence."""
    from vcell.eval.vcc2026.inputs import read_target_map

    path = tmp_path / "map.csv"
    path.write_text("perturbation,gene\nSTAT1,\nIRF1x,IRF1\nSOCS3,SOCS3\n")
    with caplog.at_level("WARNING"):
        mapping = read_target_map(path, ["STAT1", "IRF1", "JAK2"])
    assert mapping == {"STAT1": None, "IRF1x": "IRF1", "SOCS3": "SOCS3"}
    assert "row(s) naming no perturbation of the reference, so unused, that look like typos: 'IRF1x'; did you mean 'IRF1'" in caplog.text
    assert "SOCS3" not in caplog.text  # a row of the screen this reference lacks: no typo, nothing said
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_target_map(path, ["STAT1", "IRF1x"])  # a reference of a subset of the map's screen
    assert "unused" not in caplog.text


def test_prep_2026_says_when_it_drops_a_column_of_several_contexts(tiny, tmp_path, caplog):
    """Written without its contexts, a two-line prediction would be scored as one pooled context:
    prep says which column to keep; with --context-col it is kept and nothing is said."""
    import vcell.eval.vcc2026.submission as submission

    _, files = tiny
    src = ad.read_h5ad(files["pred"])
    (tmp_path / "genes.csv").write_text("\n".join(src.var_names) + "\n")
    lines = np.where(np.arange(src.n_obs) % 2 == 0, "A172", "T98G")
    path = _write(tmp_path / "two.h5ad", src.X.toarray(), src.obs[PERT_COL], list(src.var_names), obs={"cell_type": lines})
    with caplog.at_level("WARNING"):
        submission.prepare_submission_2026(path, tmp_path / "dropped.h5ad", genes=tmp_path / "genes.csv")
    assert "obs column 'cell_type' holds 2 contexts ('A172', 'T98G')" in caplog.text and "--context-col cell_type" in caplog.text
    assert "cell_type" not in ad.read_h5ad(tmp_path / "dropped.h5ad").obs
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = submission.prepare_submission_2026(path, tmp_path / "kept.h5ad", genes=tmp_path / "genes.csv", context_col="cell_type")
    assert "contexts" not in caplog.text
    assert list(ad.read_h5ad(out).obs["cell_type"]) == list(lines)


def test_a_prepared_upload_scores_against_a_reference_whose_column_has_another_name(tiny, tmp_path):
    """prep writes the upload's `target_gene`; a reference with `target` still scores it (the
    switch said once), as the prediction before prep, in files and in memory."""
    from vcell.eval.vcc2026.api import evaluate_2026

    d, files = tiny
    real, pred = ad.read_h5ad(files["real"]), ad.read_h5ad(files["pred"])
    genes = list(real.var_names)
    real_t = _write(tmp_path / "real_t.h5ad", real.X, real.obs[PERT_COL], genes, pert_col="target")
    pred_t = _write(tmp_path / "pred_t.h5ad", pred.X, pred.obs[PERT_COL], genes, pert_col="target")
    (tmp_path / "genes.csv").write_text("\n".join(genes) + "\n")
    sub = tmp_path / "sub.h5ad"
    proc = run_cli("eval", "prep", "--profile", "vcc2026", "--pred", pred_t, "--genes", tmp_path / "genes.csv",
                   "--pert-col", "target", "--out", sub)
    assert proc.returncode == 0, proc.stderr[-1500:]
    runs = {}
    for name, file in {"before": pred_t, "after": sub}.items():
        proc = run_cli("eval", "run", "--profile", "vcc2026", "--pred", file, "--real", real_t, "--pert-col", "target",
                       "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert ("'target_gene', the column of a 2026 upload" in proc.stderr) == (name == "after"), proc.stderr[-800:]
        runs[name] = pd.read_csv(tmp_path / name / "results.csv")
    pd.testing.assert_frame_equal(runs["before"], runs["after"])
    results, _ = evaluate_2026(ad.read_h5ad(sub), ad.read_h5ad(real_t), pert_col="target")
    np.testing.assert_allclose(results["value"], runs["before"]["value"], rtol=0, atol=1e-12)


def test_a_context_whose_every_scale_is_degenerate_scores_nan_quietly():
    """Lenient scoring (bench) of a context where the baseline already equals the replicate on every
    metric: each metric is left out, the context score is NaN, and numpy's empty-slice
    RuntimeWarning does not reach the user; :func:`degenerate` names the metrics left out (the
    bench says so once per scale, not once per model)."""
    from vcell.eval.vcc2026.scale import ORDER, degenerate, score_context

    same = {m: (0.0 if m in ("expr_mse_unbiased_capped_norm", "de_wilcoxon_lfc_nmae") else 1.0) for m in ORDER}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = score_context(dict(same), dict(same), dict(same), strict=False)
    avg = table.set_index("metric").loc["avg_score"]
    assert math.isnan(avg["score"]) and math.isnan(avg["from_baseline"])
    assert [d.split(" ")[0] for d in degenerate(same, same)] == ORDER
    with pytest.raises(Exception, match="degenerate"):
        score_context(dict(same), dict(same), dict(same))  # strict (vcell eval score): an error
    # one degenerate metric: only it is left out, and only it is named
    base = {m: (0.5 if m in ("expr_mse_unbiased_capped_norm", "de_wilcoxon_lfc_nmae") else 0.2) for m in ORDER}
    rep = {**same, "de_wilcoxon_sig_jaccard": 0.2}
    table = score_context(dict(same), base, rep, strict=False).set_index("metric")
    assert degenerate(base, rep) == ["de_wilcoxon_sig_jaccard (baseline 0.2, replicate 0.2)"]
    assert math.isnan(table.loc["de_wilcoxon_sig_jaccard", "score"])
    assert table["score"].drop(["de_wilcoxon_sig_jaccard", "avg_score"]).eq(1.0).all()
    assert table.loc["avg_score", "score"] == 1.0
    assert degenerate(base, None) == []  # against the perfect values alone, nothing is degenerate


def test_unresolved_names_a_replicate_within_two_standard_errors_of_the_baseline():
    """:func:`unresolved` names a metric whose replicate lies within UNRESOLVED_SE standard errors
    (over the splits) of its baseline, and no other: not a resolved scale, not a degenerate one
    (that is :func:`degenerate`'s), not one without a spread; the standard error of 5 splits is
    their ddof-0 sd / 2."""
    from vcell.eval.vcc2026.scale import ORDER, UNRESOLVED_SE, standard_errors, unresolved

    sd = pd.DataFrame({"metric": ["m"], "replicate_sd": [0.3]})
    assert standard_errors(sd, 5) == {"m": 0.15} and standard_errors(sd, 1) == {}
    lower = ("expr_mse_unbiased_capped_norm", "de_wilcoxon_lfc_nmae")
    base = {m: (0.5 if m in lower else 0.2) for m in ORDER}
    rep = {m: (0.1 if m in lower else 0.6) for m in ORDER}  # every scale 0.4 long
    se = {m: 0.01 for m in ORDER}
    assert unresolved(base, rep, se) == []
    se["de_wilcoxon_sig_jaccard"] = 1.01 * 0.4 / UNRESOLVED_SE
    se["de_wilcoxon_lfc_nmae"] = 1.01 * 0.4 / UNRESOLVED_SE  # lower is better: the same length
    se["pds_cosine"] = 0.99 * 0.4 / UNRESOLVED_SE
    named = unresolved(base, rep, se)
    assert [n.split(" ")[0] for n in named] == ["de_wilcoxon_lfc_nmae", "de_wilcoxon_sig_jaccard"]
    assert unresolved(base, {**rep, "de_wilcoxon_sig_jaccard": 0.2}, se) == named[:1]  # degenerate: not here
    assert unresolved(base, rep, {**se, "de_wilcoxon_sig_jaccard": math.nan, "de_wilcoxon_lfc_nmae": math.nan}) == []


def test_eval_score_warns_of_an_unresolved_scale_and_keeps_cell_eval2s_numbers(sim_vcell, tmp_path):
    """`vcell eval score --profile vcc2026` names the metrics whose scale is unresolved (their
    replicate's spread over the anchor's splits, with the number of splits from scale.json) in one
    warning and scores exactly as without it; the simulated reference's own scale is resolved."""
    import shutil

    from vcell.eval.csvio import read_csv, write_csv
    from vcell.eval.vcc2026.scale import UNRESOLVED_SE
    from vcell.eval.vcc2026.tables import agg_means

    clean = run_cli("eval", "score", "--profile", "vcc2026", "--user", sim_vcell["honest"], "--baseline", sim_vcell["scale"],
                    "--out", tmp_path / "clean.csv")
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "not resolved" not in clean.stderr
    avg = next(line for line in clean.stdout.splitlines() if line.strip().startswith("avg_score"))
    assert "nan" not in avg.lower() and "–" in avg  # the mean row has no value, baseline or replicate
    scale = tmp_path / "scale"
    shutil.copytree(sim_vcell["scale"], scale)
    assert json.loads((scale / "scale.json").read_text())["anchor"]["splits"] == 5
    anchor = read_csv(scale / "anchor_agg.csv", text_columns=("metric", "estimator"))
    b = agg_means(read_csv(scale / "baseline_agg_results.csv"))
    row = anchor["metric"] == "de_wilcoxon_sig_jaccard"
    span = abs(float(anchor.loc[row, "replicate"].iloc[0]) - b["de_wilcoxon_sig_jaccard"])
    anchor.loc[row, "replicate_sd"] = 2 * 1.05 * span / UNRESOLVED_SE  # standard error over 5 splits: sd / 2
    write_csv(anchor, scale / "anchor_agg.csv")

    def said(folder, name):
        proc = run_cli("eval", "score", "--profile", "vcc2026", "--user", sim_vcell["honest"], "--baseline", folder,
                       "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return " ".join(proc.stderr.split())

    text = said(scale, "unresolved.csv")
    assert "de_wilcoxon_sig_jaccard (baseline" in text and text.count("is not resolved") == 1, text
    assert "pds_cosine (baseline" not in text
    assert (tmp_path / "unresolved.csv").read_bytes() == (tmp_path / "clean.csv").read_bytes()
    # with 17 splits the same sd is a standard error half as large: resolved
    meta = json.loads((scale / "scale.json").read_text())
    meta["anchor"]["splits"] = 17
    (scale / "scale.json").write_text(json.dumps(meta))
    assert "not resolved" not in said(scale, "resolved.csv")


def test_eval_score_names_a_cell_eval2_baseline_folder_for_what_it_is(sim_vcell, tmp_path):
    """cell-eval2's baseline folder (baseline_agg.csv) is not vcell's scale: the error says so and
    names the command that builds one, instead of only 'no baseline_agg_results.csv'."""
    import shutil

    peer = tmp_path / "c2_base"
    peer.mkdir()
    shutil.copy(sim_vcell["scale"] / "baseline_agg_results.csv", peer / "baseline_agg.csv")
    proc = run_cli("eval", "score", "--profile", "vcc2026", "--user", sim_vcell["honest"], "--baseline", peer)
    assert proc.returncode == 2 and "cell-eval2's baseline files" in error_line(proc)
    assert "vcell eval baseline --profile vcc2026" in error_line(proc)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("eval", "score", "--profile", "vcc2026", "--user", sim_vcell["honest"], "--baseline", empty)
    assert proc.returncode == 2 and "cell-eval2" not in error_line(proc) and "no baseline_agg_results.csv" in error_line(proc)


def test_eval_score_refuses_a_scale_built_from_another_reference(sim_vcell, tmp_path):
    """A scale of a reference with one perturbation fewer than the run's: refused, naming it (it
    scored silently, 0.12 where the run's own scale gives 0.18); nothing written."""
    import shutil

    from vcell.eval.csvio import read_csv, write_csv

    scale = tmp_path / "scale"
    shutil.copytree(sim_vcell["scale"], scale)
    results = read_csv(scale / "baseline_results.csv", text_columns=("perturbation", "metric"))
    dropped = sorted(set(results["perturbation"]))[0]
    write_csv(results[results["perturbation"] != dropped], scale / "baseline_results.csv")
    proc = run_cli("eval", "score", "--profile", "vcc2026", "--user", sim_vcell["honest"], "--baseline", scale,
                   "--out", tmp_path / "score.csv")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert f"1 only in the run ('{dropped}')" in error_line(proc) and "results.csv: scored on" in error_line(proc)
    assert not (tmp_path / "score.csv").exists()
    proc = run_cli("eval", "score", "--profile", "vcc2026", "--user", sim_vcell["honest"], "--baseline",
                   scale / "baseline_agg_results.csv", "--out", tmp_path / "score.csv")
    assert proc.returncode == 2 and "a file; --baseline takes the folder" in error_line(proc), proc.stderr[-1500:]


def test_eval_baseline_names_a_degenerate_scale_that_score_will_refuse(tmp_path):
    """A reference whose perturbations all have the same effect: the mean-response baseline is each
    one's truth, so some metric's scale is degenerate (pds_cosine, at least: every effect ties);
    `vcell eval baseline --profile vcc2026` writes both ends and names those metrics in one warning,
    and `vcell eval score` then refuses the scale as cell-eval2 does."""
    rng = np.random.default_rng(3)
    genes = [f"g{i}" for i in range(120)]
    labels = np.array([CONTROL] * 80 + [p for p in ("dA", "dB", "dC") for _ in range(30)])
    mean = np.tile(rng.gamma(2.0, 3.0, len(genes)), (len(labels), 1))
    mean[labels != CONTROL, :20] *= 4.0
    X = rng.poisson(mean)
    real = _write(tmp_path / "real.h5ad", X, labels, genes)
    proc = run_cli("eval", "baseline", "--profile", "vcc2026", "--real", real, "--out", tmp_path / "scale", "--no-target-genes")
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = " ".join(proc.stderr.split())
    assert said.count("is degenerate") == 1 and "refuses it" in said, said
    assert (tmp_path / "scale" / "anchor_agg.csv").is_file() and (tmp_path / "scale" / "baseline_agg_results.csv").is_file()
    _vcell_run(real, real, tmp_path / "self", no_target_genes=True)
    score = run_cli("eval", "score", "--profile", "vcc2026", "--user", tmp_path / "self", "--baseline", tmp_path / "scale")
    assert score.returncode == 2 and "degenerate" in error_line(score)


# --------------------------------------------------------------------------------------------
# target genes as cell-eval2 resolves them (found by a differential fuzz against it)
# --------------------------------------------------------------------------------------------


def _knockdowns(seed: int, n_controls: int, target_mean: float, n_genes: int = 40, cells: int = 30, depth: float = 4000.0):
    """A reference of knockdowns G00..G03 (each perturbation's own gene at 0 in its cells) whose
    other genes carry ~``depth`` counts each; the targets sit at ``target_mean`` counts in the controls."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:02d}" for i in range(n_genes)]
    base = np.full(n_genes, depth)
    base[:4] = target_mean
    rows, labels = [rng.poisson(base, (n_controls, n_genes))], [CONTROL] * n_controls
    for k in range(4):
        lam = base.copy()
        lam[k] = 0.0
        lam[6 + 4 * k:10 + 4 * k] *= 1.5
        rows.append(rng.poisson(lam, (cells, n_genes)))
        labels += [genes[k]] * cells
    return np.vstack(rows).astype(np.float32), labels, genes


def test_a_target_gene_tested_in_one_half_of_the_controls_is_left_out_where_cell_eval2_leaves_it_out(tmp_path):
    """The anchor's halves each test the genes their own controls express above 5 CPM: a target near
    that line is tested in one half only. cell-eval2 leaves a target out of the DE tables only
    where the reference side (half A) tests it; vcell left it out always (sig_jaccard 1.8e-3
    higher in a fuzzed case). Now every split agrees."""
    _oracle_module()
    from vcell.eval.vcc2026.files import Options, scale_ends

    X, labels, genes = _knockdowns(5, n_controls=40, target_mean=0.8)
    real = _write(tmp_path / "real.h5ad", X, labels, genes)
    pert = np.asarray(labels) != CONTROL
    pred = _write(tmp_path / "pred.h5ad", X[pert], np.asarray(labels)[pert], genes)
    theirs = _oracle_run(pred, real, tmp_path / "ce2", "--anchor")
    scale_ends(real, tmp_path / "v", Options(), baseline=False)
    mine = pd.read_csv(tmp_path / "v" / "anchor_splits.csv")
    j = mine.merge(pd.read_parquet(theirs / "anchor_splits.parquet"), on=["split_index", "metric"], suffixes=("", "_o"))
    assert len(j) == len(mine) and j["split_index"].nunique() == 5
    ok = _close(j["value"], j["value_o"])
    assert ok.all(), j.loc[~ok, ["split_index", "metric", "value", "value_o"]]


def test_targets_the_de_cannot_resolve_or_that_fill_the_panel_are_refused_as_cell_eval2_refuses_them(tmp_path):
    """Every target below the reference's 5-CPM gate: no DE metric can leave it out (cell-eval2
    refuses; vcell scored); every measured gene a target: pds_cosine has no genes to compare
    (cell-eval2 refuses; vcell gave 0.5 to every perturbation). Both: one error line, nothing written."""
    X, labels, genes = _knockdowns(1, n_controls=30, target_mean=0.0)  # no control expresses a target
    real = _write(tmp_path / "real.h5ad", X, labels, genes)
    pert = np.asarray(labels) != CONTROL
    pred = _write(tmp_path / "pred.h5ad", X[pert], np.asarray(labels)[pert], genes)
    below = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", tmp_path / "below")
    assert "the DE metrics are undefined: no perturbation's target gene is among the 36 genes the reference's DE tests" in error_line(below)
    assert not (tmp_path / "below").exists()
    _oracle_module()
    with pytest.raises(ValueError, match="no target resolves to a gene in the reference feature index"):
        _oracle_run(pred, real, tmp_path / "ce2_below")
    stated = tmp_path / "map.csv"
    pd.DataFrame({"perturbation": genes[:4], "gene": genes[:4]}).to_csv(stated, index=False)  # stated targets resolve, as in cell-eval2
    ok = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", tmp_path / "mapped", "--target-genes", stated)
    assert ok.returncode == 0, ok.stderr[-2000:]

    X, labels, genes = _knockdowns(2, n_controls=30, target_mean=5.0, n_genes=4)  # the four genes are the four targets
    real = _write(tmp_path / "real4.h5ad", X, labels, genes)
    pred = _write(tmp_path / "pred4.h5ad", X[pert], np.asarray(labels)[pert], genes)
    full = run_cli("eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", tmp_path / "full")
    assert "pds_cosine is undefined: each of the 4 measured genes is some perturbation's target" in error_line(full)
    with pytest.raises(ValueError, match="would remove every one of the 4 measured gene"):
        _oracle_run(pred, real, tmp_path / "ce2_full")


def test_a_target_gene_map_naming_an_unmeasured_gene_excludes_nothing_as_in_cell_eval2(tmp_path, caplog):
    """A map entry is authoritative in cell-eval2 and not checked against the genes: a gene that is
    not measured excludes nothing (vcell refused the map). Same numbers, and a warning names it."""
    import logging

    _oracle_module()
    import cell_eval2
    import yaml

    X, labels, genes = _knockdowns(3, n_controls=30, target_mean=40.0)
    real = _write(tmp_path / "real.h5ad", X, labels, genes)
    pert = np.asarray(labels) != CONTROL
    pred = _write(tmp_path / "pred.h5ad", X[pert], np.asarray(labels)[pert], genes)
    tmap = {"G00": "G00", "G01": "G01", "G02": "NOT_MEASURED", "G03": "G03"}
    pd.DataFrame({"perturbation": list(tmap), "gene": list(tmap.values())}).to_csv(tmp_path / "map.csv", index=False)
    cfg = yaml.safe_load((Path(cell_eval2.__file__).parent / "configs" / "vcc2026.yaml").read_text())
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "target_gene_map": tmap}))
    full = _with_controls(pred, real, tmp_path / "pred_wc.h5ad")
    _oracle("run", "-ap", full, "-ar", real, "--config", tmp_path / "cfg.yaml", "--pert-col", PERT_COL, "--control", CONTROL,
            "-o", tmp_path / "ce2")
    with caplog.at_level(logging.WARNING):
        _vcell_run(pred, real, tmp_path / "v", target_genes=tmp_path / "map.csv")
    assert "1 perturbation(s) map to a gene that is not measured; nothing is excluded for them: 'G02 -> NOT_MEASURED'" in caplog.text
    assert_results_equal(tmp_path / "v", tmp_path / "ce2")


def test_a_degenerate_scale_says_which_end_is_undefined():
    """An lfc_nmae the baseline cannot score (NaN) read "the baseline is not worse than the top end"."""
    from vcell.errors import VcellError
    from vcell.eval.vcc2026.scale import scaled

    with pytest.raises(VcellError, match=r"baseline nan, top 0.0\): the baseline's value is undefined"):
        scaled("de_wilcoxon_lfc_nmae", 0.5, math.nan, 0.0)
    with pytest.raises(VcellError, match=r"the top end is undefined"):
        scaled("pds_cosine", 0.5, 0.6, math.nan)
    with pytest.raises(VcellError, match=r"the baseline is not worse than the top end"):
        scaled("pds_cosine", 0.5, 0.6, 0.5)


def _score_ends() -> tuple[dict, dict]:
    """A baseline and a replicate for the six scored metrics (lower-is-better ones reversed)."""
    from vcell.eval.vcc2026.scale import ORDER, POLICY

    base = {m: 0.9 if POLICY[m][0] else 0.5 for m in ORDER}
    rep = {m: 0.3 if POLICY[m][0] else 0.9 for m in ORDER}
    return base, rep


@pytest.mark.parametrize("metric, expected", [
    ("de_wilcoxon_lfc_nmae", -6.0),  # clamped: its floor
    ("expr_mse_unbiased_capped_norm", 0.0),  # clamped to [0, 1]
    ("pds_cosine", (0.0 - 0.5) / (0.9 - 0.5)),  # unclamped: the value 0 placed on the line
])
def test_an_undefined_model_aggregate_scores_the_floor_and_counts_in_the_context_score(metric, expected):
    """A NaN (or missing) aggregate is the worst score the metric can have, not a metric left out of
    ``avg_score``, which would then be the mean of the other five and flatter the model."""
    from vcell.eval.vcc2026.scale import ORDER, scaled, score_context

    base, rep = _score_ends()
    assert scaled(metric, math.nan, base[metric], rep[metric]) == pytest.approx(expected)
    assert scaled(metric, None, base[metric], rep[metric]) == pytest.approx(expected)
    user = {m: (base[m] + rep[m]) / 2 for m in ORDER}  # halfway: 0.5 each
    user[metric] = math.nan
    table = score_context(user, base, rep).set_index("metric")["score"]
    assert table[metric] == pytest.approx(expected)
    assert table["avg_score"] == pytest.approx((5 * 0.5 + expected) / 6)


def test_the_mean_context_is_the_arithmetic_mean_of_the_contexts():
    """With three contexts the mean and the median differ (two contexts cannot tell them apart)."""
    from vcell.eval.vcc2026.scale import ORDER, average_contexts, score_context

    base, rep = _score_ends()
    tables = {c: score_context({m: base[m] + f * (rep[m] - base[m]) for m in ORDER}, base, rep)
              for c, f in (("a", 0.0), ("b", 0.0), ("c", 0.9))}
    out = average_contexts(tables)
    mean = out[out["context"] == "mean"].set_index("metric")["score"]
    assert set(out["context"]) == {"a", "b", "c", "mean"}
    assert mean.drop("avg_score").to_numpy() == pytest.approx(np.full(6, 0.3))
    assert mean["avg_score"] == pytest.approx(0.3)


def test_a_panel_whose_labels_name_no_measured_gene_is_refused_before_any_work():
    from vcell.errors import VcellError
    from vcell.eval.vcc2026.evaluate import resolve_targets

    with pytest.raises(VcellError, match="no perturbation label names a measured gene"):
        resolve_targets(["DMSO", "drugX"], pd.Index(["G1", "G2"]))


def test_significance_is_an_adjusted_p_value_strictly_below_0_05():
    """cell-eval2 calls a gene significant at padj < 0.05: a real gene at exactly 0.05 is not one,
    so the prediction's second call is not in the real set (Jaccard 1/2, not 1)."""
    from vcell.eval.vcc2026.metrics import de_metrics

    def row(*values):
        return np.array([values], dtype=float)

    out = de_metrics(row(1, 1, 1), row(0.01, 0.05, 0.5), row(1, 1, 1), row(0.01, 0.01, 0.5), row(0.01, 0.01, 0.5),
                     np.arange(3), np.array([-1]))
    assert out["de_wilcoxon_sig_jaccard"].tolist() == [0.5]
