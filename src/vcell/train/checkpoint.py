"""The Lightning side of vcell's checkpoint folders (:mod:`vcell.nn.checkpoint` has the format).

:class:`SafetensorsCheckpointIO`, :class:`RunCheckpoints` and :class:`ResumableModule` are the
Lightning pieces every vcell trainer (ST, SE) uses to write, resume and replay checkpoints:
``trainer.save_checkpoint`` and ``trainer.fit(ckpt_path=...)`` go through them and never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import CheckpointIO

from vcell.data.tensors import write_safetensors
from vcell.errors import VcellError
from vcell.nn.checkpoint import (
    BEST,
    CONFIG,
    LAST,
    OPTIMIZER,
    STATE,
    TRAINER_STATE,
    WEIGHTS,
    checkpoint_kind,
    config_json,
    decode_tree,
    encode_tree,
    load_tree,
    read_config,
    read_tensors,
    resolve_checkpoint_dir,
    save_tree,
    write_checkpoint,
    write_dir,
)
from vcell.nn.transition import StateTransition

MODEL_PREFIX = "model."
META_KEY = "vcell"  # where the LightningModule puts config.json's content in a Lightning checkpoint


def save_checkpoint(
    directory: str | os.PathLike,
    module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    epoch: int,
    extra_meta: dict | None = None,
) -> Path:
    """Write a checkpoint of ``module`` (an :class:`~vcell.train.st.STModule`) without Lightning.

    ``extra_meta`` is merged into ``config.json``. Returns the directory.
    """
    meta = {**module.checkpoint_meta(), **(extra_meta or {})}
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    return write_checkpoint(directory, module.model.state_dict(), meta, step, epoch, optimizer_state)


def load_checkpoint(directory: str | os.PathLike) -> tuple[StateTransition, object, dict, dict | None]:
    """Read an ST checkpoint folder: ``(model, config, meta, optimizer_state)``.

    ``meta`` is the content of ``config.json``; ``optimizer_state`` is ``None`` when the
    checkpoint has no optimizer (e.g. weights exported for inference). The model is in eval mode.
    """
    directory = resolve_checkpoint_dir(directory)
    model, meta = StateTransition.from_checkpoint(directory)
    optimizer_state = load_tree(directory / OPTIMIZER) if (directory / OPTIMIZER).is_file() else None
    return model, model.config, meta, optimizer_state


def _read_json(path: Path) -> Any:
    """A checkpoint's JSON file; a truncated or corrupt one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VcellError(f"{path}: unreadable checkpoint file, truncated or corrupt ({exc})") from None


