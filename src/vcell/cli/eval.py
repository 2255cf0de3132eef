"""``vcell eval ...``: cell-eval compatible evaluation, scoring, baseline and submission prep."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vcell.cli.common import SEED_MAX, Control, HelpGroup, NoRandomSeed, PertCol, console, given, spelled, table
from vcell.cli.interrupts import removed_if_interrupted
from vcell.train.display import format_duration, status, task

if TYPE_CHECKING:
    import pandas as pd

app = typer.Typer(help="Evaluate predictions with the Virtual Cell Challenge metrics: 2025 as cell-eval, 2026 (--profile vcc2026) as cell-eval2.", no_args_is_help=True, rich_markup_mode=None, cls=HelpGroup)

Threads = Annotated[int, typer.Option("--threads", min=1, help="Threads for differential expression.")]
InputType = Annotated[
    str,
    typer.Option(
        "--expression", "--input-type",
        help="2025 profiles: 'log1p', 'counts' (normalised as cell-eval does) or 'auto' (decided from the values; vcell -v says "
        "which). --input-type is cell-eval's name for it. (vcc2026 takes raw counts.)",
    ),
]


def _expression_option() -> str:
    """The spelling of the expression option the user typed, for messages."""
    return spelled("--expression", "--input-type")


Profile = Annotated[str, typer.Option("--profile", help="vcc (2025, cell-eval), minimal, de, anndata, full, pds, or vcc2026 (cell-eval2's 2026 metrics on raw counts).")]
TargetGenes = Annotated[
    Path | None,
    typer.Option("--target-genes", help="vcc2026: CSV (perturbation,gene) naming each perturbation's target gene; an empty gene means none. "
                 "Default: a label that names a gene targets it."),
]
NoTargetGenes = Annotated[bool, typer.Option("--no-target-genes", help="vcc2026: exclude no gene: the perturbations are not genes (drugs, cytokines) or their targets are not measured.")]
_BACKED = ("--backed (default): a matrix larger than --memory-budget is read once into gene bands on disk (a temporary folder "
           "beside OUT, removed at the end) and tested band by band; --in-memory reads each matrix whole.")
_BUDGET = ("GB of memory for the expression matrix with --backed: a matrix that fits is read whole; else two bands of half this "
           "each (one tested, the next being read). Summaries, controls and the vcc2026 anchor's splits come on top: at the "
           "challenge's sizes the peak was 1.5-2.1x the budget.")
Backed = Annotated[bool, typer.Option("--backed/--in-memory", help=_BACKED)]
MemoryBudget = Annotated[float, typer.Option("--memory-budget", help=_BUDGET)]
Context2026 = Annotated[str, typer.Option(
    "--context-col", show_default=False,
    help="obs column of the context (cell line); each is scored on its own, in OUT/CONTEXT/. 2025 profiles: only when named "
         "(default: none, every cell one pool), as cell-eval's --celltype-col. vcc2026: default 'context'; 'none' (or ''), or "
         "the default column absent: one context.")]
# eval baseline: the 2025 baseline is one context's and read whole; these are the vcc2026 scale's
BackedScale = Annotated[bool, typer.Option("--backed/--in-memory", help="vcc2026: " + _BACKED)]
BudgetScale = Annotated[float, typer.Option("--memory-budget", help="vcc2026: " + _BUDGET)]
ContextScale = Annotated[str, typer.Option("--context-col", help="vcc2026: obs column of the context (cell line); each context's "
                                           "scale is computed apart, into OUT/CONTEXT/ ('none' (or ''), or the default column "
                                           "absent: one context). The 2025 baseline refuses it.")]


def _options_2026(pert_col, control, context_col, target_genes, no_target_genes, threads, backed=True, memory_budget=2.0):
    from vcell.errors import VcellError
    from vcell.eval.bands import budget_bytes
    from vcell.eval.vcc2026.files import Options

    if target_genes is not None and no_target_genes:
        raise VcellError("--target-genes and --no-target-genes exclude each other")
    budget = budget_bytes(memory_budget) if backed else float("inf")
    return Options(pert_col, control, context_col, target_genes, no_target_genes, threads, budget=budget, progress=task)


def _only_for(profile: str, **given) -> None:
    """Refuse options of ``profile`` (given as name=(value, default)) when another profile is used."""
    from vcell.errors import VcellError

    for option, (value, default) in given.items():
        if value != default:
            hint = ("; the 2025 baseline is one context's (build one from each context's cells)"
                    if option == "--context-col" else "")
            raise VcellError(f"{option} applies to the {'vcc2026' if profile == 'vcc2026' else '2025 (vcc)'} profile only{hint}")


def _context_col_typed() -> str | None:
    """``--context-col`` as typed (``None`` for none, or ``none``): the 2025 profiles score one
    context unless a column is named (then ``eval run`` scores each apart; ``eval baseline``,
    which has no contexts, refuses it rather than ignore it)."""
    typed = given("--context-col")
    return None if typed is None or typed.strip().lower() in ("", "none") else typed


def _agg_2026(agg: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    from vcell.eval.vcc2026.metrics import SCORED

    stats = agg.set_index("statistic")
    return pd.DataFrame([{"metric": m, "mean": float(stats.loc["mean", m])} for m in SCORED if m in stats.columns])


def _metric_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std) per metric, one row each: the short terminal summary."""
    import pandas as pd

    stats = agg.set_index("statistic")
    rows = []
    for metric in agg.columns[1:]:
        mean, std = stats.loc["mean", metric], stats.loc["std", metric]
        rows.append({"metric": metric, "mean": float(mean) if pd.notna(mean) else float("nan"), "std": float(std) if pd.notna(std) else float("nan")})
    return pd.DataFrame(rows)


