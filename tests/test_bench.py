"""`vcell bench` end to end on real data, and its predictions scored by cell-eval itself."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.eval.scoring import read_csv

from conftest import error_line, run_cli, run_cli_batch

MODELS = ["control_mean", "cell_mean", "pert_mean", "context_mean", "linear"]


@pytest.fixture
def mcfaline():
    """The McFaline file, else its small subset in tests/data (overrides conftest's full-file-only fixture)."""
    from conftest import MCFALINE, real_data

    return real_data(MCFALINE)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from conftest import MCFALINE, real_data

    data = real_data(MCFALINE)  # the full file, else its small subset in tests/data
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run_cli(
        "bench", "--data", data, "--pert-col", "perturbation", "--control", "control", "--dataset", "mcfaline23",
        "--holdout-context", "T98G", "--holdout-context", "U87MG", "--models", ",".join(MODELS), "--out", out,
        "--seed", "3",
    )
    assert result.returncode == 0, result.stderr
    assert "leaderboard" in result.stdout
    return out


def test_leaderboard_layout(bench_dir):
    board = pd.read_csv(bench_dir / "leaderboard.csv")
    assert list(board.columns[:2]) == ["model", "context"]
    assert list(board.columns[-2:]) == ["vcc_score", "vcc_score_unclipped"]
    for metric in ("mae", "discrimination_score_l1", "overlap_at_N", "pearson_delta", "mse"):
        assert metric in board.columns
    assert len(board) == len(MODELS) * 3  # two held-out lines + the mean
    assert set(board["context"]) == {"T98G", "U87MG", "mean"}
    cell_mean = board[board["model"] == "cell_mean"]
    assert np.allclose(cell_mean["vcc_score"], 0.0)  # the baseline scores 0 against itself
    mean_row = board[(board["model"] == "pert_mean") & (board["context"] == "mean")]["mae"].iloc[0]
    per_ctx = board[(board["model"] == "pert_mean") & (board["context"] != "mean")]["mae"].mean()
    assert mean_row == pytest.approx(per_ctx)
    assert (board["vcc_score"] >= 0).all() and (board["vcc_score_unclipped"] <= board["vcc_score"] + 1e-9).all()


def test_predictions_layout(bench_dir):
    meta = json.loads((bench_dir / "bench.json").read_text())
    assert meta["models"] == MODELS and meta["contexts"] == ["T98G", "U87MG"] and meta["seed"] == 3
    for ctx in ("T98G", "U87MG"):
        real = ad.read_h5ad(bench_dir / "predictions" / f"real_{ctx}.h5ad")
        assert set(real.obs["cell_type"]) == {ctx}
        for model in MODELS:
            pred = ad.read_h5ad(bench_dir / "predictions" / f"{model}_{ctx}.h5ad")
            assert list(pred.var_names) == list(real.var_names)
            assert set(pred.obs["perturbation"]) == set(real.obs["perturbation"])
            assert pred.obs["perturbation"].value_counts().sort_index().equals(real.obs["perturbation"].value_counts().sort_index())
            assert (pred.X.data >= 0).all() and np.isfinite(pred.X.data).all()
            assert (bench_dir / "eval" / f"{model}_{ctx}" / "results.csv").exists()


@pytest.mark.parametrize("model", ["pert_mean", "linear"])
def test_bench_predictions_score_the_same_under_cell_eval(bench_dir, model, tmp_path):
    pytest.importorskip("cell_eval", reason="cell-eval 0.8.2 (test extra) is the oracle")
    from cell_eval import MetricsEvaluator

    ctx = "T98G"
    evaluator = MetricsEvaluator(
        adata_pred=str(bench_dir / "predictions" / f"{model}_{ctx}.h5ad"),
        adata_real=str(bench_dir / "predictions" / f"real_{ctx}.h5ad"),
        control_pert="control", pert_col="perturbation", num_threads=2, outdir=str(tmp_path),
        pdex_kwargs={"cpm_filter": None, "epsilon": 0.0},
    )
    theirs, _ = evaluator.compute(profile="full", write_csv=False)
    ours = read_csv(bench_dir / "eval" / f"{model}_{ctx}" / "results.csv")
    assert list(ours.columns) == theirs.columns
    assert ours["perturbation"].tolist() == theirs["perturbation"].to_list()
    for col in theirs.columns[1:]:
        a = ours[col].to_numpy(dtype=float, na_value=np.nan)
        b = theirs[col].cast(float).to_numpy()
        assert np.allclose(a, b, atol=1e-6, equal_nan=True), col


def test_bench_bad_inputs(tmp_path, mcfaline):
    common = ["bench", "--data", mcfaline, "--pert-col", "perturbation", "--control", "control"]
    unknown, ctx = run_cli_batch([[*common, "--holdout-context", "T98G", "--models", "pert_mean,linaer", "--out", tmp_path / "b"],
                                  [*common, "--holdout-context", "T99G", "--out", tmp_path / "c"]])
    assert unknown.returncode == 2 and "unknown model 'linaer'; did you mean 'linear'" in unknown.stderr
    assert not (tmp_path / "b").exists()
    assert ctx.returncode == 2 and "unknown context 'T99G'" in ctx.stderr


def test_model_config_table_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """A table named relative to the config file is recorded as an absolute path: bench.json's
    options reproduce the run from any working directory."""
    from pathlib import Path

    from vcell.cli.bench import model_options

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "genes.safetensors").write_bytes(b"")
    (tmp_path / "cfg" / "models.yaml").write_text('linear_genes: {model: linear, pert_features: "onehot,genes.safetensors"}\n')
    monkeypatch.chdir(tmp_path)
    opts = model_options(Path("cfg/models.yaml"))
    assert opts["linear_genes"]["pert_features"] == f"onehot,{tmp_path / 'cfg' / 'genes.safetensors'}"


