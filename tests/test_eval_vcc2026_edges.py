"""``--profile vcc2026``: parity with cell-eval2 0.20.0 on the edge cases a differential audit found
agreeing but no other test pinned.

Each fixture builds one small panel (40-80 genes, tens of cells per group), runs cell-eval2 (the
oracle, in-process through its CLI) and vcell on it once, and several tests read that work:

- the 5 CPM gate is the reference controls' mean CPM alone, strictly above 5, on genes at 2, 4.84,
  exactly 5, 5.16 and 8 CPM, and on a gene absent from the controls (cell-eval2 #351);
- target-gene maps: one overriding a label that is itself a gene, two or all perturbations sent to
  one gene, an empty entry (no target); a panel where only some labels name genes (#289);
  panels of one and two perturbations, with and without target genes;
- the direction and Jaccard metrics where nothing is significant on one side or both;
- predictions every perturbation shares (pinned, #348), one-cell tiles, on-target-only and spray;
- X stored dense or sparse (CSR, CSC) as float32, float64, int64, int32 or uint16; labels that a
  CSV round trip could change ('NA', 'nan', 'None', 'a,b', 'q"x', a leading space) and duplicated
  cell names; counts per gene above 2**24 summed over a group stored as float32;
- the scale: baseline genes at the edges (zero in every perturbation, one control count, an odd
  number of controls), the score's clamps (the -6 floor of de_wilcoxon_lfc_nmae, capped_norm in
  [0, 1], other scores above 1 or below -1 kept) and non-default --seed / --anchor-seed;
- bad references (fractional, negative, log1p, a control cell over 1e6 counts) and bad predictions
  (NaN, inf, negative) refused by both tools; a cell of exactly 1e6 counts accepted by both.

Parity means every value within 1e-9 (the helpers of test_eval_vcc2026.py); a refusal means exit 2,
one ``error:`` line and nothing written by vcell, and an exception from cell-eval2.
"""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_eval_vcc2026 import (
    CONTROL,
    PERT_COL,
    _close,
    _oracle,
    _oracle_module,
    _oracle_run,
    _poisson_like,
    _read_results,
    _vcell_run,
    _write,
    assert_agg_equal,
    assert_results_equal,
)

from conftest import error_line, run_cli_batch

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _panel(seed: int, perts, n_genes: int = 40, n_ctrl: int = 40, cells: int = 20, depth: float = 30.0, eff: float = 3.0):
    """Controls at ~``depth`` counts per gene; each perturbation knocks its own gene (if it names
    one) to 0 and multiplies four other genes by ``eff``."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:02d}" for i in range(n_genes)]
    base = rng.uniform(0.5, 1.5, n_genes) * depth
    rows, labels = [rng.poisson(base, (n_ctrl, n_genes))], [CONTROL] * n_ctrl
    for k, p in enumerate(perts):
        lam = base.copy()
        if p in genes:
            lam[genes.index(p)] = 0.0
        j = (8 + 4 * k) % (n_genes - 4)
        lam[j:j + 4] *= eff
        rows.append(rng.poisson(lam, (cells, n_genes)))
        labels += [p] * cells
    return np.vstack(rows).astype(np.float32), np.asarray(labels, dtype=object), genes


def _predict(X, labels, seed: int, cells: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """An honest prediction: ``cells`` Poisson cells around each perturbation's real mean."""
    rng = np.random.default_rng(seed)
    perts = [p for p in dict.fromkeys(labels) if p != CONTROL]
    Y = np.vstack([_poisson_like(X, np.flatnonzero(labels == p), cells, rng) for p in perts])
    return Y, np.repeat(perts, cells).astype(object)


def _pair(d: Path, name: str, pred: Path, real: Path, *oracle_extra, **vcell_opts) -> tuple[Path, Path]:
    """vcell and cell-eval2 run on one pair: their output folders."""
    theirs = _oracle_run(pred, real, d / f"ce2_{name}", *oracle_extra)
    mine = d / f"v_{name}"
    _vcell_run(pred, real, mine, **vcell_opts)
    return mine, theirs


def _assert_pair(mine: Path, theirs: Path) -> pd.DataFrame:
    """results.csv and agg_results.csv of both tools equal; vcell's values by perturbation x metric."""
    m = assert_results_equal(mine, theirs)
    assert_agg_equal(mine / "agg_results.csv", theirs / "agg_results.csv")
    return m.pivot(index="perturbation", columns="metric", values="value")


def _map(d: Path, name: str, mapping: dict[str, str | None]) -> tuple[Path, str]:
    """A target-gene map as vcell reads it (a CSV file) and as cell-eval2 does (a --set value)."""
    path = d / f"{name}.csv"
    pd.DataFrame({"perturbation": list(mapping), "gene": [g or "" for g in mapping.values()]}).to_csv(path, index=False)
    return path, "target_gene_map={" + ", ".join(f"{p}: {g or 'null'}" for p, g in mapping.items()) + "}"


