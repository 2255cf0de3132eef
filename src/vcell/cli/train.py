"""``vcell train ...``: train STATE models (``vcell train st``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vcell.cli.common import (
    Accelerator,
    BatchCol,
    CheckpointEvery,
    ContextCol,
    Control,
    Devices,
    NumNodes,
    NumWorkers,
    PertCol,
    Precision,
    Resume,
    Seed,
    Strategy,
    console,
    make_spec,
    split_view,
    table,
)
from vcell.errors import VcellError

app = typer.Typer(help="Train STATE models on a log1p perturbation dataset.", no_args_is_help=True)


def read_config_file(path: Path) -> dict:
    """STConfig overrides from a YAML or JSON file (a mapping of field -> value)."""
    import yaml

    if not path.is_file():
        raise VcellError(f"{path}: config file not found")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise VcellError(f"{path}: unreadable config ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise VcellError(f"{path}: the config must be a mapping of ST config fields to values")
    return values


@app.command("st")
def st(
    data: Annotated[Path, typer.Option("--data", help="The log1p .h5ad dataset (run `vcell data preprocess` on counts).")],
    split: Annotated[Path | None, typer.Option("--split", help="cell-load style split TOML.")] = None,
    holdout_context: Annotated[list[str] | None, typer.Option("--holdout-context", help="Held-out (test) context, repeatable; never trained on.")] = None,
    val_context: Annotated[list[str] | None, typer.Option("--val-context", help="Validation context, repeatable (writes best/).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Model size: small, default or large.")] = "small",
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of STConfig overrides (e.g. width, n_layers).")] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Training steps.")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Cell sets per step, over all processes (each of W processes takes 1/W).")] = 8,
    set_size: Annotated[int, typer.Option("--set-size", help="Cells per set.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-4,
    out: Annotated[Path, typer.Option("--out", help="Run folder: last/, best/, logs/.")] = Path("vcell-st"),
    embed_key: Annotated[str | None, typer.Option("--embed-key", help="Train in this .obsm cell-embedding space (e.g. X_vcell from `vcell embed`) with a gene decoder back to X.")] = None,
    resume: Resume = False,
    checkpoint_every: CheckpointEvery = 100,
    accelerator: Accelerator = "auto",
    devices: Devices = 1,
    num_nodes: NumNodes = 1,
    strategy: Strategy = "auto",
    precision: Precision = "32",
    num_workers: NumWorkers = 0,
    pert_col: PertCol = "target_gene",
    control: Control = "non-targeting",
    context_col: ContextCol = "cell_type",
    batch_col: BatchCol = None,
    seed: Seed = 0,
) -> None:
    """Train a State Transition model; checkpoints go to OUT/last (and OUT/best with validation cells)."""
    from lightning.pytorch.utilities import rank_zero_only

    from vcell.data.dataset import load_dataset
    from vcell.data.splits import apply_split, holdout_config, read_split_toml
    from vcell.models.transition import STConfig
    from vcell.train.st import check_run_options, train_st

    if split is not None and (holdout_context or val_context):
        raise VcellError("give either --split or --holdout-context/--val-context, not both")
    check_run_options(accelerator, devices, num_nodes, strategy, precision, batch_size)
    # DDP runs this command once per process (Lightning re-runs it); only rank 0 reports
    overrides = read_config_file(config) if config is not None else {}
    values = STConfig.preset_values(preset, overrides)
    spec = make_spec(pert_col, control, context_col, batch_col, None)
    # only what training reads: a raw-counts layer or other .obsm entries would just take memory
    dataset = load_dataset(data, spec, only_obsm=[embed_key] if embed_key else [])
    if dataset.spec.expression == "counts":
        raise VcellError(f"{data}: X holds raw counts; the ST model trains on log1p expression: run `vcell data preprocess` first")
    index = dataset.index
    if split is not None:
        cfg = read_split_toml(split)
    else:
        cfg = holdout_config(index, list(holdout_context or []), val_contexts=list(val_context or []))
    applied = apply_split(index, cfg)
    if rank_zero_only.rank == 0:
        console.print(table(split_view(applied.summary(index)), title="split"))
    space = f"in .obsm[{embed_key!r}]" if embed_key else "in gene space"
    with console.status(f"training ST ({preset}, {space}) for {max_steps} steps"):
        run = train_st(
            dataset, applied, out, values, max_steps=max_steps, batch_size=batch_size, set_size=set_size, seed=seed,
            resume=resume, num_workers=num_workers, lr=lr, checkpoint_every=checkpoint_every, accelerator=accelerator,
            devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, embed_key=embed_key,
        )
    if rank_zero_only.rank == 0:
        console.print(f"checkpoint: {run / 'last'}" + (f" (best: {run / 'best'})" if (run / "best").is_dir() else ""))


from vcell.cli.embed import train_se  # noqa: E402  (vcell train se)

app.command("se")(train_se)
