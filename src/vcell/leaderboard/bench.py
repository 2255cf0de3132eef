"""``run_bench`` and its folds: every model trained on the same split, predicted, scored (:mod:`vcell.leaderboard`)."""


from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from vcell._version import __version__
from vcell.data.dataset import PerturbationData, file_dataset_name, from_anndata
from vcell.data.io import atomic_path, read_h5ad, write_h5ad
from vcell.data.labels import names_list
from vcell.data.spec import DataSpec
from vcell.data.splits import Split
from vcell.data.trained import pert_vocabulary, trained_labels
from vcell.data.validate import validate
from vcell.errors import VcellError, preview
from vcell.eval.inputs import check_pair
from vcell.eval.profiles import PROFILES
from vcell.eval.run import evaluate, write_outputs
from vcell.eval.scoring import score, write_csv
from vcell.leaderboard.folds import Fold, fold_record, fold_toml, make_folds
from vcell.leaderboard.resume import PARTIAL, Records, bench_settings, check_partial
from vcell.leaderboard.vcc2026 import Bench2026
from vcell.predictors.base import Predictor
from vcell.predictors.predict import predict_context

log = logging.getLogger(__name__)

BASELINE_MODEL = "cell_mean"
VCC_METRICS = tuple(PROFILES["vcc"])


def slug(text: str) -> str:
    """A file-name-safe version of a model or context name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


@dataclass
class BenchResult:
    """The leaderboard and where everything was written."""

    leaderboard: pd.DataFrame
    out: Path
    runs: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def prepare_data(
    path: str | os.PathLike | ad.AnnData,
    spec: DataSpec,
    dataset_col: str | None,
    allow_missing_controls: bool,
    datasets: Sequence[str] = (),
    keep_counts: bool = False,
) -> PerturbationData:
    """Read the data (a file, or an in-memory AnnData, not modified) in memory as log1p (counts get
    normalize_total to 1e4 + log1p, logged).

    ``datasets`` keeps only the cells whose ``dataset_col`` value is listed. ``keep_counts``
    keeps the raw counts in ``layers["counts"]`` (and requires counts).
    """
    in_memory = isinstance(path, ad.AnnData)
    adata = (path.to_memory() if path.isbacked else path.copy()) if in_memory else read_h5ad(path)  # the caller's is left as it is
    path = Path(IN_MEMORY if in_memory else path)  # names the data in messages
    if datasets:
        if not dataset_col or dataset_col not in adata.obs.columns:
            raise VcellError(f"{path}: --dataset needs the dataset column {dataset_col!r} in .obs")
        present = set(adata.obs[dataset_col].astype(str))
        unknown = [d for d in datasets if d not in present]
        if unknown:
            raise VcellError(f"{path}: dataset {unknown[0]!r} not found in column {dataset_col!r} (values: {', '.join(sorted(present))})")
        adata = adata[adata.obs[dataset_col].astype(str).isin(list(datasets)).to_numpy()].copy()
    if adata.X is not None and adata.X.dtype != np.float32:  # one precision whatever the file stores: the same numbers
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32) if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32)
    info = validate(adata, spec, path, require_context_controls=not allow_missing_controls)
    if keep_counts and info.type != "counts":
        from vcell.eval.vcc2026.inputs import counts_in_x, other_matrices

        elsewhere = [] if in_memory else other_matrices(path)
        hint = (f" (it also holds {', '.join(elsewhere)}: if those are the raw counts, put them in X, "
                f"{counts_in_x(elsewhere[0])})") if elsewhere else ""
        raise VcellError(f"{path}: --profile vcc2026 scores raw counts, and this file holds {info.type} values; "
                         f"give the raw-count file{hint}")
    if info.type == "counts":
        log.info("%s: counts -> normalize_total (1e4) + log1p for the benchmark", path)
        adata = adata.copy()
        if keep_counts:
            adata.layers["counts"] = sp.csr_matrix(adata.X, dtype=np.float32)
        adata.uns.pop("log1p", None)  # stale (X holds counts): scanpy would say X "seems to be already log-transformed"
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32) if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32)
    spec = spec.with_(expression="log1p")
    adata.uns["vcell"] = {"expression": "log1p"}
    data = from_anndata(adata, spec, dataset_col, "data" if in_memory else file_dataset_name(path),
                        require_context_controls=not allow_missing_controls, path=None if in_memory else path)
    data.path = None if in_memory else path
    return data


#: How bench names data given as an AnnData (in messages and ``bench.json``).
IN_MEMORY = "<in-memory AnnData>"


def _fold_scales(data: PerturbationData, fold: Fold, spec: DataSpec, stage: Path, bench_2026: Bench2026 | None,
                 records: Records, say: Callable[[str], None]) -> tuple[dict[str, ad.AnnData], dict[str, float]]:
    """Write a fold's real held-out cells and (vcc2026) each context's scale; record the fold. Returns
    the real cells by context and the scales' timings."""
    real_by_ctx, timings = {}, {}
    for ctx in fold.contexts:
        cells = _real_cells(data, fold.split, ctx)  # read once for both
        real_by_ctx[ctx] = _tidy(cells, spec)
        write_h5ad(real_by_ctx[ctx], stage / "predictions" / f"real_{slug(ctx)}.h5ad")
        if bench_2026 is not None:
            say(f"fold {fold.name}: the vcc2026 scale of {ctx} (baseline and replicate anchor)")
            t = time.perf_counter()
            bench_2026.add_context(fold.name, ctx, cells, stage / "eval" / f"vcc2026_scale_{slug(ctx)}")
            timings[f"vcc2026 scale {ctx}"] = time.perf_counter() - t
    files = [f"predictions/real_{slug(c)}.h5ad" for c in fold.contexts]
    files += [f"eval/vcc2026_scale_{slug(c)}" for c in fold.contexts] if bench_2026 is not None else []
    records.add_fold(fold.name, {"timings": timings, "vcc2026": bench_2026.fold_meta(fold.name) if bench_2026 is not None else {},
                                 "files": files})
    return real_by_ctx, timings