def _restore(path: Path, fmt: str, dtype) -> Path:
    """Rewrite an .h5ad's X as ``fmt`` ('dense', 'csr', 'csc') of ``dtype`` (same counts)."""
    a = ad.read_h5ad(path)
    X = a.X.toarray().astype(dtype)
    a.X = X if fmt == "dense" else (sp.csr_matrix(X) if fmt == "csr" else sp.csc_matrix(X))
    a.write_h5ad(path)
    return path


def _labels_as_written(path: Path) -> set[str]:
    """The perturbation labels of a results.csv, read without turning any into NaN."""
    return set(pd.read_csv(path, dtype=str, keep_default_na=False)["perturbation"])


# --------------------------------------------------------------------------------------------
# the 5 CPM gate (#351)
# --------------------------------------------------------------------------------------------

#: gene column -> (mean CPM in the controls, kept by the gate)
GATE = {50: (0.0, False), 51: (None, False), 52: (5.0, False), 53: (5.15625, True), 54: (4.84375, False), 55: (None, True)}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """64 controls of exactly 1e5 counts each, four knockdowns G00..G03, and genes placed around
    the gate: 50 absent from the controls and high in G00; 51 ~2 CPM in the controls and high in
    G01; 52 one count in 32 of the 64 controls (exactly 5 CPM) and high in G02; 53 one count in 33
    (5.16 CPM) and high in G03; 54 one count in 31 (4.84 CPM) and high in G00; 55 ~8 CPM in the
    controls and 0 in G02."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_gate")
    rng = np.random.default_rng(351)
    n_genes, n_ctrl, cells = 60, 64, 25
    genes = [f"G{i:02d}" for i in range(n_genes)]
    base = rng.uniform(1000, 2600, n_genes)
    base[50:] = 0.0
    ctrl = rng.poisson(base, (n_ctrl, n_genes)).astype(np.float64)
    ctrl[:, 51] = rng.poisson(0.2, n_ctrl)
    for col, n in ((52, 32), (53, 33), (54, 31)):
        ctrl[rng.permutation(n_ctrl)[:n], col] = 1
    ctrl[:, 55] = rng.poisson(0.8, n_ctrl)
    ctrl[:, 59] = 1e5 - ctrl[:, :59].sum(axis=1)  # the library of every control: exactly 1e5
    assert (ctrl[:, 59] > 0).all()
    rows, labels = [ctrl], [CONTROL] * n_ctrl
    for k, p in enumerate(genes[:4]):
        lam = base.copy()
        lam[k] = 0.0
        lam[10 + 5 * k:14 + 5 * k] *= 2.0
        lam[59] = ctrl[:, 59].mean()
        lam[{0: [50, 54], 1: [51], 2: [52], 3: [53]}[k]] = 300.0
        Y = rng.poisson(lam, (cells, n_genes)).astype(np.float64)
        Y[:, 55] = 0.0 if p == "G02" else rng.poisson(0.8, cells)
        rows.append(Y)
        labels += [p] * cells
    X, labels = np.vstack(rows).astype(np.float32), np.asarray(labels, dtype=object)
    real = _write(d / "real.h5ad", X, labels, genes)
    pred = _write(d / "pred.h5ad", *_predict(X, labels, 1), genes)
    mine, theirs = _pair(d, "gate", pred, real)
    return {"real": real, "X": X, "labels": labels, "genes": genes, "mine": mine, "theirs": theirs}


def test_cpm_gate_parity(gate):
    """Genes on both sides of the 5 CPM gate, one exactly on it: cell-eval2's numbers."""
    _assert_pair(gate["mine"], gate["theirs"])


def test_cpm_gate_is_the_controls_mean_cpm_strictly_above_5(gate):
    """A gene is tested iff its mean CPM over the reference's controls exceeds 5 (exactly 5 is out),
    whatever the perturbations express; the same genes for every perturbation."""
    from vcell.eval.vcc2026.evaluate import resolve_targets, summarise_reference
    from vcell.eval.vcc2026.inputs import read_cells

    X, labels = gate["X"], gate["labels"]
    ctrl = X[labels == CONTROL].astype(np.float64)
    cpm = (ctrl / ctrl.sum(axis=1, keepdims=True) * 1e6).mean(axis=0)
    for col, (expected, _) in GATE.items():
        if expected is not None:
            assert cpm[col] == pytest.approx(expected, abs=1e-12), (col, cpm[col])
    assert 0 < cpm[51] < 4 and 6 < cpm[55] < 12
    assert X[labels == "G00", 50].min() > 0 and X[labels == "G02", 55].max() == 0
    cells = read_cells(gate["real"], PERT_COL)
    perts = gate["genes"][:4]
    keep = summarise_reference(cells, CONTROL, perts, resolve_targets(perts, cells.genes)).ctrl.keep
    assert keep.shape == (len(gate["genes"]),)  # one gate for the panel
    assert {col: bool(keep[col]) for col in GATE} == {col: kept for col, (_, kept) in GATE.items()}
    assert keep[:50].all()


# --------------------------------------------------------------------------------------------
# target genes: maps, partial resolution, panels of one and two perturbations
# --------------------------------------------------------------------------------------------