def _prediction_names(preds: list[Path]) -> dict[str, Path]:
    """name -> prediction: each file's name without ``.h5ad``, the folder its results go to (``""``
    for a single prediction: its results go to OUT itself)."""
    from vcell.errors import VcellError

    if len(preds) == 1:
        return {"": preds[0]}
    names: dict[str, Path] = {}
    for p in preds:
        name = p.name.removesuffix(".h5ad")
        if name in names:
            if names[name].resolve() == p.resolve():
                raise VcellError(f"--pred {p} is given twice")
            raise VcellError(f"--pred {names[name]} and {p} would both write to OUT/{name}/: give the predictions distinct file names")
        names[name] = p
    return names


def _run_summary_2026(runs: dict, out: Path, seconds: float) -> str:
    """One line: what a vcc2026 `eval run` scored, in how long, and where it wrote it."""
    aggs = next(iter(runs.values()))
    counts = [agg.set_index("statistic").loc["count"].max() for agg in aggs.values()]
    per_ctx = [int(c) if c == c else 0 for c in counts]  # a context whose every metric is NaN counts none
    n = " + ".join(f"{c:,}" for c in per_ctx) if 1 < len(per_ctx) <= 4 else f"{sum(per_ctx):,}"
    contexts = f" in {len(per_ctx)} contexts" if len(per_ctx) > 1 else ""
    preds = f"{len(runs)} predictions x " if len(runs) > 1 else ""
    folders = f" ({', '.join(f'{n}/' for n in runs)})" if len(runs) > 1 else ""
    files = "" if len(runs) > 1 or len(per_ctx) > 1 else ": results.csv, agg_results.csv"
    return (f"scored {preds}{n} perturbation{'' if sum(per_ctx) == 1 else 's'}{contexts} in {format_duration(seconds)}; "
            f"wrote {out}{folders}{files}")


