"""Cell sets: S perturbed cells of one (context, perturbation[, batch]) paired with S controls.

The State Transition model learns to map a *set* of control cells of a context to the set of
perturbed cells. :class:`CellSetSampler` decides which rows form each set (a plan, drawn from a
seed and the epoch in the main process, so DataLoader workers only read rows and cannot change
the numbers); :class:`CellSetDataset` reads those rows from memory or from a backed file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from vcell.data.dataset import CellIndex
from vcell.data.spec import CONTROL_STRATEGIES, DEFAULT_SET_SIZE
from vcell.data.splits import CONTROL, Split
from vcell.errors import VcellError

#: Sets of S control cells per training context on which a ``control_relative`` model measures
#: ``control_drift``: 8 was ahead of 2 on the unseen-perturbation benchmarks (benchmarks/README.md).
DRIFT_PROBE_SETS = 8


@dataclass(frozen=True)
class CellSet:
    """One training/evaluation example: rows of perturbed cells and of matched controls.

    ``batch_codes`` holds each perturbed cell's batch (all 0 without a batch column); with
    batch-matched controls ``control_rows[i]`` is a control of ``pert_rows[i]``'s batch where that
    batch has controls.
    """

    dataset: str
    context: str
    perturbation: str
    context_code: int
    pert_code: int
    pert_rows: np.ndarray
    control_rows: np.ndarray
    batch_codes: np.ndarray
    n_distinct: int

    @property
    def size(self) -> int:
        """Number of cells in the set."""
        return len(self.pert_rows)


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows from ``pool``: without replacement when it is large enough, else all of it plus resampling."""
    if n <= pool.size:
        return rng.choice(pool, size=n, replace=False)
    extra = rng.choice(pool, size=n - pool.size, replace=True)
    return rng.permutation(np.concatenate([pool, extra]))


