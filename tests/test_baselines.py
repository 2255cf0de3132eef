"""Baselines: each one's defining property, on simulated data (known effects) and the real files."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.data.aggregate import group_sums
from vcell.data.dataset import from_anndata, load_dataset
from vcell.data.preprocess import normalize_log1p
from vcell.data.simulate import simulate_perturbseq
from vcell.data.spec import DataSpec
from vcell.data.split_files import SplitConfig
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.features.genes import GeneEmbeddings
from vcell.predictors.base import Predictor
from vcell.predictors.baselines import (
    BASELINES,
    DEFAULT_ALPHAS,
    CellMean,
    ContextMean,
    ControlMean,
    LinearBaseline,
    PertMean,
    make_baseline,
    training_stats,
)

MCF_SPEC = DataSpec(pert_col="perturbation", control="control", context_col="cell_type")
SIM_SPEC = DataSpec(batch_col="gem_group")
CTRL = "non-targeting"


# --------------------------------------------------------------------------------------------
# helpers (independent of vcell.models: dense pandas group-bys on small data)


def dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def pseudobulks(adata: ad.AnnData, mask: np.ndarray, by: list[str]) -> pd.DataFrame:
    """Mean expression of the cells in ``mask``, grouped by ``by`` columns (float64)."""
    obs = adata.obs.loc[mask, by].astype(str).reset_index(drop=True)
    frame = pd.DataFrame(dense(adata.X[np.flatnonzero(mask)]), columns=adata.var_names)
    return pd.concat([obs, frame], axis=1).groupby(by).mean()


def observed_effects(adata: ad.AnnData, context: str, labels, pert_col="target_gene", ctx_col="cell_type", control=CTRL) -> np.ndarray:
    """``pseudobulk(label, context) - pseudobulk(controls, context)`` for each label."""
    in_ctx = (adata.obs[ctx_col].astype(str) == context).to_numpy()
    pb = pseudobulks(adata, in_ctx, [pert_col])
    return pb.loc[list(labels)].to_numpy() - pb.loc[control].to_numpy()[None, :]


def context_controls(adata: ad.AnnData, context: str, pert_col="target_gene", ctx_col="cell_type", control=CTRL) -> ad.AnnData:
    mask = ((adata.obs[ctx_col].astype(str) == context) & (adata.obs[pert_col].astype(str) == control)).to_numpy()
    sub = adata[mask]
    return sub.to_memory() if sub.isbacked else sub.copy()


def simulated(**options) -> ad.AnnData:
    params = dict(n_genes=300, n_contexts=3, n_perturbations=16, n_combinations=0, cells_per_perturbation=100, n_controls=300, seed=0)
    params.update(options)
    return normalize_log1p(simulate_perturbseq(**params))


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sim():
    """Three contexts, 16 single perturbations, ctx_C held out (zero-shot)."""
    adata = simulated()
    data = from_anndata(adata, SIM_SPEC)
    return adata, data, apply_split(data.index, holdout_config(data.index, ["ctx_C"]))


@pytest.fixture(scope="module")
def sim_combos():
    """Two contexts, 12 singles and 12 pairs; every pair held out (test) in both contexts."""
    adata = simulated(n_contexts=2, n_perturbations=12, n_combinations=12)
    data = from_anndata(adata, SIM_SPEC)
    combos = [lab for lab in adata.uns["simulation"]["labels"] if "+" in lab]
    cfg = SplitConfig(training={"synthetic": "train"}, fewshot={f"synthetic.{c}": {"test": combos} for c in ("ctx_A", "ctx_B")})
    return adata, data, apply_split(data.index, cfg), combos


@pytest.fixture(scope="module")
def mcf_path():
    from conftest import real_data  # the full file, else its small subset in tests/data

    return real_data("mcfaline2023_norman2019.h5ad")


@pytest.fixture(scope="module")
def mcf(mcf_path):
    """The McFaline/Norman file opened backed (on disk), T98G held out."""
    data = load_dataset(mcf_path, MCF_SPEC, backed=True, dataset_col="dataset")
    return data, apply_split(data.index, holdout_config(data.index, ["T98G"]))


@pytest.fixture(scope="module")
def mcf_memory(mcf_path):
    return ad.read_h5ad(mcf_path)


# --------------------------------------------------------------------------------------------
# registry and input checks


def test_registry_and_make_baseline():
    assert set(BASELINES) == {"control_mean", "cell_mean", "pert_mean", "context_mean", "linear", "kernel_ridge"}
    for name, cls in BASELINES.items():
        model = make_baseline(name)
        assert isinstance(model, cls) and isinstance(model, Predictor) and model.name == name
        assert cls.__doc__ and cls.__doc__.strip()
    assert make_baseline("linear", alpha=2.0, seed=3).alpha == 2.0
    with pytest.raises(VcellError, match="did you mean 'pert_mean'"):
        make_baseline("pertmean")
    with pytest.raises(VcellError, match="no option 'alpha'"):
        make_baseline("pert_mean", alpha=1.0)
    with pytest.raises(VcellError, match="linear: pert_features file 'nope.safetensors' not found"):
        make_baseline("linear", pert_features="nope.safetensors")


def test_counts_data_is_refused():
    raw = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=4, n_combinations=0, cells_per_perturbation=10, n_controls=20)
    data = from_anndata(raw, SIM_SPEC)
    assert data.spec.expression == "counts"
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    for name in BASELINES:
        with pytest.raises(VcellError, match="log1p"):
            make_baseline(name).fit(data, split)


def test_predict_before_fit_is_an_error(sim):
    adata, _, _ = sim
    with pytest.raises(VcellError, match="before fit"):
        PertMean().predict(context_controls(adata, "ctx_C"), ["GENE0001"], "ctx_C")


def test_group_sums_in_blocks_match_dense_group_means(sim):
    adata, _, _ = sim
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 5, adata.n_obs)  # -1: skipped cells
    X = dense(adata.X)
    expected = np.stack([X[codes == g].sum(axis=0) for g in range(5)])
    for chunk in (7, 1000, 10**6):
        np.testing.assert_allclose(group_sums(adata.X, codes, 5, chunk_rows=chunk), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(group_sums(X, codes, 5, chunk_rows=13), expected, rtol=1e-9, atol=1e-9)


def test_training_stats_backed_equals_in_memory(mcf, mcf_path):
    data, split = mcf
    assert data.backed
    memory = load_dataset(mcf_path, MCF_SPEC, backed=False, dataset_col="dataset")
    a, b = training_stats(data, split), training_stats(memory, split)
    pd.testing.assert_frame_equal(a.groups, b.groups)
    np.testing.assert_allclose(a.means, b.means, rtol=1e-12)
    np.testing.assert_allclose(a.control_means, b.control_means, rtol=1e-12)
    assert "T98G" not in set(a.groups["context"])  # held out: no training groups
    assert "T98G" in set(a.controls["context"])  # its controls stay available


# --------------------------------------------------------------------------------------------
# control_mean and cell_mean


def test_control_mean_predicts_the_target_controls(mcf):
    data, split = mcf
    model = ControlMean().fit(data, split)
    controls = context_controls(data.adata, "T98G", "perturbation", control="control")
    perts = ["MAPK1", "PLK4", "SGK1"]
    # as many cells as controls: each block is a permutation of the controls -> exact pseudobulk
    pred = model.predict(controls, perts, "T98G", cells_per_perturbation=controls.n_obs, seed=3)
    X, labels = dense(pred.X), pred.obs["perturbation"].astype(str).to_numpy()
    ctrl_pb = dense(controls.X).mean(axis=0)
    for p in perts:
        np.testing.assert_allclose(X[labels == p].mean(axis=0), ctrl_pb, atol=1e-6)
        assert np.array_equal(np.sort(X[labels == p], axis=0), np.sort(dense(controls.X).astype(np.float32), axis=0))
    assert np.all(model.predict_shift(controls, perts, "T98G") == 0)


def test_cell_mean_is_the_vcc_vector(mcf, mcf_memory):
    data, split = mcf
    model = CellMean().fit(data, split)
    # independent: training cells + the training contexts' controls, one group per label
    full = mcf_memory
    ctx = full.obs["cell_type"].astype(str).to_numpy()
    is_ctrl = (full.obs["perturbation"] == "control").to_numpy()
    train = split.mask("train")
    train_ctx = set(ctx[train])
    keep = train | (is_ctrl & np.isin(ctx, list(train_ctx)))
    expected = pseudobulks(full, keep, ["perturbation"]).to_numpy().mean(axis=0)

    controls = context_controls(full, "T98G", "perturbation", control="control")
    perts = ["MAPK1", "PLK4", "TGFBR2"]
    pred = model.predict(controls, perts, "T98G", cells_per_perturbation={"MAPK1": 5, "PLK4": 7, "TGFBR2": 1})
    X, labels = dense(pred.X), pred.obs["perturbation"].astype(str).to_numpy()
    perturbed = labels != "control"
    assert perturbed.sum() == 13 and (pred.obs["cell_type"] == "T98G").all()
    np.testing.assert_allclose(X[perturbed], np.tile(expected, (13, 1)), atol=1e-6)
    np.testing.assert_array_equal(X[~perturbed], dense(controls.X).astype(np.float32))

    pytest.importorskip("cell_eval", reason="cell-eval (test extra) not installed: skipping the parity check")
    from cell_eval import build_base_mean_adata

    sub = full[keep].copy()
    sub.obs = sub.obs[["perturbation"]].astype(str)
    theirs = build_base_mean_adata(sub, pert_col="perturbation", control_pert="control")
    theirs_vec = dense(theirs.X)[(theirs.obs["perturbation"] != "control").to_numpy()][0]
    np.testing.assert_allclose(model.vector_, theirs_vec, atol=1e-6)
    np.testing.assert_allclose(X[perturbed][0], theirs_vec, atol=1e-6)


# --------------------------------------------------------------------------------------------
# pert_mean and context_mean


def imbalanced_split(data, labels):
    """ctx_C held out; in ctx_B the first five perturbations are test, so they are seen in ctx_A only."""
    cfg = holdout_config(data.index, ["ctx_C"])
    cfg.fewshot = {"synthetic.ctx_B": {"test": list(labels[:5])}}
    return apply_split(data.index, cfg)


def expected_pert_means(adata, labels) -> np.ndarray:
    eff_a, eff_b = (observed_effects(adata, c, labels) for c in ("ctx_A", "ctx_B"))
    means = (eff_a + eff_b) / 2
    means[:5] = eff_a[:5]  # seen in ctx_A only
    return means


def test_pert_mean_is_the_mean_effect_over_training_contexts(sim):
    adata, data, _ = sim
    labels = adata.uns["simulation"]["labels"]
    model = PertMean().fit(data, imbalanced_split(data, labels))
    shift = model.predict_shift(context_controls(adata, "ctx_C"), labels, "ctx_C")
    np.testing.assert_allclose(shift, expected_pert_means(adata, labels), atol=1e-6)


def test_pert_mean_recovers_planted_effects(sim):
    adata, data, split = sim
    truth = adata.uns["simulation"]
    labels, strength = truth["labels"], np.asarray(truth["strength"])
    strong = strength > np.median(strength)
    expressed = np.asarray(truth["base_mean"]).min(axis=0) > 0.5  # log1p compresses near-zero genes
    shift = PertMean().fit(data, split).predict_shift(context_controls(adata, "ctx_C"), labels, "ctx_C")
    planted = np.asarray(truth["true_lfc"])[:2].mean(axis=0)  # the training contexts' planted effects
    r = np.corrcoef(shift[strong][:, expressed].ravel(), planted[strong][:, expressed].ravel())[0, 1]
    assert r > 0.8, r

    # no context-specific effects: the held-out context's truth is the same -> pert_mean is close
    same = simulated(context_effect_share=0.0)
    same_data = from_anndata(same, SIM_SPEC)
    same_split = apply_split(same_data.index, holdout_config(same_data.index, ["ctx_C"]))
    shift0 = PertMean().fit(same_data, same_split).predict_shift(context_controls(same, "ctx_C"), labels, "ctx_C")
    held_out_truth = np.asarray(same.uns["simulation"]["true_lfc"])[2]
    r0 = np.corrcoef(shift0[strong][:, expressed].ravel(), held_out_truth[strong][:, expressed].ravel())[0, 1]
    assert r0 > 0.85, r0

    # with context-specific effects the held-out truth differs from the training contexts': less close
    held_out_30 = np.asarray(truth["true_lfc"])[2]
    r30 = np.corrcoef(shift[strong][:, expressed].ravel(), held_out_30[strong][:, expressed].ravel())[0, 1]
    assert r30 < r0 - 0.05, (r30, r0)


def test_pert_mean_unseen_perturbation_gets_the_global_mean(sim, caplog):
    adata, data, _ = sim
    labels = adata.uns["simulation"]["labels"]
    model = PertMean().fit(data, imbalanced_split(data, labels))
    expected = expected_pert_means(adata, labels).mean(axis=0)  # each perturbation counts once
    with caplog.at_level(logging.INFO, logger="vcell.predictors.baselines"):
        shift = model.predict_shift(context_controls(adata, "ctx_C"), ["NOT_A_GENE", labels[0], CTRL], "ctx_C")
    np.testing.assert_allclose(shift[0], expected, atol=1e-6)
    assert not np.allclose(shift[1], expected)
    assert np.all(shift[2] == 0)
    assert model.fallback_ == ["NOT_A_GENE"] and "NOT_A_GENE" in caplog.text


def test_context_mean_few_shot_is_the_mean_of_seen_effects(sim):
    adata, data, _ = sim
    labels = adata.uns["simulation"]["labels"]
    held = labels[::2]
    split = apply_split(data.index, SplitConfig(training={"synthetic": "train"}, fewshot={"synthetic.ctx_C": {"test": held}}))
    seen = [lab for lab in labels if lab not in held]
    expected = observed_effects(adata, "ctx_C", seen).mean(axis=0)
    model = ContextMean().fit(data, split)
    shift = model.predict_shift(context_controls(adata, "ctx_C"), held, "ctx_C")
    np.testing.assert_allclose(shift, np.tile(expected, (len(held), 1)), atol=1e-6)
    # another context's few-shot mean is a different vector
    other = model.predict_shift(context_controls(adata, "ctx_A"), held[:1], "ctx_A")[0]
    np.testing.assert_allclose(other, observed_effects(adata, "ctx_A", labels).mean(axis=0), atol=1e-6)


def test_context_mean_zero_shot_falls_back_to_the_global_mean(sim, caplog):
    adata, data, split = sim
    labels = adata.uns["simulation"]["labels"]
    with caplog.at_level(logging.INFO, logger="vcell.predictors.baselines"):
        shift = ContextMean().fit(data, split).predict_shift(context_controls(adata, "ctx_C"), labels[:3], "ctx_C")
    glob = PertMean().fit(data, split).global_effect_
    np.testing.assert_allclose(shift, np.tile(glob, (3, 1)), atol=1e-12)
    assert "zero-shot" in caplog.text


# --------------------------------------------------------------------------------------------
# linear


def test_linear_is_additive_and_beats_pert_mean_on_unseen_combinations(sim_combos, caplog):
    adata, data, split, combos = sim_combos
    lin = LinearBaseline().fit(data, split)
    controls = context_controls(adata, "ctx_A")
    with caplog.at_level(logging.INFO, logger="vcell.predictors.baselines"):
        base = lin.predict_shift(controls, ["NOT_A_GENE"], "ctx_A")[0]  # intercept + context term
    assert "intercept + context term" in caplog.text
    for combo in combos:
        a, b = combo.split("+")
        s_ab, s_a, s_b = lin.predict_shift(controls, [combo, a, b], "ctx_A")
        np.testing.assert_allclose(s_ab - base, (s_a - base) + (s_b - base), atol=1e-9)
        np.testing.assert_allclose(lin.predict_shift(controls, [f"{a}+NOT_A_GENE"], "ctx_A")[0], s_a, atol=1e-12)

    truth = observed_effects(adata, "ctx_A", combos)
    s_lin = lin.predict_shift(controls, combos, "ctx_A")
    s_pm = PertMean().fit(data, split).predict_shift(controls, combos, "ctx_A")
    mse_lin, mse_pm = np.mean((s_lin - truth) ** 2), np.mean((s_pm - truth) ** 2)
    assert mse_lin < 0.7 * mse_pm, (mse_lin, mse_pm)
    assert np.corrcoef(s_lin.ravel(), truth.ravel())[0, 1] > 0.7


def test_linear_alpha_by_seeded_cross_validation(sim_combos):
    from sklearn.linear_model import Ridge

    _, data, split, _ = sim_combos
    one = LinearBaseline(seed=0).fit(data, split)
    two = LinearBaseline(seed=0).fit(data, split)
    assert one.alpha_ == two.alpha_
    pd.testing.assert_frame_equal(one.cv_scores_, two.cv_scores_)
    assert list(one.cv_scores_["alpha"]) == list(DEFAULT_ALPHAS)
    assert one.alpha_ == one.cv_scores_["alpha"][one.cv_scores_["cv_mse"].idxmin()]
    assert not one.cv_scores_.equals(LinearBaseline(seed=1).fit(data, split).cv_scores_)  # the seed sets the folds

    # independent design matrix and sklearn ridge on the documented folds
    groups = one.stats_.groups
    targets = sorted({t for lab in groups["perturbation"] for t in lab.split("+")})
    contexts = sorted(set(groups["context"]))
    X = np.zeros((len(groups), len(targets) + len(contexts)))
    for i, (lab, ctx) in enumerate(zip(groups["perturbation"], groups["context"])):
        for t in lab.split("+"):
            X[i, targets.index(t)] += 1
        X[i, len(targets) + contexts.index(ctx)] = 1
    Y = one.stats_.effects
    folds = np.array_split(np.random.default_rng(0).permutation(len(X)), 5)
    for alpha, mse in zip(one.cv_scores_["alpha"], one.cv_scores_["cv_mse"]):
        sse = 0.0
        for held in folds:
            keep = np.setdiff1d(np.arange(len(X)), held)
            sse += np.sum((Ridge(alpha=alpha).fit(X[keep], Y[keep]).predict(X[held]) - Y[held]) ** 2)
        assert mse == pytest.approx(sse / Y.size, rel=1e-6)
    ridge = Ridge(alpha=one.alpha_).fit(X, Y)
    np.testing.assert_allclose(one.coef_, ridge.coef_.T, atol=1e-8)
    np.testing.assert_allclose(one.intercept_, ridge.intercept_, atol=1e-8)

    coarse = LinearBaseline(alphas=(0.05, 5000.0)).fit(data, split)
    assert coarse.alpha_ == coarse.cv_scores_["alpha"][coarse.cv_scores_["cv_mse"].idxmin()] and coarse.alpha_ in (0.05, 5000.0)
    fixed = LinearBaseline(alpha=123.0).fit(data, split)
    assert fixed.alpha_ == 123.0


def test_linear_unseen_context_uses_the_mean_context_coefficient(sim):
    adata, data, split = sim
    lin = LinearBaseline().fit(data, split)
    labels = adata.uns["simulation"]["labels"][:4]
    controls = context_controls(adata, "ctx_C")
    per_context = [lin.predict_shift(controls, labels, c) for c in ("ctx_A", "ctx_B")]
    np.testing.assert_allclose(lin.predict_shift(controls, labels, "ctx_C"), np.mean(per_context, axis=0), atol=1e-9)
    assert not np.allclose(per_context[0], per_context[1])
    # the unpenalised intercept absorbs the contexts' common part: their coefficients sum to 0
    n_ctx = len(lin.contexts_)
    assert n_ctx == 2
    np.testing.assert_allclose(lin.coef_[-n_ctx:].sum(axis=0), 0, atol=1e-9)


def test_linear_gene_embeddings_reach_unseen_targets():
    adata = simulated(n_contexts=2, n_perturbations=24, seed=2)
    data = from_anndata(adata, SIM_SPEC)
    truth = adata.uns["simulation"]
    labels = truth["labels"]
    held = labels[::4]  # never seen in any context
    cfg = SplitConfig(training={"synthetic": "train"}, fewshot={f"synthetic.{c}": {"test": held} for c in ("ctx_A", "ctx_B")})
    split = apply_split(data.index, cfg)
    # an informative embedding: the top principal components of each target's planted effect
    planted = np.asarray(truth["true_lfc"]).mean(axis=0)
    u, s, _ = np.linalg.svd(planted - planted.mean(axis=0), full_matrices=False)
    emb = GeneEmbeddings(names=labels, vectors=u[:, :8] * s[:8], source="planted")
    controls = context_controls(adata, "ctx_A")
    observed = observed_effects(adata, "ctx_A", held)
    plain = LinearBaseline().fit(data, split)
    with_emb = LinearBaseline(pert_features=["onehot", emb]).fit(data, split)
    emb_only = LinearBaseline(pert_features=emb).fit(data, split)
    base = plain.predict_shift(controls, ["NOT_A_GENE"], "ctx_A")[0]
    np.testing.assert_allclose(plain.predict_shift(controls, held, "ctx_A"), np.tile(base, (len(held), 1)), atol=1e-12)
    assert plain.featureless_ == held
    mse = lambda s: np.mean((s - observed) ** 2)  # noqa: E731
    for model in (with_emb, emb_only):
        assert mse(model.predict_shift(controls, held, "ctx_A")) < 0.8 * mse(np.tile(base, (len(held), 1)))
        assert model.featureless_ == []  # every held-out target has an embedding
        with pytest.raises(VcellError, match="linear: perturbation 'NOT_A_GENE': target 'NOT_A_GENE' is not in the perturbation feature table"):
            model.predict_shift(controls, [held[0], "NOT_A_GENE"], "ctx_A")


def test_linear_on_norman_doubles(mcf_path):
    data = load_dataset(mcf_path, MCF_SPEC, backed=True, dataset_col="dataset")
    norman = data.adata.obs[data.adata.obs["dataset"] == "norman19"]
    labels = sorted(set(norman["perturbation"].astype(str)) - {"control"})
    singles = {lab for lab in labels if "+" not in lab}
    doubles = [lab for lab in labels if "+" in lab and all(t in singles for t in lab.split("+"))]
    assert len(doubles) >= 3
    cfg = SplitConfig(training={"norman19": "train"}, fewshot={"norman19.k562": {"test": doubles}})
    split = apply_split(data.index, cfg)
    lin = LinearBaseline().fit(data, split)
    assert lin.alpha_ in DEFAULT_ALPHAS
    controls = context_controls(data.adata, "k562", "perturbation", control="control")
    base = lin.predict_shift(controls, ["NOT_A_GENE"], "k562")[0]
    for d in doubles:
        a, b = d.split("+")
        s_ab, s_a, s_b = lin.predict_shift(controls, [d, a, b], "k562")
        np.testing.assert_allclose(s_ab - base, (s_a - base) + (s_b - base), atol=1e-9)
    truth = observed_effects(data.adata.to_memory(), "k562", doubles, "perturbation", control="control")
    s_lin = lin.predict_shift(controls, doubles, "k562")
    s_pm = PertMean().fit(data, split).predict_shift(controls, doubles, "k562")  # unseen doubles: global mean
    assert np.mean((s_lin - truth) ** 2) < np.mean((s_pm - truth) ** 2)
    pred = lin.predict(controls, doubles, "k562", cells_per_perturbation=20)
    assert pred.n_obs == 20 * len(doubles) + controls.n_obs
    assert np.isfinite(dense(pred.X)).all() and dense(pred.X).min() >= 0


# --------------------------------------------------------------------------------------------
# every baseline on the real held-out context: the layout ``vcell eval run`` expects


@pytest.mark.parametrize("name", list(BASELINES))
def test_real_data_prediction_layout(name, mcf):
    data, split = mcf
    model = make_baseline(name).fit(data, split)
    controls = context_controls(data.adata, "T98G", "perturbation", control="control")
    perts = sorted(set(data.adata.obs.loc[data.adata.obs["cell_type"] == "T98G", "perturbation"].astype(str)) - {"control"})
    assert len(perts) == 9
    shift = model.predict_shift(controls, perts, "T98G")
    assert shift.shape == (len(perts), data.adata.n_vars) and np.isfinite(shift).all()
    pred = model.predict(controls, perts, "T98G", cells_per_perturbation=30, seed=1)
    assert list(pred.var_names) == list(data.adata.var_names)
    assert list(pred.obs.columns) == ["perturbation", "cell_type"]
    assert (pred.obs["cell_type"] == "T98G").all()
    counts = pred.obs["perturbation"].astype(str).value_counts()
    assert counts.to_dict() == {**{p: 30 for p in perts}, "control": controls.n_obs}
    X = dense(pred.X)
    assert np.isfinite(X).all() and X.min() >= 0
    n_pred = 30 * len(perts)
    np.testing.assert_array_equal(X[n_pred:], dense(controls.X).astype(np.float32))  # the real controls, appended last
    assert list(pred.obs_names[n_pred:]) == list(controls.obs_names)
    assert pred.obs_names.is_unique
    if name != "control_mean":  # every other baseline moves the cells
        assert np.abs(X[:n_pred].mean(axis=0) - dense(controls.X).mean(axis=0)).max() > 1e-3


def test_genes_must_match(mcf):
    data, split = mcf
    model = PertMean().fit(data, split)
    controls = context_controls(data.adata, "T98G", "perturbation", control="control")
    reordered = controls[:, controls.var_names[::-1]].copy()
    np.testing.assert_allclose(
        model.predict_shift(reordered, ["MAPK1"], "T98G")[0][::-1], model.predict_shift(controls, ["MAPK1"], "T98G")[0]
    )
    with pytest.raises(VcellError, match="genes differ"):
        model.predict_shift(controls[:, :100].copy(), ["MAPK1"], "T98G")


def test_context_mean_zero_shot_is_pert_means_global_effect_on_an_unbalanced_split():
    from vcell.data.dataset import from_anndata
    from vcell.predictors.baselines import ContextMean, PertMean

    adata = simulated()
    data = from_anndata(adata, SIM_SPEC)
    labels = adata.uns["simulation"]["labels"]
    split = imbalanced_split(data, labels)  # ctx_A saw 16 perturbations, ctx_B 11
    shift = ContextMean().fit(data, split).predict_shift(context_controls(adata, "ctx_C"), labels[:2], "ctx_C")
    expected = expected_pert_means(adata, labels).mean(axis=0)  # each perturbation once, not each context once
    np.testing.assert_allclose(shift, np.tile(expected, (2, 1)), atol=1e-6)
    np.testing.assert_allclose(shift[0], PertMean().fit(data, split).global_effect_, atol=1e-12)