@app.command("run")
def run_cmd(
    pred: Annotated[list[Path], typer.Option("--pred", help="Predicted cells (.h5ad), controls included. Repeat it to score several "
                                             "predictions against one read of the reference, each in OUT/NAME/ (NAME: its file name).")],
    real: Annotated[Path, typer.Option("--real", help="Real cells (.h5ad), controls included.")],
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    profile: Profile = "vcc",
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("vcell-eval"),
    threads: Threads = 2,
    input_type: InputType = "auto",
    backed: Backed = True,
    memory_budget: MemoryBudget = 2.0,
    skip_metrics: Annotated[str | None, typer.Option("--skip-metrics", help="2025 profiles: comma-separated metric names to leave out.")] = None,
    context_col: Context2026 = "context",
    target_genes: TargetGenes = None,
    no_target_genes: NoTargetGenes = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results of an earlier run in OUT.")] = False,
    seed: NoRandomSeed = 0,
) -> None:
    """Score predictions: writes results.csv and agg_results.csv (2025 profiles with DE metrics: real_de.csv, pred_de.csv too).

    With --profile vcc2026 (raw counts; the reference's controls are used on both sides, the
    prediction's own are ignored): results.csv and agg_results.csv in cell-eval2's layouts, per
    context in OUT/CONTEXT/ when the reference has several.
    """
    preds = _prediction_names(pred)  # {"": pred} for one: its files in OUT itself
    what = pred[0] if len(pred) == 1 else f"{len(pred)} predictions"
    if profile == "vcc2026":
        _only_for("vcc", **{"--skip-metrics": (skip_metrics, None), _expression_option(): (input_type, "auto")})
        from vcell.eval.vcc2026.files import RUN_FILES, run_many

        opts = _options_2026(pert_col, control, context_col, target_genes, no_target_genes, threads, backed, memory_budget)
        start = time.perf_counter()
        with (removed_if_interrupted(out, RUN_FILES if len(pred) == 1 else list(preds)),
              status(f"evaluating {what} against {real} (vcc2026 profile)") as st):
            runs = run_many(preds, real, out, opts, overwrite=overwrite, report=lambda m: st.update(info=m))
        for name, aggs in runs.items():
            for ctx, agg in aggs.items():
                where = ", ".join(w for w in (name, f"context {ctx}" if ctx else "") if w)
                console.print(table(_agg_2026(agg), title="vcc2026 profile" + (f", {where}" if where else "")))
        console.print(_run_summary_2026(runs, out, time.perf_counter() - start))
        gc.freeze()
        return
    _only_for("vcc2026", **{"--target-genes": (target_genes, None), "--no-target-genes": (no_target_genes, False)})
    skip = tuple(s.strip() for s in skip_metrics.split(",") if s.strip()) if skip_metrics else ()
    by_context = _context_col_typed()  # cell-eval's --celltype-col: each context scored apart, into OUT[/NAME]/CONTEXT/
    from vcell.eval.bands import budget_bytes
    from vcell.eval.run import OUTPUT_NAMES, run_many

    start = time.perf_counter()
    per = f" per {by_context}" if by_context else ""
    made = list(preds) if len(pred) > 1 else [] if by_context else OUTPUT_NAMES  # a context's folder is named once the file is read
    with (removed_if_interrupted(out, made),
          status(f"evaluating {what} against {real}{per} ({profile} profile)")):
        runs = run_many(preds, real, out, pert_col, control, profile, threads, input_type, backed, skip, overwrite=overwrite,
                        option=_expression_option(), budget=budget_bytes(memory_budget), progress=task, context_col=by_context)
    for key, (result, paths) in runs.items():
        name, ctx = key if isinstance(key, tuple) else (key, None)
        where = ", ".join(w for w in (name, f"context {ctx}" if ctx else "") if w)
        console.print(table(_metric_table(result.agg), title=f"{profile} profile{f', {where}' if where else ''}, "
                                                             f"{len(result.results):,} perturbation{'' if len(result.results) == 1 else 's'}"))
        if not by_context:
            console.print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()), highlight=False, soft_wrap=True)
            console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)
    if by_context:
        contexts = {key[1] for key in runs}
        n = sum(len(result.results) for result, _ in runs.values()) // len(preds)
        files = ",".join(p.name for p in next(iter(runs.values()))[1])  # every context writes the same files
        where = f"{out}/{'NAME/' if len(preds) > 1 else ''}CONTEXT/{{{files}}}"
        console.print(f"scored {n} perturbations in {len(contexts)} contexts{f' x {len(preds)} predictions' if len(preds) > 1 else ''} "
                      f"in {format_duration(time.perf_counter() - start)}; wrote {where}", highlight=False, soft_wrap=True)
    # The process ends next: spare the interpreter's final garbage collections over every object
    # of pandas, anndata, numba & co.; the outputs are closed already.
    gc.freeze()


