"""Perturbation features from gene tables: encoding, errors, ST on a target it never saw, checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from vcell.data.dataset import from_anndata
from vcell.data.splits import Split
from vcell.errors import VcellError
from vcell.features import GeneEmbeddings, PertFeatures
from vcell.predictors.st import STPredictor
from vcell.train.st import train_st

from conftest import error_line, run_cli

TINY = {"width": 32, "n_layers": 1, "n_heads": 2, "encoder_layers": 2, "dropout": 0.0}
FAST = dict(batch_size=8, set_size=16, accelerator="cpu", log_every=50, lr=3e-3)


def test_onehot_multi_hot_and_errors():
    feats = PertFeatures.onehot(["A", "B", "C"])
    got = feats.encode(["A", "B+C", "non-targeting", "C+A"], control="non-targeting")
    expected = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(got, expected)
    with pytest.raises(VcellError, match=r"'A\+D': target 'D' is not in the model's training targets") as err:
        feats.encode(["A", "A+D"])
    assert "\n" not in str(err.value) and "--pert-features FILE" in str(err.value)
    with pytest.raises(VcellError, match="'non-targeting'"):
        feats.encode(["non-targeting"])  # a control label is only zero when declared
    with pytest.raises(VcellError, match="twice"):
        PertFeatures.onehot(["A", "A"])


def test_tables_are_scaled_summed_and_concatenated(tmp_path):
    table = GeneEmbeddings(names=["A", "B", "C"], vectors=torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 4.0]]), source="test")
    path = table.save(tmp_path / "genes.safetensors")
    only = PertFeatures.build(str(path), ["A", "B"])
    scale = (3 + 3 + 5) / 3  # mean row norm -> 1
    torch.testing.assert_close(only.encode(["C"]), torch.tensor([[3.0, 4.0]]) / scale)
    torch.testing.assert_close(only.encode(["A+B"]), only.encode(["A"]) + only.encode(["B"]))  # combinations add up
    both = PertFeatures.build(f"onehot, {path}", ["A", "Z"])  # Z: a training target the table lacks
    assert both.widths == [2, 2] and both.names == ["A", "Z", "B", "C"]
    torch.testing.assert_close(both.encode(["A", "Z", "C"]), torch.tensor(
        [[1, 0, 3 / scale, 0], [0, 1, 0, 0], [0, 0, 3 / scale, 4 / scale]], dtype=torch.float32))
    with pytest.raises(VcellError, match=r"target 'Q' is not in the perturbation feature table.*genes.safetensors"):
        both.encode(["B+Q"])
    with pytest.raises(VcellError, match="missing.parquet: gene embedding file not found"):
        PertFeatures.build(str(tmp_path / "missing.parquet"), ["A"])
    with pytest.raises(VcellError, match="named twice"):
        PertFeatures.build(f"onehot,{path},onehot", ["A"])


# --- ST on a target it never saw: a planted case ----------------------------------------------

SEEN = {"S": (1.0, 0.0), "T": (-1.0, 0.0), "R": (0.0, 1.0), "Q": (0.0, -1.0)}
UNSEEN = ("U", (0.9, 0.1))  # next to S in the table


def _planted(seed: int = 0) -> tuple[ad.AnnData, GeneEmbeddings]:
    """log1p cells whose effects are linear in 2-D target vectors: genes 0-5 follow the first
    coordinate, genes 6-11 the second; U is held out and its vector is near S's."""
    rng = np.random.default_rng(seed)
    n_genes, n = 24, 48
    base = rng.uniform(1.0, 2.0, n_genes)
    loading = np.zeros((2, n_genes))
    loading[0, :6], loading[1, 6:12] = 1.0, 1.0
    blocks, labels = [], []
    for label, vec in [("non-targeting", (0.0, 0.0)), *SEEN.items(), UNSEEN]:
        mean = np.clip(base + np.asarray(vec) @ loading, 0, None)
        blocks.append(np.clip(mean + rng.normal(0, 0.15, (n if label != "non-targeting" else 2 * n, n_genes)), 0, None))
        labels += [label] * len(blocks[-1])
    obs = pd.DataFrame({"target_gene": labels, "cell_type": "k562"}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.uns["vcell"] = {"expression": "log1p"}
    vectors = {**SEEN, UNSEEN[0]: UNSEEN[1], "other": (0.0, 0.3)}
    table = GeneEmbeddings(names=list(vectors), vectors=torch.tensor(list(vectors.values())), source="planted")
    return adata, table


def _split(data) -> Split:
    labels = data.index.perts[data.index.pert_codes].astype(str)
    roles = np.where(labels == "non-targeting", "control", np.where(labels == UNSEEN[0], "test", "train"))
    return Split.from_roles(roles)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    adata, table = _planted()
    folder = tmp_path_factory.mktemp("planted")
    path = table.save(folder / "genes.safetensors")
    data = from_anndata(adata)
    out = train_st(data, _split(data), folder / "run", TINY, pert_features=str(path), max_steps=120, seed=0,
                   checkpoint_every=60, **FAST)
    return adata, data, path, out


def test_st_predicts_an_unseen_target_in_the_direction_of_its_table_neighbour(planted_run, caplog):
    adata, data, _, out = planted_run
    model = STPredictor.from_checkpoint(out, checkpoint="last", set_size=16)
    assert "U" not in model.pert_vocab and "U" in model.known_targets and "other" in model.known_targets
    controls = adata[adata.obs["target_gene"] == "non-targeting"]
    cells = model.predict_cells(model.prepare_controls(controls), ["U", "S", "T"], cells_per_perturbation=64, seed=0)
    ctrl = np.asarray(controls.X.mean(axis=0)).ravel()
    shift = {p: cells[p].mean(axis=0) - ctrl for p in cells}
    # the mean effect of the training targets is ~0 on genes 0-5 (S and T cancel); U follows S there
    assert shift["U"][:6].mean() > 0.5 and shift["T"][:6].mean() < -0.5
    assert np.corrcoef(shift["U"], shift["S"])[0, 1] > 0.8
    with pytest.raises(VcellError, match=r"unknown perturbation 'S\+NOPE': target 'NOPE' is not in the perturbation feature table"):
        model.check_perturbations(["S+NOPE"])
    # loaded from its checkpoint (no pert_features option), it still reads its table: a target only the
    # table has is no misspelling to warn of
    import logging

    from vcell.predictors.request import _warn_unknown

    assert model.pert_features is None and model.reads_gene_table() and model.predicts_unseen_targets()
    assert "other" not in set(adata.obs["target_gene"].astype(str))
    with caplog.at_level(logging.WARNING, logger="vcell"):
        _warn_unknown(model, data, ["other"])
    assert "neither the data nor the training" not in caplog.text


def test_a_checkpoint_predicts_with_the_set_size_it_was_trained_with(planted_run):
    """A set's cells attend to each other, so the set size changes the numbers: a loaded model
    predicts in sets of its training size unless told otherwise (it took 64 whatever it was trained on)."""
    adata, _, _, out = planted_run
    controls = adata[adata.obs["target_gene"] == "non-targeting"]

    def cells(**sizes):
        model = STPredictor.from_checkpoint(out, checkpoint="last", **sizes)
        return model.options.set_size, model.predict_cells(model.prepare_controls(controls), ["S"], cells_per_perturbation=64, seed=0)["S"]

    (trained, default), (_, sixteen), (big, sixty_four) = cells(), cells(set_size=16), cells(set_size=64)
    assert trained == FAST["set_size"] == 16 and big == 64
    np.testing.assert_array_equal(default, sixteen)
    assert np.abs(default - sixty_four).max() > 1e-4


def test_all_means_the_perturbations_trained_on(planted_run, tmp_path):
    """`--perturbations all` is every label with training cells: not the held-out one (a one-hot
    model refused the whole request over it), also for a checkpoint written before they were recorded."""
    _, _, _, out = planted_run
    model = STPredictor.from_checkpoint(out, checkpoint="last", set_size=16)
    assert sorted(model.trained_perturbations()) == sorted(SEEN)
    older = Path(shutil.copytree(out, tmp_path / "older"))
    config = older / "last" / "config.json"
    meta = json.loads(config.read_text())
    del meta["trained_perturbations"]
    config.write_text(json.dumps(meta))
    assert sorted(STPredictor.from_checkpoint(older, checkpoint="last", set_size=16).trained_perturbations()) == sorted(SEEN)


def test_checkpoints_carry_the_table_and_resume_exactly(planted_run, tmp_path):
    adata, data, path, out = planted_run
    cfg = json.loads((out / "last" / "config.json").read_text())
    assert cfg["pert_features"]["names"] == ["Q", "R", "S", "T", "U", "other"]  # training targets first
    assert cfg["model"]["pert_table_rows"] == 6 and cfg["pert_vocab"] == ["Q", "R", "S", "T"]
    path.unlink()  # the checkpoint alone predicts: the table travels in its weights
    model = STPredictor.from_checkpoint(out, checkpoint="last")
    torch.testing.assert_close(model.features.encode(["U"]), PertFeatures.build(_planted()[1], ["S"]).encode(["U"]))
    # a run stopped at step 60 and resumed to 120 ends with the same weights as the straight run
    table = _planted()[1]
    table.save(path)
    split = _split(data)
    half = train_st(data, split, tmp_path / "r", TINY, pert_features=str(path), max_steps=60, seed=0, checkpoint_every=60, **FAST)
    train_st(data, split, half, TINY, pert_features=str(path), max_steps=120, seed=0, checkpoint_every=60, resume=True, **FAST)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "last" / "weights.safetensors")), load_file(str(half / "last" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = GeneEmbeddings(names=table.names, vectors=table.vectors.flip(1), source="planted")
    other_path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(VcellError, match="cannot resume.*--pert-features planted \\(genes.safetensors\\), not planted \\(other.safetensors\\)"):
        train_st(data, split, half, TINY, pert_features=str(other_path), max_steps=130, seed=0, resume=True, **FAST)


def test_train_cli_refuses_a_missing_table_first(tmp_path):
    proc = run_cli("train", "st", "--data", tmp_path / "nothing.h5ad", "--pert-features", f"onehot,{tmp_path / 'no.safetensors'}",
                   "--out", tmp_path / "run")
    assert "no.safetensors' not found" in error_line(proc)


def test_effect_anchor_sets_the_mean_and_onehot_dropout_needs_both_parts(planted_run, tmp_path):
    from vcell.predictors.registry import make_model

    adata, data, path, _ = planted_run
    split = _split(data)
    model = make_model("st", seed=0, pert_features=str(path), effect_anchor="kernel_ridge", config=TINY, max_steps=40,
                       out_dir=tmp_path / "st", checkpoint="last", **FAST).fit(data, split)
    controls = model.prepare_controls(adata[adata.obs["target_gene"] == "non-targeting"].copy())
    cells = model.predict_cells(controls, ["U"], cells_per_perturbation=64, seed=0)["U"]
    krr = make_model("kernel_ridge", seed=0, pert_features=str(path)).fit(data, split)
    want = np.asarray(controls.X.mean(axis=0)).ravel() + krr.predict_shift(controls, ["U"], "k562")[0]
    np.testing.assert_allclose(cells.mean(axis=0), want, atol=0.02)  # up to the clip at 0
    assert not np.allclose(cells, cells.mean(axis=0))  # ST's spread is kept
    # the anchor travels in the checkpoints: loaded later (as `vcell predict` does), the same cells
    assert {"anchor.safetensors"} <= {p.name for p in (tmp_path / "st" / "last").iterdir()}
    loaded = STPredictor.from_checkpoint(tmp_path / "st", checkpoint="last", batch_size=8, set_size=16, accelerator="cpu")
    assert loaded.effect_anchor == "kernel_ridge" and loaded.anchor.pert_features is None  # the table is inside
    np.testing.assert_array_equal(loaded.predict_cells(controls, ["U"], cells_per_perturbation=64, seed=0)["U"], cells)
    with pytest.raises(VcellError, match="unknown baseline 'cell_mean_x'"):
        make_model("st", effect_anchor="cell_mean_x")
    with pytest.raises(VcellError, match="onehot_dropout 0.5 needs pert_features 'onehot,FILE'"):
        train_st(data, split, tmp_path / "d", {**TINY, "onehot_dropout": 0.5}, pert_features=str(path), max_steps=2, **FAST)
    both = train_st(data, split, tmp_path / "e", {**TINY, "onehot_dropout": 0.5}, pert_features=f"onehot,{path}", max_steps=2, **FAST)
    assert json.loads((both / "last" / "config.json").read_text())["model"]["onehot_dropout"] == 0.5


def test_onehot_dropout_never_turns_a_target_without_a_table_vector_into_the_control(planted_run, tmp_path, caplog):
    """A training target the table lacks has only its one-hot part: dropping it made that target's
    sets read as the control label (an all-zero vector) half the time, silently."""
    import logging

    from vcell.train.st import build_module

    adata, data, _, _ = planted_run
    full = _planted()[1]
    keep = [i for i, n in enumerate(full.names) if n != "R"]
    partial = GeneEmbeddings([full.names[i] for i in keep], full.vectors[keep], "partial").save(tmp_path / "partial.safetensors")
    with caplog.at_level(logging.WARNING, logger="vcell"):
        module = build_module(data, {**TINY, "onehot_dropout": 0.5}, split=_split(data), pert_features=f"onehot,{partial}")
    assert "1 training label(s) have no vector in the table (R)" in caplog.text
    codes = torch.tensor([module.perturbations.index(p) for p in ("R", "S")])
    seen = []
    forward = module.model.forward
    module.model.forward = lambda basal, pert, batch=None, mask=None: seen.append(pert.clone()) or forward(basal, pert, batch, mask)
    module.train()
    torch.manual_seed(0)
    for _ in range(200):
        module({"pert": codes, "basal": torch.rand(2, 4, adata.n_vars), "mask": torch.ones(2, 4, dtype=torch.bool)})
    width = module.features.widths[0]
    vectors = torch.stack(seen)  # [200, 2 labels, dim]
    assert (vectors[:, 0].abs().sum(-1) > 0).all()  # R: never the control's zeros
    dropped_s = (vectors[:, 1, :width].abs().sum(-1) == 0).float().mean().item()
    assert 0.35 < dropped_s < 0.65  # S (in the table) still loses its one-hot part about half the time


def test_control_relative_st_reads_its_effect_against_its_own_control_prediction(planted_run, tmp_path):
    from vcell.data.cellsets import CellSetSampler
    from vcell.nn.transition import STConfig

    adata, data, path, _ = planted_run
    split = _split(data)
    with pytest.raises(VcellError, match="control_relative needs predict_residual and output_dim equal to input_dim"):
        STConfig(input_dim=24, pert_dim=4, output_dim=12, control_relative=True)
    out = train_st(data, split, tmp_path / "rel", {**TINY, "control_relative": True}, pert_features=str(path), max_steps=30,
                   seed=0, **FAST)
    assert json.loads((out / "last" / "config.json").read_text())["model"]["control_relative"] is True
    model = STPredictor.from_checkpoint(out, checkpoint="last", set_size=256, accelerator="cpu")  # one set per perturbation
    net = model.model
    # the stored reference is the model's mean control-label drift on its training contexts' controls
    probe = CellSetSampler(data.index, split, "train", FAST["set_size"], seed=0).drift_probe()
    X = adata.X.toarray()
    with torch.no_grad():
        expected = torch.stack([(net(x, torch.zeros(len(x), net.config.pert_dim)) - x).mean(dim=(0, 1))
                                for x in (torch.from_numpy(X[rows]) for rows in probe)]).mean(dim=0)
    torch.testing.assert_close(net.control_drift, expected, atol=1e-5, rtol=1e-5)
    assert net.control_drift.abs().max() > 1e-3
    controls = model.prepare_controls(adata[adata.obs["target_gene"] == "non-targeting"].copy())
    cells = model.predict_cells(controls, ["U", "S", "non-targeting"], cells_per_perturbation=96, seed=0)
    draws = model.source_controls(controls.n_obs, ["U", "S", "non-targeting"], 96, seed=0)
    feats = model.features.encode(["U", "S", "non-targeting"], "non-targeting")
    with torch.no_grad():
        for i, p in enumerate(["U", "S", "non-targeting"]):
            x = torch.from_numpy(controls.X[draws[i]].toarray())[None]
            raw = net(x, feats[i:i + 1])
            drift = (net(x, torch.zeros_like(feats[i:i + 1])) - x).mean(dim=1, keepdim=True)
            np.testing.assert_allclose(cells[p], np.clip((raw - drift + net.control_drift)[0].numpy(), 0, None), atol=1e-5)
            assert not np.allclose(cells[p], np.clip(raw[0].numpy(), 0, None), atol=1e-3)  # the correction is not zero
    # a checkpoint written before control_drift was recorded says so, rather than "was config.json edited?"
    from safetensors.torch import load_file, save_file

    weights = out / "last" / "weights.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "control_drift"}, weights)
    with pytest.raises(VcellError, match=r"parameter 'control_drift' \[\d+\] .* missing .*control drift: retrain it$"):
        STPredictor.from_checkpoint(out, checkpoint="last", accelerator="cpu")


def test_bench_refuses_a_onehot_st_on_unseen_targets_before_training(tmp_path):
    from vcell.leaderboard import run_bench
    from vcell.predictors.registry import make_model

    adata, table = _planted()
    adata.obs["cell_type"] = "k562"
    path = tmp_path / "planted.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(VcellError, match=r"st: fold perturbations holds out target\(s\) never trained on \('U'\).*pert_features"):
        run_bench(path, tmp_path / "bench", ["st", "pert_mean"], lambda name: make_model(name), holdout_perturbations=["U"],
                  report=False)
    assert not (tmp_path / "bench" / "predictions").exists()  # refused before any work


def test_bench_refuses_before_training_a_table_without_a_held_out_target_or_a_missing_embedding(tmp_path):
    """A gene table lacking a held-out target, and an ST variant reading absent cell embeddings,
    failed only after fitting (ST: its whole budget) and named the base model, not the variant
    nor the fold; a repeated held-out context ran its fold twice."""
    from vcell.cli.bench import build_model
    from vcell.leaderboard import run_bench

    adata, table = _planted()
    path = tmp_path / "planted.h5ad"
    adata.write_h5ad(path)
    partial = GeneEmbeddings(names=[n for n in table.names if n != UNSEEN[0]],
                             vectors=table.vectors[[i for i, n in enumerate(table.names) if n != UNSEEN[0]]], source="planted")
    genes = partial.save(tmp_path / "genes.safetensors")
    options = {"linear_genes": {"model": "linear", "pert_features": f"onehot,{genes}"},
               "st_se": {"model": "st", "embed_key": "X_nope", "max_steps": 2,
                         "pert_features": f"onehot,{table.save(tmp_path / 'all.safetensors')}"}}
    for name, words in [("linear_genes", r"linear_genes on fold perturbations: perturbation 'U': target 'U' is not in the "
                                         r"perturbation feature table"),
                        ("st_se", r"st_se on fold perturbations: .*planted\.h5ad: no \.obsm\['X_nope'\] cell embeddings")]:
        with pytest.raises(VcellError, match=words):
            run_bench(path, tmp_path / name, ["pert_mean", name], lambda n: build_model(n, options, seed=0),
                      holdout_perturbations=[UNSEEN[0]], report=False)
        assert not (tmp_path / name).exists()  # refused before any work
    data = from_anndata(adata)  # the check itself, which runs before any model is fitted
    with pytest.raises(VcellError, match="no .obsm\\['X_nope'\\]"):
        build_model("st_se", options, seed=0).check_fit(data, _split(data), [UNSEEN[0]])
    with pytest.raises(VcellError, match="target 'U' is not in the perturbation feature table"):
        build_model("linear_genes", options, seed=0).check_fit(data, _split(data), [UNSEEN[0]])
    build_model("linear_genes", options, seed=0).check_fit(data, _split(data), ["S"])
    with pytest.raises(VcellError, match="--holdout-context 'k562' is given twice"):
        run_bench(path, tmp_path / "twice", ["pert_mean"], lambda n: build_model(n, {}, seed=0), holdout=["k562", "k562"],
                  report=False)
    with pytest.raises(VcellError, match="--holdout-context 'k562' and 'planted.k562' name the same context"):
        run_bench(path, tmp_path / "twice", ["pert_mean"], lambda n: build_model(n, {}, seed=0), holdout=["k562", "planted.k562"],
                  report=False)
    assert not (tmp_path / "twice").exists()


def test_a_onehot_model_refuses_a_validation_only_target_and_training_says_why(tmp_path, caplog):
    """A one-hot ST gives validation-only targets columns no training cell teaches: training warns
    (their val_loss picks best/), and predict refuses them as it refuses test targets (it predicted
    them from untrained columns)."""
    import logging

    adata, _ = _planted()
    data = from_anndata(adata)
    labels = data.index.perts[data.index.pert_codes].astype(str)
    roles = np.where(labels == "non-targeting", "control", np.where(labels == "Q", "val", np.where(labels == "U", "test", "train")))
    with caplog.at_level(logging.WARNING, logger="vcell"):
        out = train_st(data, Split.from_roles(roles), tmp_path / "run", TINY, max_steps=4, seed=0, checkpoint_every=4, **FAST)
    assert "one-hot features: 1 validation perturbation(s) ('Q') have targets no training cell has" in caplog.text
    model = STPredictor.from_checkpoint(out, checkpoint="last", set_size=16)
    assert "Q" in model.pert_vocab and "Q" not in model.trained_perturbations()
    with pytest.raises(VcellError, match="perturbation 'Q' has a one-hot column but no training cell"):
        model.check_perturbations(["S", "Q"])
    model.check_perturbations(["S", "R+T"])  # trained targets, alone or together


def test_zero_rows_are_absent_and_do_not_count_in_the_scale():
    """A gene whose table vector is zero (constant where the table was made) would be encoded as the
    control's zero vector: it counts as absent, and zero rows do not shrink the table's scale (its
    rows are divided by the mean norm of the others)."""
    table = GeneEmbeddings(names=["Q", "R", "Z"], vectors=torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]]), source="t")
    feats = PertFeatures.build(table, [])
    assert feats.names == ["Q", "R"]
    torch.testing.assert_close(feats.vectors.norm(dim=1), torch.tensor([5 / 3.5, 2 / 3.5]))
    with pytest.raises(VcellError, match="target 'Z' is not in the perturbation feature table .*all-zero vector"):
        feats.encode(["Z"])
    assert feats.missing(["Q", "+", "control"], control="control") == ["+"]  # a label with no target at all
    with pytest.raises(VcellError, match="perturbation '\\+'"):
        feats.encode(["+"])