def test_bench_writes_a_self_contained_report(bench_dir):
    html = (bench_dir / "report.html").read_text()
    for name in MODELS + ["T98G", "U87MG"]:
        assert name in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("data:image/png;base64,") >= 5


@pytest.mark.slow
def test_bench_model_config(tmp_path, mcfaline):
    """`--model-config` reaches the st model (a tiny budget here); bad files fail in one line, before any work."""
    common = ["bench", "--data", mcfaline, "--pert-col", "perturbation", "--control", "control", "--dataset", "mcfaline23",
              "--holdout-context", "A172", "--no-report"]
    cases = (("st", "st: {max_step: 3}\n", "st: unknown option(s) 'max_step'"),
             ("st", "st: {config: {max_steps: 3}}\n", "config holds training option(s) max_steps, not model sizes"),
             ("linear", "linear: {lr: 0.1}\n", "linear: unknown option(s) 'lr' (options: alphas, alpha, n_folds, pert_features)"),
             ("st", "sst: {}\n", "unknown model 'sst'"),
             ("st", "st_x: {model: nope}\n", "unknown model 'nope' of 'st_x'"),
             ("st", "linear: {model: st}\n", "'linear' is a built-in model name"),
             ("st_x", "st_x: {model: st, embed_key: X_none}\n", "no .obsm['X_none']"))
    commands = []
    for i, (model, text, _) in enumerate(cases):
        (tmp_path / f"bad{i}.yaml").write_text(text)
        commands.append([*common, "--models", model, "--model-config", tmp_path / f"bad{i}.yaml", "--out", tmp_path / f"bad{i}"])
    for i, (bad, (_, text, expected)) in enumerate(zip(run_cli_batch(commands, timeout=300), cases)):  # one interpreter
        assert bad.returncode == 2 and expected in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / f"bad{i}").exists()  # X_none too: it failed only once st_x started training
    config = tmp_path / "st.yaml"
    tiny = "  max_steps: 3\n  set_size: 8\n  batch_size: 2\n"
    config.write_text(f"st:\n{tiny}  config: {{width: 16, n_layers: 1, n_heads: 2, encoder_layers: 1}}\n"
                      f"st_wide:\n  model: st\n{tiny}  config: {{width: 24, n_layers: 1, n_heads: 2, encoder_layers: 1}}\n")
    out = tmp_path / "ok"
    ok = run_cli(*common, "--models", "control_mean,st,st_wide", "--model-config", config, "--out", out, "--seed", "1")
    assert ok.returncode == 0, ok.stderr
    assert "GPU available" not in ok.stderr + ok.stdout and "LeafSpec" not in ok.stderr  # Lightning kept quiet
    board = read_csv(out / "leaderboard.csv", text_columns=("model", "context"))
    assert set(board["model"]) == {"control_mean", "cell_mean", "st", "st_wide"}
    assert json.loads((out / "bench.json").read_text())["timings"]["fit st A172"] < 60


