"""Training the State Embedding model with Lightning, its checkpoints and cell embedding.

:class:`SEModule` knows the model, loss, optimiser and schedule; :class:`SEDataModule` serves
tokenised cell-sentence batches drawn from one or more ``.h5ad`` files (each file is one class of
the dataset token); the Lightning ``Trainer`` runs the loop. Checkpoints are pickle-free
directories in the same layout as ST's (:mod:`vcell.train.checkpoint`): ``weights.safetensors``
(the gene table included), ``optimizer.safetensors``, ``state.safetensors`` and ``config.json``.
Batch ``b`` of epoch ``e`` depends only on ``(seed, e, b)``, so a resumed run sees the same batches
as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vcell.data.io import read_h5ad
from vcell.data.rows import row_source
from vcell.data.validate import check_expression, check_unique_genes
from vcell.errors import VcellError
from vcell.nn.checkpoint import read_config
from vcell.nn.embedding import SEConfig, StateEmbedding, match_genes, normalise_expression, tokenize, unit_gene_vectors
from vcell.train.checkpoint import ResumableModule
from vcell.train.display import status
from vcell.train.options import SETrainOptions
from vcell.train.runs import check_resume, file_identity, run_dir
from vcell.train.seeding import seeded
from vcell.train.trainer import fit_module

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data


@dataclass
class CellSource:
    """One ``.h5ad`` file as SE input: its rows, expression type and the vocabulary id of each used column."""

    name: str
    path: Path | None
    rows: Any
    expression: str
    columns: np.ndarray  # columns of X whose gene is in the vocabulary
    gene_ids: np.ndarray  # their vocabulary ids
    n_cells: int
    identity: dict | None = None  # the file's identity (vcell.train.runs.file_identity), for resuming

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log1p values of the vocabulary columns, log read depth)`` of ``rows``."""
        values, depth = normalise_expression(self.rows.read(np.asarray(rows)), self.expression)
        return values[:, self.columns], depth


def open_source(path: str | os.PathLike, vocab: dict[str, int], expression: str | None = None) -> CellSource:
    """A :class:`CellSource` over ``path`` (read on demand, never modified)."""
    path = Path(path)
    adata = read_h5ad(path, backed=True)
    if adata.n_obs == 0:
        raise VcellError(f"{path}: the file has no cells")
    info = check_expression(adata, expression, path)  # NaN, negative or mislabelled values: one line, named
    columns, ids, _ = match_genes(adata.var_names, vocab, str(path))
    return CellSource(path.stem, path, row_source(adata, path), info.type, columns, ids, adata.n_obs, file_identity(path, adata))