def _run_model(make_model: Callable[[str], Predictor], name: str, data: PerturbationData, fold: Fold,
               real_by_ctx: dict[str, ad.AnnData], spec: DataSpec, stage: Path, profile: str, threads: int, seed: int,
               bench_2026: Bench2026 | None, say: Callable[[str], None]) -> dict:
    """Train model ``name`` on ``fold``, predict and score each of its contexts (files in ``stage``):
    the run's record (:meth:`~vcell.leaderboard.resume.Records.add_run`): ``runs``, ``timings``,
    ``aggs`` and, with vcc2026, ``scores_2026`` and ``beyond`` by context."""
    record: dict = {"runs": [], "timings": {}, "aggs": {}, "scores_2026": {}, "beyond": []}
    timings = record["timings"]
    t = time.perf_counter()
    with _named(name, fold.name):
        model = make_model(name).fit(data, fold.split)
    timings[f"fit {name} {fold.name}"] = time.perf_counter() - t
    for ctx in fold.contexts:
        say(f"{name} on fold {fold.name}: predicting {ctx}")
        t = time.perf_counter()
        with _named(name, fold.name):
            raw = predict_context(model, data, ctx, "data", seed=seed, cells=_scored_cells(fold.split))
        pred = _tidy(raw, spec)
        timings[f"predict {name} {ctx}"] = time.perf_counter() - t
        run_slug = f"{slug(name)}_{slug(ctx)}"
        write_h5ad(pred, stage / "predictions" / f"{run_slug}.h5ad")
        say(f"{name} on fold {fold.name}: scoring {ctx}")
        t = time.perf_counter()
        result = evaluate(check_pair(pred, real_by_ctx[ctx], spec.pert_col, spec.control, "log1p", "pred", "real"), profile, threads)
        write_outputs(result, stage / "eval" / run_slug)
        timings[f"eval {name} {ctx}"] = time.perf_counter() - t
        record["aggs"][ctx] = result.agg
        if bench_2026 is not None:
            t = time.perf_counter()
            record["scores_2026"][ctx], beyond = bench_2026.score(fold.name, name, ctx, raw, stage / "eval" / run_slug / "vcc2026", model)
            record["beyond"] += beyond
            timings[f"vcc2026 {name} {ctx}"] = time.perf_counter() - t
        record["runs"].append({"model": name, "context": ctx, "fold": fold.name, "slug": run_slug,
                               "prediction": f"predictions/{run_slug}.h5ad", "eval_dir": f"eval/{run_slug}"})
    return record


