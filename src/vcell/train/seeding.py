"""Seeding a training run without changing the caller's random generators."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch

_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # what seed_everything leaves for DDP's processes and loader workers


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators with ``seed`` for the body (Lightning's
    ``seed_everything``, loader workers included), then put back the caller's generators and
    environment: a notebook's own draws after a fit are those it would have made without it."""
    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    env = {name: os.environ.get(name) for name in _ENV}
    L.seed_everything(seed, workers=True, verbose=False)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