FIVE = ("G00", "G01", "G02", "G03", "G04")
MAPS = {
    "map_to_other": {"G00": "G10", "G01": "G01", "G02": "G02", "G03": "G03", "G04": "G04"},  # the label G00 is a gene: the map wins
    "two_to_one": {"G00": "G05", "G01": "G05", "G02": "G02", "G03": "G03", "G04": "G04"},
    "all_to_one": dict.fromkeys(FIVE, "G07"),
    "one_none": {"G00": None, "G01": "G01", "G02": "G02", "G03": "G03", "G04": "G04"},  # an empty entry: no target gene
}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Knockdowns G00..G04 scored with no map and with each of MAPS (cell-eval2's all_to_one run
    also computes its anchor, from base seed 7); a panel G00, G01, KO_A, KO_B, KO_C (two labels are
    genes); panels of one and of two perturbations, with and without target genes."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_targets")
    X, labels, genes = _panel(6, FIVE)
    real = _write(d / "real.h5ad", X, labels, genes)
    pred = _write(d / "pred.h5ad", *_predict(X, labels, 2), genes)
    out = {"real": real, "maps": {}}
    out["maps"]["none"] = _pair(d, "none", pred, real)
    out["map_files"] = {name: _map(d, name, mapping) for name, mapping in MAPS.items()}
    for name, (path, value) in out["map_files"].items():
        # the all_to_one run carries cell-eval2's anchor of the reference with that map, from base seed 7
        anchor = ("--anchor", "--anchor-base-seed", 7) if name == "all_to_one" else ()
        out["maps"][name] = _pair(d, name, pred, real, "--set", value, *anchor, target_genes=path)

    X, labels, genes = _panel(7, ("G00", "G01", "KO_A", "KO_B", "KO_C"))
    real = _write(d / "real_partial.h5ad", X, labels, genes)
    pred = _write(d / "pred_partial.h5ad", *_predict(X, labels, 3), genes)
    out["partial"] = _pair(d, "partial", pred, real)

    out["small"] = {}
    for n in (1, 2):
        X, labels, genes = _panel(8, FIVE[:n], cells=30)
        real = _write(d / f"real{n}.h5ad", X, labels, genes)
        pred = _write(d / f"pred{n}.h5ad", *_predict(X, labels, 4, cells=30), genes)
        out["small"][n] = _pair(d, f"panel{n}", pred, real)
        out["small"][f"{n}_notg"] = _pair(d, f"panel{n}_notg", pred, real, "--no-target-genes", no_target_genes=True)
        out[f"real{n}"] = real
    return out


@pytest.mark.parametrize("name", ["none", *MAPS])
def test_target_gene_map_parity(targets, name):
    """A map overriding a label that is a gene, two or all perturbations sent to one gene, an empty
    entry: cell-eval2's numbers, every perturbation scored."""
    v = _assert_pair(*targets["maps"][name])
    assert sorted(v.index) == list(FIVE) and v["pds_cosine"].notna().all()


def test_a_target_gene_map_changes_what_is_left_out(targets):
    """The map is used: G00's values move when it targets G10 or nothing instead of its own gene,
    and the other perturbations' own targets are left out as without a map."""
    none = _read_results(targets["maps"]["none"][0] / "results.csv").set_index(["perturbation", "metric"])["value"]
    for name in ("map_to_other", "one_none"):
        mapped = _read_results(targets["maps"][name][0] / "results.csv").set_index(["perturbation", "metric"])["value"]
        assert abs(mapped[("G00", "expr_mse_unbiased")] - none[("G00", "expr_mse_unbiased")]) > 1e-6, name
        same = [("G03", m) for m in ("expr_mse_unbiased", "de_wilcoxon_sig_jaccard")]
        assert _close(mapped[same], none[same]).all(), name


def test_partial_target_resolution_parity(targets, caplog):
    """Two labels name genes, three do not (no map): the three keep their row, said in a warning;
    cell-eval2's numbers."""
    import logging

    from vcell.eval.vcc2026.evaluate import resolve_targets

    v = _assert_pair(*targets["partial"])
    assert sorted(v.index) == ["G00", "G01", "KO_A", "KO_B", "KO_C"]
    with caplog.at_level(logging.WARNING):
        t = resolve_targets(["G00", "G01", "KO_A", "KO_B", "KO_C"], pd.Index([f"G{i:02d}" for i in range(40)]))
    assert list(t.cols) == [0, 1, -1, -1, -1]
    assert "3 perturbation(s) name no gene; their target gene is not excluded" in caplog.text


@pytest.mark.parametrize("case", ["1", "1_notg", "2", "2_notg"])
def test_panels_of_one_and_two_perturbations_parity(targets, case):
    """One perturbation (the pds denominator n-1 is 0: cell-eval2 gives 1.0) and two, with and
    without target genes: cell-eval2's numbers."""
    v = _assert_pair(*targets["small"][int(case[0]) if case.isdigit() else case])
    assert len(v) == int(case[0])
    if case.startswith("1"):
        assert v["pds_cosine"].tolist() == [1.0]


