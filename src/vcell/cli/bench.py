"""``vcell bench``: every model on the same split, scored the same way, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import (
    AllowMissingControls,
    BatchCol,
    ContextCol,
    Control,
    Expression,
    PertCol,
    Seed,
    console,
    make_spec,
    table,
)
from vcell.cli.interrupts import removed_if_interrupted
from vcell.errors import VcellError
from vcell.train.display import format_duration, status

DEFAULT_MODELS = "control_mean,cell_mean,pert_mean,context_mean,linear"


def model_options(path: Path) -> dict[str, dict]:
    """Per-model constructor options from a YAML/JSON file (``{model: {option: value}}``).

    An entry may name a variant of a model with ``model:``, e.g. ``st_se: {model: st, embed_key:
    X_vcell}`` makes ``st_se`` usable in ``--models`` next to ``st``. A relative FILE in a
    ``pert_features`` value (``onehot,genes.safetensors``) is relative to the config file's folder
    (made absolute here).
    """
    from vcell.nn.config import read_config_file
    from vcell.predictors.registry import model_names

    values = read_config_file(path, "model config")
    known = model_names()
    for name, opts in values.items():
        if not isinstance(opts, dict):
            raise VcellError(f"{path}: the options of {name!r} must be a mapping of option -> value")
        base = opts.get("model", name)
        if base not in known:
            what = f"model {base!r} of {name!r}" if "model" in opts else f"model {name!r}"
            raise VcellError(f"{path}: unknown {what} (models: {', '.join(known)}; a variant names its model with `model:`)")
        if "model" in opts and name in known and base != name:
            raise VcellError(f"{path}: {name!r} is a built-in model name; give the {base!r} variant another name")
        if isinstance(opts.get("pert_features"), str):
            parts = [p.strip() for p in opts["pert_features"].split(",")]
            opts["pert_features"] = ",".join(p if p.lower() in ("", "onehot") else str((Path(path).parent / Path(p).expanduser()).absolute())
                                             for p in parts)  # absolute: bench.json records what reproduces the run
        try:  # option names, types and values are checked now, before any data is read
            build_model(name, values, seed=0)
        except VcellError as exc:
            said = str(exc).removeprefix(f"{name}: ")  # a built-in model says its own name too ('st: st:')
            raise VcellError(f"{path}: {name}: {said}") from None
    return values


def build_model(name: str, options: dict[str, dict], seed: int):
    """A fresh predictor for ``name``: a registered model or a variant declared in ``options``."""
    from vcell.predictors.registry import make_model

    opts = dict(options.get(name, {}))
    return make_model(opts.pop("model", name), seed=seed, **opts)


def bench(
    data: Annotated[Path, typer.Option("--data", help="The .h5ad dataset (counts or log1p).")],
    split: Annotated[Path | None, typer.Option("--split", help="cell-load style split TOML (one fold).")] = None,
    holdout_context: Annotated[list[str] | None, typer.Option("--holdout-context", help="Held-out context, one fold each (repeatable); 'all': leave-one-context-out.")] = None,
    holdout_perturbations: Annotated[str | None, typer.Option(
        "--holdout-perturbations", metavar="FRACTION|LIST|FILE",
        help="Hold out perturbations in every context, never trained on: a fraction in (0, 1) of the non-control labels (drawn with "
             "--seed), comma-separated labels or a .csv/.tsv/.txt file of them. Alone: one fold, every context scored on them; with --holdout-context: the same "
             "labels held out in every fold, each fold scoring its held-out context.")] = None,
    models: Annotated[str, typer.Option("--models", help="Comma-separated model names.", show_default=DEFAULT_MODELS.replace(",", ", "))] = DEFAULT_MODELS,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    expression: Expression = None,
    dataset_col: Annotated[str, typer.Option(help="obs column naming each cell's dataset (if present).")] = "dataset",
    dataset: Annotated[list[str] | None, typer.Option("--dataset", help="Keep only cells of this dataset (repeatable).")] = None,
    profile: Annotated[str, typer.Option("--profile", help="Metric profile scored (full includes vcc); vcc2026: the 2025 vcc metrics and the VCC 2026 score (raw-count data).")] = "full",
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("vcell-bench"),
    threads: Annotated[int, typer.Option("--threads", min=1, help="Threads for differential expression.")] = 2,
    allow_missing_controls: AllowMissingControls = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip report.html.")] = False,
    model_config: Annotated[Path | None, typer.Option("--model-config", help="YAML/JSON: model name -> options, e.g. st: {max_steps: 2000, config: {width: 256}}; variants: st_se: {model: st, embed_key: X_vcell}.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results of an earlier benchmark in OUT; without "
                                            "--resume, discard the finished runs an interrupted one kept in OUT/bench.partial.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a benchmark that stopped (an error, Ctrl-C, a kill) from the "
                                         "runs it finished (a model on a fold, kept in OUT/bench.partial), with the same data, "
                                         "folds, options and --model-config entries of those models; the results are those "
                                         "of an uninterrupted run.")] = False,
    seed: Seed = 0,
) -> None:
    """Train each model, predict the held-out contexts, score with vcell eval, write leaderboard + report."""
    from vcell.data.perturbation_lists import parse_perturbations
    from vcell.eval.profiles import profile_metrics
    from vcell.leaderboard import BENCH_OUTPUTS, PARTIAL, run_bench
    from vcell.leaderboard.resume import RECORD

    if profile != "vcc2026":
        profile_metrics(profile)  # an unknown profile is named now, not after every model was trained
    if split is not None and (holdout_context or holdout_perturbations is not None):
        raise VcellError("give either --split FILE or --holdout-context/--holdout-perturbations, not both")
    if holdout_perturbations is not None:
        parse_perturbations(holdout_perturbations)  # a bad fraction is named before any work
    spec = make_spec(pert_col, control, context_col, batch_col, expression)
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise VcellError(f"--models {models!r}: names no model (e.g. --models {DEFAULT_MODELS})")
    options = model_options(model_config) if model_config is not None else {}
    with removed_if_interrupted(out, BENCH_OUTPUTS, staged=True, kept=f"{PARTIAL}/{RECORD}"), status("benchmark") as line:
        result = run_bench(
            data, out, names, lambda name: build_model(name, options, seed), spec=spec, split_file=split,
            holdout=holdout_context or [], holdout_perturbations=holdout_perturbations, dataset_col=dataset_col, datasets=dataset or [], profile=profile, threads=threads, seed=seed,
            allow_missing_controls=allow_missing_controls, report=not no_report,
            progress=lambda text: line.update(description=f"benchmark: {text}"), overwrite=overwrite, model_options=options,
            resume=resume,
        )
    show = {"model": "model", "context": "context", "vcc_score": "VCC", "vcc_score_unclipped": "VCC unclipped", "vcc2026_score": "VCC 2026",
            "mae": "MAE", "discrimination_score_l1": "PDS", "overlap_at_N": "DES"}
    board = result.leaderboard[[c for c in show if c in result.leaderboard.columns]].rename(columns=show)
    if board["context"].nunique() == 2:  # one scored context: its mean rows repeat it
        board = board[board["context"] != "mean"]
    with_2026 = "VCC 2026" in board.columns
    board = board.sort_values(["context", "VCC 2026" if with_2026 else "VCC"], ascending=[True, False])  # table() shows 4 digits
    title = "leaderboard (VCC: the 2025 score x100, scaled against cell_mean"
    title += "; VCC 2026: on a 0-1 scale, 0 = the mean-response baseline, 1 = a replicate)" if with_2026 else ")"
    console.print(table(board, title=title))
    report = "" if no_report else f", report: {out / 'report.html'}"
    console.print(f"leaderboard: {out / 'leaderboard.csv'}{report} ({len(result.runs)} runs in {format_duration(result.timings['total'])})",
                  highlight=False, soft_wrap=True)
