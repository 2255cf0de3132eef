"""What a training run shows and says: its progress bar, its summary line, and a clean Ctrl-C.

:class:`TrainProgress` is the one Lightning callback behind both (added by
:func:`~vcell.train.trainer.make_trainer`, so ST and SE runs share it): rank 0 shows steps
done/total, the current loss, cells per second and the ETA on the progress display
(:mod:`vcell.train.display`), and keeps a :class:`RunSummary` for the command's summary line.

Ctrl-C (SIGINT) during training (:func:`stop_on_interrupt`): the first one lets the current step
finish, writes ``last/`` at that step (the same consistent state a scheduled checkpoint has, so
``--resume`` continues exactly as an uninterrupted run) and ends the run with
:class:`~vcell.errors.Interrupted` naming what was saved; a second one stops at once and says
which checkpoint on disk is the latest. Under DDP the processes agree after every step, so they
all stop at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from vcell.data.io import human_size
from vcell.errors import STOP_SIGNALS, Interrupted
from vcell.nn.checkpoint import BEST, LAST, checkpoint_bytes, resolve_checkpoint_dir
from vcell.train.checkpoint import validation_follows
from vcell.train.display import TaskLine, format_duration, note, task
from vcell.train.runs import checkpoint_step, forget_logged_steps

_REFRESH_S = 0.25  # how often the loss and speed on the bar are refreshed (each read syncs the device)
_LAST_RUN: dict = {"summary": None}


class StopTraining(Exception):
    """Raised by :class:`TrainProgress` after the checkpoint of a Ctrl-C'd run is written (ends ``fit``)."""


@dataclass
class RunSummary:
    """What one ``fit`` did: the steps, the time, the cells seen and how it ended."""

    kind: str
    out_dir: Path
    start_step: int
    step: int
    max_steps: int
    seconds: float
    cells: float
    best_loss: float | None = None
    interrupted: bool = False
    validation_every: int | None = None  # steps between validations (an epoch), when the run validates
    processes: int = 1  # the run's processes (DDP: devices x nodes)

    @property
    def cells_per_s(self) -> float:
        """Training cells per second over the run (all processes)."""
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The command's summary line, e.g. ``trained ST to step 300 in 1m12s (2,345 cells/s); checkpoint: OUT/last (12.3 MB)``."""
        span = f"to step {self.step}" if self.start_step == 0 else f"from step {self.start_step} to step {self.step}"
        procs = f" in {self.processes} processes" if self.processes > 1 else ""
        text = f"trained {self.kind.upper()} {span}{procs} in {format_duration(self.seconds)} ({self.cells_per_s:,.0f} cells/s)"
        last = self.out_dir / LAST
        text += f"; checkpoint: {last} ({human_size(checkpoint_bytes(last))})"
        best = self.out_dir / BEST
        if resolve_checkpoint_dir(best).is_dir():
            parts = [f"val_loss {self.best_loss:.4g}"] if self.best_loss is not None else []
            step = checkpoint_step(best)
            parts += [f"at step {step}"] if step is not None else []
            text += f", best: {best}" + (f" ({' '.join(parts)})" if parts else "")
        elif self.validation_every:
            text += (f"; no validation ran yet (one at the end of each epoch, every {self.validation_every:,} steps): "
                     "no best/ (predict uses last/)")
        return text


def _validation_every(trainer) -> int | None:
    """Steps between validations (one epoch of training batches) when the run validates, else ``None``."""
    try:
        if not trainer.limit_val_batches or not trainer.val_dataloaders:
            return None
        steps = int(trainer.num_training_batches)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None
    return steps if steps > 0 else None


def last_run() -> RunSummary | None:
    """The :class:`RunSummary` of the latest training run in this process (``None`` before any)."""
    return _LAST_RUN["summary"]


def _cells(batch) -> object:
    """Cells in a training batch: the real cells of ST's cell sets (``mask``), else the batch's rows."""
    if isinstance(batch, dict):
        if "mask" in batch:
            return batch["mask"].sum()  # stays on the device: read only when the bar refreshes
        for value in batch.values():
            if hasattr(value, "shape") and len(value.shape):
                return int(value.shape[0])
    return 0