# --------------------------------------------------------------------------------------------
# direction and Jaccard where nothing is significant on one side or both
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory):
    """P09/P10/P11 raise 9/10/11 genes sixfold, PNULL and PNULL2 change nothing; predicted: P09 and
    P10 as they are, P11 as controls (an effect predicted as none), PNULL with ten genes raised (an
    effect predicted where there is none), PNULL2 as controls (none on either side)."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_quadrants")
    rng = np.random.default_rng(9)
    genes = [f"G{i:02d}" for i in range(60)]
    base = np.full(60, 40.0)
    rows, labels = [rng.poisson(base, (80, 60))], [CONTROL] * 80
    for p, n in {"P09": 9, "P10": 10, "P11": 11, "PNULL": 0, "PNULL2": 0}.items():
        lam = base.copy()
        lam[20:20 + n] *= 6.0
        rows.append(rng.poisson(lam, (40, 60)))
        labels += [p] * 40
    X, labels = np.vstack(rows).astype(np.float32), np.asarray(labels, dtype=object)
    real = _write(d / "real.h5ad", X, labels, genes)
    pert = labels != CONTROL
    Y, lp = X[pert].copy(), labels[pert]
    ctrl = X[labels == CONTROL][:40]
    lam = base.copy()
    lam[40:50] *= 6.0
    Y[lp == "PNULL"] = rng.poisson(lam, (40, 60))
    Y[lp == "PNULL2"] = ctrl
    Y[lp == "P11"] = ctrl
    pred = _write(d / "pred.h5ad", Y, lp, genes)
    return _pair(d, "quadrants", pred, real, "--no-target-genes", no_target_genes=True)


def test_direction_and_jaccard_quadrants_parity(quadrants):
    """A real effect predicted as none, none predicted as one, none on either side: cell-eval2's
    numbers, and the closed forms (Jaccard of two empty sets 1, of one empty set 0; the direction
    metrics 0 or NaN where a side has nothing significant)."""
    v = _assert_pair(*quadrants)
    fid, reach, jac = (v[f"de_wilcoxon_{m}"] for m in ("direction_fidelity_yield_raw", "direction_reach_raw", "sig_jaccard"))
    assert jac["PNULL2"] == 1.0 and math.isnan(fid["PNULL2"]) and math.isnan(reach["PNULL2"])
    assert jac["PNULL"] == 0.0 and math.isnan(reach["PNULL"]) and 0.0 < fid["PNULL"] < 1.0
    assert jac["P11"] == 0.0 and fid["P11"] == 0.0 and reach["P11"] == 0.0
    assert jac["P10"] > 0.5 and fid["P10"] > 0.5


# --------------------------------------------------------------------------------------------
# pinned, one-cell, on-target-only and spray predictions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    """Six knockdowns G00..G05 (25 cells each) and six predictions of them: every perturbation the
    same 25 control cells (pinned_ctrl) or the same draw of the mean response (pinned_mean); one
    identical cell each (tile); control cells with the own target set to 500 (spike) or to 0
    (on_target_only); the latter with every gene scaled by 0.2 or 3 (spray)."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_attacks")
    perts = tuple(f"G0{i}" for i in range(6))
    X, labels, genes = _panel(10, perts, cells=25)
    real = _write(d / "real.h5ad", X, labels, genes)
    lp = np.repeat(perts, 25).astype(object)
    ctrl = X[labels == CONTROL][:25]
    rng = np.random.default_rng(0)
    mean = np.vstack([rng.poisson(X[labels != CONTROL].mean(0), (25, len(genes)))] * 6).astype(np.float32)
    spike, on_target = np.vstack([ctrl] * 6), np.vstack([ctrl] * 6)
    for i in range(6):
        spike[i * 25:(i + 1) * 25, i] = 500
        on_target[i * 25:(i + 1) * 25, i] = 0
    preds = {
        "pinned_ctrl": (np.vstack([ctrl] * 6), lp),
        "pinned_mean": (mean, lp),
        "tile": (np.vstack([mean[:1]] * 6), np.asarray(perts, dtype=object)),
        "spike": (spike, lp),
        "on_target_only": (on_target, lp),
        "spray": (np.round(on_target * rng.choice([0.2, 3.0], size=(1, len(genes)))), lp),
    }
    return {name: _pair(d, name, _write(d / f"pred_{name}.h5ad", Y, lab, genes), real) for name, (Y, lab) in preds.items()}


@pytest.mark.parametrize("name", ["pinned_ctrl", "pinned_mean", "tile", "spike", "on_target_only", "spray"])
def test_pinned_and_attack_predictions_parity(attacks, name):
    """Predictions shared by every perturbation, one-cell tiles, a spike or a knockout of the own
    target only, a spray of fold changes: cell-eval2's numbers."""
    v = _assert_pair(*attacks[name])
    assert len(v) == 6
    if name in ("pinned_ctrl", "on_target_only"):
        # nothing predicted beyond the own target, which is left out: no predicted DE gene
        assert (v["de_wilcoxon_sig_jaccard"] == 0.0).all() and (v["de_wilcoxon_direction_fidelity_yield_raw"] == 0.0).all()


# --------------------------------------------------------------------------------------------
# storage, dtypes and labels
# --------------------------------------------------------------------------------------------

