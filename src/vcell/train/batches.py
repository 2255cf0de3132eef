"""Each process's share of a global batch of cell sets (DDP), with the weights that keep a padded
share exact, and each process's seed."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vcell.data.cellsets import SetBatch


def rank_seed(seed: int, rank: int) -> int:
    """A torch seed for process ``rank`` of a run seeded with ``seed`` (independent of other ranks)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rank_share(indices: list[int], rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous block of a global batch ``indices``.

    A batch of N sets that does not split evenly over the W ranks (an epoch's short last batch) is
    padded by cycling through its own sets, so every rank gets the same number of sets, and comes
    as ``(index, weight)`` pairs: W/N for each real set, 0 for a padded copy. Each rank's loss is
    then its sets' weighted sum, and DDP's average over ranks is the mean over the N sets, as one
    process computes it (a copy counted as a set gave it twice the weight).
    """
    if world_size == 1:
        return list(indices)
    n = len(indices)
    per = -(-n // world_size)
    if per * world_size == n:
        return list(indices[rank * per : (rank + 1) * per])
    padded = [(indices[i % n], world_size / n if i < n else 0.0) for i in range(per * world_size)]
    return padded[rank * per : (rank + 1) * per]


class EpochShare(list):
    """A rank's share of a global batch (:func:`rank_share`) and the epoch whose plan its indices
    refer to: the dataset draws that plan where it reads, in a persistent worker process too."""

    def __init__(self, items=(), epoch: int | None = None):
        super().__init__(items)
        self.epoch = epoch

    def __reduce__(self):
        return EpochShare, (list(self), self.epoch)


class EpochBatches(Sampler):
    """Consecutive global batches of an epoch's shuffled plan from batch ``skip``, each cut to
    rank ``rank``'s share (:func:`rank_share`) and tagged with the epoch (:class:`EpochShare`).

    ``position``, when given, says at the start of each pass (each epoch) which ``(epoch, skip)``
    it is, from the trainer's step: one data loader, and its worker processes, serve every epoch
    (a loader rebuilt each epoch started its workers again, ~0.3 s each time at GPU sizes).
    Without ``position`` or ``epoch`` the shares carry no epoch: the dataset reads the plan it
    holds (its ``set_epoch`` called by hand).
    ``len`` is the whole epoch so Lightning's progress counters stay right when a resumed run
    starts mid-epoch.
    """

    def __init__(self, n_items: int, batch_size: int, skip: int = 0, rank: int = 0, world_size: int = 1, epoch: int | None = None,
                 position: Callable[[], tuple[int, int]] | None = None):
        self.n_items, self.batch_size, self.rank, self.world_size = n_items, batch_size, rank, world_size
        self.position = position if position is not None else (lambda: (epoch, skip))

    def __len__(self) -> int:
        return math.ceil(self.n_items / self.batch_size)

    def __iter__(self):
        epoch, skip = self.position()
        for b in range(skip, len(self)):
            batch = list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n_items)))
            yield EpochShare(rank_share(batch, self.rank, self.world_size), epoch)


class WeightedSets(Dataset):
    """A cell-set dataset read through :class:`EpochBatches`: a share of ``(index, weight)`` pairs
    reads those sets and adds their ``weight`` [B] to the batch (the loss is then their weighted
    sum, not their mean); a share of another epoch than the sets' draws that epoch's plan first."""

    def __init__(self, sets: Dataset):
        self.sets = sets

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, i: int) -> dict:
        return self.sets[i]

    def __getitems__(self, indices: list) -> list:
        epoch = getattr(indices, "epoch", None)
        if epoch is not None and epoch != self.sets.epoch:
            self.sets.set_epoch(epoch)
        if not indices or not isinstance(indices[0], tuple):
            return self.sets.__getitems__(list(indices))
        rows, weights = zip(*indices)
        items = self.sets.__getitems__(list(rows))
        weight = torch.tensor(weights, dtype=torch.float32)
        if isinstance(items, SetBatch):
            items.batch["weight"] = weight
        for item, w in zip(items, weight):
            item["weight"] = w
        return items