class SEBatches(Dataset):
    """Tokenised batches of one epoch: item ``b`` is batch ``b`` of the epoch's shuffled plan.

    All cells of all sources are shuffled together with ``(seed, epoch)``; a cell's tokenisation
    (padding and masking draws) uses ``(seed, epoch, its place in the plan)``, so a global batch is
    drawn alike whether one process takes it or W processes take a share each.
    """

    def __init__(self, sources: list[CellSource], n_slots: int, n_mask: int, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise VcellError(f"batch size must be >= 1, got {batch_size}")
        self.sources, self.n_slots, self.n_mask = sources, n_slots, n_mask
        self.batch_size, self.seed = batch_size, seed
        self.cells = np.concatenate(
            [np.stack([np.full(s.n_cells, k), np.arange(s.n_cells)], 1) for k, s in enumerate(sources)]
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the cell order of ``epoch``."""
        self.epoch = int(epoch)
        self.plan = self.cells[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.cells))]

    def __len__(self) -> int:
        return math.ceil(len(self.cells) / self.batch_size)

    def __getitem__(self, b: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Batch ``b`` of the current epoch, or ``(epoch, b)``: batch ``b`` of that epoch (its plan
        drawn first where it is another: a persistent worker process serves every epoch)."""
        if isinstance(b, tuple):
            epoch, b = b
            if epoch != self.epoch:
                self.set_epoch(epoch)
        start = int(b) * self.batch_size
        cells = self.plan[start : start + self.batch_size]
        places = np.arange(start, start + len(cells))
        parts = []
        for k in np.unique(cells[:, 0]):
            mine = cells[:, 0] == k
            rows = cells[mine, 1]
            values, depth = self.sources[k].read(rows)
            rngs = [np.random.default_rng([self.seed, self.epoch, int(place)]) for place in places[mine]]
            tok = tokenize(values, self.sources[k].gene_ids, self.n_slots, self.n_mask, rngs)
            parts.append({**tok, "depth": depth, "dataset": np.full(len(rows), k)})
        return {key: torch.as_tensor(np.concatenate([p[key] for p in parts])) for key in parts[0]}


class _RankBatchNumbers(Sampler):
    """``(epoch, batch number)`` of this rank's batches (``rank``, ``rank + world``, ...), ``steps`` of
    them, from ``skip`` on; ``position()`` says ``(epoch, skip)`` at the start of each pass."""

    def __init__(self, steps: int, position, rank: int = 0, world: int = 1):
        self.steps, self.position, self.rank, self.world = steps, position, rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        epoch, skip = self.position()
        for j in range(skip, self.steps):
            yield epoch, self.rank + j * self.world


class SEDataModule(L.LightningDataModule):
    """Training batches of :class:`SEBatches`; one data loader (and its worker processes) serves
    every epoch, its batch numbers tagged with their epoch."""

    def __init__(self, batches: SEBatches, num_workers: int = 0):
        super().__init__()
        self.batches, self.num_workers = batches, num_workers
        self.prefetch_factor: int | None = None  # batches per worker fetched ahead; None: torch's default

    def sample_batch(self, world: int = 1) -> dict:
        """A training batch of one process (``batch_size`` is per process), as the loader's workers build it."""
        return self.batches[0]

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch: whole global batches (the remainder waits for a later
        epoch's shuffle, so every rank takes an equal share of each step and W processes train as
        one); one short step when the data is smaller than one global batch and one process trains."""
        _, world = self._world()
        n, size = len(self.batches.cells), self.batches.batch_size * world
        if n < size and world > 1:
            raise VcellError(f"{n} cells are fewer than one global batch (--batch-size {size}) over {world} processes: "
                             "lower --batch-size, or train in one process")
        return max(1, n // size)

    def _position(self) -> tuple[int, int]:
        step = self.trainer.global_step if self.trainer is not None else 0
        return divmod(step, self.steps_per_epoch)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        self.batches.set_epoch(self._position()[0])  # drawn once here, before any worker forks with a copy
        return DataLoader(
            self.batches,
            batch_size=None,
            sampler=_RankBatchNumbers(self.steps_per_epoch, self._position, rank, world),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(0),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )


# ------------------------------------------------------------------------------------------- module


class SEModule(ResumableModule, L.LightningModule):
    """A :class:`StateEmbedding` with its loss, AdamW and a warm-up + cosine learning-rate schedule
    over ``schedule_steps`` steps (5% warm-up, then down to a tenth of ``lr``).

    ``meta`` goes into ``config.json`` (gene names, dataset names, seed).
    """

    def __init__(self, config: SEConfig, gene_vectors: torch.Tensor | None = None, lr: float = 3e-3,
                 schedule_steps: int = 1000, meta: dict | None = None):
        super().__init__()
        self.config, self.lr, self.schedule_steps = config, float(lr), int(schedule_steps)
        self.meta = dict(meta or {})
        self.model = StateEmbedding(config, gene_vectors)

    def checkpoint_meta(self) -> dict:
        """The content of ``config.json`` (without step, epoch and version)."""
        return {**self.meta, "kind": "se", "model": self.config.to_dict(), "lr": self.lr, "schedule_steps": self.schedule_steps}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.model.loss(batch)
        n = batch["genes"].shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        self.log("train_mse", parts["mse"], on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        warmup, total = max(1, self.schedule_steps // 20), self.schedule_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            done = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------- training


_DATA_SIZES = ("n_genes", "gene_dim", "n_datasets")  # filled in from the data and the gene table


def _check_gene_table(start: Path, genes, names: list[str], vectors) -> None:
    """Refuse to resume with a gene table (``genes``, when given) other than the checkpoint's: the
    checkpoint's is the one trained on (``--gene-dim`` sizes new tables only)."""
    table = gene_table([], genes)
    stored = unit_gene_vectors(table.vectors)
    if list(table.names) != list(names) or not torch.equal(stored, torch.as_tensor(vectors, dtype=torch.float32)):
        raise VcellError(f"cannot resume {start}: --genes {genes if not hasattr(genes, 'names') else 'table'} is another gene "
                         "table than the checkpoint's; resume without --genes (or with its table), or train into a new --out")


def gene_table(paths: list[Path], genes=None, dim: int = 128, seed: int = 0, expression: str | None = None):
    """The gene embeddings to train with: ``genes`` (a ``GeneEmbeddings`` or a file) or data-derived ones.

    Data-derived embeddings come from the log1p expression of all training files together (genes
    joined by name; counts are normalised first).
    """
    from vcell.data.preprocess import normalize_log1p
    from vcell.features.genes import GeneEmbeddings, data_gene_embeddings

    if genes is not None:
        return genes if isinstance(genes, GeneEmbeddings) else GeneEmbeddings.load(genes)
    adatas = []
    for p in paths:
        adata = read_h5ad(p)
        check_unique_genes(adata.var_names, str(p))
        if check_expression(adata, expression, p).type == "counts":
            adata.uns.pop("log1p", None)
            adata = normalize_log1p(adata)
            del adata.layers["counts"]
        adatas.append(adata)
    if len(adatas) == 1:
        adata = adatas[0]
    else:
        import anndata as ad

        adata = ad.concat(adatas, join="outer", fill_value=0)
    return data_gene_embeddings(adata, dim=dim, seed=seed)


def train_se(
    paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: dict,
    genes=None,
    options: SETrainOptions | None = None,
    resume: bool = False,
    expression: str | None = None,
    overwrite: bool = False,
    **option_values,
) -> Path:
    """Train a State Embedding model on the ``.h5ad`` files ``paths``; returns ``out_dir`` (``last/``, ``logs/``).

    Parameters
    ----------
    paths
        Training files; each file is one class of the dataset token.
    out_dir
        Run folder.
    config
        :class:`SEConfig` field values (from :meth:`SEConfig.preset_values`); the data sizes are
        filled in.
    genes
        A ``GeneEmbeddings`` or its file; ``None`` derives them from the data (``gene_dim`` wide).
    options
        :class:`~vcell.train.options.SETrainOptions`; keyword ``option_values`` go on top. The
        learning-rate schedule spans ``schedule_steps`` (default ``max_steps``; on resume, the
        checkpoint's), so a run can be trained in pieces.
    resume
        Continue from ``out_dir/last`` with the checkpoint's model sizes, gene table and learning rate;
        the files must be those it was trained on (same names, cells, genes and values, read as the
        same expression type), any difference is refused, named.
    expression
        ``counts`` or ``log1p`` for every file; default: read from each file.
    overwrite
        Replace a trained run already in ``out_dir`` (without it, and without ``resume``, that is
        refused; see :func:`~vcell.train.runs.run_dir`).
    """
    options = SETrainOptions.from_values(option_values, options)
    out_dir = Path(out_dir)
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    odd = [p for p in paths if not isinstance(p, str | os.PathLike)]
    if odd:
        raise VcellError(f"train_se reads .h5ad files: give their paths, got {type(odd[0]).__name__}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise VcellError("no training data given (--data)")
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise VcellError(f"two --data files share the name {next(n for n in names if names.count(n) > 1)!r}; each file is a dataset class")
    with run_dir(out_dir, resume, overwrite) as start, seeded(options.seed):
        lr, schedule_steps = options.lr, options.schedule_steps
        if start is not None:
            trained, meta = StateEmbedding.from_checkpoint(start)
            if meta["datasets"] != names:
                raise VcellError(f"{start}: was trained on {', '.join(meta['datasets'])}; resume with the same --data files")
            # the data sizes are the checkpoint's; other sizes as passed, so that a change is refused, named
            # (ResumableModule.on_load_checkpoint), as train st refuses it
            vocab_names, vectors = meta["genes"], trained.gene_vectors
            values = {**meta["model"], **{k: v for k, v in config.items() if k not in _DATA_SIZES}}
            if genes is not None:
                _check_gene_table(start, genes, vocab_names, vectors)
            source = meta.get("gene_source", "checkpoint")
            schedule_steps, lr = int(meta["schedule_steps"]), float(meta["lr"])
        else:
            what = f"reading the gene table {genes}" if genes is not None else f"deriving gene embeddings from {len(paths)} file(s)"
            with status(what):
                table = gene_table(paths, genes, options.gene_dim, options.seed, expression)
            vocab_names, vectors, source = list(table.names), table.vectors, table.source
            values = {**config, "n_genes": len(vocab_names), "gene_dim": int(vectors.shape[1]), "n_datasets": len(paths)}
        schedule_steps = int(schedule_steps or options.max_steps)
        vocab = {g: i for i, g in enumerate(vocab_names)}
        with status(f"opening {len(paths)} training file(s)"):
            sources = [open_source(p, vocab, expression) for p in paths]
        cfg = SEConfig.from_dict(values)
        n_slots = min(cfg.gene_slots, *(len(s.columns) for s in sources))
        if n_slots < cfg.gene_slots:
            log.info("cell sentences use %d gene tokens (the data has no more genes in the vocabulary)", n_slots)
        batches = SEBatches(sources, n_slots, cfg.n_mask, options.batch_size // options.world_size, options.seed)
        meta = {
            "genes": vocab_names,
            "gene_source": source,
            "datasets": names,
            "expression": {s.name: s.expression for s in sources},
            "seed": int(options.seed),
            "gene_slots": int(n_slots),  # what `vcell embed` tokenises with
            "lr": float(options.lr),  # compared on resume (the checkpoint's own rate is the one trained with)
            "batch_size": int(options.batch_size),
            "precision": options.precision,
            "devices": options.devices,
            "num_nodes": options.num_nodes,
            "fingerprint": {"data": [s.identity for s in sources]},
        }
        if start is not None:
            check_resume(start, read_config(start), meta)
        module = SEModule(cfg, vectors, lr=lr, schedule_steps=schedule_steps, meta=meta)
        fit_module(module, SEDataModule(batches, options.num_workers), out_dir, options, "se", start)
    return out_dir