class CellSetSampler:
    """Plans the cell sets of one split role.

    Parameters
    ----------
    index
        The dataset's :class:`~vcell.data.dataset.CellIndex`.
    split
        Roles of the cells; ``None`` uses every perturbed cell.
    role
        ``"train"``, ``"val"`` or ``"test"``.
    set_size
        S, the number of cells per set.
    control_strategy
        ``"batch"``: sets are cut per (context, perturbation, batch) and their controls drawn from
        the same context and batch (the whole context when that batch has no controls), as
        cell-load's batch mapping cuts and pairs them; ``"random"``: sets per (context,
        perturbation), of any batch, their controls any of the context's.
    train
        Train mode shuffles cells and pads short groups by resampling them to S; evaluation
        mode keeps every cell once, in file order, and leaves the last set of a group short.
    seed
        Seed of every random draw; the plan of an epoch depends only on (seed, epoch).
    control_sets
        Train mode only: each context (and batch, with ``control_strategy="batch"``) that has
        perturbed groups also gets sets of the control label, control cells as the target and
        other control cells of the same pool as the basal cells, as many cells per epoch as its
        average perturbed group (so the model learns that the control label changes nothing).
    """

    def __init__(
        self,
        index: CellIndex,
        split: Split | None = None,
        role: str = "train",
        set_size: int = DEFAULT_SET_SIZE,
        control_strategy: str = "batch",
        train: bool = True,
        seed: int = 0,
        control_sets: bool = False,
    ):
        if set_size < 1:
            raise VcellError(f"cell set size must be >= 1, got {set_size}")
        if control_strategy not in CONTROL_STRATEGIES:
            raise VcellError(f"unknown control strategy {control_strategy!r}; use one of {', '.join(CONTROL_STRATEGIES)}")
        self.index, self.role, self.set_size = index, role, set_size
        self.control_strategy, self.train, self.seed = control_strategy, train, seed
        self.control_sets = bool(control_sets and train)
        mask = split.mask(role) if split is not None else None
        self.groups = index.groups(mask=mask, by_batch=control_strategy == "batch")
        is_ctrl = index.is_control if split is None else split.mask(CONTROL)
        self._controls_by_context = self._pools(np.flatnonzero(is_ctrl), by_batch=False)
        #: (dataset, context) -> {batch code: its controls}, for batch-matched controls
        self._batch_pools: dict[tuple, dict[int, np.ndarray]] = {}
        if control_strategy == "batch":
            for (d, c, b), rows in self._pools(np.flatnonzero(is_ctrl), by_batch=True).items():
                self._batch_pools.setdefault((d, c), {})[b] = rows
        missing = {
            (int(d), int(c))
            for d, c in zip(self.groups["dataset_code"], self.groups["context_code"])
            if (int(d), int(c)) not in self._controls_by_context
        }
        if missing:
            d, c = sorted(missing)[0]
            raise VcellError(f"context {index.datasets[d]}.{index.contexts[c]} has perturbed cells but no control cells")

    def _pools(self, rows: np.ndarray, by_batch: bool) -> dict[tuple, np.ndarray]:
        idx = self.index
        keys = [idx.dataset_codes[rows], idx.context_codes[rows]] + ([idx.batch_codes[rows]] if by_batch else [])
        pools: dict[tuple, list] = {}
        stacked = np.stack(keys, axis=1)
        order = np.lexsort(stacked.T[::-1])
        stacked, rows = stacked[order], rows[order]
        if rows.size == 0:
            return {}
        cuts = np.flatnonzero(np.any(np.diff(stacked, axis=0) != 0, axis=1)) + 1
        for part_keys, part_rows in zip(np.split(stacked, cuts), np.split(rows, cuts)):
            pools[tuple(int(k) for k in part_keys[0])] = part_rows
        return pools

    def _match(self, rng: np.random.Generator, cells: np.ndarray, controls: np.ndarray, pools: dict | None) -> np.ndarray:
        """One row of ``controls`` (one context's) per cell of ``cells``, without replacement while the
        pool lasts; with ``control_strategy="batch"`` from the cell's batch (``pools``: batch code ->
        its rows of ``controls``, ``None`` to split ``controls`` here), or from all of ``controls``
        when that batch has none."""
        if self.control_strategy != "batch" or len(cells) == 0:
            return np.asarray(_draw(rng, controls, len(cells)), dtype=np.int64)
        codes = self.index.batch_codes
        if pools is None:
            pools = {int(b): controls[codes[controls] == b] for b in np.unique(codes[controls])}
        cell_codes = codes[cells]
        out = np.empty(len(cells), dtype=np.int64)
        for b in np.unique(cell_codes):
            at = np.flatnonzero(cell_codes == b)
            pool = pools.get(int(b))
            out[at] = _draw(rng, pool if pool is not None and pool.size else controls, at.size)
        return out

    def plan(self, epoch: int = 0) -> list[CellSet]:
        """The cell sets of ``epoch`` (train mode: shuffled; same seed and epoch, same sets)."""
        rng = np.random.default_rng([self.seed, epoch])
        sets: list[CellSet] = []
        for g in self.groups.itertuples(index=False):
            cells = rng.permutation(g.cells) if self.train else g.cells
            ctx = (int(g.dataset_code), int(g.context_code))
            sets += self._cut(rng, g, cells, g.cells, self._controls_by_context[ctx], str(g.perturbation),
                              int(g.perturbation_code), self._batch_pools.get(ctx))
        if self.control_sets:
            sets += self._control_plan(rng)
        if self.train:
            sets = [sets[i] for i in rng.permutation(len(sets))]
        return sets

    def _cut(self, rng: np.random.Generator, g, cells: np.ndarray, pad_from: np.ndarray, controls: np.ndarray,
             perturbation: str, pert_code: int, pools: dict | None = None) -> list[CellSet]:
        """``cells`` of group ``g`` (its dataset and context) cut into sets of S, the last one padded in
        train mode by resampling ``pad_from``, each with its basal cells matched from ``controls``."""
        S = self.set_size
        sets = []
        for start in range(0, len(cells), S):
            chunk = cells[start : start + S]
            n_distinct = len(chunk)
            if self.train and len(chunk) < S:
                chunk = np.concatenate([chunk, rng.choice(pad_from, size=S - len(chunk), replace=True)])
            chunk = np.asarray(chunk, dtype=np.int64)
            sets.append(
                CellSet(
                    dataset=str(g.dataset),
                    context=str(g.context),
                    perturbation=perturbation,
                    context_code=int(g.context_code),
                    pert_code=pert_code,
                    pert_rows=chunk,
                    control_rows=self._match(rng, chunk, controls, pools),
                    batch_codes=self.index.batch_codes[chunk].astype(np.int64),
                    n_distinct=n_distinct,
                )
            )
        return sets

    def _control_plan(self, rng: np.random.Generator) -> list[CellSet]:
        """Sets of the control label (see ``control_sets``): per pool of the perturbed groups'
        contexts (and batches), a fresh draw of as many control cells as the pool's average
        perturbed group, each set's basal cells matched from the pool's other controls."""
        control = int(self.index.control_code)
        keys = ["dataset_code", "context_code"] + (["batch_code"] if self.control_strategy == "batch" else [])
        sets: list[CellSet] = []
        for _, groups in self.groups.groupby(keys, sort=True):
            first = groups.iloc[0]
            ctx = (int(first.dataset_code), int(first.context_code))
            pool = self._controls_by_context[ctx]
            if self.control_strategy == "batch":  # the batch's controls, or the context's when it has none
                batch_pool = self._batch_pools.get(ctx, {}).get(int(first.batch_code))
                pool = batch_pool if batch_pool is not None and batch_pool.size else pool
            size = min(pool.size, math.ceil(groups["n_cells"].mean()))
            if size == 0:
                continue
            drawn = rng.permutation(pool)
            targets, rest = drawn[:size], drawn[size:]
            sets += self._cut(rng, first, targets, targets, rest if rest.size else pool, str(self.index.perts[control]), control)
        return sets

    def drift_probe(self, n_sets: int = DRIFT_PROBE_SETS) -> list[np.ndarray]:
        """Per context that has perturbed groups, ``n_sets`` sets of S of its control cells (rows
        ``[n_sets, S]``; drawn with replacement when it has fewer), from the seed alone: where a
        ``control_relative`` model measures its reference change under the control label."""
        rng = np.random.default_rng([self.seed, 1 << 20])
        out = []
        for (d, c), _ in self.groups.groupby(["dataset_code", "context_code"], sort=True):
            pool = self._controls_by_context[(int(d), int(c))]
            n = n_sets * self.set_size
            out.append(np.sort(rng.choice(pool, size=n, replace=pool.size < n)).reshape(n_sets, self.set_size))
        return out


