"""How many batches the data loader's worker processes may keep in shared memory.

Worker processes hand each batch to the training process through shared memory (on Linux,
files in ``/dev/shm``). A container's ``/dev/shm`` is often small (Docker's default: 64 MB), and
when it fills up, torch's loader prints a traceback per batch in the workers while the training
process waits for those batches without end. vcell sizes what is in flight before training
starts instead: fewer batches fetched ahead when that fits, else one error line.
"""

from __future__ import annotations

import logging
import os

import torch

from vcell.data.io import free_space, human_size
from vcell.errors import VcellError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
#: torch's default batches fetched ahead per worker
PREFETCH = 2
#: batches a training process holds besides the workers' queue (measured: one, the batch in use; one more
#: as a margin)
HELD = 2
#: share of the free space the loaders may fill (NCCL and other processes use /dev/shm too)
USABLE = 0.8
_PAGE = 4096


def batch_nbytes(batch) -> int:
    """Shared-memory bytes of a collated batch: each distinct tensor storage, in whole pages."""
    seen, total = set(), 0
    stack = [batch]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += -(-max(storage.nbytes(), 1) // _PAGE) * _PAGE
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def shm_free(path: str = SHM_DIR) -> int | None:
    """Free bytes in ``path`` (``/dev/shm``), or ``None`` where that is unknown: no such folder (not
    Linux), or a tmpfs without a size limit (``size=0``, which reports no blocks at all)."""
    return free_space(path) if os.path.isdir(path) else None


def worker_prefetch(batch_bytes: int, num_workers: int, free: int, processes: int = 1) -> int:
    """Batches each of ``num_workers`` workers may fetch ahead (``DataLoader(prefetch_factor=)``).

    Parameters
    ----------
    batch_bytes
        One process's batch in shared memory (:func:`batch_nbytes`).
    num_workers
        Worker processes per training process (> 0).
    free
        Free shared memory in bytes (:func:`shm_free`).
    processes
        Training processes on this machine sharing its ``/dev/shm`` (``--devices``).

    Returns
    -------
    int
        :data:`PREFETCH`, or 1 when only that fits (a warning says so).

    Raises
    ------
    VcellError
        When even one batch per worker does not fit: one line with the sizes and what to change.
    """
    per_process = USABLE * free / processes
    fits = int((per_process / max(batch_bytes, 1) - HELD) // num_workers)
    if fits >= PREFETCH:
        return PREFETCH
    if fits >= 1:
        log.warning(f"--num-workers {num_workers}: {SHM_DIR} has {human_size(free)} free, room for one batch "
                    f"({human_size(batch_bytes)}) per worker ahead instead of {PREFETCH}")
        return fits
    most = max(0, int(per_process / max(batch_bytes, 1)) - HELD)
    need = processes * (num_workers + HELD) * batch_bytes / USABLE
    fewer = f"--num-workers {most} or fewer" if most else "--num-workers 0"
    raise VcellError(
        f"--num-workers {num_workers}: the workers pass batches of {human_size(batch_bytes)} through shared memory and "
        f"need ~{human_size(int(need))} of {SHM_DIR}, which has {human_size(free)} free: use {fewer}, "
        f"smaller batches, or a larger {SHM_DIR} (docker run --shm-size 2g)"
    )