STORAGE = {
    "dense_float32": ("dense", np.float32),
    "dense_int64": ("dense", np.int64),
    "csr_int32": ("csr", np.int32),
    "csr_float64": ("csr", np.float64),
    "csr_uint16": ("csr", np.uint16),
    "csc_float32": ("csc", np.float32),
}
ODD_LABELS = ("NA", "nan", "None", "null", "1", "10", "a,b", 'q"x', " sp")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One pair of count matrices written with both files in each STORAGE."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_storage")
    X, labels, genes = _panel(12, ("G00", "G01", "G02", "G03"))
    Y, lp = _predict(X, labels, 5)
    out = {}
    for name, (fmt, dtype) in STORAGE.items():
        real = _restore(_write(d / f"real_{name}.h5ad", X, labels, genes), fmt, dtype)
        pred = _restore(_write(d / f"pred_{name}.h5ad", Y, lp, genes), fmt, dtype)
        out[name] = _pair(d, name, pred, real)
    return out


@pytest.mark.parametrize("name", sorted(STORAGE))
def test_storage_and_dtype_parity(storage, name):
    """X dense, CSR or CSC, of float32, float64, int64, int32 or uint16, in both files: cell-eval2's
    numbers, the same for every storage."""
    mine, theirs = storage[name]
    a = ad.read_h5ad(mine.parent / f"real_{name}.h5ad", backed="r")
    fmt, dtype = STORAGE[name]
    assert a.X.dtype == dtype
    a.file.close()
    _assert_pair(mine, theirs)
    _assert_pair(mine, storage["dense_float32"][1])


