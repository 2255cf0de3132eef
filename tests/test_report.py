"""vcell.report: the self-contained HTML benchmark report and its headless-Chromium screenshot.

The benchmark directory is built here the way ``vcell bench`` lays it out, from the real
McFaline-Figueroa 2023 data (three glioblastoma lines, 9 kinase knockdowns): two held-out cell
lines, three simple models (``cell_mean`` baseline, ``control_mean`` = control cells relabelled,
``noisy_truth`` = the real cells plus noise), each evaluated with ``vcell.eval.run.run`` (profile
``full``) and a leaderboard assembled from the aggregates and the VCC score.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcell.errors import VcellError

from conftest import MCFALINE, real_data

PERT_COL, CONTROL, CONTEXT_COL = "perturbation", "control", "cell_type"
CONTEXTS = ["T98G", "U87MG"]
MODELS = ["cell_mean", "control_mean", "noisy_truth"]
VCC = ["overlap_at_N", "mae", "discrimination_score_l1"]


def _slug(context: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", context).strip("-").lower()


def _control_mean(real: ad.AnnData, rng: np.random.Generator) -> ad.AnnData:
    """Every perturbed cell predicted as a random control cell of the same context."""
    labels = real.obs[PERT_COL].astype(str).to_numpy()
    ctrl = np.flatnonzero(labels == CONTROL)
    rows = np.where(labels == CONTROL, np.arange(labels.size), rng.choice(ctrl, labels.size))
    pred = ad.AnnData(X=sp.csr_matrix(real.X[rows]), obs=real.obs.copy(), var=real.var.copy())
    return pred


def _noisy_truth(real: ad.AnnData, rng: np.random.Generator) -> ad.AnnData:
    X = sp.csr_matrix(real.X, copy=True)
    X.data = np.maximum(X.data + rng.normal(0.0, 0.3, X.data.size), 0.0)
    X.eliminate_zeros()
    return ad.AnnData(X=X, obs=real.obs.copy(), var=real.var.copy())


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    from vcell.eval.baseline import build_cell_mean_baseline
    from vcell.eval.run import run
    from vcell.eval.scoring import read_csv, score

    data_path = real_data(MCFALINE)  # the full file, else its small subset in tests/data
    root = tmp_path_factory.mktemp("bench")
    (root / "predictions").mkdir()
    adata = ad.read_h5ad(data_path)
    adata = adata[adata.obs["dataset"] == "mcfaline23"].copy()
    rng = np.random.default_rng(0)
    runs, real_paths, rows = [], {}, []
    for context in CONTEXTS:
        real = adata[adata.obs[CONTEXT_COL] == context].copy()
        real.X = sp.csr_matrix(real.X)
        real.obs = real.obs[[PERT_COL, CONTEXT_COL]].astype(str)
        real_rel = f"predictions/real_{_slug(context)}.h5ad"
        real.write_h5ad(root / real_rel)
        real_paths[context] = real_rel
        train = adata[adata.obs[CONTEXT_COL] != context]
        baseline = build_cell_mean_baseline(train, PERT_COL, CONTROL)  # mean of the training contexts
        baseline = baseline[baseline.obs[PERT_COL].astype(str) != CONTROL]
        preds = {
            "cell_mean": ad.concat([baseline, real[real.obs[PERT_COL] == CONTROL]]),
            "control_mean": _control_mean(real, rng),
            "noisy_truth": _noisy_truth(real, rng),
        }
        aggs = {}
        for model in MODELS:
            pred = preds[model]
            pred.X = sp.csr_matrix(pred.X)
            pred.obs = pd.DataFrame(
                {PERT_COL: pred.obs[PERT_COL].astype(str).to_numpy(), CONTEXT_COL: context},
                index=[f"{model}_{i}" for i in range(pred.n_obs)],
            )
            pred.var_names = real.var_names
            slug = f"{model}_{_slug(context)}"
            pred_rel, eval_rel = f"predictions/{slug}.h5ad", f"eval/{slug}"
            pred.write_h5ad(root / pred_rel)
            run(root / pred_rel, root / real_rel, root / eval_rel, PERT_COL, CONTROL, profile="full")
            aggs[model] = read_csv(root / eval_rel / "agg_results.csv")
            runs.append({"model": model, "context": context, "slug": slug, "prediction": pred_rel, "eval_dir": eval_rel})
        for model in MODELS:
            agg = aggs[model]
            means = agg[agg["statistic"] == "mean"].iloc[0]
            keep = ["statistic", *VCC]
            scored = score(agg[keep], aggs["cell_mean"][keep]).set_index("metric")
            row = {"model": model, "context": context}
            row.update({c: float(means[c]) for c in agg.columns if c != "statistic"})
            row["vcc_score"] = float(scored.loc["avg_score", "from_baseline"])
            row["vcc_score_unclipped"] = float(scored.loc["avg_score", "unclipped"])
            rows.append(row)
    board = pd.DataFrame(rows)
    means = board.drop(columns="context").groupby("model", sort=False).mean().reset_index()
    means.insert(1, "context", "mean")
    pd.concat([board, means], ignore_index=True).to_csv(root / "leaderboard.csv", index=False)
    meta = {
        "data": str(data_path),
        "pert_col": PERT_COL,
        "control": CONTROL,
        "context_col": CONTEXT_COL,
        "models": MODELS,
        "contexts": CONTEXTS,
        "runs": runs,
        "real": real_paths,
        "seed": 0,
        "split": "holdout_context",
        "timings": {"total": 12.5, "noisy_truth_t98g": {"fit": 0.1, "predict": 0.2, "eval": 1.5}},
    }
    (root / "bench.json").write_text(json.dumps(meta, indent=2))
    return root


@pytest.fixture(scope="module")
def report(bench_dir) -> Path:
    from vcell.report import build_report

    return build_report(bench_dir)


# --------------------------------------------------------------------------------------------


def _urls(text: str) -> list[str]:
    """Every src / href / url(...) / xlink:href value in the document."""
    attrs = re.findall(r"""(?:src|href|xlink:href|poster|action|data)\s*=\s*["']?([^"'\s>]+)""", text, re.I)
    css = re.findall(r"url\(\s*['\"]?([^'\")]+)", text, re.I)
    return attrs + css


def test_report_is_one_self_contained_file(bench_dir, report):
    assert report == bench_dir / "report.html"
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not list(bench_dir.glob(".report.html.*")), "atomic write left a temp file"
    urls = _urls(text)
    assert urls, "expected embedded images and in-page anchors"
    external = [u for u in urls if not (u.startswith("data:image/png;base64,") or u.startswith("#"))]
    assert external == [], f"references outside the file: {external[:5]}"
    assert not re.search(r"https?://", text), "a web address in the report"
    assert "file://" not in text.lower()
    assert "<script" not in text.lower() and "@import" not in text and "@font-face" not in text
    assert str(bench_dir) not in text, "absolute path of the bench dir leaked into the page"
    # in-page anchors all resolve
    for anchor in (u[1:] for u in urls if u.startswith("#")):
        assert f'id="{anchor}"' in text, anchor
    assert len(text) < 5_000_000


def test_report_content_models_contexts_values_images(bench_dir, report):
    text = report.read_text(encoding="utf-8")
    for name in [*MODELS, *CONTEXTS, "mean", "holdout_context", "mcfaline2023_norman2019", "cell_mean"]:
        assert name in text, name
    board = pd.read_csv(bench_dir / "leaderboard.csv", float_precision="round_trip")
    metrics = [c for c in board.columns if c not in ("model", "context")]
    assert metrics[-2:] == ["vcc_score", "vcc_score_unclipped"] and len(metrics) > 20
    cells = re.findall(r'<td[^>]*title="([^"]+)"[^>]*>([^<]*)</td>', text)
    shown = {float(full) for full, _ in cells}
    for value in board[metrics].to_numpy().ravel():
        if np.isfinite(value):
            assert value in shown, f"leaderboard value {value!r} not in the report"
            assert f"{value:.4g}" in text
    # the VCC score columns come first in the table, clipped then unclipped
    head = text[text.index("<h3>All metrics</h3>"):]
    first_th = re.findall(r"<th>([a-zA-Z_0-9]+)", head)[:3]
    assert first_th[:2] == ["vcc_score", "vcc_score_unclipped"], first_th
    assert "clip" in text and "baseline" in text
    # images: 2 bar-chart figures + per context (scatter + discrimination) + DE overlap
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2 + 2 * len(CONTEXTS) + 1
    import base64

    for b64 in images:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"matplotlib.org" not in png
    assert '<p class="warn">' not in text, "unexpected warnings for a complete bench dir"


def test_best_value_highlighted_per_context(bench_dir, report):
    text = report.read_text(encoding="utf-8")
    board = pd.read_csv(bench_dir / "leaderboard.csv", float_precision="round_trip")
    best_cells = {float(v) for v in re.findall(r'<td class="best" title="([^"]+)"', text)}
    for context in [*CONTEXTS, "mean"]:
        group = board[board["context"] == context]
        assert group["vcc_score"].max() in best_cells
        assert group["mae"].min() in best_cells  # lower is better
        if group["overlap_at_N"].nunique() == 1:  # a tie across all models is not highlighted
            assert f'<td class="best" title="{group["overlap_at_N"].iloc[0]!r}"' not in text
        else:
            assert group["overlap_at_N"].max() in best_cells
        worst_mae = group["mae"].max()
        if worst_mae != group["mae"].min():
            assert worst_mae not in best_cells
    # the best model by mean VCC score is the headline
    mean = board[board["context"] == "mean"].set_index("model")["vcc_score"]
    assert mean.idxmax() == "noisy_truth"
    assert re.search(r"Best model[^<]*<b>noisy_truth</b>", text)


def test_discrimination_ranks_match_metric(bench_dir):
    """The ranks the heatmap prints agree with discrimination_score_l1 of results.csv."""
    from vcell.eval.scoring import read_csv
    from vcell.report.build import _context_effects, discrimination_panel, load_bench

    bench = load_bench(bench_dir)
    for context in CONTEXTS:
        effects = _context_effects(bench, context)
        assert effects.warnings == []
        assert set(effects.pred) == set(MODELS)
        n = effects.perts.size
        for model in MODELS:
            dist, perts, ranks = discrimination_panel(effects, model)
            assert dist.shape == (n, n)
            results = read_csv(bench_dir / f"eval/{model}_{_slug(context)}/results.csv").set_index("perturbation")
            expected = [1.0 - (r - 1) / n for r in ranks]
            got = results.loc[perts, "discrimination_score_l1"].astype(float).to_numpy()
            np.testing.assert_allclose(got, expected, atol=1e-12)
            # subsetting (many perturbations) keeps the ranks among all perturbations
            _, sub_perts, sub_ranks = discrimination_panel(effects, model, max_perts=4)
            assert len(sub_perts) == 4
            assert sub_ranks == [ranks[perts.index(p)] for p in sub_perts]
        assert discrimination_panel(effects, "noisy_truth")[2].count(1) >= n - 2


def test_headline_names_ties_and_a_score_beyond_the_replicate_and_the_header_the_datasets_used(bench_dir):
    """The headline named the first of tied models alone, and nothing of a 2026 score resting on
    metrics beyond the replicate; the header left out a --dataset filter bench.json records."""
    from vcell.report.build import load_bench
    from vcell.report.header import SCORE_2026, header_section, headline

    bench = load_bench(bench_dir)
    lb = bench.leaderboard
    mean = lb["context"] == "mean"
    lb.loc[mean & (lb["model"] == "cell_mean"), "vcc_score"] = float(lb.loc[mean & (lb["model"] == "noisy_truth"), "vcc_score"].iloc[0])
    assert "<b>cell_mean</b> (tied with noisy_truth)" in headline(bench)  # in row order, the tie said
    lb[SCORE_2026] = np.where(lb["model"] == "control_mean", 0.5, 0.1)
    bench.meta["vcc2026_beyond_replicate"] = [{"fold": "T98G", "context": "T98G", "model": "control_mean", "metric": "pds_cosine"}]
    said = headline(bench)
    assert "<b>control_mean</b>, VCC 2026 score" in said and "Its score includes pds_cosine beyond the replicate anchor in 1 context" in said
    assert "Datasets used" not in header_section(bench, "t")
    bench.meta["datasets"] = ["mcfaline23"]
    assert re.search(r"Datasets used</dt>\s*<dd>mcfaline23", header_section(bench, "t"))


def test_discrimination_summary_ranks_every_perturbation_when_the_heatmap_shows_some(bench_dir, tmp_path, monkeypatch):
    """With more perturbations than a heatmap shows (50), the caption's score averaged the shown
    rows' ranks over all of them (0.756 for a discrimination_score_l1 of 0.8): it is now the metric."""
    import vcell.report.sections as sections
    from vcell.eval.scoring import read_csv
    from vcell.report import build_report

    panel = sections.discrimination_panel
    monkeypatch.setattr(sections, "discrimination_panel", lambda effects, model, max_perts=4: panel(effects, model, max_perts))
    text = build_report(bench_dir, tmp_path / "r.html").read_text()
    for context in CONTEXTS:
        for model in MODELS:
            agg = read_csv(bench_dir / f"eval/{model}_{_slug(context)}/agg_results.csv").set_index("statistic")
            assert f"{model}: mean rank" in text
            assert re.search(rf"{model}: mean rank [0-9.]+, score {agg.loc['mean', 'discrimination_score_l1']:.3f}", text), model
    assert "the heatmaps show the 4 with the largest real effects" in text and "shown)" not in text


def test_a_context_of_one_perturbation_says_its_discrimination_score_is_1_by_construction(bench_dir):
    """Kang's pDC (one perturbation) showed every model at discrimination 1 with no word that it cannot be otherwise."""
    from vcell.report.build import _context_effects, load_bench
    from vcell.report.effects import ContextEffects
    from vcell.report.sections import discrimination_section

    bench = load_bench(bench_dir)
    effects = {c: _context_effects(bench, c) for c in CONTEXTS}
    html, _ = discrimination_section(bench, effects)
    assert "1 by construction" not in html
    one = effects[CONTEXTS[0]]
    effects[CONTEXTS[0]] = ContextEffects(one.perts[:1], one.genes, one.real[:1], {m: e[:1] for m, e in one.pred.items()})
    html, _ = discrimination_section(bench, effects)
    assert html.count("the score is 1 by construction") == 1


def test_report_escapes_text_and_warns_on_missing_files(bench_dir, tmp_path):
    import shutil

    from vcell.report import build_report

    copy = tmp_path / "bench"
    shutil.copytree(bench_dir, copy, ignore=shutil.ignore_patterns("report.html"))
    meta = json.loads((copy / "bench.json").read_text())
    meta["split"] = '<script>alert("x")</script>'
    meta["runs"][0]["prediction"] = "predictions/missing.h5ad"
    (copy / "bench.json").write_text(json.dumps(meta))
    (copy / "eval" / f"noisy_truth_{_slug(CONTEXTS[1])}" / "results.csv").unlink()
    board = (copy / "leaderboard.csv").read_text().splitlines()
    header = board[0].split(",")
    cells = board[1].split(",")
    cells[header.index("mae")] = ""  # a null value
    board[1] = ",".join(cells)
    (copy / "leaderboard.csv").write_text("\n".join(board) + "\n")
    out = build_report(copy, out=tmp_path / "r" / "custom.html", title="A & B <report>")
    text = out.read_text()
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "<title>A &amp; B &lt;report&gt;</title>" in text
    warnings = re.findall(r'<p class="warn">([^<]*)</p>', text)
    assert any("predictions/missing.h5ad: file not found" in w for w in warnings), warnings
    assert any("results.csv: not found" in w for w in warnings), warnings
    assert str(copy) not in text, "paths inside the bench dir are shown relative to it"
    assert re.search(r'<td class="null">–</td>', text), "a null leaderboard value is shown as –"
    # the report is still complete apart from the missing run's figures
    assert len(re.findall(r"<img ", text)) == 2 + 2 * len(CONTEXTS) + 1


def test_build_report_errors_are_one_line(tmp_path):
    from vcell.report import build_report

    with pytest.raises(VcellError, match="bench.json"):
        build_report(tmp_path)
    (tmp_path / "bench.json").write_text("{not json")
    with pytest.raises(VcellError, match="unreadable JSON"):
        build_report(tmp_path)
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(VcellError, match="leaderboard.csv"):
        build_report(tmp_path)
    (tmp_path / "leaderboard.csv").write_text("a,b\n1,2\n")
    with pytest.raises(VcellError, match="missing column") as err:
        build_report(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report.html").exists()


def test_screenshot_without_chromium_is_a_vcell_error(tmp_path, monkeypatch):
    from vcell.report import screenshot

    html = tmp_path / "a.html"
    html.write_text("<p>x</p>")
    monkeypatch.setattr("vcell.report.chromium.find_chromium", lambda: None)
    with pytest.raises(VcellError, match="chromium not found") as err:
        screenshot(html, tmp_path / "a.png")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a.png").exists()


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image  # a dependency of matplotlib

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.int32)


def test_screenshot_renders_the_report(report, tmp_path):
    from vcell.report import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium); skipping the rendering check")
    png = screenshot(report, tmp_path / "report.png", width=1400, height=1600)
    assert png.is_file()
    pixels = _read_png(png)
    assert pixels.shape[:2] == (1600, 1400)
    assert pixels.std() > 20, "the screenshot is blank"
    # not just a white page with a stripe: a good share of rows carry ink (text, tables, plots)
    inked_rows = (pixels.min(axis=(1, 2)) < 128).mean()
    assert inked_rows > 0.25, inked_rows


