"""``vcell demo``: the main job on data vcell makes itself (no network, no files needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.bench import DEFAULT_MODELS
from vcell.cli.common import Seed, console, split_view, table
from vcell.cli.interrupts import removed_if_interrupted
from vcell.errors import VcellError, did_you_mean
from vcell.train.display import status


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("vcell-demo"),
    holdout_context: Annotated[str | None, typer.Option("--holdout-context", help="Context to hold out (default: the last).")] = None,
    models: Annotated[str, typer.Option("--models", help="Comma-separated models to benchmark.", show_default=DEFAULT_MODELS.replace(",", ", "))] = DEFAULT_MODELS,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the files of an earlier demo in OUT.")] = False,
    seed: Seed = 0,
) -> None:
    """Simulate a Perturb-seq dataset, hold out a context, benchmark the default baselines, write a report."""
    from vcell.data.io import check_output_dir
    from vcell.predictors.registry import make_model

    for name in [m.strip() for m in models.split(",") if m.strip()]:
        make_model(name, seed=seed)  # an unknown model is named before anything is written
    from vcell.data.staging import check_replaceable
    from vcell.leaderboard.bench import BENCH_OUTPUTS, bench_files

    check_output_dir(out, ["simulated.h5ad", "bench"], overwrite=overwrite)
    check_replaceable(out / "bench", BENCH_OUTPUTS, bench_files(out / "bench"))  # run_bench's own check, before any work
    with removed_if_interrupted(out, ["simulated.h5ad", "bench"]):
        _demo(out, holdout_context, models, seed)


def _demo(out: Path, holdout_context: str | None, models: str, seed: int) -> None:
    """The demo's three steps (simulate, split, benchmark), printed as they finish."""
    from vcell.data.dataset import load_dataset
    from vcell.data.io import write_h5ad
    from vcell.data.simulate import simulate_perturbseq
    from vcell.data.spec import DataSpec
    from vcell.data.splits import apply_split, holdout_config
    from vcell.leaderboard import run_bench
    from vcell.predictors.registry import make_model

    with status("simulating a Perturb-seq dataset"):
        adata = simulate_perturbseq(seed=seed)
        contexts = sorted(set(adata.obs["cell_type"].astype(str)))
        if holdout_context is not None and holdout_context.rsplit(".", 1)[-1] not in contexts:  # NAME or DATASET.NAME
            raise VcellError(f"--holdout-context {holdout_context!r}: the simulated contexts are "
                             f"{', '.join(contexts)}{did_you_mean(holdout_context, contexts)}")
        path = write_h5ad(adata, out / "simulated.h5ad")
    console.print(f"1. simulated {adata.n_obs:,} cells x {adata.n_vars:,} genes (raw counts) -> {path}")

    spec = DataSpec(batch_col="gem_group")
    data = load_dataset(path, spec, backed=True)
    held = holdout_context or str(data.index.contexts[-1])
    split = apply_split(data.index, holdout_config(data.index, [held]))
    console.print(f"2. checked; context {held!r} held out (zero-shot), its controls kept as basal input")
    console.print(table(split_view(split.summary(data.index))))

    names = [m.strip() for m in models.split(",") if m.strip()]
    with status("benchmark") as line:
        result = run_bench(
            path, out / "bench", names, lambda name: make_model(name, seed=seed), spec=spec, holdout=[held],
            seed=seed, progress=lambda text: line.update(description=f"benchmark: {text}"),
            overwrite=True,  # the demo's folder was checked (and --overwrite given) before it started
        )
    show = {"model": "model", "vcc_score": "VCC", "vcc_score_unclipped": "VCC unclipped", "mae": "MAE",
            "discrimination_score_l1": "PDS", "overlap_at_N": "DES", "pearson_delta": "r(delta)"}
    board = result.leaderboard[result.leaderboard["context"] == held]
    board = board[[c for c in show if c in board.columns]].rename(columns=show).sort_values("VCC", ascending=False).round(4)
    console.print(f"3. leaderboard on {held} (VCC score x100, scaled against cell_mean):")
    console.print(table(board))
    console.print(f"[green]demo done[/green] in {result.timings['total']:.0f} s: report {out / 'bench' / 'report.html'}")