class CellSetDataset(Dataset):
    """A PyTorch dataset of cell sets, reading expression rows from a row source.

    Each item is a dict: ``basal`` [S, G] control expression, ``target`` [S, G] perturbed
    expression, ``mask`` [S] (True for real cells), the integer codes ``pert`` and ``context`` of
    the set and ``batch`` [S] of each cell (codes index :class:`CellIndex` vocabularies).
    With ``gene_rows`` (when ``rows`` reads cell embeddings) the items also hold the same cells'
    genes: ``target_genes`` and ``basal_genes``.
    Call :meth:`set_epoch` before each epoch to draw new sets.
    """

    def __init__(self, sampler: CellSetSampler, rows, epoch: int = 0, gene_rows=None):
        self.sampler, self.rows, self.gene_rows = sampler, rows, gene_rows
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the sets of ``epoch``."""
        self.epoch = epoch
        self.sets = self.sampler.plan(epoch)

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, i: int) -> dict:
        s = self.sets[i]
        rows = np.concatenate([s.pert_rows, s.control_rows])
        block = self.rows.read(rows)
        n = s.size
        item = {
            "target": torch.from_numpy(block[:n]),
            "basal": torch.from_numpy(block[n:]),
            "mask": torch.ones(n, dtype=torch.bool),
            "pert": torch.tensor(s.pert_code),
            "context": torch.tensor(s.context_code),
            "batch": torch.from_numpy(s.batch_codes),
        }
        if self.gene_rows is not None:
            genes = self.gene_rows.read(rows)
            item["target_genes"], item["basal_genes"] = torch.from_numpy(genes[:n]), torch.from_numpy(genes[n:])
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The items of one DataLoader batch, read together (one row read for all their cells).

        Sets of equal size come back as a :class:`SetBatch`: the item dicts are views into one
        block, and :func:`collate_cell_sets` hands that block on without copying it.
        """
        sets = [self.sets[i] for i in indices]
        if not sets or len({s.size for s in sets}) > 1:
            return [self[i] for i in indices]
        B, S = len(sets), sets[0].size
        rows = np.concatenate([s.pert_rows for s in sets] + [s.control_rows for s in sets])
        block = torch.from_numpy(self.rows.read(rows)).view(2, B, S, -1)
        batch = {
            "target": block[0],
            "basal": block[1],
            "mask": torch.ones((B, S), dtype=torch.bool),
            "pert": torch.tensor([s.pert_code for s in sets]),
            "context": torch.tensor([s.context_code for s in sets]),
            "batch": torch.from_numpy(np.stack([s.batch_codes for s in sets])),
        }
        if self.gene_rows is not None:
            genes = torch.from_numpy(self.gene_rows.read(rows)).view(2, B, S, -1)
            batch["target_genes"], batch["basal_genes"] = genes[0], genes[1]
        return SetBatch(batch)


class SetBatch(list):
    """The items of a batch of equal-size cell sets (a list of dicts, views into ``batch``) and the
    collated ``batch`` itself, which :func:`collate_cell_sets` returns as is."""

    def __init__(self, batch: dict):
        super().__init__({key: value[b] for key, value in batch.items()} for b in range(len(batch["pert"])))
        self.batch = batch


def collate_cell_sets(items: list[dict]) -> dict:
    """Stack cell sets into a batch, zero-padding short sets (``mask`` marks the real cells).

    Training items hold ``target`` and ``basal`` (and the codes ``pert``, ``context`` and, per cell,
    ``batch``; a set's loss ``weight`` where a DDP share has one); prediction items hold ``basal``,
    ``mask`` and ``pert`` only. Keys an item lacks are left out.
    A :class:`SetBatch` is already collated: its batch is returned without a copy.
    """
    if isinstance(items, SetBatch):
        return items.batch
    S = max(item["basal"].shape[0] for item in items)
    out: dict = {}
    for key in ("target", "basal", "mask", "batch", "target_genes", "basal_genes"):
        if key not in items[0]:
            continue
        padded = []
        for item in items:
            x = item[key]
            pad = S - x.shape[0]
            if pad:
                x = torch.cat([x, torch.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
            padded.append(x)
        out[key] = torch.stack(padded)
    for key in ("pert", "context", "weight"):
        if key in items[0]:
            out[key] = torch.stack([item[key] for item in items])
    return out