def test_figures_scale_to_many_genes_and_perturbations():
    """Large benchmarks: scatters are downsampled (r still over every gene), the DE-overlap chart
    becomes a strip per model, the discrimination heatmap drops its per-cell labels."""
    from vcell.report import figures as F

    rng = np.random.default_rng(0)
    n_genes = F.MAX_SCATTER_POINTS + 5_000
    genes = np.array([f"g{i}" for i in range(n_genes)])
    real = {"g1": rng.normal(size=n_genes), "g2": rng.normal(size=n_genes)}
    pred = {"m$a": {p: v + rng.normal(size=n_genes) for p, v in real.items()}, "m2": {"g1": np.zeros(n_genes)}}
    colors = F.model_colors(["m$a", "m2"])
    with F.style():
        fig, rs = F.effect_scatter_figure(genes, real, pred, ["m$a", "m2"], colors, "ctx")
        assert f"showing {F.MAX_SCATTER_POINTS:,} of {n_genes:,} genes" in fig.get_suptitle()
        offsets = fig.axes[0].collections[0].get_offsets()
        assert len(offsets) == F.MAX_SCATTER_POINTS
        assert rs[("g1", "m$a")] == pytest.approx(np.corrcoef(real["g1"], pred["m$a"]["g1"])[0, 1])
        assert np.isnan(rs[("g1", "m2")]) and np.isnan(rs[("g2", "m2")])  # constant / missing prediction
        F.png_data_uri(fig)  # draws: "$" in a model name must not be parsed as mathtext

        perts = [f"P{i}" for i in range(120)]
        per_context = {"ctx": {"m$a": {p: rng.uniform() for p in perts}, "m2": {p: rng.uniform() for p in perts[:80]}}}
        fig = F.overlap_figure(per_context, ["m$a", "m2"], colors)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [r"m\$a", "m2"]
        F.png_data_uri(fig)

        n = 70
        dist = rng.uniform(size=(n, n))
        fig = F.discrimination_figure({"m$a": (dist, perts[:n], list(range(1, n + 1)))}, "ctx", 120)
        assert "70 of 120 perturbations" in fig.get_suptitle()
        assert len(fig.axes[0].texts) == 0 and len(fig.axes[0].get_xticks()) == 0
        assert F.png_data_uri(fig).startswith("data:image/png;base64,")


