"""The Python API names a bad argument in one line (a notebook user's walk met tracebacks and silence)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import vcell
from vcell.errors import VcellError


@pytest.mark.parametrize("kwargs, words", [
    ({"pert_col": 3}, "DataSpec pert_col=3: a column name or label is text"),
    ({"control": None}, "DataSpec control=None"),
    ({"expression": "log"}, "DataSpec expression='log': use 'counts', 'log1p' or None"),
])
def test_dataspec_checks_its_fields(kwargs, words):
    with pytest.raises(VcellError, match=words.replace("(", r"\(").replace(")", r"\)")):
        vcell.DataSpec(**kwargs)
    assert vcell.DataSpec(context_col=None, batch_col=None).context_col is None


@pytest.mark.parametrize("kwargs, words", [
    ({"max_steps": -3}, "st: --max-steps (max_steps=) must be an integer >= 1, got -3"),
    ({"lr": "x"}, "st: training option: lr must be a number"),
    ({"checkpoint": "first"}, "st: checkpoint must be 'best' or 'last'"),
])
def test_st_options_are_named_as_the_baselines_name_theirs(kwargs, words):
    with pytest.raises(VcellError, match=re.escape(words)):
        vcell.make_model("st", **kwargs)


def test_to_counts_refuses_counts(tmp_path):
    """A counts prediction given to to_counts: named (it overflowed in expm1 and said 'finite and >= 0')."""
    a = vcell.simulate_perturbseq(n_genes=20, n_contexts=1, n_perturbations=2, n_combinations=0,
                                  cells_per_perturbation=5, n_controls=5, seed=0)
    a.X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32) * 50
    with pytest.raises(VcellError, match="is not log1p-normalised .*counts already"):
        vcell.to_counts(a, depth=100)
    a.uns["vcell"] = {"output": "counts"}
    with pytest.raises(VcellError, match=r"counts already \(uns\['vcell'\]\['output'\] == 'counts'\)"):
        vcell.to_counts(a, depth=100)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Simulated log1p data (raw counts in layers['counts']), ctx_B held out, pert_mean fitted."""
    from vcell.data import normalize_log1p

    raw = vcell.simulate_perturbseq(n_genes=60, n_contexts=2, n_perturbations=5, n_combinations=0,
                                    cells_per_perturbation=20, n_controls=40, seed=1)
    lg = normalize_log1p(raw)
    data = vcell.load_dataset(lg, vcell.DataSpec())
    split = vcell.apply_split(data.index, vcell.holdout_config(data.index, "ctx_B"))
    model = vcell.make_model("pert_mean").fit(data, split)
    path = tmp_path_factory.mktemp("small") / "lg.h5ad"
    lg.write_h5ad(path)
    return lg, data, split, model, path


def test_a_backed_view_is_refused_not_read_by_the_wrong_rows(small):
    """A view of a backed AnnData was accepted, and ST streamed the file's rows at the view's positions:
    trained on other cells than the labels said, silently."""
    import anndata as ad

    _, _, _, _, path = small
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(VcellError, match=r"a view of a file read with backed='r' .*to_memory\(\)"):
            vcell.load_dataset(backed[np.arange(backed.n_obs) >= 10], vcell.DataSpec())
        assert vcell.load_dataset(backed, vcell.DataSpec()).adata.isbacked  # the whole file still streams
    finally:
        backed.file.close()


def test_write_prediction_refuses_to_replace_a_file_and_a_folder_before_any_work(small, tmp_path):
    _, data, _, model, _ = small
    out = tmp_path / "mine.h5ad"
    out.write_text("the user's")
    with pytest.raises(VcellError, match="already exists"):
        vcell.write_prediction(out, model, data, "ctx_B")
    assert out.read_text() == "the user's"
    vcell.write_prediction(out, model, data, "ctx_B", overwrite=True)
    assert vcell.load_dataset(out, vcell.DataSpec()).adata.n_obs > 0
    (tmp_path / "folder").mkdir()
    with pytest.raises(VcellError, match="is a folder"):
        vcell.write_prediction(tmp_path / "folder", model, data, "ctx_B")