@app.command("score")
def score_cmd(
    user: Annotated[Path, typer.Option("--user", help="agg_results.csv of the model (vcc2026: or its `eval run` folder).")],
    baseline: Annotated[Path, typer.Option("--baseline", help="agg_results.csv of the baseline (vcc2026: the `eval baseline` folder).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the score table here (CSV).")] = None,
    profile: Profile = "vcc",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    seed: NoRandomSeed = 0,
) -> None:
    """Baseline-scaled VCC score per metric and overall; --profile vcc2026: scaled between baseline and replicate.

    The metrics of --profile are scored (vcc, the default: the VCC 2025 score's three), whatever
    else the tables hold; 2025 profiles write the unclipped value beside the clipped one.

    With --profile vcc2026: each metric on the scale from the baseline (0) to the replicate anchor
    (1), per context, and the mean of the six; contexts averaged.
    """
    if profile == "vcc2026":
        from vcell.eval.vcc2026.score_files import score as score_2026
        from vcell.eval.vcc2026.score_files import score_value

        scores = score_2026(user, baseline, out, overwrite=overwrite)
        shown = scores.drop(columns=["from_baseline"] + (["context"] if (scores["context"] == "").all() else []))  # all in --out
        console.print(table(shown, title="vcc2026 score (0 = mean-response baseline, 1 = replicate)"))
        console.print(f"score: {score_value(scores):.4f}" + (f"; wrote {out}" if out is not None else ""))
        return
    from vcell.data.io import check_output_path
    from vcell.errors import VcellError
    from vcell.eval.scoring import read_csv, score, write_csv

    if out is not None:
        check_output_path(out, [user, baseline], overwrite=overwrite)
    tables = []
    for path in (user, baseline):
        if path.is_dir():
            raise VcellError(f"{path}: is a folder; give its agg_results.csv ({path / 'agg_results.csv'})")
        if not path.is_file():
            raise VcellError(f"{path}: file not found")
        tables.append(read_csv(path))
    scores = score(*tables, names=(str(user), str(baseline)), profile=profile)
    console.print(table(scores, title=f"{profile} score vs baseline (clipped at 0 as cell-eval; unclipped beside it)"))
    if out is not None:
        write_csv(scores, out)
        console.print(f"wrote {out}")


