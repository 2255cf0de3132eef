"""``vcell data ...``: check, preprocess, split, subset, simulate, list and fetch datasets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from vcell.cli.common import (
    SEED_MAX,
    AllowMissingControls,
    BatchCol,
    ContextCol,
    Control,
    Expression,
    HelpGroup,
    HoldoutPerturbations,
    NoRandomSeed,
    PertCol,
    Seed,
    check_split_options,
    console,
    make_spec,
    split_config,
    split_view,
    table,
)
from vcell.data.spec import DEFAULT_SET_SIZE
from vcell.errors import VcellError

log = logging.getLogger("vcell.cli")

app = typer.Typer(help="Inspect, validate, preprocess, split and fetch perturbation datasets.", no_args_is_help=True, rich_markup_mode=None, cls=HelpGroup)

# The validation part of an inline split (`data split`, `data subset`; `train st` says what validation writes there)
ValContext = Annotated[list[str] | None, typer.Option("--val-context", help="Hold out a context for validation; repeatable.")]
ValPerturbations = Annotated[str | None, typer.Option(
    "--val-perturbations", help="Validation perturbations in every context, never trained on: FRACTION, LIST or FILE as "
                                "--holdout-perturbations (drawn after it, same --seed).")]


@app.command("check")
def check_cmd(
    file: Annotated[Path, typer.Argument(help="The .h5ad file to check.")],
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    expression: Expression = None,
    backed: Annotated[bool, typer.Option("--backed/--in-memory", help="Scan the matrix on disk (default) or load it.")] = True,
    allow_missing_controls: AllowMissingControls = False,
    seed: NoRandomSeed = 0,
) -> None:
    """Summarise a dataset and list every problem found in it.

    Exit codes: 0 no problem found; 1 problems found in the file (each listed); 2 the check
    could not run (file missing or unreadable, a bad option value), with one `error:` line.
    """
    from vcell.data.io import read_h5ad
    from vcell.data.validate import check

    spec = make_spec(pert_col, control, context_col, batch_col, expression)
    adata = read_h5ad(file, backed=backed)
    report = check(adata, spec, file, require_context_controls=not allow_missing_controls)
    expr = report.expression
    lines = [
        f"[bold]{file}[/bold]",
        f"cells: {report.n_cells:,}   genes: {report.n_genes:,}   storage: {report.storage}",
        f"perturbations: {'?' if report.n_perturbations is None else format(report.n_perturbations, ',')} "
        f"(column {spec.pert_col!r}, control {spec.control!r})",
    ]
    if expr is not None:
        lines.append(f"expression: {expr.type} ({expr.how}: {expr.reason})")
    console.print("\n".join(lines))
    if report.contexts is not None:
        console.print(table(report.contexts, title=f"per context ({spec.context_col or 'one context'})"))
    if report.problems:
        console.print(f"[red]{len(report.problems)} problem(s):[/red]")
        for p in report.problems:
            console.print(f"  - {p.message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("[green]no problems found[/green]")


@app.command("preprocess")
def preprocess_cmd(
    input: Annotated[Path, typer.Argument(help="Input .h5ad (never modified).")],
    output: Annotated[Path, typer.Argument(help="Output .h5ad (written atomically).")],
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    expression: Expression = None,
    target_sum: Annotated[float, typer.Option(help="Counts per cell after normalize_total.")] = 1e4,
    n_top_genes: Annotated[int, typer.Option(help="Number of highly variable genes.")] = 2000,
    subset_hvg: Annotated[bool, typer.Option("--subset-hvg/--flag-hvg", help="Keep only HVGs (+targets) or only flag them.")] = True,
    genes: Annotated[Path | None, typer.Option(help="Text file, one gene per line (or a CSV whose first column lists them): keep these genes (instead of HVGs).")] = None,
    knockdown_qc: Annotated[bool, typer.Option("--knockdown-qc/--no-knockdown-qc", help="Drop perturbations whose target is not knocked down.")] = False,
    residual_expression: Annotated[float, typer.Option(help="Knockdown QC: max target expression vs control (perturbation level).")] = 0.30,
    cell_residual_expression: Annotated[float | None, typer.Option(help="Knockdown QC: max target expression vs control per cell (off unless given; cell-load's default is 0.5).")] = None,
    min_cells: Annotated[int, typer.Option(help="Knockdown QC: drop groups left with fewer cells.")] = 30,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    allow_missing_controls: AllowMissingControls = False,
    seed: NoRandomSeed = 0,
) -> None:
    """normalize_total + log1p + HVG selection (+ gene list, + on-target knockdown QC), streamed from disk.

    The matrix is read in row blocks (a pass per statistic, then one that writes), so memory does
    not grow with the number of cells; raw counts are kept in layers['counts'].
    """
    import time

    from vcell.data.io import check_output_path, read_h5ad
    from vcell.data.preprocess import preprocess_file
    from vcell.data.validate import validate
    from vcell.eval.prep import read_gene_list
    from vcell.train.display import format_duration, status, task

    spec = make_spec(pert_col, control, context_col, batch_col, expression)
    if n_top_genes < 1 or not target_sum > 0:  # options are checked before any work, not after normalising
        raise VcellError(f"--n-top-genes must be >= 1 and --target-sum > 0, got {n_top_genes} and {target_sum:g}")
    gene_list = read_gene_list(genes) if genes else None  # a missing or unreadable file is named now
    check_output_path(output, [input], overwrite=overwrite)
    t0 = time.perf_counter()
    with status(f"checking {input.name}"):
        backed = read_h5ad(input, backed=True)
        try:
            info = validate(backed, spec, input, require_context_controls=not allow_missing_controls)
        finally:
            backed.file.close()
    summary = preprocess_file(
        input,
        output,
        spec.with_(expression=info.type),
        target_sum=target_sum,
        n_top_genes=n_top_genes,
        subset_hvg=subset_hvg,
        genes=gene_list,
        knockdown_qc=knockdown_qc,
        residual_expression=residual_expression,
        cell_residual_expression=cell_residual_expression,
        min_cells=min_cells,
        overwrite=overwrite,
        progress=task,
    )
    s = summary
    what = [f"log1p of normalize_total {s['target_sum']:,g}, counts in layers['counts']" if s["normalized"] else "log1p as given"]
    if "n_target_genes_kept" in s and s["n_top_genes"] >= s["n_genes_before"]:
        what.append(f"all genes kept (--n-top-genes {s['n_top_genes']:,})")
    elif "n_target_genes_kept" in s:
        extra = max(0, s["n_genes_after"] - s["n_top_genes"])  # targets that were not among the highly variable genes
        what.append(f"{s['n_top_genes']:,} highly variable genes + {extra:,} target genes not among them "
                    f"({s['n_target_genes_kept']:,} targets kept in all)"
                    if subset_hvg else "highly variable genes flagged in var['highly_variable']")
    if "n_cells_dropped_qc" in s:
        untested = f", kept {s['n_groups_untested_qc']:,} group(s) untested" if s.get("n_groups_untested_qc") else ""
        what.append(f"knockdown QC dropped {s['n_perturbations_dropped_qc']:,} perturbation(s), {s['n_cells_dropped_qc']:,} cells{untested}")
    console.print(f"wrote {output} in {format_duration(time.perf_counter() - t0)}: {s['n_cells_before']:,} x {s['n_genes_before']:,} "
                  f"-> {s['n_cells_after']:,} cells x {s['n_genes_after']:,} genes ({'; '.join(what)})", highlight=False, soft_wrap=True)


@app.command("split")
def split_cmd(
    file: Annotated[Path, typer.Argument(help="The .h5ad dataset.")],
    split: Annotated[Path | None, typer.Option("--split", help="cell-load style split TOML.")] = None,
    holdout_context: Annotated[list[str] | None, typer.Option("--holdout-context", help="Hold out a context for test (zero-shot); repeatable.")] = None,
    val_context: ValContext = None,
    holdout_perturbations: HoldoutPerturbations = None,
    val_perturbations: ValPerturbations = None,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    expression: Expression = None,
    dataset_col: Annotated[str, typer.Option(help="obs column naming each cell's dataset (if present).")] = "dataset",
    set_size: Annotated[int, typer.Option(min=1, help="Cells per cell set, for the count of sets (default: train st's).")] = DEFAULT_SET_SIZE,
    out: Annotated[Path | None, typer.Option("--out", help="Write the split as a TOML file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    allow_missing_controls: AllowMissingControls = False,
    simulated_roles: Annotated[bool, typer.Option("--simulated-roles", help="Hold out the test perturbations and validate on the val ones that `vcell data simulate --preset vcc` recorded (uns['simulation']['roles']; kept by preprocess).")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed: draws the --holdout-perturbations/--val-perturbations fractions and the cell sets; the same seed gives the same split.")] = 0,
) -> None:
    """Apply a split (TOML, or --holdout-context and/or --holdout-perturbations) and print cells and cell sets per context and role."""
    from vcell.data.cellsets import CellSetSampler
    from vcell.data.dataset import load_dataset
    from vcell.data.io import atomic_path, check_output_path
    from vcell.data.splits import ROLES, apply_split, cell_load_notes, datasets_in_file, require_training_cells

    if simulated_roles and (split is not None or holdout_perturbations is not None or val_perturbations is not None):
        raise VcellError("--simulated-roles gives the held-out and validation perturbations: not with --split, "
                         "--holdout-perturbations or --val-perturbations")
    check_split_options(split, holdout_context, holdout_perturbations, val_perturbations, val_context, required=not simulated_roles)
    if out is not None:
        check_output_path(out, [file, *([split] if split else [])], overwrite=overwrite)
    spec = make_spec(pert_col, control, context_col, batch_col, expression)
    data = load_dataset(file, spec, backed=True, dataset_col=dataset_col, require_context_controls=not allow_missing_controls)
    if simulated_roles:
        from vcell.data.simulate_vcc import simulated_roles as recorded_roles

        roles = recorded_roles(data.adata.uns, file)
        holdout_perturbations, val_perturbations = ",".join(roles["test"]), ",".join(roles["val"]) or None
    cfg = split_config(data.index, split, holdout_context, holdout_perturbations, seed, val_context, val_perturbations)
    if simulated_roles:
        cfg.source = "--simulated-roles"
    result = apply_split(data.index, cfg)
    require_training_cells(result, cfg.source)
    console.print(table(split_view(result.summary(data.index)), title=f"split of {file} ({cfg.source})"))
    if cfg.holdout_perturbations or cfg.val_perturbations:
        held = ", ".join(cfg.holdout_perturbations) or "none"
        val = f"; validation in every context: {', '.join(cfg.val_perturbations)}" if cfg.val_perturbations else ""
        console.print(f"held out in every context: {held}{val}", markup=False, highlight=False, soft_wrap=True)
    counts = {r: len(CellSetSampler(data.index, result, r, set_size, train=(r == "train"), seed=seed).plan()) for r in ROLES}
    console.print("cell sets of " + str(set_size) + ": " + ", ".join(f"{r} {n}" for r, n in counts.items()))
    if out is not None:
        if not cfg.datasets:
            cfg.datasets = datasets_in_file(data.index, file)
        notes = cell_load_notes(data.index, result, cfg, file)
        for note in notes:
            log.warning("%s: %s", out, note)
        with atomic_path(out) as tmp:
            tmp.write_text(cfg.to_toml(notes))
        console.print(f"wrote {out}")


@app.command("subset")
def subset_cmd(
    file: Annotated[Path, typer.Argument(help="The .h5ad dataset (never modified).")],
    out: Annotated[Path, typer.Option("--out", help="Output .h5ad: the selected cells, every column of FILE kept (written atomically).")],
    split: Annotated[Path | None, typer.Option("--split", help="cell-load style split TOML (e.g. from `vcell data split --out`).")] = None,
    holdout_context: Annotated[list[str] | None, typer.Option("--holdout-context", help="Or: hold out this context (zero-shot), as `vcell data split`; repeatable.")] = None,
    holdout_perturbations: HoldoutPerturbations = None,
    val_context: ValContext = None,
    val_perturbations: ValPerturbations = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="Cells of this role: test (default), val, train or control; repeatable.")] = None,
    context: Annotated[list[str] | None, typer.Option("--context", help="Only cells of this context (name or dataset.context); repeatable.")] = None,
    controls: Annotated[bool, typer.Option("--controls/--no-controls", help="Add the control cells of the selected cells' contexts (needed to score).")] = True,
    genes: Annotated[Path | None, typer.Option("--genes", help="Keep only these genes, in this order: text file, one gene per line (or a CSV whose first column lists them).")] = None,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    expression: Expression = None,
    dataset_col: Annotated[str, typer.Option(help="obs column naming each cell's dataset (if present).")] = "dataset",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    allow_missing_controls: AllowMissingControls = False,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed: draws a --holdout-perturbations fraction (the same seed as `vcell data split` gives the same cells).")] = 0,
) -> None:
    """Write the cells of a split's role (default: the held-out test cells) with their contexts' controls: the real cells to score a prediction against."""
    from vcell.data.dataset import load_dataset
    from vcell.data.io import check_output_path
    from vcell.data.splits import apply_split, select_cells
    from vcell.data.subset import write_cells
    from vcell.eval.prep import read_gene_list
    from vcell.train.display import task

    check_split_options(split, holdout_context, holdout_perturbations, val_perturbations, val_context)
    spec = make_spec(pert_col, control, context_col, batch_col, expression)
    gene_list = read_gene_list(genes) if genes else None
    check_output_path(out, [file] + ([split] if split else []) + ([genes] if genes else []), overwrite=overwrite)
    data = load_dataset(file, spec, backed=True, dataset_col=dataset_col, require_context_controls=not allow_missing_controls)
    cfg = split_config(data.index, split, holdout_context, holdout_perturbations, seed, val_context, val_perturbations)
    mask = select_cells(data.index, apply_split(data.index, cfg), role or ["test"], context or [], controls)
    with task(f"writing {out.name}", total=int(mask.sum()), unit="cells") as line:  # on stderr, off with -q
        write_cells(file, mask, out, progress=line.advance, genes=gene_list).file.close()
    is_ctrl = data.index.is_control[mask]
    n_perts = len(np.unique(data.index.pert_codes[mask][~is_ctrl]))
    contexts = ", ".join(map(str, data.index.contexts[np.unique(data.index.context_codes[mask])]))
    console.print(f"wrote {out}: {int((~is_ctrl).sum()):,} {'/'.join(role or ['test'])} cells of {n_perts} perturbation(s) + "
                  f"{int(is_ctrl.sum()):,} controls ({contexts})")

@app.command("simulate")
def simulate_cmd(
    output: Annotated[Path, typer.Argument(help="Output .h5ad of raw counts (written atomically).")],
    preset: Annotated[str | None, typer.Option(help="'vcc': the Virtual Cell Challenge's size and structure "
                                               "(300,000 cells x 18,080 genes, 300 perturbations), written chunk by chunk.")] = None,
    n_cells: Annotated[int | None, typer.Option(help="Cells in all, controls included (vcc: 300,000; --preset only).")] = None,
    n_genes: Annotated[int | None, typer.Option(help="Genes (default: 2000; vcc: 18,080).")] = None,
    n_contexts: Annotated[int | None, typer.Option(help="Cell contexts (default: 3; vcc: 1, cells split between them).")] = None,
    n_perturbations: Annotated[int | None, typer.Option(help="Single-gene perturbations (default: 40; vcc: 300).")] = None,
    n_val_perturbations: Annotated[int | None, typer.Option(help="Perturbations given the validation role (vcc: a sixth; --preset only).")] = None,
    n_test_perturbations: Annotated[int | None, typer.Option(help="Held-out test perturbations (vcc: a third; --preset only).")] = None,
    n_combinations: Annotated[int | None, typer.Option(help="Two-gene combinations (A+B) (default: 10; vcc: none).")] = None,
    cells_per_perturbation: Annotated[int | None, typer.Option("--cells-per-perturbation", "--cells-per-pert", help="Mean cells per perturbation and context, each group "
                                                               "drawn within +-40% of it (default: 100; vcc: from --n-cells, ~870).")] = None,
    n_controls: Annotated[int | None, typer.Option(help="Control cells per context (default: 600); with --preset vcc in all, split between the contexts (38,000, 12.7% of --n-cells when given).")] = None,
    n_batches: Annotated[int | None, typer.Option(help="Batches (obs 'gem_group') (default: 2; vcc: 8).")] = None,
    umi_per_cell: Annotated[float | None, typer.Option(help="Median UMIs per cell (vcc: 20,000; --preset only).")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads drawing cells (default: all CPUs; --preset only); the file does not depend on it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    seed: Seed = 0,
) -> None:
    """Simulate a Perturb-seq dataset (negative-binomial counts, known effects in uns['simulation']).

    With --preset vcc, also OUTPUT's STEM.gene_names.csv and STEM.pert_counts.csv: the gene list and
    the test perturbations with their cells, as the challenge hands them out.
    """
    import time

    from vcell.data.io import check_output_path, disk_size, human_size, write_h5ad
    from vcell.data.simulate import simulate_perturbseq
    from vcell.train.display import format_duration, task

    if preset is not None and preset != "vcc":
        raise VcellError(f"--preset {preset!r}: the only preset is 'vcc'")
    if preset is None:
        only = {"--n-cells": n_cells, "--n-val-perturbations": n_val_perturbations, "--n-test-perturbations": n_test_perturbations,
                "--umi-per-cell": umi_per_cell, "--threads": threads}
        given = [name for name, value in only.items() if value is not None]
        if given:
            raise VcellError(f"{', '.join(given)}: only with --preset vcc")
        check_output_path(output, overwrite=overwrite)
        adata = simulate_perturbseq(
            n_genes=2000 if n_genes is None else n_genes,
            n_contexts=3 if n_contexts is None else n_contexts,
            n_perturbations=40 if n_perturbations is None else n_perturbations,
            n_combinations=10 if n_combinations is None else n_combinations,
            cells_per_perturbation=100 if cells_per_perturbation is None else cells_per_perturbation,
            n_controls=600 if n_controls is None else n_controls,
            n_batches=2 if n_batches is None else n_batches,
            seed=seed,
        )
        write_h5ad(adata, output)
        console.print(f"wrote {output}: {adata.n_obs:,} cells x {adata.n_vars:,} genes")
        return

    from vcell.data.simulate_vcc import VCC_PRESET, challenge_list_paths, write_challenge_lists, write_vcc_simulation

    if n_combinations:
        raise VcellError("--n-combinations: --preset vcc simulates single-gene perturbations only")
    if cells_per_perturbation is not None and n_cells is not None:
        raise VcellError("give --n-cells or --cells-per-perturbation, not both")
    sizes = {k: v for k, v in dict(n_genes=n_genes, n_contexts=n_contexts, n_perturbations=n_perturbations, n_controls=n_controls,
                                   n_batches=n_batches, umi_per_cell=umi_per_cell).items() if v is not None}
    opts = {**VCC_PRESET, **sizes}
    if cells_per_perturbation is not None:
        if cells_per_perturbation < 1:
            raise VcellError(f"--cells-per-perturbation must be >= 1, got {cells_per_perturbation}")
        opts["n_cells"] = opts["n_controls"] + cells_per_perturbation * opts["n_perturbations"] * opts["n_contexts"]
    elif n_cells is not None:
        opts["n_cells"] = n_cells
        if n_controls is None:  # the challenge's share of controls (38,000 of 300,000), not its count
            opts["n_controls"] = max(opts["n_contexts"], round(VCC_PRESET["n_controls"] * n_cells / VCC_PRESET["n_cells"]))
    for path in (output, *challenge_list_paths(output)):
        check_output_path(path, overwrite=overwrite)
    t0 = time.perf_counter()
    with task("simulating", total=opts["n_cells"], unit="cells") as line:
        s = write_vcc_simulation(output, **opts, n_val_perturbations=n_val_perturbations, n_test_perturbations=n_test_perturbations,
                                 threads=threads, seed=seed, progress=line.advance)
    ctx = f", {s.n_contexts} contexts" if s.n_contexts > 1 else ""
    console.print(f"wrote {output} in {format_duration(time.perf_counter() - t0)}: {s.n_cells:,} cells x {s.n_genes:,} genes, "
                  f"{s.n_perturbations} perturbations ({s.roles['train']} train / {s.roles['val']} val / {s.roles['test']} test) "
                  f"+ {s.n_controls:,} controls{ctx}, median {s.median_umi:,.0f} UMI/cell, "
                  f"{s.nnz / (s.n_cells * s.n_genes):.1%} non-zero, {human_size(disk_size(output))}",
                  highlight=False, soft_wrap=True)
    genes_csv, perts_csv = write_challenge_lists(output)
    console.print(f"wrote {genes_csv} and {perts_csv} (the challenge's gene list and its test perturbations' cell counts, "
                  "for `vcell predict --perturbations` and `vcell eval prep`)", highlight=False, soft_wrap=True)


@app.command("list")
def list_cmd(
    registry: Annotated[Path | None, typer.Option(help="Extra registry TOML (also $VCELL_REGISTRY).")] = None,
    seed: NoRandomSeed = 0,
) -> None:
    """List the datasets `vcell data fetch` knows."""
    import pandas as pd

    from vcell.data.registry import list_datasets, load_registry

    rows = pd.DataFrame(list_datasets(load_registry(registry)))
    rows["sha256"] = ["unknown" if c.startswith("checksum unknown") else "pinned" for c in rows["checksum"]]
    rows = rows.rename(columns={"perturbation": "type"})
    cols = ["name", "type", "citation"] + (["size"] if (rows["size"] != "unknown").any() else []) + ["sha256", "cached"]
    console.print(table(rows[cols], title="known datasets"))
    console.print("details (URL, columns, citation): see `vcell.data.registry` or pass --registry FILE to add or pin entries")


@app.command("fetch")
def fetch_cmd(
    name: Annotated[str, typer.Argument(help="Dataset name (see `vcell data list`).")],
    cache_dir: Annotated[Path | None, typer.Option(help="Where to store it (default: user cache, or $VCELL_CACHE_DIR).")] = None,
    registry: Annotated[Path | None, typer.Option(help="Extra registry TOML (also $VCELL_REGISTRY).")] = None,
    force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False,
    seed: NoRandomSeed = 0,
) -> None:
    """Download a dataset into the cache (resumable, atomic, checksum-verified when known)."""
    from vcell.data.io import human_size
    from vcell.data.registry import fetch, load_registry
    from vcell.train.display import task

    reg = load_registry(registry)
    with task(f"fetch {name}", unit="bytes") as line:  # on stderr: `$(vcell data fetch NAME)` captures only the path line
        path = fetch(name, cache_dir=cache_dir, registry=reg, force=force,
                     progress=lambda done, total: line.update(completed=done, total=total, info=human_size(done)))
    console.print(f"{name}: {path}")