def test_st_keeps_the_seed_of_its_options():
    """STPredictor(options=STTrainOptions(seed=5)) trained with seed 0 (the constructor's default won)."""
    opts = vcell.STTrainOptions(seed=5)
    assert vcell.STPredictor(options=opts).seed == 5
    assert vcell.make_model("st", options=opts).seed == 5  # make_model refused options=
    assert vcell.make_model("st", seed=7, options=opts).seed == 7
    assert vcell.STPredictor().seed == 0 and vcell.make_model("pert_mean").seed == 0


def test_to_counts_refuses_controls_that_are_not_those_the_prediction_started_from(small):
    """Another context's controls (or some missing) silently switched the pairing to random draws."""
    lg, data, _, model, _ = small
    pred = vcell.predict_context(model, data, "ctx_B", seed=0)
    ctrl = lambda ctx: lg[((lg.obs.cell_type == ctx) & (lg.obs.target_gene == "non-targeting")).to_numpy()].copy()  # noqa: E731
    right = vcell.to_counts(pred, ctrl("ctx_B"), seed=0)
    assert right.uns["vcell"]["library_pairing"] == "each predicted cell's own control cell"
    for wrong in (ctrl("ctx_A"), ctrl("ctx_B")[1:]):
        with pytest.raises(VcellError, match="started from control cells not among the controls given"):
            vcell.to_counts(pred, wrong, seed=0)
    with pytest.raises(VcellError, match=r"no 'NT' cells in column 'target_gene', but it holds real control cells .*"
                                         "'non-targeting' reads like a control label: pass control="):
        vcell.to_counts(pred, depth=1000, control="NT")  # the real control rows were counted as predicted cells
    # a prediction without control rows, whose labels only look like the control label: drawn as it is
    own = pred[(pred.obs.target_gene != "non-targeting").to_numpy()].copy()
    own.obs["target_gene"] = "NT" + own.obs["target_gene"].astype(str)
    assert vcell.to_counts(own, depth=1000, control="NTX").n_obs == own.n_obs
    # two controls sharing a name: drawn from the controls' sizes, said (it was refused, then drawn silently)
    twins = ctrl("ctx_B")
    twins.obs_names = ["same", "same", *twins.obs_names[2:]]
    assert vcell.to_counts(pred, twins, seed=0).uns["vcell"]["library_pairing"].startswith("drawn with replacement")


@pytest.mark.parametrize("value, words", [
    (np.int64(0), "must be >= 1"), (0.5, "whole number"), (2.9, "whole number"), ({"GENE0000": 3}, "no number of cells for"),
])
def test_cells_per_perturbation_is_a_whole_number_for_every_perturbation(small, value, words):
    _, data, _, model, _ = small
    with pytest.raises(VcellError, match=words):
        vcell.predict_context(model, data, "ctx_B", cells_per_perturbation=value)
    n = vcell.predict_context(model, data, "ctx_B", cells_per_perturbation=np.int64(3))
    assert (n.obs.target_gene != "non-targeting").sum() == 3 * (n.obs.target_gene[n.obs.target_gene != "non-targeting"].nunique())


def test_training_leaves_the_callers_random_generators_as_they_were(small, tmp_path):
    import os
    import random

    import torch

    _, data, split, _, _ = small
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    want = (np.random.rand(), random.random(), float(torch.rand(1)))
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    vcell.train_st(data, split, tmp_path / "st", {"width": 16, "n_layers": 1, "n_heads": 2}, max_steps=2, seed=0)
    assert (np.random.rand(), random.random(), float(torch.rand(1))) == want
    assert "PL_GLOBAL_SEED" not in os.environ


def test_resuming_on_changed_in_memory_data_says_it_changed(small, tmp_path):
    lg, data, split, _, _ = small
    cfg = {"width": 16, "n_layers": 1, "n_heads": 2}
    vcell.train_st(data, split, tmp_path / "st", cfg, max_steps=2)
    edited = lg.copy()
    edited.X.data[:10] += 0.5
    with pytest.raises(VcellError, match=r"data \(in memory\) changed since it was trained on it"):
        vcell.train_st(vcell.load_dataset(edited, vcell.DataSpec()), split, tmp_path / "st", cfg, max_steps=4, resume=True)