def _bench_2026(tmp_path, meta: dict, contexts=("all",)):
    """An in-memory vcc2026 benchmark: model a best by the 2025 score, model b by the 2026 score."""
    from vcell.report.inputs import Bench

    metrics_2026 = ["vcc2026_pds_cosine", "vcc2026_expr_mse_unbiased_capped_norm", "vcc2026_de_wilcoxon_direction_fidelity_yield_raw",
                    "vcc2026_de_wilcoxon_direction_reach_raw", "vcc2026_de_wilcoxon_sig_jaccard", "vcc2026_de_wilcoxon_lfc_nmae"]
    rows = [{"model": m, "context": c, "mae": 0.1, "vcc_score": s25, "vcc_score_unclipped": s25, "vcc2026_score": s26,
             **{k: s26 for k in metrics_2026}}
            for c in (*contexts, "mean") for m, s25, s26 in (("a", 5.0, 0.1), ("b", 1.0, 0.3), ("cell_mean", 0.0, -0.2))]
    board = pd.DataFrame(rows)
    return Bench(root=tmp_path, meta={"profile": "vcc2026", **meta}, leaderboard=board, models=["a", "b", "cell_mean"],
                 contexts=list(contexts), runs=[], real={}, pert_col="target", control="non-targeting", context_col=None,
                 metric_columns=[c for c in board.columns if c not in ("model", "context")])