@pytest.fixture(scope="module")
def odd_labels(tmp_path_factory):
    """A panel whose labels a CSV round trip could change (not genes: --no-target-genes), as
    written, and with every cell of both files named alike."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_labels")
    X, labels, genes = _panel(13, ODD_LABELS)
    real = _write(d / "real.h5ad", X, labels, genes)
    pred = _write(d / "pred.h5ad", *_predict(X, labels, 6), genes)
    out = {"plain": _pair(d, "plain", pred, real, "--no-target-genes", no_target_genes=True)}
    for path in (real, pred):
        a = ad.read_h5ad(path)
        a.obs_names = ["cell"] * a.n_obs
        a.write_h5ad(path.with_name(f"dup_{path.name}"))
    out["dup_names"] = _pair(d, "dup_names", d / "dup_pred.h5ad", d / "dup_real.h5ad", "--no-target-genes", no_target_genes=True)
    return out


def test_odd_labels_parity(odd_labels):
    """'NA', 'nan', 'None', 'null', '1', '10', 'a,b', 'q"x', ' sp': cell-eval2's numbers, and
    results.csv gives every label back as written, on both sides."""
    mine, theirs = odd_labels["plain"]
    _assert_pair(mine, theirs)
    assert _labels_as_written(mine / "results.csv") == _labels_as_written(theirs / "results.csv") == set(ODD_LABELS)


def test_duplicated_cell_names_parity(odd_labels):
    """Every cell of both files named alike: cell-eval2's numbers, the same as with unique names."""
    mine, theirs = odd_labels["dup_names"]
    assert not ad.read_h5ad(mine.parent / "dup_real.h5ad").obs_names.is_unique
    _assert_pair(mine, theirs)
    _assert_pair(mine, odd_labels["plain"][1])


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """20 genes at 2e4-4.5e4 counts per cell (under 1e6 per cell), 400 controls: a control group's
    sum of a gene exceeds 2**24, where float32 stops holding every integer."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_wide")
    rng = np.random.default_rng(17)
    genes = [f"G{i:02d}" for i in range(20)]
    base = rng.uniform(2e4, 4.5e4, 20)
    rows, labels = [rng.poisson(base, (400, 20))], [CONTROL] * 400
    for k in range(4):
        lam = base.copy()
        lam[k] = 3.0
        lam[8 + 3 * k:11 + 3 * k] *= 1.3
        rows.append(rng.poisson(lam, (40, 20)))
        labels += [genes[k]] * 40
    X, labels = np.vstack(rows).astype(np.float32), np.asarray(labels, dtype=object)
    real = _write(d / "real.h5ad", X, labels, genes)
    pred = _write(d / "pred.h5ad", *_predict(X, labels, 7, cells=40), genes)
    return X, labels, _pair(d, "wide", pred, real)


def test_large_counts_per_gene_in_float32_parity(wide):
    """Group sums beyond float32's exact integers: cell-eval2's numbers."""
    X, labels, pair = wide
    assert X.sum(axis=1).max() < 1e6
    assert X[labels == CONTROL].astype(np.float64).sum(axis=0).max() > 2**24
    _assert_pair(*pair)


# --------------------------------------------------------------------------------------------
# the scale: baseline genes at the edges, the score's clamps, seeds
# --------------------------------------------------------------------------------------------


def _scale_reference(seed: int = 31):
    """A reference whose scale is resolved (81 controls: an odd number to halve; five knockdowns
    G00..G04 of 30 cells, each moving 8 random genes x0.3 or x2.5), with gene 40 at zero in every
    perturbation and gene 41 absent from the controls but for one count, and high elsewhere."""
    rng = np.random.default_rng(seed)
    n = 80
    genes = [f"G{i:02d}" for i in range(n)]
    base = rng.gamma(2, 15, n) + 2
    rows, labels = [rng.poisson(base, (81, n))], [CONTROL] * 81
    for k in range(5):
        lam = base.copy()
        lam[k] *= 0.3
        moved = rng.choice(np.arange(10, n), 8, replace=False)
        lam[moved] *= rng.choice([0.3, 2.5], 8)
        rows.append(rng.poisson(lam, (30, n)))
        labels += [genes[k]] * 30
    X, labels = np.vstack(rows).astype(np.float32), np.asarray(labels, dtype=object)
    ctrl = labels == CONTROL
    X[~ctrl, 40] = 0
    X[ctrl, 41] = 0
    X[np.flatnonzero(ctrl)[3], 41] = 1
    X[~ctrl, 41] = rng.poisson(25, (~ctrl).sum())
    return X, labels, genes


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    """Both ends of the scale by both tools (cell-eval2's baseline with --seed 3 too), and three
    predictions scored on it: the reference's own cells (truth), genes scaled by 0.02 or 40
    at random (garbage), each effect's sign reversed (negated)."""
    _oracle_module()
    from vcell.eval.vcc2026.files import Options, scale_ends
    from vcell.eval.vcc2026.score_files import score

    d = tmp_path_factory.mktemp("edges_scale")
    X, labels, genes = _scale_reference()
    real = _write(d / "real.h5ad", X, labels, genes)
    pert = labels != CONTROL
    lp = labels[pert]
    rng = np.random.default_rng(5)
    negated = np.zeros_like(X[pert])
    cm = X[~pert].mean(0)
    for q in sorted(set(lp)):
        lam = np.clip(cm * cm / np.maximum(X[labels == q].mean(0), 0.5), 0, 500)
        negated[lp == q] = rng.poisson(lam, ((lp == q).sum(), len(genes)))
    preds = {"truth": X[pert],
             "garbage": rng.poisson(X[pert].mean(0) * rng.choice([0.02, 40.0], size=len(genes)), (pert.sum(), len(genes))),
             "negated": negated}
    paths = {name: _write(d / f"pred_{name}.h5ad", Y, lp, genes) for name, Y in preds.items()}

    base = {0: d / "ce2_base", 3: d / "ce2_base_seed3"}
    for seed, folder in base.items():
        _oracle("baseline", "-ar", real, "--preset", "vcc2026", "--pert-col", PERT_COL, "--seed", seed, "-o", folder)
    anchor = _oracle_run(paths["truth"], real, d / "ce2_truth", "--anchor")  # the truth run carries the anchor
    runs = {"truth": (d / "v_truth", anchor)}
    for name in ("garbage", "negated"):
        runs[name] = (d / f"v_{name}", _oracle_run(paths[name], real, d / f"ce2_{name}"))
    for name, (mine, _) in runs.items():
        _vcell_run(paths[name], real, mine)
    scale_ends(real, d / "v_scale", Options())
    scores = {}
    for name, (mine, theirs) in runs.items():
        _oracle("score", "--user-agg", theirs / "agg_results.csv", "--baseline-agg", base[0] / "baseline_agg.csv",
                "--anchor", anchor, "-o", d / f"ce2_score_{name}.csv")
        scores[name] = (score(mine, d / "v_scale").set_index("metric"), pd.read_csv(d / f"ce2_score_{name}.csv").set_index("metric"))
    return {"dir": d, "real": real, "X": X, "labels": labels, "runs": runs, "base": base, "anchor": anchor, "scores": scores,
            "v_scale": d / "v_scale"}


def _assert_anchor_equal(mine: Path, theirs: Path) -> pd.DataFrame:
    """vcell's anchor_splits.csv / anchor_agg.csv against cell-eval2's anchor parquet files: every
    split's seed, value and n_perturbations, and the replicate with its spread."""
    splits = pd.read_csv(mine / "anchor_splits.csv")
    j = splits.merge(pd.read_parquet(theirs / "anchor_splits.parquet"), on=["split_index", "metric"], suffixes=("", "_o"),
                     how="outer", indicator=True)
    assert (j["_merge"] == "both").all() and j["split_index"].nunique() == 5
    assert (j["seed"] == j["seed_o"]).all()
    assert _close(j["value"], j["value_o"]).all(), j.loc[~_close(j["value"], j["value_o"]), ["split_index", "metric", "value", "value_o"]]
    assert _close(j["n_perturbations"], j["n_perturbations_o"], 0).all()
    agg = pd.read_csv(mine / "anchor_agg.csv").set_index("metric")
    oagg = pd.read_parquet(theirs / "anchor_agg.parquet").set_index("metric")
    assert sorted(agg.index) == sorted(oagg.index)
    for col in ("replicate", "replicate_sd", "replicate_min", "replicate_max"):
        ok = _close(agg[col], oagg.loc[agg.index, col])
        assert ok.all(), (col, agg.loc[~ok, col].to_dict(), oagg.loc[agg.index[~ok], col].to_dict())
    return splits


def test_scale_with_edge_genes_parity(scale):
    """A gene zero in every perturbation, one with a single control count, an odd number of
    controls: the baseline (per perturbation, aggregated) and the anchor as cell-eval2's."""
    X, labels = scale["X"], scale["labels"]
    ctrl = labels == CONTROL
    assert ctrl.sum() % 2 == 1 and X[~ctrl, 40].max() == 0 and X[ctrl, 41].sum() == 1 and X[~ctrl, 41].mean() > 10
    mine = scale["v_scale"]
    assert_results_equal(mine, scale["base"][0], "baseline_results.csv", "baseline_results.csv")
    assert_agg_equal(mine / "baseline_agg_results.csv", scale["base"][0] / "baseline_agg.csv")
    _assert_anchor_equal(mine, scale["anchor"])


def test_non_default_seeds_parity(scale, targets, cli):
    """`vcell eval baseline --seed 3` (the baseline's control draws) as cell-eval2's baseline
    --seed 3; `--anchor-seed 7` (the splits) with every perturbation mapped to one gene (the
    baseline is refused there, below; the anchor is defined) as cell-eval2's run --anchor
    --anchor-base-seed 7 with that map; both seeds change the numbers."""
    for name in ("seed_3", "anchor_seed_7"):
        assert cli["procs"][name].returncode == 0, cli["procs"][name].stderr[-2000:]
    mine = cli["dir"] / "out_seed_3"
    assert_results_equal(mine, scale["base"][3], "baseline_results.csv", "baseline_results.csv")
    assert_agg_equal(mine / "baseline_agg_results.csv", scale["base"][3] / "baseline_agg.csv")
    b0 = _read_results(scale["v_scale"] / "baseline_results.csv")["value"].to_numpy()
    b3 = _read_results(mine / "baseline_results.csv")["value"].to_numpy()
    assert not np.allclose(b0, b3, equal_nan=True)
    seeded = _assert_anchor_equal(cli["dir"] / "out_anchor_seed_7", targets["maps"]["all_to_one"][1])
    assert set(seeded["seed"]).isdisjoint(pd.read_csv(scale["v_scale"] / "anchor_splits.csv")["seed"])


@pytest.mark.parametrize("name", ["truth", "garbage", "negated"])
def test_score_clamps_parity(scale, name):
    """The run and the scaled score as cell-eval2's (score = from_replicate, and from_baseline),
    clamps included: de_wilcoxon_lfc_nmae floored at -6, expr_mse_unbiased_capped_norm's score in
    [0, 1], the others unclamped (above 1, or below -1)."""
    _assert_pair(*scale["runs"][name])
    mine, theirs = scale["scores"][name]
    assert set(mine.index) == set(theirs.index)
    theirs = theirs.loc[mine.index]
    assert _close(mine["score"], theirs["from_replicate"]).all(), pd.concat([mine["score"], theirs["from_replicate"]], axis=1)
    assert _close(mine["from_baseline"], theirs["from_baseline"]).all()
    s = mine["score"]
    assert 0.0 <= s["expr_mse_unbiased_capped_norm"] <= 1.0
    if name == "truth":
        assert mine.loc["expr_mse_unbiased_capped_norm", "value"] < 0 and s["expr_mse_unbiased_capped_norm"] == 1.0
        assert s["de_wilcoxon_sig_jaccard"] > 1.0 and s["avg_score"] > 1.0
    if name == "garbage":
        assert s["de_wilcoxon_lfc_nmae"] == -6.0 and mine.loc["de_wilcoxon_lfc_nmae", "from_baseline"] == -6.0
        assert mine.loc["expr_mse_unbiased_capped_norm", "value"] > 1.0 and s["expr_mse_unbiased_capped_norm"] == 0.0
    if name == "negated":
        assert s["de_wilcoxon_direction_reach_raw"] < -1.0  # no floor but lfc_nmae's
        assert s["pds_cosine"] == -1.0 and s["de_wilcoxon_lfc_nmae"] == -6.0


# --------------------------------------------------------------------------------------------
# refused by both tools
# --------------------------------------------------------------------------------------------


def _edit(X: np.ndarray, row: int, col: int, value: float) -> np.ndarray:
    Y = X.astype(np.float64)
    Y[row, col] = value
    return Y


@pytest.fixture(scope="module")
def cli(tmp_path_factory, targets, scale):
    """Every vcell command line of this file, in one process: bad references and predictions of one
    panel (four knockdowns, 40 controls first), the baseline of a panel of one perturbation and of
    a map sending every perturbation to one gene (each also through cell-eval2), the baseline of
    the scale reference with --seed 3 and the anchor of that map with --anchor-seed 7; a cell of
    exactly 1e6 counts, through both tools."""
    _oracle_module()
    d = tmp_path_factory.mktemp("edges_cli")
    X, labels, genes = _panel(16, ("G00", "G01", "G02", "G03"))
    Y, lp = _predict(X, labels, 8)
    real = _write(d / "real.h5ad", X, labels, genes)
    pred = _write(d / "pred.h5ad", Y, lp, genes)
    big = X.astype(np.float64)
    big[2, 4] += 2e6 - big[2].sum()  # a control cell of 2e6 counts
    exact = Y.astype(np.float64)
    exact[3, 4] += 1e6 - exact[3].sum()  # a predicted cell of exactly 1e6 counts: accepted
    files = {
        "real_fractional": (pred, _write(d / "real_frac.h5ad", _edit(X, 50, 4, X[50, 4] + 0.5), labels, genes)),
        "real_negative": (pred, _write(d / "real_neg.h5ad", _edit(X, 50, 4, -3), labels, genes)),
        "real_log1p": (pred, _write(d / "real_log1p.h5ad", np.log1p(X), labels, genes)),
        "real_control_over_1e6": (pred, _write(d / "real_big.h5ad", big, labels, genes)),
        "pred_nan": (_write(d / "pred_nan.h5ad", _edit(Y, 3, 4, np.nan), lp, genes), real),
        "pred_inf": (_write(d / "pred_inf.h5ad", _edit(Y, 3, 4, np.inf), lp, genes), real),
        "pred_negative": (_write(d / "pred_neg.h5ad", _edit(Y, 3, 4, -1), lp, genes), real),
    }
    commands = {name: ["eval", "run", "--profile", "vcc2026", "--pred", p, "--real", r, "--out", d / f"out_{name}"]
                for name, (p, r) in files.items()}
    map_all, value_all = targets["map_files"]["all_to_one"]
    commands["baseline_one_perturbation"] = ["eval", "baseline", "--profile", "vcc2026", "--real", targets["real1"],
                                             "--out", d / "out_baseline_one_perturbation"]
    commands["baseline_all_to_one"] = ["eval", "baseline", "--profile", "vcc2026", "--real", targets["real"], "--target-genes", map_all,
                                       "--out", d / "out_baseline_all_to_one"]
    commands["seed_3"] = ["eval", "baseline", "--profile", "vcc2026", "--real", scale["real"], "--seed", 3, "--only", "baseline",
                          "--out", d / "out_seed_3"]
    commands["anchor_seed_7"] = ["eval", "baseline", "--profile", "vcc2026", "--real", targets["real"], "--target-genes", map_all,
                                 "--anchor-seed", 7, "--only", "anchor", "--out", d / "out_anchor_seed_7"]
    procs = dict(zip(commands, run_cli_batch(list(commands.values())), strict=True))
    oracle = {}
    for name, (p, r) in files.items():
        try:
            _oracle_run(p, r, d / f"ce2_{name}")
        except Exception as exc:
            oracle[name] = exc
    for name, args in (("baseline_one_perturbation", [targets["real1"]]), ("baseline_all_to_one", [targets["real"], "--set", value_all])):
        try:
            _oracle("baseline", "-ar", args[0], "--preset", "vcc2026", "--pert-col", PERT_COL, *args[1:], "-o", d / f"ce2_{name}")
        except Exception as exc:
            oracle[name] = exc
    exact_pair = _pair(d, "exact_1e6", _write(d / "pred_exact.h5ad", exact, lp, genes), real)
    return {"dir": d, "procs": procs, "oracle": oracle, "exact": exact_pair, "exact_X": exact}


#: case -> (words of vcell's error line, words of cell-eval2's exception)
REFUSED = {
    "real_fractional": ("real_frac.h5ad: value", "is not an integer", "fractional"),
    "real_negative": ("real_neg.h5ad: value -3.0", "is negative", "negative"),
    "real_log1p": ("real_log1p.h5ad: value", "is not an integer", "fractional"),
    "real_control_over_1e6": ("real_big.h5ad: cell 2 ('non-targeting') holds 2,000,000 counts", "more than the 1,000,000 allowed", "exceeds max_counts_per_cell"),
    "pred_nan": ("pred_nan.h5ad: value nan at row 3", "is not finite", "fractional"),
    "pred_inf": ("pred_inf.h5ad: value inf at row 3", "is not finite", "exceeds max_counts_per_cell"),
    "pred_negative": ("pred_neg.h5ad: value -1.0 at row 3", "is negative", "negative"),
    "baseline_one_perturbation": ("gene 'G00' is the target of every perturbation", "the mean response has no value there", "at least 2 non-control"),
    "baseline_all_to_one": ("gene 'G07' is the target of every perturbation", "the mean response has no value there", "leaves no perturbation"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_by_both(cli, case):
    """A bad reference (fractional, negative, log1p, a control cell over 1e6 counts), a bad
    prediction (NaN, inf, negative), a baseline whose mean response is undefined at a gene: vcell
    exits 2 with one error line naming it and writes nothing; cell-eval2 raises."""
    *words, theirs = REFUSED[case]
    line = error_line(cli["procs"][case])
    for w in words:
        assert w in line, line
    assert not (cli["dir"] / f"out_{case}").exists()
    assert case in cli["oracle"], "cell-eval2 accepted it"
    assert theirs in str(cli["oracle"][case]), repr(cli["oracle"][case])


def test_a_cell_of_exactly_1e6_counts_is_accepted_by_both(cli):
    """The per-cell limit is inclusive: a predicted cell of exactly 1e6 counts is scored, as by cell-eval2."""
    assert cli["exact_X"].sum(axis=1).max() == 1e6
    _assert_pair(*cli["exact"])
