"""Pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint directory holds

- ``weights.safetensors``: the :class:`~vcell.models.transition.StateTransition` state dict;
- ``optimizer.safetensors``: the optimizer's tensors, with a JSON index of its non-tensor parts
  (param groups, steps) in the file's metadata;
- ``state.safetensors`` + ``trainer_state.json``: the rest of Lightning's checkpoint (loop
  progress, callback states, RNG states), tensors split out the same way;
- ``config.json``: the model config, gene list, perturbation vocabulary, data columns, vcell
  version, step, epoch and seed.

Directories are written to a temporary sibling and renamed into place, so a reader (or a run
killed mid-write) never sees a half-written checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors.torch import load_file, save_file
from safetensors import safe_open

import vcell
from vcell.errors import VcellError
from vcell.models.transition import STConfig, StateTransition

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.safetensors"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.json"
MODEL_PREFIX = "model."
META_KEY = "vcell"  # where the LightningModule puts config.json's content in a Lightning checkpoint


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """JSON-able form of ``obj``; tensors go to ``tensors`` and are replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        key = f"{path}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # optimizer state is keyed by int parameter ids: keep the key types
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise VcellError(f"checkpoint: cannot store a value of type {type(obj).__name__} at {path} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _save_tree(obj: Any, path: Path) -> None:
    """Tensors of ``obj`` to ``path`` (safetensors) with the JSON index in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    index = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={"index": json.dumps(index)})


def _load_tree(path: Path) -> Any:
    with safe_open(str(path), framework="pt") as f:
        index = json.loads(f.metadata()["index"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(index, tensors)


def _write_dir(target: Path, write) -> Path:
    """Run ``write(tmp_dir)`` and move the result onto ``target`` (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the usual directory mode
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint_dir(directory: str | os.PathLike) -> Path:
    """``directory``, or the previous version kept beside it if a writer died between its two renames."""
    directory = Path(directory)
    old = directory.parent / f".{directory.name}.old"
    if not directory.exists() and old.is_dir():
        return old
    return directory


def _config_json(meta: dict, step: int, epoch: int) -> dict:
    return {**meta, "vcell_version": vcell.__version__, "step": int(step), "epoch": int(epoch)}


def read_config(directory: Path) -> dict:
    """``config.json`` of a checkpoint folder, after checking the folder holds one (one-line errors)."""
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise VcellError(f"{directory}: not a vcell checkpoint (missing {name})")
    try:
        return json.loads((directory / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise VcellError(f"{directory / CONFIG}: unreadable JSON ({exc})") from None


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

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}, str(tmp / WEIGHTS))
        if optimizer is not None:
            _save_tree(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / CONFIG).write_text(json.dumps(_config_json(meta, step, epoch), indent=2))

    return _write_dir(directory, write)


def load_checkpoint(directory: str | os.PathLike) -> tuple[StateTransition, STConfig, dict, dict | None]:
    """Read a checkpoint directory: ``(model, config, meta, optimizer_state)``.

    ``meta`` is the content of ``config.json``; ``optimizer_state`` is ``None`` when the
    checkpoint has no optimizer (e.g. weights exported for inference). The model is in eval mode.
    """
    directory = resolve_checkpoint_dir(directory)
    meta = read_config(directory)
    config = STConfig.from_dict(meta["model"])
    model = StateTransition(config)
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except RuntimeError as exc:
        raise VcellError(f"{directory / WEIGHTS}: weights do not match the config ({str(exc).splitlines()[0]})") from None
    model.eval()
    optimizer_state = _load_tree(directory / OPTIMIZER) if (directory / OPTIMIZER).is_file() else None
    return model, config, meta, optimizer_state


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint I/O in the directory format above, so ``trainer.save_checkpoint`` and
    ``trainer.fit(ckpt_path=...)`` never pickle."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        rest = dict(checkpoint)
        state_dict = rest.pop("state_dict")
        optimizer_states = rest.pop("optimizer_states", [])
        meta = rest.pop(META_KEY, None)
        if meta is None:
            raise VcellError("checkpoint has no vcell metadata (the LightningModule must add it in on_save_checkpoint)")
        weights = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}

        def write(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            if len(optimizer_states) > 1:
                raise VcellError("checkpoint: only one optimizer is supported")
            if optimizer_states:
                _save_tree(optimizer_states[0], tmp / OPTIMIZER)
            tensors: dict[str, torch.Tensor] = {}
            index = _encode(rest, tensors)
            save_file(tensors, str(tmp / STATE))
            (tmp / TRAINER_STATE).write_text(json.dumps(index))
            (tmp / CONFIG).write_text(json.dumps(_config_json(meta, rest.get("global_step", 0), rest.get("epoch", 0)), indent=2))

        _write_dir(Path(path), write)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = resolve_checkpoint_dir(path)
        model, _config, meta, optimizer_state = load_checkpoint(path)
        if not (path / TRAINER_STATE).is_file():
            raise VcellError(f"{path}: checkpoint has no trainer state ({TRAINER_STATE}); it cannot resume training")
        checkpoint = _decode(json.loads((path / TRAINER_STATE).read_text()), load_file(str(path / STATE)))
        checkpoint["state_dict"] = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
        checkpoint["optimizer_states"] = [optimizer_state] if optimizer_state is not None else []
        checkpoint[META_KEY] = meta
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)