class TrainProgress(Callback):
    """Progress bar, summary and Ctrl-C handling of one training run.

    Parameters
    ----------
    out_dir
        The run folder (where ``last/`` goes).
    kind
        ``st`` or ``se`` (for the bar and the summary).
    checkpoints
        The run's :class:`~vcell.train.checkpoint.RunCheckpoints` (its interval and best
        ``val_loss``).
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str, checkpoints=None):
        self.out_dir, self.kind, self.checkpoints = Path(out_dir), kind, checkpoints
        self.stop_requested = False
        self.signum: int | None = None  # the signal (SIGTERM, SIGHUP) that stopped the run; None for Ctrl-C
        self.training = False  # inside the training loop (a Ctrl-C can wait for the step to end)
        self.stopped_at: int | None = None  # step a Ctrl-C stopped at (checkpoint written)
        self.killed_at: int | None = None  # step a second Ctrl-C (or one before training) stopped at
        self._stop_after_validation = False
        self.stop_handlers: dict[int, object] = {}  # set by stop_on_interrupt, put back over Lightning's at the start
        self._stack = contextlib.ExitStack()
        self._line = TaskLine()
        self._validation = contextlib.ExitStack()  # the validation's own line, open while one runs
        self._val_line = TaskLine()
        self._start_step = self._max_steps = 0
        self._t0 = self._last_refresh = 0.0
        self._cells = 0
        self._world = 1

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step, self._max_steps, self._world = trainer.global_step, trainer.max_steps, trainer.world_size
        self._t0 = self._last_refresh = time.perf_counter()
        self._cells = 0
        self.training = True
        # Lightning's SIGTERM handler, installed during fit, ends the run at the next loop check, in
        # validation before last/ is written: the step was lost. Ours stops after the step, as Ctrl-C
        # does (the ranks agree at each step's end); this is the main thread (stop_on_interrupt checked).
        for signum, handler in self.stop_handlers.items():
            signal.signal(signum, handler)
        if not trainer.is_global_zero:
            return
        if trainer.ckpt_path:
            note(f"resuming from {trainer.ckpt_path} at step {self._start_step} of {self._max_steps}")
            if trainer.logger is not None and trainer.logger.log_dir:
                forget_logged_steps(Path(trainer.logger.log_dir).parent, self._start_step, trainer.logger.log_dir)
        self._line = self._stack.enter_context(
            task(f"training {self.kind.upper()}", total=self._max_steps, unit="steps", completed=self._start_step)
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._cells = self._cells + _cells(batch)
        step = trainer.global_step
        now = time.perf_counter()
        if now - self._last_refresh >= _REFRESH_S:
            self._last_refresh = now
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            info = f"loss {float(loss):.4g}, " if loss is not None else ""
            self._line.update(completed=step, info=f"{info}{float(self._cells) * self._world / (now - self._t0):,.0f} cells/s")
        else:
            self._line.update(completed=step)
        stop = self.stop_requested
        if self._world > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)  # every process stops at the same step
        if stop and step < self._max_steps and self.stopped_at is None:
            # last/ is written now (the loop's state at a step's end), or after this epoch's validation if
            # one follows (a run resumed from before it skipped it); the run ends once Lightning has logged
            # this step (it logs after these hooks: ending here lost the step's row from the record).
            if self.checkpoints is not None and validation_follows(trainer):
                self._stop_after_validation = True
            else:
                self._save_last(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stopped_at is not None:
            raise StopTraining(f"stopped at step {self.stopped_at}")

    def on_validation_start(self, trainer, pl_module) -> None:
        # its own line: a long validation (a large held-out split) otherwise leaves the bar, and a
        # batch job's log, silent until it ends
        if trainer.sanity_checking or not trainer.is_global_zero or not self.training:
            return
        total = sum(trainer.num_val_batches)
        self._val_line = self._validation.enter_context(
            task(f"validating {self.kind.upper()}", total=total if 0 < total < float("inf") else None, unit="batches"))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._val_line.advance(1)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._close_validation()
        # after RunCheckpoints' (the callbacks' order): best/ is up to date
        if self._stop_after_validation and not trainer.sanity_checking:
            self._save_last(trainer)
            raise StopTraining(f"stopped at step {self.stopped_at}")

    def _save_last(self, trainer) -> None:
        """Write ``last/`` at this step for the stop (unless RunCheckpoints has)."""
        step = trainer.global_step
        if self.checkpoints is None:
            trainer.save_checkpoint(self.out_dir / LAST, weights_only=False)
        elif self.checkpoints.last_step != step:
            self.checkpoints.save_last(trainer)
        self.stopped_at = step

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, interrupted=False)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) or getattr(trainer, "received_sigterm", False):
            self.killed_at = trainer.global_step
        self._finish(trainer, interrupted=True)

    # ------------------------------------------------------------------ the rest

    def _close_validation(self) -> None:
        self._validation.close()
        self._val_line = TaskLine()

    def close(self) -> None:
        """Take the run's lines off the progress display (done by the end hooks; safe to repeat)."""
        self._close_validation()
        self._stack.close()
        self._line = TaskLine()
        self.training = False

    def _finish(self, trainer, interrupted: bool) -> None:
        self.close()
        if not self._t0:  # training never started
            return
        _LAST_RUN["summary"] = RunSummary(
            self.kind, self.out_dir, self._start_step, trainer.global_step, self._max_steps,
            time.perf_counter() - self._t0, float(self._cells) * self._world,
            getattr(self.checkpoints, "best", None), interrupted, _validation_every(trainer), self._world,
        )

    def request_stop(self) -> None:
        """Ask the run to stop after the current step (what the first Ctrl-C does)."""
        self.stop_requested = True
        self._line.update(description=f"training {self.kind.upper()}: stopping after this step (Ctrl-C again: stop now)")

    def interrupted_message(self, max_steps: int) -> str:
        """One line: where the run stopped, what is saved and how to continue."""
        last = self.out_dir / LAST
        resume = "continue with --resume"
        if not getattr(self.checkpoints, "save_optimizer", True):
            resume = "it has no optimiser state (--no-save-optimizer), so it cannot be resumed"
        if self.stopped_at is not None:
            return f"interrupted at step {self.stopped_at} of {max_steps}: saved {last} (step {self.stopped_at}); {resume}"
        where = f"at step {self.killed_at} of {max_steps}" if self.killed_at is not None and self._t0 else "before training started"
        saved = checkpoint_step(last)
        if saved is None:
            return f"interrupted {where}; no checkpoint was written (nothing to resume)"
        return f"interrupted {where}; the latest checkpoint is {last} (step {saved}); {resume}"