def _scored_cells(split: Split) -> np.ndarray:
    """The cells a fold scores: its held-out (test) cells and every control cell."""
    return split.mask("test") | split.mask("control")


def _real_cells(data: PerturbationData, split: Split, context: str) -> ad.AnnData:
    """The real held-out cells of ``context`` with the context's controls."""
    index = data.index
    ctx_code = int(np.flatnonzero(index.contexts == context)[0])
    return data.adata[(index.context_codes == ctx_code) & _scored_cells(split)].copy()


def _tidy(adata: ad.AnnData, spec: DataSpec) -> ad.AnnData:
    """Keep only the perturbation and context columns, as strings; CSR float32."""
    ctx_col = spec.context_col or "context"
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    obs[spec.pert_col] = pd.Categorical(adata.obs[spec.pert_col].astype(str).to_numpy())
    obs[ctx_col] = pd.Categorical(adata.obs[ctx_col].astype(str).to_numpy() if ctx_col in adata.obs else np.full(adata.n_obs, "all"))
    X = adata.X
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, dtype=np.float32))
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))


def vcc_score(user_agg: pd.DataFrame, base_agg: pd.DataFrame) -> tuple[float, float]:
    """VCC 2025 score x 100 (clipped as cell-eval, and unclipped) over the ``vcc`` metrics both tables have."""
    cols = ["statistic"] + [m for m in VCC_METRICS if m in user_agg.columns and m in base_agg.columns]
    if len(cols) == 1:
        return float("nan"), float("nan")
    table = score(user_agg[cols], base_agg[cols])
    row = table.loc[table["metric"] == "avg_score"].iloc[0]
    return 100 * float(row["from_baseline"]), 100 * float(row["unclipped"])