def _trainer_state(path: Path) -> dict:
    """Lightning's loop/callback state of a checkpoint folder (tensors restored)."""
    if (path / TRAINER_STATE).is_file() and (path / STATE).is_file():
        return decode_tree(_read_json(path / TRAINER_STATE), read_tensors(path / STATE))
    if (path / STATE).is_file():  # SE checkpoints of vcell <= 0.1 kept the JSON index in the file's metadata
        return load_tree(path / STATE)
    raise VcellError(f"{path}: checkpoint has no trainer state ({TRAINER_STATE}); it cannot resume training")


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint I/O in the directory format above, so ``trainer.save_checkpoint`` and
    ``trainer.fit(ckpt_path=...)`` never pickle.

    ``kind``: the model kind this run trains; resuming from a checkpoint of another kind is a
    one-line error.
    """

    def __init__(self, kind: str = "st"):
        self.kind = kind

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` as a folder at ``path``; ``storage_options={"optimizer": False}`` leaves
        the optimiser state out (a checkpoint for inference, or a smaller ``last/``)."""
        rest = dict(checkpoint)
        state_dict = rest.pop("state_dict")
        optimizer_states = rest.pop("optimizer_states", [])
        if not (storage_options or {}).get("optimizer", True):
            optimizer_states = []
        meta = rest.pop(META_KEY, None)
        if meta is None:
            raise VcellError("checkpoint has no vcell metadata (the LightningModule must add it in on_save_checkpoint)")
        if len(optimizer_states) > 1:
            raise VcellError("checkpoint: only one optimizer is supported")
        weights = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}

        def write(tmp: Path) -> None:
            write_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
            if optimizer_states:
                save_tree(optimizer_states[0], tmp / OPTIMIZER)
            tensors: dict[str, torch.Tensor] = {}
            index = encode_tree(rest, tensors)
            write_safetensors(tensors, tmp / STATE)
            (tmp / TRAINER_STATE).write_text(json.dumps(index))
            (tmp / CONFIG).write_text(json.dumps(config_json(meta, rest.get("global_step", 0), rest.get("epoch", 0)), indent=2))

        write_dir(Path(path), write)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = resolve_checkpoint_dir(path)
        meta = read_config(path)
        if checkpoint_kind(meta) != self.kind:
            raise VcellError(f"{path}: holds a {checkpoint_kind(meta).upper()} model; this run trains {self.kind.upper()}")
        checkpoint = _trainer_state(path)
        checkpoint["state_dict"] = {MODEL_PREFIX + k: v for k, v in read_tensors(path / WEIGHTS).items()}
        checkpoint["optimizer_states"] = [load_tree(path / OPTIMIZER)] if (path / OPTIMIZER).is_file() else []
        checkpoint[META_KEY] = meta
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def validation_follows(trainer) -> bool:
    """Whether Lightning validates right after the batch just trained: the epoch's last, with
    validation on (vcell validates once per epoch)."""
    return bool(trainer.enable_validation and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class RunCheckpoints(Callback):
    """Writes ``last/`` every ``every_n_steps`` steps and at the last step, ``best/`` on a lower ``val_loss``
    (runs without validation write ``last/`` only). A ``last/`` due at an epoch's last step is
    written once that epoch's validation has run, so a run resumed from it does not skip it.

    Only ``last/`` (what ``--resume`` continues from) keeps the optimiser state, and only with
    ``save_optimizer``; ``best/`` is for inference and holds none (a third of the size with Adam).

    Under DDP every rank calls ``trainer.save_checkpoint`` at the same points (it is collective:
    the RNG states are gathered) and only rank 0 writes.
    """

    def __init__(self, out_dir: str | os.PathLike, every_n_steps: int = 100, save_optimizer: bool = True):
        if every_n_steps < 1:
            raise VcellError(f"checkpoint interval must be >= 1 step, got {every_n_steps}")
        self.out_dir, self.every_n_steps, self.save_optimizer = Path(out_dir), every_n_steps, bool(save_optimizer)
        self.best: float | None = None
        self.last_step: int | None = None  # the step ``last/`` was last written at
        self._last_due = False  # ``last/`` is due once this step's validation has run

    def save_last(self, trainer) -> None:
        """Write ``last/`` at the current step (with the optimiser state when ``save_optimizer``)."""
        trainer.save_checkpoint(self.out_dir / LAST, weights_only=False, storage_options={"optimizer": self.save_optimizer})
        self.last_step, self._last_due = trainer.global_step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the last step too, here: at the end of training Lightning's epoch counter has moved on, and a
        # run resumed from there logged its epochs (and, from an epoch's end, its losses) one off
        if trainer.global_step % self.every_n_steps == 0 or trainer.global_step >= trainer.max_steps:
            if validation_follows(trainer):
                self._last_due = True  # written after it: a run resumed from it must not skip this epoch's validation
            else:
                self.save_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if "val_loss" in trainer.callback_metrics:
            val = float(trainer.callback_metrics["val_loss"])
            if self.best is None or val < self.best:
                self.best = val
                trainer.save_checkpoint(self.out_dir / BEST, weights_only=False, storage_options={"optimizer": False})
        if self._last_due:
            self.save_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.last_step != trainer.global_step:
            self.save_last(trainer)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")


class ResumableModule:
    """LightningModule mixin: checkpoints carry the ``config.json`` content and every rank's torch
    (and CUDA) RNG state; a resumed run checks the checkpoint's model config against its own and
    restores the RNG states right before its first step, so dropout and sampling continue as in
    an uninterrupted run.

    A subclass has ``config`` (with ``to_dict()``) and ``checkpoint_meta()`` (the ``config.json``
    content).
    """

    _rng_to_restore: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add ``config.json``'s content and every rank's RNG state to the checkpoint."""
        checkpoint[META_KEY] = self.checkpoint_meta()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = list(torch.cuda.get_rng_state_all())
        if self.trainer.world_size > 1:
            # called on every rank; rank 0 writes the file, so it keeps every rank's RNG state
            rng["torch_ranks"] = self._gather(torch.get_rng_state())
            if self.device.type == "cuda":
                rng["cuda_ranks"] = self._gather(torch.cuda.get_rng_state(self.device))
        checkpoint["rng"] = rng

    def _gather(self, state: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of ``state`` (a CPU tensor of the same shape on each rank)."""
        state = state.to(self.device)
        parts = [torch.empty_like(state) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(parts, state)
        return [p.cpu() for p in parts]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model config; keep its RNG states for the first step."""
        saved = checkpoint.get(META_KEY, {}).get("model", {})
        ours = json.loads(json.dumps(self.config.to_dict()))  # tuples -> lists, as config.json has them
        changed = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if changed:
            diffs = ", ".join(f"{k} {saved.get(k)!r} -> {ours.get(k)!r}" for k in changed[:4])
            raise VcellError(f"cannot resume: the checkpoint was trained with another model config ({diffs}); "
                             "resume with the same preset and config, or train into a new --out")
        self._rng_to_restore = checkpoint.get("rng")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Restore the checkpoint's RNG states right before the first step after a resume."""
        # restored right before the first step so nothing in between (setup, data loading) shifts it
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is None:
            return
        rank, world = self.global_rank, self.trainer.world_size
        if world > 1 and len(rng.get("torch_ranks", [])) == world:
            torch.set_rng_state(rng["torch_ranks"][rank])
            if len(rng.get("cuda_ranks", [])) == world and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda_ranks"][rank], self.device)
        elif rank == 0:  # saved with another number of processes: only rank 0's stream carries on
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and world == 1:
                torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_bytes(module: torch.nn.Module, optimizer: bool) -> int:
    """Bytes of one ``last/`` of ``module``: its weights and buffers, and with ``optimizer`` Adam's two
    moments per trained parameter (float32)."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    moments = 2 * 4 * sum(p.numel() for p in module.parameters() if p.requires_grad) if optimizer else 0
    return weights + moments


def check_checkpoint_space(module: torch.nn.Module, out_dir: str | os.PathLike, max_steps: int, every: int,
                           optimizer: bool, validate: bool, start: int = 0, resumed: bool = False) -> None:
    """Refuse, before training, a run whose checkpoints will not fit on ``out_dir``'s disk.

    ``last/`` is replaced whole (the old folder stays until the new one is complete), so a new run
    that writes it more than once holds two at a time, beside one ``best/`` (with ``validate``; it
    is written after ``last/``, not with it). ``start``: the step the run continues from;
    ``resumed``: from ``out_dir``'s own ``last/`` (and ``best/``), which are on the disk already,
    so each write needs room for one more copy.
    """
    import tempfile

    from vcell.data.io import free_space, human_size

    steps = range(start + 1, max_steps + 1)
    writes = len({s for s in steps if s % every == 0} | ({max_steps} if max_steps > start else set()))
    if not writes:
        return
    last, weights = checkpoint_bytes(module, optimizer), checkpoint_bytes(module, False)
    best_new = validate and not (resumed and (Path(out_dir) / BEST).is_dir())
    copies = 1 if resumed else min(writes, 2)
    need = copies * last + (weights if best_new else 0)
    free = free_space(out_dir)
    if free is None or need <= free:  # unknown: the first write will tell
        return
    where = Path(out_dir)
    made_here = where.resolve().parent == Path(tempfile.gettempdir()).resolve() and where.name.startswith("vcell-")
    hint = " (a temporary folder: set TMPDIR to a folder on a larger disk)" if made_here else ""
    held = ", kept twice while it is replaced" if copies == 2 else ""
    smaller = "; or --no-save-optimizer (last/ without Adam's state, a third of the size)" if optimizer else ""
    raise VcellError(f"{where}{hint}: {human_size(free)} free, but this run's checkpoints need about {human_size(need)} "
                     f"({human_size(last)} for last/{held}{', and best/' if best_new else ''}): "
                     f"free some space or write the run elsewhere (--out){smaller}")