def test_one_name_is_one_name_not_its_characters(small, tmp_path):
    lg, data, _, _, _ = small
    assert vcell.holdout_perturbations(data.index, ["GENE0001"], contexts="ctx_B").zeroshot == {"synthetic.ctx_B": "test"}
    result = vcell.run_bench(lg, tmp_path / "b", ["control_mean"], lambda n: vcell.make_model(n), holdout="ctx_B",
                             profile="vcc", report=False, dataset_col=None)
    assert set(result.leaderboard.context) == {"ctx_B", "mean"}
    with pytest.raises(VcellError, match="--dtypes 'float16'"):
        vcell.precompile_evaluator(dtypes="float16")


@pytest.mark.parametrize("call, words", [
    (lambda d: vcell.predict_context(d["model"], d["lg"], "ctx_B"), r"data must be the dataset vcell.load_dataset returns \(vcell"),
    (lambda d: vcell.holdout_config(d["data"], "ctx_B"), r"holdout_config: index must be the data's CellIndex \(pass data.index\)"),
    (lambda d: vcell.apply_split(d["data"], vcell.holdout_config(d["data"].index, "ctx_B")), "apply_split: index must be"),
    (lambda d: vcell.load_dataset(d["lg"], {"pert_col": "target_gene"}), "spec must be a vcell.DataSpec"),
    (lambda d: vcell.predict_context(d["model"], d["data"], "ctx_B", seed=None), "seed must be a whole number, got None"),
    (lambda d: vcell.train_se([d["lg"]], "never", {}), "train_se reads .h5ad files: give their paths, got AnnData"),
])
def test_a_wrong_kind_of_argument_is_named(small, call, words):
    lg, data, _, model, _ = small
    with pytest.raises(VcellError, match=words):
        call({"lg": lg, "data": data, "model": model})


def test_score_names_an_eval_result_given_for_its_table(small):
    lg, data, _, model, _ = small
    res = vcell.evaluate(vcell.predict_context(model, data, "ctx_B"), lg[(lg.obs.cell_type == "ctx_B").to_numpy()])
    with pytest.raises(VcellError, match=r"an agg_results table \(a DataFrame\) \(pass result.agg\), got EvalResult"):
        vcell.score(res, res)
    assert vcell.score(res.agg, res.agg).shape[0] > 0


def test_run_bench_without_a_holdout_names_the_options(small, tmp_path):
    lg = small[0]
    with pytest.raises(VcellError, match="give --split FILE, --holdout-context"):  # holdout=None was a TypeError
        vcell.run_bench(lg, tmp_path / "b", ["control_mean"], lambda n: vcell.make_model(n), holdout=None, profile="vcc")


def test_per_context_scoring_refuses_a_context_without_a_name(small, tmp_path):
    """Its folder would have been OUT itself, beside the other contexts' folders."""
    from vcell.eval.run import run_many

    lg, data, _, model, _ = small
    real = lg[(lg.obs.cell_type == "ctx_B").to_numpy()].copy()
    real.obs["line"] = np.where(np.arange(real.n_obs) % 2, "L1", "")
    real.write_h5ad(tmp_path / "real.h5ad")
    with pytest.raises(VcellError, match="empty context name in column 'line'"):
        run_many({"": tmp_path / "real.h5ad"}, tmp_path / "real.h5ad", tmp_path / "out", context_col="line")
    assert not (tmp_path / "out").exists()


def test_grad_clip_zero_means_no_clipping_and_is_accepted():
    from vcell.train.options import TrainOptions

    TrainOptions(grad_clip=0.0, accelerator="cpu").check()
    with pytest.raises(VcellError, match="grad_clip must be >= 0"):
        TrainOptions(grad_clip=-1.0, accelerator="cpu").check()
