"""Pickle-free checkpoint folders: safetensors for tensors, JSON for everything else.

A checkpoint folder holds

- ``weights.safetensors``: the model's state dict;
- ``config.json``: the model's ``kind`` (``st`` or ``se``; ``st`` when absent), its config and
  what it was trained on (gene list, perturbation vocabulary, data columns, seed), the vcell
  version, step and epoch;
- when written by training: ``optimizer.safetensors`` (the optimiser's tensors, with a JSON index
  of its non-tensor parts in the file's metadata) and ``state.safetensors`` +
  ``trainer_state.json`` (the rest of Lightning's checkpoint: loop progress, callback states, RNG
  states; see :mod:`vcell.train.checkpoint`).

A training run folder holds ``last/`` and, with validation cells, ``best/``. Folders are written to
a temporary sibling and renamed into place, so a reader (or a run killed mid-write) never sees a
half-written checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vcell._version import __version__
from vcell.data.io import clean_leftovers, disk_size, human_size, temp_prefix
from vcell.data.tensors import write_safetensors
from vcell.errors import VcellError

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.safetensors"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.json"
LAST, BEST = "last", "best"
MODEL_NAMES = {"st": "State Transition", "se": "State Embedding"}

def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """JSON-able form of ``obj``; tensors go to ``tensors`` and are replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        key = f"{path}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # optimizer state is keyed by int parameter ids: keep the key types
        return {"__items__": [[k, encode_tree(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise VcellError(f"checkpoint: cannot store a value of type {type(obj).__name__} at {path} without pickle")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_tree`: ``obj`` with tensor references replaced by ``tensors``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: decode_tree(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    return obj


def save_tree(obj: Any, path: Path) -> None:
    """Tensors of ``obj`` to ``path`` (safetensors) with the JSON index in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    index = encode_tree(obj, tensors)
    write_safetensors(tensors, path, metadata={"index": json.dumps(index)})


def _unreadable(path: Path, exc: Exception) -> VcellError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return VcellError(f"{path}: unreadable checkpoint file, truncated or corrupt ({detail}); "
                      "the file is damaged: copy it again, or train again")


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; a truncated or corrupt file is a one-line error naming it."""
    path = Path(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error (and OSError) for bad headers and short files
        raise _unreadable(path, exc) from None


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Open every file of a checkpoint folder (safetensors headers, which cover each file's full
    length, and the JSON files) without reading the tensors: a truncated or corrupt file is named
    before a run starts anything (a resumed run, before its logger writes a line)."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.metadata()
        except Exception as exc:  # safetensors' own error for short files and bad headers
            raise _unreadable(path, exc) from None
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _unreadable(path, exc) from None


def load_tree(path: Path) -> Any:
    """What :func:`save_tree` wrote to ``path`` (one-line error naming a truncated or corrupt file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            index = json.loads(f.metadata()["index"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return decode_tree(index, tensors)
    except Exception as exc:  # corrupt header, short file, missing or bad index, dangling tensor reference
        raise _unreadable(path, exc) from None


def write_dir(target: Path, write) -> Path:
    """Run ``write(tmp_dir)`` and move the result onto ``target`` (replacing it).

    ``tmp_dir`` is ``.NAME.PID-XXXXXXXX.tmp`` beside ``target``; what an interrupted earlier write
    of ``target`` left is removed first (:func:`recover_checkpoint_dir`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
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
            old = _old_dir(target)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _old_dir(directory: Path) -> Path:
    """Where :func:`write_dir` keeps the previous version of ``directory`` between its two renames."""
    return directory.parent / f".{directory.name}.old"


def recover_checkpoint_dir(directory: str | os.PathLike) -> int:
    """Tidy what an interrupted :func:`write_dir` of ``directory`` left; returns the bytes removed.

    Temporary folders (``.NAME.PID-XXXXXXXX.tmp`` of processes no longer running) are removed. The
    previous version kept as ``.NAME.old`` is put back when ``directory`` is missing (the writer
    died between its two renames), and removed when ``directory`` is there. Each action is logged.
    """
    directory = Path(directory)
    removed = clean_leftovers(directory)
    old = _old_dir(directory)
    if old.is_dir():
        if directory.exists():
            size = disk_size(old)
            shutil.rmtree(old, ignore_errors=True)
            removed += size
            log.warning("removed %s (%s): the previous version of %s an interrupted write left", old.name, human_size(size), directory)
        else:
            os.replace(old, directory)
            log.warning("restored %s from %s: a write of it was interrupted", directory, old.name)
    return removed


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint (or run) folder."""
    return disk_size(resolve_checkpoint_dir(directory))


def run_checkpoints(model: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder of the run ``model`` names (a run folder, or its ``last/`` or ``best/``),
    the previous versions an interrupted write keeps included: what a command reading the model must
    never write over. A prediction may still live in the run folder beside them."""
    model = Path(model)
    base = model.parent if model.name in (LAST, BEST) and (model / CONFIG).is_file() else model
    found = [p for name in (LAST, BEST) for p in (base / name, _old_dir(base / name)) if p.is_dir()]
    return found or [model]


def resolve_checkpoint_dir(directory: str | os.PathLike) -> Path:
    """``directory``, or the previous version kept beside it if a writer died between its two renames."""
    directory = Path(directory)
    old = _old_dir(directory)
    if not directory.exists() and old.is_dir():
        return old
    return directory


def config_json(meta: dict, step: int, epoch: int) -> dict:
    """``config.json``'s content: ``meta`` plus the vcell version, step and epoch."""
    return {**meta, "vcell_version": __version__, "step": int(step), "epoch": int(epoch)}


def read_config(directory: Path) -> dict:
    """``config.json`` of a checkpoint folder, after checking the folder holds one (one-line errors)."""
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise VcellError(f"{directory}: not a vcell checkpoint (missing {name})")
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VcellError(f"{directory / CONFIG}: unreadable JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise VcellError(f"{directory / CONFIG}: not a vcell checkpoint config (no 'model' mapping of sizes)")
    return meta


def checkpoint_kind(meta: dict) -> str:
    """The model kind a checkpoint's ``config.json`` holds (``st`` for checkpoints that predate the field)."""
    return str(meta.get("kind", "st"))


def find_checkpoint(directory: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint folder: ``directory`` itself, or ``best/`` (falling back to ``last/``) of a run folder.

    ``prefer="last"`` takes ``last/`` only. Raises a one-line error when there is none.
    """
    directory = Path(directory)
    if prefer not in (BEST, LAST):
        raise VcellError(f"checkpoint must be 'best' or 'last', got {prefer!r}")
    if not directory.exists() and not resolve_checkpoint_dir(directory).exists():
        raise VcellError(f"{directory}: model directory not found")
    if (resolve_checkpoint_dir(directory) / CONFIG).is_file():
        return resolve_checkpoint_dir(directory)
    names = (BEST, LAST) if prefer == BEST else (LAST,)
    for name in names:
        found = resolve_checkpoint_dir(directory / name)
        if (found / CONFIG).is_file():
            return found
    inside = " or ".join(f"{name}/" for name in names)
    raise VcellError(f"{directory}: not a vcell checkpoint (no config.json, nor {inside} inside)")


def load_model(directory: str | os.PathLike, kind: str, build: Callable[[dict], torch.nn.Module]) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode, config.json content)`` of the checkpoint folder ``directory``.

    ``kind`` is the model kind expected (``st``, ``se``); ``build`` makes the model from the
    config's field values. Every way this can fail is a one-line error naming the file.
    """
    directory = resolve_checkpoint_dir(directory)
    meta = read_config(directory)
    if checkpoint_kind(meta) != kind:
        raise VcellError(f"{directory}: holds a {checkpoint_kind(meta).upper()} model, not a {MODEL_NAMES.get(kind, kind)} model")
    try:
        model = build(meta["model"])
    except VcellError as exc:
        raise VcellError(f"{directory / CONFIG}: {exc}") from None
    weights = read_tensors(directory / WEIGHTS)
    check_weights(model.state_dict(), weights, directory)
    model.load_state_dict(weights)
    return model.eval(), meta


def check_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], directory: Path) -> None:
    """One complete line naming the first parameter whose presence or shape differs between ``weights``
    (the checkpoint's file) and ``expected`` (the model its ``config.json`` builds), with both shapes."""
    problems = []
    for name, tensor in expected.items():
        if name not in weights:
            problems.append(f"parameter {name!r} {list(tensor.shape)} of the config's model is missing from the weights")
        elif tuple(weights[name].shape) != tuple(tensor.shape):
            problems.append(f"parameter {name!r} has shape {list(weights[name].shape)} in the weights "
                            f"but {list(tensor.shape)} in the model {CONFIG} describes")
    problems += [f"the weights hold {name!r} {list(weights[name].shape)}, which the config's model has not"
                 for name in weights if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        hint = f"was {CONFIG} edited, or copied from another model?"
        if set(expected) - set(weights) == {"control_drift"} and len(problems) == 1:
            # control_relative checkpoints store control_drift since the drift fix of issue #14;
            # an older one would be read differently from how it was trained.
            hint = "it was written before control_relative models recorded their control drift: retrain it"
        raise VcellError(f"{directory / WEIGHTS}: weights do not match {directory / CONFIG}: {problems[0]}{more}; {hint}")


def write_checkpoint(
    directory: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    meta: dict,
    step: int = 0,
    epoch: int = 0,
    optimizer_state: dict | None = None,
) -> Path:
    """Write a checkpoint folder (weights, ``config.json`` and, if given, the optimiser state) atomically."""

    def write(tmp: Path) -> None:
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        if optimizer_state is not None:
            save_tree(optimizer_state, tmp / OPTIMIZER)
        (tmp / CONFIG).write_text(json.dumps(config_json(meta, step, epoch), indent=2))

    return write_dir(directory, write)
