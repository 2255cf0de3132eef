"""The one Lightning ``Trainer`` every vcell model trains with, and the fit call around it."""

from __future__ import annotations

import inspect
import os
import signal
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from vcell.errors import VcellError
from vcell.nn.checkpoint import verify_checkpoint
from vcell.nn.precision import PRECISIONS
from vcell.train.checkpoint import RunCheckpoints, SafetensorsCheckpointIO, check_checkpoint_space
from vcell.train.options import TrainOptions
from vcell.train.progress import StopTraining, TrainProgress, raise_interrupted, stop_on_interrupt
from vcell.train.quiet import quiet_lightning
from vcell.train.runs import LAST, check_resume_steps, checkpoint_step
from vcell.train.shared_memory import batch_nbytes, shm_free, worker_prefetch


class ProcessLost(VcellError):
    """Another process of a distributed run ended (killed, out of memory): one line, exit status 1."""

    exit_code = 1


# torch 2.13 renamed DDP's switch for syncing buffers in each forward (the old name warns there);
# older torch knows only the old one.
_DDP_NO_BUFFER_SYNC = (
    "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers"
)

#: What gloo and nccl say when the process at the other end of a collective is gone
_PEER_GONE = ("closed by peer", "reset by peer", "broken pipe", "nccl communicator was aborted", "watchdog caught collective")


def _peer_lost(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistError", ())) or any(marker in text for marker in _PEER_GONE)


def _lost_message(exc: RuntimeError, out_dir: str | os.PathLike) -> str:
    cause = " ".join(str(exc).split())
    cause = cause[:160] + ("..." if len(cause) > 160 else "")
    last = Path(out_dir) / LAST
    step = checkpoint_step(last)
    saved = f"the latest checkpoint is {last} (step {step}); continue with --resume" if step is not None else "no checkpoint was written"
    return f"another process of this distributed run ended (its own output says why; here: {cause}); {saved}"


def make_trainer(options: TrainOptions, out_dir: str | os.PathLike, kind: str, validate: bool = False) -> L.Trainer:
    """A Lightning ``Trainer`` for ``options`` writing pickle-free checkpoints and logs under ``out_dir``.

    Parameters
    ----------
    options
        Steps, devices, precision, clipping, checkpoint and log intervals.
    out_dir
        Run folder: ``last/``, ``best/`` (with ``validate``) and ``logs/``.
    kind
        The model kind trained (``st``, ``se``); resuming from another kind is an error.
    validate
        Run the validation loop (and keep ``best/``).
    """
    options.check()
    out_dir = Path(out_dir)
    strategy = options.strategy
    if options.distributed:
        # Buffers (the perturbation table, the gene table) are the same on every rank; syncing them
        # in each forward would make ranks with different numbers of validation batches wait.
        strategy = DDPStrategy(**{_DDP_NO_BUFFER_SYNC: False})
    checkpoints = RunCheckpoints(out_dir, options.checkpoint_every, options.save_optimizer)
    try:
        return L.Trainer(
            max_steps=options.max_steps,
            max_epochs=-1,
            accelerator=options.accelerator,
            devices=options.devices,
            num_nodes=options.num_nodes,
            strategy=strategy,
            precision=PRECISIONS[options.precision],
            use_distributed_sampler=False,  # vcell's data modules give each rank its share themselves
            gradient_clip_val=options.grad_clip or None,
            enable_checkpointing=False,  # Lightning's checkpoints pickle; RunCheckpoints writes safetensors
            plugins=[SafetensorsCheckpointIO(kind)],
            callbacks=[checkpoints, TrainProgress(out_dir, kind, checkpoints)],  # this order: see TrainProgress
            logger=CSVLogger(out_dir, name="logs"),
            limit_val_batches=1.0 if validate else 0,
            num_sanity_val_steps=0,
            log_every_n_steps=options.log_every,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out_dir,
        )
    except MisconfigurationException as exc:
        raise VcellError(f"devices: {str(exc).splitlines()[0]}") from None


@quiet_lightning()
def fit_module(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    out_dir: str | os.PathLike,
    options: TrainOptions,
    kind: str,
    resume_from: str | os.PathLike | None = None,
    validate: bool = False,
) -> L.Trainer:
    """Train ``module`` on ``datamodule`` with :func:`make_trainer`; continue from ``resume_from`` if given."""
    ckpt, start = None, 0
    if resume_from is not None:
        ckpt = Path(resume_from)
        if not ckpt.is_dir():
            raise VcellError(f"{ckpt}: no checkpoint to resume from")
        start = check_resume_steps(ckpt, options.max_steps)
        verify_checkpoint(ckpt)  # a damaged file is named before the trainer (and its logger) starts
    resumed = ckpt is not None and ckpt.resolve() == (Path(out_dir) / LAST).resolve()
    check_checkpoint_space(module, out_dir, options.max_steps, options.checkpoint_every, options.save_optimizer, validate, start,
                           resumed)
    workers, free = getattr(datamodule, "num_workers", 0), shm_free()
    if workers and free is not None:  # no /dev/shm to size (not Linux): torch's default
        batch = datamodule.sample_batch(options.world_size)
        datamodule.prefetch_factor = worker_prefetch(batch_nbytes(batch), workers, free, options.devices)
    trainer = make_trainer(options, out_dir, kind, validate)
    progress = next(cb for cb in trainer.callbacks if isinstance(cb, TrainProgress))
    with stop_on_interrupt(progress):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
        except StopTraining:
            raise_interrupted(progress, options.max_steps, trainer.is_global_zero)
        except RuntimeError as exc:
            if trainer.world_size > 1 and _peer_lost(exc):
                raise ProcessLost(_lost_message(exc, out_dir)) from None
            raise
        except SystemExit:  # Lightning's answer to a KeyboardInterrupt (sys.exit(1)) or a SIGTERM (exit status 0!)
            if progress.killed_at is None and not trainer.received_sigterm:
                raise
            if trainer.received_sigterm and progress.signum is None:
                progress.signum = signal.SIGTERM
            raise_interrupted(progress, options.max_steps, trainer.is_global_zero)
        finally:
            progress.close()
            _drop_empty_log(trainer)
    return trainer


def _drop_empty_log(trainer: L.Trainer) -> None:
    """Remove this run's ``logs/version_N/`` when it ended with nothing in it (a resume refused inside
    fit): the next run would log to ``version_N+1`` beside an empty folder."""
    logger = trainer.logger
    if logger is None or not trainer.is_global_zero:
        return
    folder = Path(logger.log_dir)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