@app.command("baseline")
def baseline_cmd(
    real: Annotated[Path, typer.Option("--real", help="Data whose perturbation means make the baseline (.h5ad).")],
    out: Annotated[Path, typer.Option("--out", help="Baseline prediction (.h5ad); vcc2026: output folder.")],
    de_out: Annotated[Path | None, typer.Option("--de-out", help="Also write its DE table (CSV).")] = None,
    counts: Annotated[Path | None, typer.Option("--counts", help="CSV with cells per perturbation (columns: pert col, n_cells).")] = None,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    as_delta: Annotated[bool, typer.Option("--as-delta", help="Mean effect versus control instead of mean expression.")] = False,
    input_type: InputType = "auto",
    threads: Threads = 2,
    profile: Profile = "vcc",
    context_col: ContextScale = "context",
    target_genes: TargetGenes = None,
    no_target_genes: NoTargetGenes = False,
    splits: Annotated[int, typer.Option("--splits", help="vcc2026: split-half replicates of the anchor (cell-eval2: 5).")] = 5,
    anchor_seed: Annotated[int, typer.Option("--anchor-seed", min=0, max=SEED_MAX, help="vcc2026: base seed of the anchor's splits (cell-eval2: 0).")] = 0,
    only: Annotated[str | None, typer.Option("--only", help="vcc2026: 'baseline' or 'anchor' (default: both ends).")] = None,
    backed: BackedScale = True,
    memory_budget: BudgetScale = 2.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace outputs that exist.")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="vcc2026: seed of the baseline's control-cell draws (cell-eval2: 0); the 2025 baseline draws nothing.")] = 0,
) -> None:
    """Build the cell-mean baseline (as `cell-eval baseline`); --profile vcc2026: both ends of the 2026 scale.

    With --profile vcc2026: the two ends of the 2026 scale for every context of REAL, into the
    folder OUT: the mean-response baseline scored as a prediction (baseline_*.csv) and the
    split-half replicate anchor (anchor_*.csv), as cell-eval2 computes them.
    """
    if profile == "vcc2026":
        from vcell.errors import VcellError
        from vcell.eval.vcc2026.files import SCALE_FILES, scale_ends

        _only_for("vcc", **{"--de-out": (de_out, None), "--counts": (counts, None), "--as-delta": (as_delta, False),
                             _expression_option(): (input_type, "auto")})
        if only not in (None, "baseline", "anchor"):
            raise VcellError(f"--only {only!r}: use 'baseline' or 'anchor'")
        opts = _options_2026(pert_col, control, context_col, target_genes, no_target_genes, threads, backed, memory_budget)
        with removed_if_interrupted(out, SCALE_FILES), status(f"computing the vcc2026 scale of {real}") as st:
            done = scale_ends(real, out, opts, splits=splits, anchor_seed=anchor_seed, seed=seed, anchor=only != "baseline",
                              baseline=only != "anchor", overwrite=overwrite, report=lambda m: st.update(info=m))
        import pandas as pd

        from vcell.eval.vcc2026.metrics import SCORED

        for ctx, ends in done.items():
            rows = []
            b = _agg_2026(ends["baseline"]).set_index("metric")["mean"] if ends["baseline"] is not None else None
            a = ends["anchor"].set_index("metric") if ends["anchor"] is not None else None
            for m in SCORED:
                rows.append({"metric": m, "baseline": float(b[m]) if b is not None else float("nan"),
                             "replicate": float(a.loc[m, "replicate"]) if a is not None else float("nan"),
                             "replicate_sd": float(a.loc[m, "replicate_sd"]) if a is not None else float("nan")})
            console.print(table(pd.DataFrame(rows), title="vcc2026 scale" + (f", context {ctx}" if ctx else "")))
        console.print(f"wrote {out}")
        return
    from vcell.eval.profiles import profile_metrics

    profile_metrics(profile)  # the 2025 baseline is the same for every profile; an unknown name is still a typo
    _only_for("vcc2026", **{"--target-genes": (target_genes, None), "--no-target-genes": (no_target_genes, False),
                             "--only": (only, None), "--splits": (splits, 5), "--anchor-seed": (anchor_seed, 0),
                             "--in-memory": (backed, True), "--memory-budget": (memory_budget, 2.0),
                             "--context-col": (_context_col_typed(), None)})
    from vcell.data.io import atomic_files, check_output_path, read_h5ad, write_h5ad
    from vcell.data.validate import check_unique_genes
    from vcell.eval.baseline import build_cell_mean_baseline, read_counts_table
    from vcell.eval.csvio import write_de_csv
    from vcell.eval.de import differential_expression
    from vcell.eval.inputs import perturbation_labels, to_log1p

    check_output_path(out, [real], overwrite=overwrite)
    if de_out is not None:
        check_output_path(de_out, [real], overwrite=overwrite)
    counts_df = read_counts_table(counts, pert_col) if counts is not None else None
    adata = read_h5ad(real)
    perturbation_labels(adata, pert_col, str(real), control)  # columns named before the matrix is read
    check_unique_genes(adata.var_names, str(real))
    adata = to_log1p(adata, str(real), input_type, _expression_option())
    base = build_cell_mean_baseline(adata, pert_col, control, counts_df, as_delta=as_delta)
    de = differential_expression(base, pert_col, control, threads=threads) if de_out is not None else None
    with atomic_files([out] + ([de_out] if de is not None else [])) as temps:  # both files or neither
        write_h5ad(base, temps[0])
        if de is not None:
            write_de_csv(de, temps[1])
    console.print(f"wrote {out} ({base.n_obs:,} cells)" + (f" and {de_out}" if de_out else ""))


