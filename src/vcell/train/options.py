"""How a model is trained, apart from what the model is: one dataclass per model kind.

The model's sizes live in its config (:class:`~vcell.nn.transition.STConfig`,
:class:`~vcell.nn.embedding.SEConfig`); everything else a training run needs (steps, batch,
learning rate, precision, devices, seed, checkpoint interval, gradient clipping) lives here, once.
``vcell train``, ``vcell bench --model-config``, :class:`~vcell.predictors.STPredictor` and the
Python training functions all take these options, so their defaults agree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vcell.data.spec import CONTROL_STRATEGIES, DEFAULT_SET_SIZE
from vcell.errors import VcellError
from vcell.nn.config import field_values
from vcell.nn.precision import check_precision

STRATEGIES = ("auto", "ddp")
#: Lightning's accelerators that vcell trains on (tpu needs torch_xla, which vcell does not support).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


@dataclass
class TrainOptions:
    """Run options shared by every model kind.

    Parameters
    ----------
    max_steps
        Optimiser steps to train to (a resumed run continues up to this step).
    batch_size
        Global batch: with ``devices`` x ``num_nodes`` processes (DDP) each takes its share.
    lr
        Peak learning rate.
    seed
        Seed of everything random; the same seed gives the same weights.
    precision
        ``"32"``, ``"bf16-mixed"`` (CPU or GPU) or ``"16-mixed"`` (GPU only).
    accelerator, devices, num_nodes, strategy
        Lightning's device settings; more than one process trains with DDP.
    num_workers
        Data loader worker processes.
    checkpoint_every
        Write ``last/`` every this many steps (and at the last; one due at an epoch's end is written after its validation).
    log_every
        Log the loss every this many steps.
    grad_clip
        Clip the gradient norm to this value (``0``: no clipping).
    save_optimizer
        Keep the optimiser state in ``last/`` (needed to resume; about twice the weights' size
        with Adam). ``best/`` never holds it.
    """

    max_steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    precision: str = "32"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    grad_clip: float = 10.0
    save_optimizer: bool = True

    @classmethod
    def names(cls) -> list[str]:
        """The option names."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_values(cls, values: Mapping[str, Any] | None = None, base: TrainOptions | None = None):
        """Options from ``values`` on top of ``base`` (or the defaults); unknown names are an error."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise VcellError(f"unknown training option(s) {', '.join(map(repr, unknown))} (options: {', '.join(cls.names())})")
        values = field_values(cls, values, "training option")  # `max_steps: lots` is named, not a traceback
        options = dataclasses.replace(base, **values) if base is not None else cls(**values)
        options.check()
        return options

    @property
    def world_size(self) -> int:
        """Processes taking part (devices x nodes)."""
        return self.devices * self.num_nodes

    @property
    def distributed(self) -> bool:
        """Whether the run uses DDP."""
        return self.strategy == "ddp" or self.world_size > 1

    def check(self) -> None:
        """Raise a one-line :class:`VcellError` for values that cannot work (alone or together)."""
        for name in ("max_steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VcellError(f"{_flag(name)} must be an integer >= 1, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise VcellError(f"{_flag('num_workers')} must be an integer >= 0, got {self.num_workers!r}")
        if not self.lr > 0:
            raise VcellError(f"{_flag('lr')} must be > 0, got {self.lr!r}")
        if self.grad_clip < 0:
            raise VcellError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if not isinstance(self.save_optimizer, bool):
            raise VcellError(f"save_optimizer must be true or false, got {self.save_optimizer!r}")
        check_run_options(self.accelerator, self.devices, self.num_nodes, self.strategy, self.precision, self.batch_size)


@dataclass
class STTrainOptions(TrainOptions):
    """Run options of the State Transition model (:class:`TrainOptions` plus the cell sets).

    Parameters
    ----------
    set_size
        Cells per set, in training and (as the largest set) in prediction.
    control_strategy
        How sets are cut and their control cells drawn: ``batch`` (sets of one batch, controls of
        that batch, when the data has one, as cell-load's batch mapping does) or ``random`` (sets of
        any batch, any control of the context).
    """

    set_size: int = DEFAULT_SET_SIZE
    control_strategy: str = "batch"

    def check(self) -> None:
        """As :meth:`TrainOptions.check`, plus the cell-set options."""
        super().check()
        if not isinstance(self.set_size, int) or self.set_size < 1:
            raise VcellError(f"{_flag('set_size')} must be >= 1, got {self.set_size!r}")
        if self.control_strategy not in CONTROL_STRATEGIES:
            raise VcellError(f"control_strategy {self.control_strategy!r}: use one of {', '.join(CONTROL_STRATEGIES)}")


@dataclass
class SETrainOptions(TrainOptions):
    """Run options of the State Embedding model (:class:`TrainOptions` with SE's defaults).

    Parameters
    ----------
    schedule_steps
        Length of the warm-up + cosine learning-rate schedule (default ``max_steps``; a resumed
        run keeps its checkpoint's).
    gene_dim
        Width of data-derived gene embeddings (when no gene table is given).
    """

    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    grad_clip: float = 1.0
    schedule_steps: int | None = None
    gene_dim: int = 128


#: The run options that `vcell train` takes as flags (the others are Python keywords or --config fields only).
_CLI_FLAGS = {"max_steps", "batch_size", "checkpoint_every", "num_workers", "lr", "set_size"}


def _flag(name: str) -> str:
    """How a message names option ``name``: its flag and keyword (``--max-steps (max_steps=)``), or the keyword."""
    return f"--{name.replace('_', '-')} ({name}=)" if name in _CLI_FLAGS else name


def on_cpu(accelerator: str) -> bool:
    """Whether ``accelerator`` trains on the CPU on this machine."""
    import torch  # not at module level: the CLI builds its options without loading torch

    if accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return accelerator == "cpu"


#: Environment variables of a launcher that starts one task per node or process (Slurm, torchrun, MPI,
#: LSF, Lightning's own NODE_RANK): without one, ``num_nodes`` > 1 waits for nodes that never come.
_LAUNCHED = ("SLURM_NTASKS", "WORLD_SIZE", "RANK", "NODE_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "LSB_JOBID")


def check_run_options(
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32",
    batch_size: int | None = None,
) -> None:
    """Raise a one-line :class:`VcellError` for device, strategy, precision or batch-size options that cannot work together."""
    if accelerator not in ACCELERATORS:
        raise VcellError(f"--accelerator {accelerator!r}: use one of {', '.join(ACCELERATORS)}")
    for name, value in (("devices", devices), ("num-nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise VcellError(f"--{name} must be a positive integer, got {value!r}")
    if strategy not in STRATEGIES:
        raise VcellError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    check_precision(precision, on_cpu(accelerator))
    if num_nodes > 1 and not any(key in os.environ for key in _LAUNCHED):
        raise VcellError(f"--num-nodes {num_nodes}: start this command on every node with a launcher (srun, torchrun; or set "
                         "NODE_RANK and MASTER_ADDR on each): alone it would wait for the other nodes without end")
    world = devices * num_nodes
    if batch_size is not None and batch_size % world:
        raise VcellError(f"--batch-size {batch_size} is the global batch and must be divisible by devices x nodes = {world}")