def test_bench_2026_scale_when_the_control_label_is_also_a_gene(tmp_path):
    """Kang's control label CTRL is also a gene; its perturbation (STIM) is not: no target gene to
    exclude, so the scale is built (it was refused as if the labels were misnamed genes)."""
    import vcell
    from vcell.leaderboard.vcc2026 import _scale_2026

    a = vcell.simulate_perturbseq(seed=0, n_genes=300, n_perturbations=6, n_combinations=0, n_contexts=1,
                                  cells_per_perturbation=60, n_controls=150)
    labels = a.obs["target_gene"].astype(str)
    a.obs["target_gene"] = np.where(labels == "non-targeting", "CTRL", "drug_" + labels)
    a.var_names = ["CTRL", *a.var_names[1:]]
    a.layers["counts"] = a.X.copy()
    spec = vcell.DataSpec(pert_col="target_gene", control="CTRL", context_col=None)
    scale, totals, _, rule = _scale_2026(a, spec, threads=1, seed=0, folder=tmp_path / "scale", where="fold f, context all")
    assert len(totals) == 150 and scale.baseline_agg.shape[0] > 0
    assert rule == {"rule": "no label names a measured gene: none excluded", "labels": 6, "labels_naming_genes": 0,
                    "de_targets_resolved": True}
    assert (tmp_path / "scale" / "anchor_agg.csv").is_file()


def test_bench_2026_scale_whose_targets_the_de_never_tests_says_why_its_de_metrics_are_left_out(tmp_path, caplog):
    """Every target below the 5-CPM gate of the DE (`vcell eval` refuses such a panel, as cell-eval2
    does): bench scores the other metrics, says why the four DE metrics are left out and records it;
    the anchor's lfc_nmae, from the whole reference's gate, is left out with the others."""
    import logging

    from vcell.leaderboard.vcc2026 import _scale_2026

    rng = np.random.default_rng(1)
    genes = [f"G{i:02d}" for i in range(40)]
    base = np.full(40, 4000.0)
    base[:4] = 0.0  # no control expresses a target
    X = [rng.poisson(base, (30, 40))]
    labels = ["non-targeting"] * 30
    for k in range(4):
        lam = base.copy()
        lam[6 + 4 * k:10 + 4 * k] *= 1.5
        X.append(rng.poisson(lam, (30, 40)))
        labels += [genes[k]] * 30
    a = ad.AnnData(sp.csr_matrix(np.vstack(X).astype(np.float32)), obs=pd.DataFrame({"target_gene": labels}),
                   var=pd.DataFrame(index=genes))
    a.layers["counts"] = a.X.copy()
    import vcell

    spec = vcell.DataSpec(pert_col="target_gene", control="non-targeting", context_col=None)
    with caplog.at_level(logging.WARNING):
        scale, _, caveats, rule = _scale_2026(a, spec, threads=1, seed=0, folder=tmp_path / "scale", where="fold f, context all")
    assert "fold f, context all: no perturbation's target gene is among the genes the held-out cells' DE tests" in caplog.text
    assert rule["de_targets_resolved"] is False
    de = ["de_wilcoxon_direction_fidelity_yield_raw", "de_wilcoxon_direction_reach_raw", "de_wilcoxon_sig_jaccard", "de_wilcoxon_lfc_nmae"]
    assert all(any(d.startswith(m) for d in caveats["degenerate"]) for m in de), caveats
    replicate = dict(zip(scale.anchor.agg["metric"], scale.anchor.agg["replicate"]))
    assert all(np.isnan(replicate[m]) for m in de) and np.isfinite(replicate["pds_cosine"])