@app.command("prep")
def prep_cmd(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted cells (.h5ad).")],
    genes: Annotated[Path, typer.Option("--genes", help="Gene list (CSV, first column, no header), as cell-eval prep -g.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output .vcc (default: PRED.prep.vcc); vcc2026: .h5ad (default: PRED.prep.h5ad).")] = None,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    max_cells: Annotated[int, typer.Option(min=-1, help="vcc (2025): most cells allowed (-1: no cap).")] = 200_000,
    expected_n_genes: Annotated[int, typer.Option(min=-1, help="vcc (2025): the gene count expected; another count is warned of, not refused (-1: no warning); vcc2026 checks the gene list itself.")] = 18_080,
    profile: Annotated[str, typer.Option("--profile", help="vcc (2025 .vcc archive) or vcc2026 (raw-count .h5ad, the 2026 upload checks).")] = "vcc",
    perturbations: Annotated[Path | None, typer.Option("--perturbations", help="vcc2026: CSV of the perturbations to predict (header; first column names, optional second column cell counts; a control row is skipped).")] = None,
    context_col: Annotated[str | None, typer.Option("--context-col", help="vcc2026: obs column of each cell's context, kept in the output.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")] = False,
    seed: NoRandomSeed = 0,
) -> None:
    """Prepare a submission as `cell-eval prep` does (.vcc tar); --profile vcc2026: the 2026 upload checks.

    With --profile vcc2026: the 2026 upload checks (gene list and order, the listed
    perturbations and cell counts, no control rows, integral non-negative counts, no cell above
    1e6, the stored-entry cap), then a CSR float32 .h5ad; nothing is written unless all pass.
    """
    if profile == "vcc2026":
        _only_for("vcc", **{"--max-cells": (max_cells, 200_000), "--expected-n-genes": (expected_n_genes, 18_080)})
        from vcell.eval.vcc2026.submission import prepare_submission_2026

        target = out if out is not None else pred.with_name(pred.name.removesuffix(".h5ad") + ".prep.h5ad")
        with status(f"checking {pred} for the 2026 upload"):
            path = prepare_submission_2026(pred, target, genes=genes, perturbations=perturbations, pert_col=pert_col,
                                           control=control, context_col=context_col, overwrite=overwrite)
        console.print(f"wrote {path}")
        return
    if profile != "vcc":
        from vcell.errors import VcellError

        raise VcellError(f"--profile {profile!r}: use vcc or vcc2026")
    _only_for("vcc2026", **{"--perturbations": (perturbations, None), "--context-col": (context_col, None)})
    from vcell.eval.prep import prepare_submission

    path = prepare_submission(
        pred, out, genes=genes, pert_col=pert_col, control=control, max_cells=max_cells,
        expected_n_genes=expected_n_genes, overwrite=overwrite,
    )
    console.print(f"wrote {path}")


@app.command("compile")
def compile_cmd(
    dtypes: Annotated[str, typer.Option("--dtypes", help="Comma-separated dtypes of the stored values of the files to be evaluated "
                                        "(float32, float64, int32, int64): numba compiles one version per dtype.")] = "float32",
    threads: Threads = 2,
    seed: NoRandomSeed = 0,
) -> None:
    """Compile the evaluator's kernels into numba's cache now, so that the next runs start warm.

    ~30 s on 2 cores, ~10 s more per extra dtype, e.g. while building a container image: the
    first `vcell eval` run then does not spend ~10 s compiling.
    """
    from vcell.eval.precompile import precompile_evaluator

    with task("compiling the evaluator's kernels", unit="steps") as line:
        result = precompile_evaluator(tuple(d.strip() for d in dtypes.split(",") if d.strip()), threads,
                                      on_step=lambda what, done, total: line.update(completed=done, total=total, info=what))
    console.print(f"compiled the evaluator's kernels for {dtypes} in {result['seconds']:.1f} s ({result['steps']} steps); "
                  f"numba's cache: {result['cache']}")
