"""`linear` and `kernel_ridge` on perturbation features from gene tables (`pert_features`): a planted case.

The table puts the unseen target U next to the seen target S (strong, known effect) and far from
every other target, so a model using the table must predict U's shift in S's direction.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell.data.dataset import from_anndata
from vcell.data.spec import DataSpec
from vcell.data.split_files import SplitConfig
from vcell.data.splits import apply_split
from vcell.errors import VcellError
from vcell.features.genes import GeneEmbeddings
from vcell.predictors.baselines import KernelRidgeBaseline, PertMean
from vcell.predictors.linear import encode_pert_features
from vcell.predictors.registry import make_model

CTRL = "non-targeting"
OTHERS = [f"T{i}" for i in range(8)]


def planted(n_genes: int = 40, cells: int = 20, seed: int = 0):
    """Two contexts, targets T0..T7 (small random effects), S (+2 on the first 10 genes) and U (0.9 x S's)."""
    rng = np.random.default_rng(seed)
    effects = {t: rng.normal(0, 0.3, n_genes) for t in OTHERS}
    effects["S"] = np.where(np.arange(n_genes) < 10, 2.0, 0.0)
    effects["U"] = 0.9 * effects["S"]
    X, obs = [], []
    for ctx, shift in (("ctx_A", 0.0), ("ctx_B", 0.5)):
        basal = 3.0 + shift + rng.normal(0, 0.2, n_genes)
        for label in [CTRL, *effects]:
            mean = basal + (0.0 if label == CTRL else effects[label])
            X.append(mean + rng.normal(0, 0.1, (cells, n_genes)))
            obs += [(label, ctx)] * cells
    obs = pd.DataFrame(obs, columns=["target_gene", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    adata = ad.AnnData(np.clip(np.vstack(X), 0, None).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    vectors = np.eye(10, 11)  # T0..T7, S: orthogonal; U: close to S
    vectors[9] = 0.95 * vectors[8] + 0.3 * np.eye(11)[10]
    table = GeneEmbeddings(names=[*OTHERS, "S", "U"], vectors=vectors, source="planted")
    return adata, table, effects


@pytest.fixture(scope="module")
def case():
    adata, table, effects = planted()
    data = from_anndata(adata, DataSpec(context_col="cell_type", expression="log1p"))
    held = {f"data.{c}": {"test": ["U"]} for c in ("ctx_A", "ctx_B")}  # U never seen perturbed
    split = apply_split(data.index, SplitConfig(training={"data": "train"}, fewshot=held))
    controls = {c: adata[((adata.obs["target_gene"] == CTRL) & (adata.obs["cell_type"] == c)).to_numpy()].copy() for c in ("ctx_A", "ctx_B")}
    return data, split, table, effects, controls


@pytest.mark.parametrize("name,options", [("kernel_ridge", {}), ("kernel_ridge", {"kernel": "cosine"}), ("linear", {})])
def test_table_features_predict_an_unseen_target_in_the_planted_direction(case, name, options):
    data, split, table, effects, controls = case
    model = make_model(name, pert_features=table, **options).fit(data, split)
    assert "U" not in model.trained_perturbations()
    u = model.predict_shift(controls["ctx_A"], ["U"], "ctx_A")[0]
    fallback = PertMean().fit(data, split).predict_shift(controls["ctx_A"], ["U"], "ctx_A")[0]  # the global mean effect
    assert np.corrcoef(u, effects["S"])[0, 1] > 0.9
    assert np.linalg.norm(u - effects["U"]) < 0.3 * np.linalg.norm(fallback - effects["U"])
    assert np.linalg.norm(u - fallback) > 2.0
    # one-hot only: an unseen target carries no information, the documented fallback (no error)
    onehot = make_model(name, **options).fit(data, split)
    v = onehot.predict_shift(controls["ctx_A"], ["U"], "ctx_A")[0]
    assert onehot.featureless_ == ["U"] and np.linalg.norm(v - effects["U"]) > 3 * np.linalg.norm(u - effects["U"])


def test_kernel_ridge_contexts_and_onehot_fallback(case):
    data, split, table, effects, controls = case
    krr = KernelRidgeBaseline(pert_features=table).fit(data, split)
    a, b = (krr.predict_shift(controls[c], ["S", "T0", CTRL], c) for c in ("ctx_A", "ctx_B"))
    np.testing.assert_allclose(a[:2] - b[:2], np.tile(krr.context_effects_[0] - krr.context_effects_[1], (2, 1)), atol=1e-12)
    assert not a[2].any() and not b[2].any()  # controls: no shift
    unseen = krr.predict_shift(controls["ctx_A"], ["S"], "ctx_Z")  # a context never trained on: the mean of the contexts
    np.testing.assert_allclose(unseen[0], (a[0] + b[0]) / 2, atol=1e-12)
    plain = KernelRidgeBaseline().fit(data, split)  # one-hot: a target without a vector adds no kernel term
    z = plain.predict_shift(controls["ctx_A"], ["U", "T0+U"], "ctx_A")
    np.testing.assert_allclose(z[0], plain.context_effects_[0] + plain.offset_, atol=1e-12)
    np.testing.assert_allclose(z[1], plain.predict_shift(controls["ctx_A"], ["T0"], "ctx_A")[0], atol=1e-12)


def test_target_absent_from_the_table_is_one_error_line(case):
    data, split, table, _, controls = case
    partial = GeneEmbeddings(names=table.names[:-1], vectors=table.vectors[:-1], source="partial")  # no U
    for name in ("kernel_ridge", "linear"):
        model = make_model(name, pert_features=partial).fit(data, split)
        with pytest.raises(VcellError, match=rf"^{name}: perturbation 'S\+U': target 'U' is not in the perturbation feature table \(partial; a gene with an all-zero vector there counts as absent\)$"):
            model.predict(controls["ctx_A"], ["S", "S+U"], "ctx_A")
        assert model.predict_shift(controls["ctx_A"], ["S"], "ctx_A").shape == (1, 40)
        # a training target outside the table: refused at fit time, unless onehot gives it a column
        no_s = GeneEmbeddings(names=[*OTHERS, "U"], vectors=table.vectors[[*range(8), 9]], source="no S")
        with pytest.raises(VcellError, match=f"{name}: training perturbation 'S': target 'S' is not in .*add 'onehot'"):
            make_model(name, pert_features=no_s).fit(data, split)
        make_model(name, pert_features=["onehot", no_s]).fit(data, split)


def test_combination_features_are_the_sum(case):
    data, split, table, _, controls = case
    for name in ("kernel_ridge", "linear"):
        model = make_model(name, pert_features=["onehot", table]).fit(data, split)
        X, unknown, featureless = encode_pert_features(name, model.features_, ["S+T0", "S", "T0", "U+T1", "U", "T1", CTRL], CTRL)
        np.testing.assert_allclose(X[0], X[1] + X[2])
        np.testing.assert_allclose(X[3], X[4] + X[5])
        assert not X[6].any() and unknown == [] and featureless == []
    lin = make_model("linear", pert_features=table).fit(data, split)
    s_ab, s_a, s_b = lin.predict_shift(controls["ctx_A"], ["S+T0", "S", "T0"], "ctx_A")
    const = lin.intercept_ + lin._context_features("ctx_A") @ lin.coef_[-2:]  # the affine model's constant term
    np.testing.assert_allclose(s_ab - const, (s_a - const) + (s_b - const), atol=1e-9)


def test_kernel_ridge_cross_validation_is_seeded(case):
    data, split, table, _, _ = case
    fits = [KernelRidgeBaseline(pert_features=table, seed=s).fit(data, split) for s in (4, 4, 5)]
    assert fits[0].cv_scores_.equals(fits[1].cv_scores_)
    assert (fits[0].gamma_, fits[0].alpha_) == (fits[1].gamma_, fits[1].alpha_)
    assert not np.allclose(fits[0].cv_scores_["cv_mse"], fits[2].cv_scores_["cv_mse"])  # other folds
    scores = fits[0].cv_scores_
    assert len(scores) == 5 * 11 and scores["cv_mse"].notna().all()
    best = scores.loc[scores["cv_mse"].idxmin()]
    assert (best["gamma"], best["alpha"]) == (fits[0].gamma_, fits[0].alpha_)
    fixed = KernelRidgeBaseline(pert_features=table, kernel="cosine", alpha=0.5).fit(data, split)  # nothing to choose
    assert fixed.alpha_ == 0.5 and fixed.gamma_ is None and len(fixed.cv_scores_) == 1


def test_model_config_options_reach_the_model(case, tmp_path, monkeypatch):
    from vcell.cli.bench import build_model, model_options

    _, _, table, _, _ = case
    (tmp_path / "conf").mkdir()
    table.save(tmp_path / "conf" / "genes.safetensors")
    config = tmp_path / "conf" / "models.yaml"
    config.write_text("krr: {model: kernel_ridge, pert_features: 'onehot,genes.safetensors', kernel: cosine, alphas: [0.1, 1.0]}\n"
                      "lin: {model: linear, pert_features: genes.safetensors, n_folds: 3}\n")
    monkeypatch.chdir(tmp_path)  # a relative table is found next to the config file, not in the working folder
    options = model_options(config)
    krr, lin = build_model("krr", options, seed=3), build_model("lin", options, seed=3)
    assert isinstance(krr, KernelRidgeBaseline) and krr.kernel == "cosine" and krr.alphas == (0.1, 1.0) and krr.seed == 3
    assert krr.pert_features == f"onehot,{tmp_path / 'conf' / 'genes.safetensors'}"
    assert lin.name == "linear" and lin.n_folds == 3 and lin.pert_features == str(tmp_path / "conf" / "genes.safetensors")
    config.write_text("krr: {model: kernel_ridge, kernal: cosine}\n")
    with pytest.raises(VcellError, match=r"^.*models.yaml: krr: kernel_ridge: unknown option\(s\) 'kernal' \(options: kernel, pert_features, "):
        model_options(config)


@pytest.mark.parametrize("name,options,message", [
    ("kernel_ridge", {"kernel": "poly"}, "kernel_ridge: kernel must be one of rbf, cosine, got 'poly'"),
    ("kernel_ridge", {"alphas": "1,2"}, "kernel_ridge: alphas must be non-negative numbers, got '1,2'"),
    ("kernel_ridge", {"gamma": 0}, "kernel_ridge: gamma must be positive, got 0"),
    ("kernel_ridge", {"alphas": [0, 1]}, "kernel_ridge: alpha must be positive, got [0, 1]"),
    ("linear", {"n_folds": 1}, "linear: n_folds must be an integer >= 2, got 1"),
    ("linear", {"pert_features": "genes.csv"}, "linear: pert_features file 'genes.csv' not found"),
    ("linear", {"pert_features": "OneHot"}, "linear: pert_features: write 'onehot' in lower case"),
    ("linear", {"use_onehot": False}, "linear: unknown option(s) 'use_onehot' (options: alphas, alpha, n_folds, pert_features)"),
    ("pert_mean", {"alpha": 1.0}, "pert_mean: this baseline takes no options"),
])
def test_bad_options_are_one_error_line(name, options, message):
    with pytest.raises(VcellError) as err:
        make_model(name, **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,options", [("kernel_ridge", {"kernel": "cosine"}), ("linear", {}), ("pert_mean", {})])
def test_fitted_shift_models_round_trip_through_their_file(case, tmp_path, name, options):
    """What an ST checkpoint stores as its effect anchor predicts the same shifts once read back,
    without the feature table's file; a file that is not one is one error line naming it."""
    from vcell.predictors.fitted_state import load_fitted, save_fitted

    data, split, table, _, controls = case
    if name != "pert_mean":
        options = {**options, "pert_features": table}
    model = make_model(name, **options).fit(data, split)
    loaded = load_fitted(save_fitted(model, tmp_path / "anchor.safetensors"))
    labels = ["S", "U", "T0+U", CTRL]
    for ctx in ("ctx_A", "ctx_Z"):
        np.testing.assert_array_equal(loaded.predict_shift(controls["ctx_A"], labels, ctx), model.predict_shift(controls["ctx_A"], labels, ctx))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VcellError, match="bad.safetensors: unreadable checkpoint file"):
        load_fitted(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name", ["linear", "kernel_ridge"])
def test_a_penalty_at_the_top_of_the_grid_is_warned_of(case, name, caplog):
    """Features that explain nothing the held-out folds can measure (random vectors): cross-validation
    takes the largest penalty, shrinking the model toward the mean effect, which reads as another
    model in a table unless said; a choice inside the grid is not warned of."""
    import logging

    data, split, table, _, _ = case
    noise = GeneEmbeddings(names=list(table.names), vectors=np.random.default_rng(5).normal(size=table.vectors.shape), source="noise")
    grid = {"alphas": [1e-4, 1e-3, 1e-2]} if name == "linear" else {"alphas": [1e-4, 1e-3, 1e-2], "gammas": [1.0]}
    with caplog.at_level(logging.WARNING, logger="vcell"):
        model = make_model(name, seed=0, pert_features=noise, **grid).fit(data, split)
    assert model.alpha_ == 1e-2, model.cv_scores_
    assert f"{name}: cross-validation chose the largest penalty of its grid (alpha=0.01)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vcell"):
        model = make_model(name, seed=0, pert_features=table).fit(data, split)
    assert model.alpha_ < max(model.alphas) and "largest penalty" not in caplog.text


@pytest.mark.parametrize("features, by_label", [("onehot", False), ("onehot,TABLE", True)])
def test_linear_cross_validates_over_labels_when_it_reads_a_table(case, tmp_path, monkeypatch, features, by_label):
    """With a gene table `linear` is the learner of perturbations never seen, so its penalty is chosen
    on held-out labels (all their contexts together); folds of (context, label) groups let a held-out
    group's label be learnt from its other context and chose too small a penalty. One-hot alone
    keeps folds of groups (a seen label in another context is all it can predict)."""
    import vcell.predictors.linear as linear

    data, split, table, _, _ = case
    path = table.save(tmp_path / "table.safetensors")
    fits = []
    real_fit = linear._ridge_fit
    monkeypatch.setattr(linear, "_ridge_fit", lambda X, Y, alphas: fits.append(X.copy()) or real_fit(X, Y, alphas))
    model = make_model("linear", pert_features=features.replace("TABLE", str(path))).fit(data, split)
    labels = model.stats_.groups["perturbation"].tolist()
    onehot = fits[-1][:, :len(model.features_.names) if features == "onehot" else model.features_.widths[0]]  # the refit: all groups
    total = onehot.sum(axis=0)  # groups of each training label (2: one per context)
    assert len(fits) == 1 + model.n_folds and (total == 2).all() and len(labels) == 2 * len(total)
    split_labels = [int(((X[:, :onehot.shape[1]].sum(axis=0) % 2) == 1).sum()) for X in fits[:-1]]  # labels with one group kept
    assert (max(split_labels) == 0) == by_label