def bench_files(out: str | os.PathLike) -> list[str]:
    """Every file an earlier bench wrote in ``out``, relative to it: its ``eval/`` and ``predictions/``
    files as listed by its run (read from ``bench.json``'s runs for vcell versions that wrote no
    list), and its top-level files. What ``--overwrite`` may replace without deleting a user's file."""
    import json

    from vcell.data.staging import WRITTEN

    out = Path(out)
    try:
        files = list(json.loads((out / WRITTEN).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        files = []
        try:
            meta = json.loads((out / "bench.json").read_text())
            tops = [*(r["prediction"] for r in meta["runs"]), *(r["eval_dir"] for r in meta["runs"]), *meta["real"].values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            tops = []
        tops += [p.relative_to(out).as_posix() for p in out.glob("eval/vcc2026_scale_*")]
        found = [p for top in tops for p in ([out / top] if (out / top).is_file() else (out / top).rglob("*"))]
        files = [p.relative_to(out).as_posix() for p in found if p.is_file()]
    return files + [name for name in (*BENCH_OUTPUTS, WRITTEN) if (out / name).is_file()]


#: What :func:`run_bench` writes into its output folder (``vcell bench --out``).
BENCH_OUTPUTS = ("leaderboard.csv", "bench.json", "report.html", "predictions", "eval")


def run_bench(
    data_path: str | os.PathLike | ad.AnnData,
    out: str | os.PathLike,
    models: Sequence[str],
    make_model: Callable[[str], Predictor],
    spec: DataSpec = DataSpec(),
    split_file: str | os.PathLike | None = None,
    holdout: Sequence[str] = (),
    holdout_perturbations: float | str | Sequence[str] | None = None,
    dataset_col: str | None = "dataset",
    datasets: Sequence[str] = (),
    profile: str = "full",
    threads: int = 2,
    seed: int = 0,
    allow_missing_controls: bool = False,
    report: bool = True,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    model_options: dict[str, dict] | None = None,
    resume: bool = False,
) -> BenchResult:
    """Train, predict and score every model on every fold; write the leaderboard and the report.

    Parameters
    ----------
    data_path : path or anndata.AnnData
        The ``.h5ad`` or an in-memory AnnData (log1p, or raw counts normalised to log1p here; raw
        counts for ``vcc2026``).
    out : path
        Output folder (layout in this module's docstring); refused when it holds an earlier
        benchmark's results, unless ``overwrite``.
    models : sequence of str
        Model names. ``cell_mean`` is added when absent (built with
        :func:`vcell.make_model`, not ``make_model``): the VCC score (x 100) is scaled against it.
    make_model : callable
        Name -> an unfitted predictor (e.g. ``lambda name: vcell.make_model(name, seed=0)``).
    spec : DataSpec
        The data's columns.
    split_file, holdout, holdout_perturbations
        The folds: a cell-load TOML, held-out contexts and/or perturbations held out in every
        context (a fraction drawn with ``seed``, or names), as :func:`make_folds` makes them.
    dataset_col, datasets
        The dataset column of a file holding several, and which to use (default: all).
    profile : str
        The metric profile (``full``, ``vcc``, ...) or ``vcc2026`` (the 2025 ``vcc`` metrics and the
        VCC 2026 score).
    threads, seed
        Threads for differential expression; seed of folds, models' draws and counts.
    allow_missing_controls : bool
        Accept contexts without control cells.
    report : bool
        Write ``report.html``.
    progress : callable, optional
        Called with a short text as each step starts.
    overwrite : bool
        Replace an earlier benchmark's results in ``out`` (and discard the runs an interrupted one
        kept, unless ``resume``).
    model_options : dict, optional
        Model name -> the options ``make_model`` builds it with, recorded in ``bench.json`` (``make_model``
        is opaque); a model without an entry is recorded with ``{}``.
    resume : bool
        Continue an interrupted benchmark from the runs (a model on a fold) it finished, kept in
        ``out/bench.partial`` (:mod:`vcell.leaderboard.resume`): refused when they were made with
        other data, options, folds or model options (as ``model_options`` records them).

    Returns
    -------
    BenchResult
        The leaderboard (one row per model and context), the runs and the timings.
    """
    from vcell.data.io import check_output_dir
    from vcell.data.staging import check_replaceable, sole_writer, staged_folder
    from vcell.predictors.registry import make_model as registry_model

    t0 = time.perf_counter()
    out = Path(out)
    holdout, datasets = names_list(holdout), names_list(datasets)
    source = IN_MEMORY if isinstance(data_path, ad.AnnData) else str(Path(data_path).resolve())  # bench.json's "data"
    with sole_writer(out):  # one benchmark at a time in OUT (and its bench.partial), from the command line or Python
        check_output_dir(out, list(BENCH_OUTPUTS), [] if source == IN_MEMORY else [data_path], overwrite=overwrite)
        check_replaceable(out, BENCH_OUTPUTS, bench_files(out))
        check_partial(out, resume, overwrite)
        given = {"pert_col": spec.pert_col, "control": spec.control, "context_col": spec.context_col, "batch_col": spec.batch_col,
                 "expression": spec.expression, "dataset_col": dataset_col, "datasets": datasets, "profile": profile, "seed": seed,
                 "allow_missing_controls": allow_missing_controls}
        models = list(dict.fromkeys(models))
        user_models = set(models)  # the models make_model builds: the options recorded are theirs
        if BASELINE_MODEL not in models:
            log.info("adding %s: the VCC score is scaled against it", BASELINE_MODEL)
            models.append(BASELINE_MODEL)
            user_model = make_model

            def make_model(name: str) -> Predictor:  # the baseline as the registry builds it, whatever the caller's builds
                return registry_model(name, seed=seed) if name == BASELINE_MODEL else user_model(name)
        for name in models:
            make_model(name)  # unknown names fail before any work
        say = progress or (lambda text: None)
        with_2026 = profile == "vcc2026"
        scored_profile = "vcc" if with_2026 else profile  # vcc2026: the 2025 score beside the 2026 one
        say(f"reading {source}")
        data = prepare_data(data_path, spec, dataset_col, allow_missing_controls, datasets, keep_counts=with_2026)
        spec = data.spec
        folds = make_folds(data, split_file, holdout, holdout_perturbations, seed)
        _check_models(data, folds, {name: make_model(name) for name in models})
        all_options = {m: dict((model_options or {}).get(m, {})) if m in user_models else {} for m in models}
        with (staged_folder(out, BENCH_OUTPUTS, keep=PARTIAL) as stage,  # an earlier run's results stay whole until this one is
              (records := Records(stage, bench_settings(data, folds, given), resume, all_options)).kept_on_failure()):
            (stage / "predictions").mkdir(parents=True, exist_ok=True)
            rows, runs, timings = [], [], {}
            bench_2026 = Bench2026(spec, threads, seed) if with_2026 else None
            fits = 0
            for fold in folds:
                kept = {name: records.run(fold.name, name) for name in models}
                fold_kept = records.fold(fold.name) if all(kept.values()) else None
                if fold_kept is not None:  # every run of the fold finished before an interruption
                    timings.update(fold_kept["timings"])
                    if bench_2026 is not None:
                        bench_2026.restore(fold_kept["vcc2026"])
                else:
                    real_by_ctx, fold_timings = _fold_scales(data, fold, spec, stage, bench_2026, records, say)
                    timings.update(fold_timings)
                aggs: dict[tuple[str, str], pd.DataFrame] = {}
                scores_2026: dict[tuple[str, str], dict[str, float]] = {}
                for name in models:
                    fits += 1
                    record = kept[name]
                    if record is not None:  # finished before an interruption: read back, not run again
                        records.kept.append(f"{name} on fold {fold.name}")
                        say(f"{name} on fold {fold.name} ({fits} of {len(models) * len(folds)}): kept from the interrupted run")
                    else:
                        say(f"{name} on fold {fold.name} ({fits} of {len(models) * len(folds)}): training")
                        record = _run_model(make_model, name, data, fold, real_by_ctx, spec, stage, scored_profile, threads, seed,
                                            bench_2026, say)
                        records.add_run(fold.name, name, record)
                    runs += record["runs"]
                    timings.update(record["timings"])
                    aggs.update({(name, ctx): agg for ctx, agg in record["aggs"].items()})
                    scores_2026.update({(name, ctx): score for ctx, score in record["scores_2026"].items()})
                    if bench_2026 is not None:
                        bench_2026.beyond += record["beyond"]
                for (name, ctx), agg in aggs.items():
                    means = agg.set_index("statistic").loc["mean"]
                    row = {"model": name, "context": ctx, **{k: float(v) if pd.notna(v) else np.nan for k, v in means.items()}}
                    row["vcc_score"], row["vcc_score_unclipped"] = vcc_score(agg, aggs[(BASELINE_MODEL, ctx)])
                    row.update(scores_2026.get((name, ctx), {}))
                    rows.append(row)
            if resume:
                _drop_other_runs(stage, runs, [c for f in folds for c in f.contexts])
                records.keep_only(models)
            write_csv(board := _leaderboard(rows), stage / "leaderboard.csv")
            held = [", ".join(holdout)] if holdout else []
            if folds[0].config.holdout_perturbations and split_file is None:
                held.append("perturbations " + ", ".join(folds[0].config.holdout_perturbations))
            meta = {
                "data": source, "out": str(out.resolve()), "pert_col": spec.pert_col, "control": spec.control,
                "context_col": spec.context_col, "models": models, "contexts": [c for f in folds for c in f.contexts],
                "model_options": all_options,
                "folds": [{**fold_record(data, f), "split": fold_toml(data, f)} for f in folds],
                "runs": runs, "real": {c: f"predictions/real_{slug(c)}.h5ad" for f in folds for c in f.contexts},
                "datasets": list(datasets), "seed": seed, "profile": profile, "vcell_version": __version__, "timings": timings,
                "resumed_runs": records.kept,
                "split": str(split_file) if split_file else "holdout: " + "; ".join(held),
            }
            if bench_2026 is not None:
                meta.update(bench_2026.meta())
            with atomic_path(stage / "bench.json") as tmp:
                tmp.write_text(json.dumps(meta, indent=2, default=str))  # default: a YAML option json cannot write (a date) as text
            if report:
                from vcell.report import build_report

                say("writing the report")
                build_report(stage)
            records.finish()
        timings["total"] = time.perf_counter() - t0
        return BenchResult(board, out, runs, timings)


def _drop_other_runs(stage: Path, runs: list[dict], contexts: list[str]) -> None:
    """Remove from a resumed benchmark's folder the files of runs it does not list: one that failed
    before the interruption, a kept one of a model no longer in ``--models``."""
    listed = {r["prediction"] for r in runs} | {r["eval_dir"] for r in runs}
    listed |= {f"predictions/real_{slug(c)}.h5ad" for c in contexts} | {f"eval/vcc2026_scale_{slug(c)}" for c in contexts}
    for path in [*stage.glob("predictions/*"), *stage.glob("eval/*")]:
        if path.relative_to(stage).as_posix() not in listed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_models(data: PerturbationData, folds: list[Fold], models: dict[str, Predictor]) -> None:
    """Refuse, before any training, a model that cannot predict a fold's targets never trained on,
    or that its fit or prediction would refuse (:meth:`~vcell.predictors.base.Predictor.check_fit`)."""
    for fold in folds:
        trained = set(pert_vocabulary(trained_labels(data, fold.split, ("train",)), data.spec.control))
        scored = trained_labels(data, fold.split, ("test",))
        unseen = sorted(set(pert_vocabulary(scored, data.spec.control)) - trained)
        for name, model in models.items():
            if unseen and not model.predicts_unseen_targets():
                raise VcellError(f"{name}: fold {fold.name} holds out target(s) never trained on ({preview(unseen)}) and the "
                                 "model's one-hot perturbation features cannot predict them; give it a gene table "
                                 f"(--model-config: {name}: {{pert_features: 'onehot,genes.safetensors'}}) or leave it out")
            with _named(name, fold.name):
                model.check_fit(data, fold.split, scored)


@contextlib.contextmanager
def _named(model: str, fold: str) -> Iterator[None]:
    """Prefix an error of a model's fit or prediction with the model's name in the bench and the fold."""
    try:
        yield
    except VcellError as exc:
        raise VcellError(f"{model} on fold {fold}: {exc}") from None


def _leaderboard(rows: list[dict]) -> pd.DataFrame:
    board = pd.DataFrame(rows)
    metric_cols = [c for c in board.columns if c not in ("model", "context")]
    last = ["vcc_score", "vcc_score_unclipped"] + [c for c in metric_cols if c.startswith("vcc2026_")]
    ordered = ["model", "context"] + [c for c in metric_cols if c not in last] + last
    board = board[ordered]
    mean = board.groupby("model", sort=False)[ordered[2:]].mean(numeric_only=True).reset_index()
    mean.insert(1, "context", "mean")
    return pd.concat([board, mean], ignore_index=True)