@contextlib.contextmanager
def stop_on_interrupt(progress: TrainProgress) -> Iterator[None]:
    """Within the body, a Ctrl-C during training asks ``progress`` to stop after the current step;
    a second Ctrl-C, or one before the training loop runs, interrupts at once (``KeyboardInterrupt``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum != signal.SIGINT:
            progress.signum = signum
        if progress.stop_requested or not progress.training:
            raise KeyboardInterrupt
        progress.request_stop()

    # STOP_SIGNALS, when the CLI turned them into a Ctrl-C, stop after the step as well: a preempted
    # job keeps its last step. TrainProgress puts this handler back over Lightning's SIGTERM one.
    signums = [signal.SIGINT] + [s for s in STOP_SIGNALS if signal.getsignal(s) not in (signal.SIG_DFL, signal.SIG_IGN, None)]
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    progress.stop_handlers = {signum: handler for signum in signums if signum != signal.SIGINT}
    try:
        yield
    finally:
        progress.stop_handlers = {}
        for signum, before in previous.items():
            signal.signal(signum, before)


def raise_interrupted(progress: TrainProgress, max_steps: int, is_global_zero: bool) -> None:
    """Raise :class:`~vcell.errors.Interrupted` with ``progress``'s message (printed by rank 0 only)."""
    raise Interrupted(progress.interrupted_message(max_steps), quiet=not is_global_zero, signum=progress.signum) from None