def test_kang_bench_counts_its_context_without_controls_once(tmp_path, kang):
    """Kang's Eryth cells have no controls: said once, though bench validates the file again after
    normalising it (the second said it as '<AnnData>')."""
    result = run_cli("bench", "--data", kang, "--pert-col", "stim", "--control", "CTRL", "--context-col", "seurat_annotations",
                     "--allow-missing-controls", "--holdout-context", "CD14 Mono", "--models", "control_mean", "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr[-2000:]
    said = " ".join(result.stderr.split())
    assert said.count("has no control cells labelled 'CTRL'") == 1 and "<AnnData>" not in said


def test_bench_vcc2026_profile(tmp_path):
    """--profile vcc2026 on raw counts: the 2025 score and the scaled 2026 score side by side, both
    ends of each held-out context's scale on disk, the report's table of the six scaled metrics;
    log1p data is refused with one line."""
    import vcell

    a = vcell.simulate_perturbseq(seed=0, n_genes=600, n_perturbations=12, n_combinations=0, n_contexts=2,
                                  cells_per_perturbation=40, n_controls=200)
    data = tmp_path / "sim.h5ad"
    a.uns["log1p"] = {"base": None}  # stale, as left by counts put back into X after scanpy's log1p
    a.write_h5ad(data)
    out = tmp_path / "bench"
    result = run_cli("bench", "--data", data, "--models", "control_mean,pert_mean", "--holdout-context", "ctx_B",
                     "--profile", "vcc2026", "--out", out, "--seed", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already log-transformed" not in result.stderr  # the recorded counts decide; scanpy's guess is not shown
    del a.uns["log1p"]
    board = pd.read_csv(out / "leaderboard.csv")
    scaled = [c for c in board.columns if c.startswith("vcc2026_") and c != "vcc2026_score"]
    assert len(scaled) == 6 and {"vcc_score", "vcc2026_score"} <= set(board.columns)
    rows = board[board["context"] == "ctx_B"].set_index("model")
    # predicting each perturbation's mean response beats predicting the controls on the 2026 scale too
    assert rows.loc["pert_mean", "vcc2026_score"] > rows.loc["control_mean", "vcc2026_score"]
    assert rows.loc["pert_mean", "vcc2026_pds_cosine"] > 0.5
    scale = out / "eval" / "vcc2026_scale_ctx_B"
    assert {"baseline_agg_results.csv", "anchor_agg.csv", "anchor_splits.csv"} <= {p.name for p in scale.iterdir()}
    assert (out / "eval" / "pert_mean_ctx_B" / "vcc2026" / "score.csv").is_file()
    assert "VCC 2026 score and its six scaled metrics" in (out / "report.html").read_text()
    # each held-out context's scale caveats are recorded, and the report names them when there are any
    from vcell.report.inputs import load_bench
    from vcell.report.vcc2026 import scale_caveats_note as _scale_caveats

    caveats = json.loads((out / "bench.json").read_text())["vcc2026_scale_caveats"]
    assert [c["context"] for c in caveats] == ["ctx_B"] and set(caveats[0]) == {"fold", "context", "degenerate", "unresolved",
                                                                                 "single_cell"}
    assert caveats[0]["single_cell"] == []
    flagged = bool(caveats[0]["degenerate"] or caveats[0]["unresolved"])
    assert ("Scales to read with care" in (out / "report.html").read_text()) == flagged
    bench = load_bench(out)
    bench.meta["vcc2026_scale_caveats"] = [{"fold": "f1", "context": "ctx_B", "degenerate": [], "unresolved": [
        "de_wilcoxon_sig_jaccard (baseline 0.6667, replicate 0.6694, standard error 0.084)"]}]
    note = _scale_caveats(bench)
    assert "fold f1, context ctx_B: not resolved: de_wilcoxon_sig_jaccard (baseline 0.6667" in note and "left out:" not in note
    bench.meta["vcc2026_scale_caveats"][0]["unresolved"] = []
    assert _scale_caveats(bench) == ""
    bench.meta["vcc2026_scale_caveats"][0]["single_cell"] = ["P3"]  # scored, but not in the replicate anchor
    assert "fold f1, context ctx_B: one cell, not in the anchor: P3" in _scale_caveats(bench)

    import scanpy as sc

    logged = tmp_path / "log.h5ad"
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.uns.pop("vcell", None)  # no recorded expression type: the values decide
    a.write_h5ad(logged)
    bad = run_cli("bench", "--data", logged, "--models", "control_mean", "--holdout-context", "ctx_B",
                  "--profile", "vcc2026", "--out", tmp_path / "bench2")
    assert bad.returncode == 2 and "raw counts" in error_line(bad)


def test_run_bench_builds_its_added_baseline_itself_and_keeps_earlier_results(tmp_path):
    """A caller's builder that makes one model for any name (`lambda name: make_model("linear")`)
    must not become the cell_mean baseline the VCC score is scaled against (every score was 0);
    an earlier benchmark in `out` is refused without overwrite, as `vcell bench` refuses it."""
    import vcell
    from vcell.errors import VcellError

    a = vcell.simulate_perturbseq(seed=0, n_genes=60, n_perturbations=6, n_combinations=0, n_contexts=2,
                                  cells_per_perturbation=30, n_controls=60)
    data = tmp_path / "sim.h5ad"
    a.write_h5ad(data)
    out = tmp_path / "bench"
    kwargs = dict(holdout=["ctx_B"], profile="vcc", report=False, seed=0)
    result = vcell.run_bench(data, out, ["mine"], lambda name: vcell.make_model("pert_mean", seed=0), **kwargs)
    board = result.leaderboard[result.leaderboard["context"] == "ctx_B"].set_index("model")
    assert set(board.index) == {"mine", "cell_mean"}
    assert board.loc["cell_mean", "vcc_score"] == 0 and board.loc["mine", "vcc_score"] > 0
    assert board.loc["mine", "mae"] != board.loc["cell_mean", "mae"]
    before = (out / "leaderboard.csv").read_bytes()
    with pytest.raises(VcellError, match="leaderboard.csv.*--overwrite"):
        vcell.run_bench(data, out, ["control_mean"], lambda name: vcell.make_model(name, seed=0), **kwargs)
    assert (out / "leaderboard.csv").read_bytes() == before
    mine = [out / "eval" / "my_model" / "agg_results.csv", out / "predictions" / "my_model.h5ad"]
    for path in mine:  # a user's own results kept beside bench's: --overwrite replaced eval/ and predictions/ whole
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine\n")
    with pytest.raises(VcellError, match=r"eval/my_model/agg_results.csv', 'predictions/my_model.h5ad' in it were not written by vcell"):
        vcell.run_bench(data, out, ["control_mean"], lambda name: vcell.make_model(name, seed=0), overwrite=True, **kwargs)
    assert all(p.read_text() == "mine\n" for p in mine) and (out / "leaderboard.csv").read_bytes() == before
    for path in mine:
        path.unlink()
    (out / ".vcell-written.json").unlink()  # as an older vcell left it: its bench.json names what it wrote
    vcell.run_bench(data, out, ["control_mean"], lambda name: vcell.make_model(name, seed=0), overwrite=True, **kwargs)
    assert set(pd.read_csv(out / "leaderboard.csv")["model"]) == {"control_mean", "cell_mean"}


def test_bench_gives_the_same_numbers_whatever_the_file_stores_counts_as(tmp_path):
    """The same integer counts as float32, float64, float16 or int32 gave other numbers (normalised
    in the file's precision: float16 moved the 2026 score from -0.47 to -0.35): bench computes in
    float32 whatever the file stores."""
    import vcell

    a = vcell.simulate_perturbseq(seed=0, n_genes=60, n_perturbations=6, n_combinations=0, n_contexts=2,
                                  cells_per_perturbation=30, n_controls=60)
    a.X = sp.csr_matrix(np.minimum(a.X.toarray(), 2000))
    boards = {}
    for dtype in ("float32", "float64", "float16", "int32"):
        b = a.copy()
        b.X = b.X.toarray().astype(dtype) if dtype == "float16" else b.X.astype(dtype)
        b.write_h5ad(tmp_path / f"{dtype}.h5ad")
        result = vcell.run_bench(tmp_path / f"{dtype}.h5ad", tmp_path / dtype, ["control_mean", "pert_mean"],
                                 lambda name: vcell.make_model(name, seed=0), holdout=["ctx_B"], profile="vcc", report=False)
        boards[dtype] = result.leaderboard
    for dtype in ("float64", "float16", "int32"):
        pd.testing.assert_frame_equal(boards[dtype], boards["float32"])


def _score_line(row) -> float:
    """A 2026 score table row's scaled value before any clamp, written out here from its definition:
    0 at the baseline, 1 at the replicate, the sign given by the metric's direction."""
    lower = row["metric"] in ("expr_mse_unbiased_capped_norm", "de_wilcoxon_lfc_nmae")
    return (row["baseline"] - row["value"]) / (row["baseline"] - row["replicate"]) if lower else \
        (row["value"] - row["baseline"]) / (row["replicate"] - row["baseline"])


def test_bench_json_and_report_record_the_hold_out_models_options_profile_and_target_genes(tmp_path, caplog):
    """Contexts and perturbations both held out (one fold per context): bench.json records the profile
    as given, each model's options (the added cell_mean: none), per fold the held-out contexts and
    perturbations and per context the target-gene rule (said once in the log); the report's header
    lists them with a count and says what was held out; every run beyond the replicate is recorded."""
    import logging

    import vcell
    from vcell.report.header import header_section
    from vcell.report.inputs import load_bench

    a = vcell.simulate_perturbseq(seed=0, n_genes=300, n_perturbations=8, n_combinations=0, n_contexts=2,
                                  cells_per_perturbation=40, n_controls=120)
    data, out = tmp_path / "sim.h5ad", tmp_path / "bench"
    a.write_h5ad(data)
    options = {"linear": {"alpha": 3.0}, "st": {"max_steps": 3}}  # st is not benchmarked: not recorded
    with caplog.at_level(logging.INFO, logger="vcell.leaderboard"):
        vcell.run_bench(data, out, ["control_mean", "linear"], lambda n: vcell.make_model(n, seed=0, **options.get(n, {})),
                        holdout=["ctx_A", "ctx_B"], holdout_perturbations=0.3, profile="vcc2026", threads=1, seed=0,
                        model_options=options)
    meta = json.loads((out / "bench.json").read_text())
    assert meta["profile"] == "vcc2026"
    assert meta["model_options"] == {"control_mean": {}, "linear": {"alpha": 3.0}, "cell_mean": {}}
    held = meta["folds"][0]["held_out_perturbations"]
    assert len(held) == 2 and all(f["held_out_perturbations"] == held for f in meta["folds"])
    assert [f["held_out_contexts"] for f in meta["folds"]] == [["ctx_A"], ["ctx_B"]]
    # each fold's split is a TOML cell-load can read: [datasets] names the file (it was empty)
    from vcell.data.split_files import read_split_toml

    (tmp_path / "fold.toml").write_text(meta["folds"][0]["split"])
    assert read_split_toml(tmp_path / "fold.toml").datasets == {"synthetic": data.resolve()}
    labels = sorted(set(a.obs["target_gene"].astype(str)) - {"non-targeting"})
    assert meta["folds"][0]["scored_perturbations"] == {"ctx_A": labels}  # a held-out context: every perturbation scored
    assert [(t["context"], t["rule"], t["labels_naming_genes"]) for t in meta["vcc2026_target_genes"]] == \
        [("ctx_A", "labels name measured genes: excluded", 8), ("ctx_B", "labels name measured genes: excluded", 8)]
    assert caplog.text.count("vcc2026 target genes") == 1 and "8 of 8 perturbation labels name a measured gene" in caplog.text
    for run in meta["runs"]:  # each run beyond the replicate is recorded, and no other
        table = read_csv(out / run["eval_dir"] / "vcc2026" / "score.csv").set_index("metric").drop(index="avg_score")
        beyond = {m for m, row in table.iterrows() if np.isfinite(row["value"]) and _score_line({**row, "metric": m}) > 1}
        assert {b["metric"] for b in meta["vcc2026_beyond_replicate"] if b["model"] == run["model"] and b["context"] == run["context"]} == beyond
    header = header_section(load_bench(out), "t")
    assert f"Held-out perturbations (2)</dt><dd>{', '.join(held)}</dd>" in header
    assert "Held-out contexts</dt><dd>ctx_A, ctx_B</dd>" in header and "in held-out cell contexts (every perturbation there scored; the held-out perturbations never" in header
    assert "vcc2026</dd>" in header and "linear: {&quot;alpha&quot;: 3.0}; other models: defaults" in header


def test_bench_cli_perturbation_hold_out_one_context_beyond_the_replicate(tmp_path):
    """`vcell bench --profile vcc2026` holding out perturbations of one context whose labels name no
    gene (drugs): the target-gene rule is said and recorded; the --model-config options and the profile
    as given are recorded; the headline leads with the VCC 2026 score; cell_mean's pds_cosine lies beyond
    the replicate (5 perturbations of ~10 cells; at seed 0, by the draws of its counts): warned, recorded with its scaled value and shown in the
    report; the terminal names both scales; one context is shown once (no duplicate mean rows)."""
    import vcell

    a = vcell.simulate_perturbseq(seed=0, n_genes=300, n_perturbations=10, n_combinations=0, n_contexts=1,
                                  cells_per_perturbation=10, n_controls=100)
    labels = a.obs["target_gene"].astype(str)
    a.obs["target_gene"] = np.where(labels == "non-targeting", labels, "drug_" + labels)
    data, out, config = tmp_path / "sim.h5ad", tmp_path / "bench", tmp_path / "models.yaml"
    a.write_h5ad(data)
    config.write_text("linear: {alpha: 3.0}\n")
    result = run_cli("bench", "--data", data, "--context-col", "none", "--holdout-perturbations", "0.5", "--models",
                     "control_mean,pert_mean,linear", "--model-config", config, "--profile", "vcc2026", "--threads", "1", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    said = " ".join(result.stderr.split())
    assert said.count("none of the 5 perturbation labels names a measured gene: no target gene is excluded") == 1
    meta = json.loads((out / "bench.json").read_text())
    assert meta["profile"] == "vcc2026" and meta["model_options"]["linear"] == {"alpha": 3.0}
    assert meta["vcc2026_target_genes"] == [{"fold": "perturbations", "context": "all", "labels": 5, "labels_naming_genes": 0,
                                             "rule": "no label names a measured gene: none excluded", "de_targets_resolved": True}]
    held = meta["folds"][0]["held_out_perturbations"]
    assert len(held) == 5 and meta["folds"][0]["held_out_contexts"] == []
    beyond = {(b["model"], b["metric"]): b for b in meta["vcc2026_beyond_replicate"]}
    pds = beyond[("cell_mean", "pds_cosine")]
    board = read_csv(out / "leaderboard.csv", text_columns=("model", "context")).set_index(["model", "context"])
    assert pds["scaled"] > 1 and not pds["clamped"] and pds["score"] == board.loc[("cell_mean", "all"), "vcc2026_pds_cosine"]
    assert re.search(r"cell_mean lies beyond the replicate anchor on .*pds_cosine [0-9.]+ \(replicate", said), said
    assert "no evidence of a better-than-replicate" in said
    shown = " ".join(result.stdout.split())
    assert "(VCC: the 2025 score x100, scaled against cell_mean; VCC 2026: on a 0-1 scale" in shown
    assert " mean " not in shown.split("leaderboard (")[1]  # the one context's mean repeats it
    html = (out / "report.html").read_text()
    assert "Perturbation-response prediction for held-out perturbations, never trained on" in html
    assert f"Held-out perturbations (5)</dt><dd>{', '.join(held)}</dd>" in html and "Held-out contexts" not in html
    assert "Beyond the replicate." in html and "<b>cell_mean</b>, pds_cosine" in html
    best = board.xs("all", level="context")["vcc2026_score"].idxmax()
    assert re.search(rf"Best model \(context all\): <b>{best}</b>, VCC 2026 score", html)
    assert "(average over scored contexts)" not in html and html.count("<th colspan") == 3  # 2026, 2025 and all-metrics tables


def test_beyond_replicate_names_values_past_the_anchor_with_the_challenge_clamps():
    """A value past the replicate is named with its scaled value before the clamp; its score is the
    table's (expr_mse clamped to 1, pds_cosine kept above 1, as cell-eval2 does); a value at the
    replicate, a degenerate scale and a missing value are not named."""
    from vcell.eval.vcc2026.scale import score_context
    from vcell.leaderboard.vcc2026 import beyond_note, beyond_replicate

    nan = float("nan")
    base = {"pds_cosine": 0.5, "expr_mse_unbiased_capped_norm": 1.0, "de_wilcoxon_lfc_nmae": 0.9,
            "de_wilcoxon_direction_fidelity_yield_raw": 0.4, "de_wilcoxon_direction_reach_raw": 0.3, "de_wilcoxon_sig_jaccard": 0.1}
    rep = {"pds_cosine": 0.7, "expr_mse_unbiased_capped_norm": 0.2, "de_wilcoxon_lfc_nmae": 0.3,
           "de_wilcoxon_direction_fidelity_yield_raw": 0.4, "de_wilcoxon_direction_reach_raw": 0.9, "de_wilcoxon_sig_jaccard": 0.4}
    user = {"pds_cosine": 0.8, "expr_mse_unbiased_capped_norm": 0.1, "de_wilcoxon_lfc_nmae": 0.3,
            "de_wilcoxon_direction_fidelity_yield_raw": 0.9, "de_wilcoxon_direction_reach_raw": 0.5, "de_wilcoxon_sig_jaccard": nan}
    table = score_context(user, base, rep, strict=False)
    found = {f["metric"]: f for f in beyond_replicate(table)}
    assert set(found) == {"pds_cosine", "expr_mse_unbiased_capped_norm"}
    assert found["pds_cosine"]["scaled"] == pytest.approx(1.5) and found["pds_cosine"]["score"] == pytest.approx(1.5)
    assert not found["pds_cosine"]["clamped"]
    assert found["expr_mse_unbiased_capped_norm"]["scaled"] == pytest.approx(1.125)
    assert found["expr_mse_unbiased_capped_norm"]["score"] == 1.0 and found["expr_mse_unbiased_capped_norm"]["clamped"]
    scores = table.set_index("metric")["score"]
    assert all(f["score"] == scores[m] for m, f in found.items())  # the numbers scored are left as they are
    note = beyond_note("m", list(found.values()))
    assert "pds_cosine 0.8 (replicate 0.7, baseline 0.5): scaled 1.5, kept" in note and "clamped to 1" in note


def test_run_bench_takes_an_anndata_and_leaves_it_as_it_was(tmp_path):
    """A notebook user's object: the same leaderboard as from its file; the object is not modified."""
    import vcell

    a = vcell.simulate_perturbseq(seed=0, n_genes=60, n_perturbations=6, n_combinations=0, n_contexts=2,
                                  cells_per_perturbation=30, n_controls=60)
    a.write_h5ad(tmp_path / "sim.h5ad")
    kwargs = dict(holdout=["ctx_B"], profile="vcc", report=False, seed=0)
    build = lambda name: vcell.make_model(name, seed=0)  # noqa: E731
    X, uns = a.X.copy(), dict(a.uns)
    from_object = vcell.run_bench(a, tmp_path / "mem", ["pert_mean"], build, **kwargs).leaderboard
    from_file = vcell.run_bench(tmp_path / "sim.h5ad", tmp_path / "file", ["pert_mean"], build, **kwargs).leaderboard
    pd.testing.assert_frame_equal(from_object, from_file)
    assert (a.X != X).nnz == 0 if hasattr(X, "nnz") else np.array_equal(a.X, X)
    assert a.uns.keys() == uns.keys()
    assert json.loads((tmp_path / "mem" / "bench.json").read_text())["data"] == "<in-memory AnnData>"


def test_bench_2026_names_targets_measured_under_another_var_column(caplog):
    """Ensembl IDs as var_names with the symbols in var['gene_symbols']: bench said only "no target
    gene is excluded" (an INFO line) while the knocked-down targets were measured."""
    import logging

    import anndata as ad

    from vcell.data.spec import DataSpec
    from vcell.leaderboard.vcc2026 import RULE_NONE, target_gene_rule

    var = pd.DataFrame({"gene_symbols": ["IRF1", "JAK2", "ACTB"], "n_cells": [3, 4, 5]}, index=["ENSG1", "ENSG2", "ENSG3"])
    real = ad.AnnData(np.zeros((2, 3), np.float32), var=var)
    spec = DataSpec(pert_col="target", control="non-targeting")
    with caplog.at_level(logging.WARNING):
        rule = target_gene_rule(real, spec, ["non-targeting", "IRF1", "JAK2", "STAT1"])
    assert rule["rule"] == RULE_NONE
    assert "2 of 3 perturbation labels name genes of var['gene_symbols'] (e.g. 'IRF1'), not var_names" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        target_gene_rule(real, spec, ["non-targeting", "DMSO_1"])
    assert "var[" not in caplog.text


def test_leaderboard_mean_row_is_the_mean_over_contexts():
    from vcell.leaderboard.bench import _leaderboard

    rows = [{"model": "m", "context": c, "mae": v, "vcc_score": s, "vcc_score_unclipped": s}
            for c, v, s in (("a", 0.1, 10.0), ("b", 0.2, 20.0), ("c", 0.9, 90.0))]
    board = _leaderboard(rows).set_index(["model", "context"])
    assert board.loc[("m", "mean"), "mae"] == pytest.approx(0.4)  # the median would be 0.2
    assert board.loc[("m", "mean"), "vcc_score"] == pytest.approx(40.0)
