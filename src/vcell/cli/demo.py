"""``vcell demo``: the main job on data vcell makes itself (no network, no files needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import Seed, console, split_view, table


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("vcell-demo"),
    holdout_context: Annotated[str | None, typer.Option("--holdout-context", help="Context to hold out (default: the last).")] = None,
    set_size: Annotated[int, typer.Option(help="Cells per cell set.")] = 64,
    seed: Seed = 0,
) -> None:
    """Simulate a Perturb-seq dataset, check it, hold out a context and draw cell sets."""
    from vcell.data.cellsets import CellSetDataset, CellSetSampler, collate_cell_sets
    from vcell.data.dataset import load_dataset
    from vcell.data.io import write_h5ad
    from vcell.data.rows import row_source
    from vcell.data.simulate import simulate_perturbseq
    from vcell.data.spec import DataSpec
    from vcell.data.splits import ROLES, apply_split, holdout_config
    from vcell.data.validate import context_summary

    with console.status("simulating a Perturb-seq dataset"):
        adata = simulate_perturbseq(seed=seed)
        path = write_h5ad(adata, out / "simulated.h5ad")
    console.print(f"1. simulated {adata.n_obs:,} cells x {adata.n_vars:,} genes -> {path}")

    spec = DataSpec(batch_col="gem_group")
    data = load_dataset(path, spec, backed=True)
    console.print(f"2. checked: no problems; expression {data.expression.type} ({data.expression.reason})")
    console.print(table(context_summary(data.adata, data.spec)))

    held = holdout_context or str(data.index.contexts[-1])
    split = apply_split(data.index, holdout_config(data.index, [held]))
    console.print(f"3. split: context {held!r} held out (zero-shot); its controls stay available as basal input")
    console.print(table(split_view(split.summary(data.index))))

    rows = row_source(data.adata, path)
    for role in ROLES:
        sampler = CellSetSampler(data.index, split, role, set_size, "batch", train=(role == "train"), seed=seed)
        sets = sampler.plan()
        if not sets:
            continue
        ds = CellSetDataset(sampler, rows)
        batch = collate_cell_sets([ds[i] for i in range(min(4, len(ds)))])
        shape = "x".join(map(str, batch["target"].shape))
        console.print(f"4. {role}: {len(sets)} cell sets of <= {set_size}; first batch target {shape}, streamed from disk")
    console.print(f"[green]demo done[/green]: files in {out}/")