def test_report_vcc2026_headline_caveats_glossary_and_one_context(tmp_path):
    """A vcc2026 benchmark: the headline leads with the best VCC 2026 score (the 2025 best after it),
    the models beyond the replicate are named by the 2026 table, every 2026 column has a meaning in the
    glossary, the 2026 table's headers are short and wrap, and one context is one group per table."""
    from vcell.report.sections import details_section, leaderboard_section

    beyond = {"fold": "f1", "context": "all", "model": "b", "metric": "pds_cosine", "value": 0.75, "baseline": 0.36,
              "replicate": 0.66, "scaled": 1.294, "score": 1.294, "clamped": False}
    bench = _bench_2026(tmp_path, {"vcc2026_beyond_replicate": [beyond]})
    html = leaderboard_section(bench)
    lead = re.search(r'<div class="headline">(.*?)</div>', html).group(1)
    assert lead.startswith("Best model (context all): <b>b</b>, VCC 2026 score <b>0.3</b>")
    assert "By the VCC 2025 score: <b>a</b>, VCC score <b>5</b>" in lead
    table_2026 = html[html.index("VCC 2026 score and its six"):html.index("VCC score and its three")]
    assert "Beyond the replicate." in table_2026 and "<b>b</b>, pds_cosine 0.75 (replicate 0.66, baseline 0.36): scaled 1.294, kept" in table_2026
    assert '<th class="wrap" title="vcc2026_de_wilcoxon_direction_fidelity_yield_raw">de_<wbr>wilcoxon_<wbr>' in table_2026
    heads = re.findall(r'<th class="wrap" title="[^"]+">([^<]+)', table_2026)
    assert len(heads) == 7 and not any(h.startswith("vcc2026") for h in heads)  # no header repeats the prefix
    assert html.count("<th colspan") == 3 and "context: all" in html and "average over" not in html
    glossary = details_section(bench)
    for column in [c for c in bench.metric_columns if c.startswith("vcc2026_")]:
        meaning = re.search(rf"<td class=\"text\">{column}</td><td class=\"text\">[^<]*</td><td class=\"text\">([^<]*)</td>", glossary)
        assert meaning and len(meaning.group(1)) > 20, column
    two = _bench_2026(tmp_path, {}, contexts=("ctx_A", "ctx_B"))
    assert leaderboard_section(two).count("<th colspan") == 9 and "Beyond the replicate" not in leaderboard_section(two)


def test_report_vcc2026_missing_values_dashes_and_each_scores_baseline(tmp_path):
    """A degenerate 2026 metric (NaN in the leaderboard CSV) showed 'NaN' where the note promises –;
    the header named cell_mean as the 0 of every score, which holds for the 2025 score only."""
    from vcell.report.header import header_section
    from vcell.report.sections import leaderboard_section

    bench = _bench_2026(tmp_path, {"baseline": "cell_mean"})
    bench.leaderboard.loc[0, "vcc2026_de_wilcoxon_lfc_nmae"] = np.nan
    html = leaderboard_section(bench)
    assert ">NaN<" not in html and '<td class="null">–</td>' in html
    header = header_section(bench, "t")
    assert "Baseline (VCC 2025 score = 0)</dt><dd>cell_mean" in header
    assert "Baseline (VCC 2026 score = 0)</dt><dd>each context&#x27;s mean-response baseline" in header


def test_report_header_says_what_was_held_out(tmp_path):
    """The header's subtitle and rows fit a context hold-out, a perturbation hold-out or both; a
    bench.json from before the hold-out was recorded keeps the old wording."""
    from vcell.report.header import header_section

    def header(folds):
        return header_section(_bench_2026(tmp_path, {"folds": folds} if folds is not None else {}), "t")

    contexts_only = header([{"held_out_contexts": ["all"], "held_out_perturbations": []}])
    assert "in held-out cell contexts:" in contexts_only and "Held-out contexts</dt><dd>all</dd>" in contexts_only
    assert "Held-out perturbations" not in contexts_only and "Scored contexts" not in contexts_only
    perts = header([{"held_out_contexts": [], "held_out_perturbations": ["P1", "P2", "P3"]}])
    assert "for held-out perturbations, never trained on:" in perts and "Held-out perturbations (3)</dt><dd>P1, P2, P3</dd>" in perts
    assert "Held-out contexts" not in perts and "Scored contexts</dt><dd>all</dd>" in perts
    both = header([{"held_out_contexts": ["all"], "held_out_perturbations": ["P1"]}])
    assert "in held-out cell contexts (every perturbation there scored; the held-out perturbations never trained on in any context):" in both and "Held-out perturbations (1)" in both
    old = header(None)
    assert "in held-out cell contexts:" in old and "Held-out contexts</dt><dd>all</dd>" in old
