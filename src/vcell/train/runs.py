"""Run folders: who may write into one, and whether a resumed run matches what it was trained on.

A run folder (``vcell train st|se --out DIR``) holds ``last/``, ``best/`` and ``logs/version_N/``.
:func:`run_dir` is the one rule for running in it: an existing trained run is never replaced
without ``overwrite`` (and then set aside before the new run writes anything, so a new run never
sits beside an old ``best/``; it is deleted when the new run ends, and put back when the new run
fails), ``resume`` needs a ``last/`` holding the optimiser state, and what an interrupted earlier
run left (temporary checkpoint folders) is removed first. Only what vcell writes is ever moved:
a ``last/`` or ``best/`` that is no checkpoint is refused, and ``logs/`` keeps every entry but
Lightning's ``version_N`` folders.

Every checkpoint's ``config.json`` carries a ``fingerprint`` of what the run was trained on (the
data file's identity and, for ST, the split); :func:`check_resume` compares it, and the columns,
genes and perturbation features, with the run being resumed, and refuses naming each difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcell.data.io import atomic_path, check_writable, clean_leftovers, human_size, leftovers, stop_signals_held, temp_prefix
from vcell.data.rows import H5Rows
from vcell.data.staging import held_exclusively
from vcell.errors import VcellError, preview
from vcell.nn.checkpoint import (
    BEST,
    CONFIG,
    LAST,
    OPTIMIZER,
    checkpoint_bytes,
    checkpoint_kind,
    read_config,
    recover_checkpoint_dir,
    resolve_checkpoint_dir,
)

log = logging.getLogger(__name__)

LOGS = "logs"
REPLACED = "replaced-run"  # a cleared run waits in OUT/.replaced-run.PID-XXXXXXXX.tmp while it is deleted
SAMPLE_ROWS = 16  # rows of the matrix hashed into a data file's digest
MORE_ROWS = 512  # rows hashed into its rows digest (with a sparse X's indptr), compared when a checkpoint has one


# ------------------------------------------------------------------------------------ run folders


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The step of the checkpoint folder ``directory`` (``None`` when there is none or it is unreadable)."""
    path = resolve_checkpoint_dir(directory) / CONFIG
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume_steps(checkpoint: str | os.PathLike, max_steps: int) -> int:
    """The step of ``checkpoint``; a one-line error when it is already at ``max_steps`` or beyond (nothing to train)."""
    step = checkpoint_step(checkpoint)
    if step is not None and step >= max_steps:
        raise VcellError(f"{checkpoint}: the run is already at step {step} >= --max-steps {max_steps}; "
                         f"pass a larger --max-steps to train on")
    return step or 0


def check_run_dir(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False, kind: str | None = None,
                  max_steps: int | None = None) -> Path | None:
    """The checks of :func:`run_dir`, changing nothing: call it before loading data.

    With ``resume``, also that the checkpoint holds a ``kind`` model (``st``, ``se``) and is below
    ``max_steps``, when given. Returns the checkpoint a ``resume`` continues from (``None`` without ``resume``).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise VcellError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    check_writable(out_dir, folder=True)
    if resume:
        found = resolve_checkpoint_dir(out_dir / LAST)
        killed = _killed_overwrite(out_dir)
        if not found.is_dir() and killed is not None and (killed / LAST).is_dir():
            found = killed / LAST  # the earlier run an --overwrite killed early set aside: run_dir puts it back
        if not found.is_dir():
            raise VcellError(f"{out_dir}: nothing to resume (no {LAST}/ checkpoint)")
        if not (found / OPTIMIZER).is_file():
            raise VcellError(f"{found}: cannot resume: this checkpoint was saved without the optimiser state "
                             "(--no-save-optimizer); train into a new --out, or start again with --overwrite")
        if kind is not None:
            check_kind(found, read_config(found), kind)
        if max_steps is not None:
            check_resume_steps(found, max_steps)
        return found
    for name in (LAST, BEST):
        found = resolve_checkpoint_dir(out_dir / name)
        if found.exists() and not (found / CONFIG).is_file():  # the user's own folder: never replaced, never deleted
            raise VcellError(f"{found}: not a vcell checkpoint (no {CONFIG}); a run writes {LAST}/, {BEST}/ and {LOGS}/ "
                             "into --out: move it away or choose another --out")
    trained = [name for name in (LAST, BEST) if resolve_checkpoint_dir(out_dir / name).is_dir()]
    if trained and not overwrite:
        where = resolve_checkpoint_dir(out_dir / trained[0])
        raise VcellError(f"{out_dir}: already holds a trained run ({trained[0]}/ at step {checkpoint_step(where) or '?'}); "
                         "pass --resume to continue it, --overwrite to replace it, or choose another --out")
    return None


@contextlib.contextmanager
def run_dir(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Iterator[Path | None]:
    """Check and prepare the run folder ``out_dir`` before any work; yields the checkpoint to resume from.

    - ``out_dir`` must be (or be creatable as) a writable folder;
    - temporary folders an interrupted run left are removed, and a checkpoint caught between its
      two renames is put back (each logged);
    - ``resume``: ``out_dir/last`` must exist and hold the optimiser state; it is yielded;
    - otherwise a trained run there (``last/`` or ``best/``) is refused unless ``overwrite``,
      which sets ``last/``, ``best/`` and ``logs/version_*`` aside before anything new is written.
      They are deleted when the body ends, or fails after the new run saved a checkpoint (resumable),
      and put back if it fails before: a failed ``--overwrite`` loses nothing.

    Under DDP only rank 0 moves or removes anything (the other ranks run this after rank 0 did).
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir, resume, overwrite)  # refuse before touching anything
    from lightning.pytorch.utilities import rank_zero_only  # not at module level: refusals come before Lightning loads

    rank0 = rank_zero_only.rank == 0
    with contextlib.ExitStack() as stack:
        if rank0:  # two runs into one folder would write over each other's checkpoints: the second is refused
            if not out_dir.exists():  # made here: removed again if the run writes nothing into it
                stack.callback(lambda: out_dir.is_dir() and not any(out_dir.iterdir()) and out_dir.rmdir())
            out_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(held_exclusively(out_dir, f"{out_dir}: another vcell run is training into this folder now; "
                                                          "wait for it to finish or choose another --out"))
        yield from _prepared(out_dir, resume, overwrite, rank0)


def _prepared(out_dir: Path, resume: bool, overwrite: bool, rank0: bool) -> Iterator[Path | None]:
    """:func:`run_dir`'s body, with the folder held."""
    if rank0 and out_dir.is_dir():
        for name in (LAST, BEST):
            recover_checkpoint_dir(out_dir / name)
        _restore_killed_overwrite(out_dir)
        clean_leftovers(out_dir / REPLACED)
    start = check_run_dir(out_dir, resume, overwrite)
    aside = None
    try:
        if not resume and overwrite and rank0 and any((out_dir / name).exists() for name in (LAST, BEST)):
            aside = _set_aside(out_dir)  # a stop signal during it is raised once it is done, here
        yield start
    except BaseException:
        if aside is not None:
            if _resumable(out_dir):
                _drop(aside, out_dir)  # the new run saved a step it can continue from (its message says so): it replaces the old one
            else:
                _put_back(aside, out_dir)
        raise
    if aside is not None:
        _drop(aside, out_dir)


def _resumable(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a ``last/`` checkpoint a run can be resumed from (with its optimiser state)."""
    return (out_dir / LAST / CONFIG).is_file() and (out_dir / LAST / OPTIMIZER).is_file()


def _run_entries(out_dir: Path) -> list[Path]:
    """What a run wrote into ``out_dir``: ``best/``, ``logs/version_*`` (Lightning's), ``last/``."""
    logs = out_dir / LOGS
    versions = sorted(p for p in logs.glob("version_*") if p.is_dir()) if logs.is_dir() else []
    return [p for p in (out_dir / BEST, *versions, out_dir / LAST) if p.exists()]


def _set_aside(out_dir: Path) -> Path:
    """Move the earlier run into one temporary folder (each entry one rename, so a run killed
    meanwhile leaves either an entry or nothing under each name); :func:`_drop` or
    :func:`_put_back` ends it, or the next run in ``out_dir`` if this one is killed."""
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir / REPLACED), suffix=".tmp", dir=out_dir))
    with stop_signals_held(redeliver=True):
        for entry in _run_entries(out_dir):
            target = aside / entry.relative_to(out_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, target)
    return aside


def _drop(aside: Path, out_dir: Path) -> None:
    size = sum(checkpoint_bytes(aside / name) for name in (LAST, BEST) if (aside / name).exists())
    shutil.rmtree(aside, ignore_errors=True)
    log.warning("--overwrite: removed the earlier run in %s (checkpoints %s)", out_dir, human_size(size))


def _put_back(aside: Path, out_dir: Path) -> None:
    """Remove what the failed new run wrote and move the earlier run back."""
    with stop_signals_held(redeliver=True):
        for entry in _run_entries(out_dir):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for entry in _run_entries(aside):
            target = out_dir / entry.relative_to(aside)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, target)
    shutil.rmtree(aside, ignore_errors=True)
    log.warning("--overwrite: the new run did not save a checkpoint to resume from; %s holds the earlier run as it was", out_dir)


def _killed_overwrite(out_dir: Path) -> Path | None:
    """The earlier run an ``--overwrite`` run set aside and was killed before a checkpoint it could
    be resumed from (a ``best/`` alone is not one); ``None`` if there is none."""
    if _resumable(out_dir):
        return None
    return next((a for a in leftovers(out_dir / REPLACED) if (a / LAST).is_dir() or (a / BEST).is_dir()), None)


def _restore_killed_overwrite(out_dir: Path) -> None:
    """Put back the :func:`_killed_overwrite` run (with a new checkpoint there, the set-aside run is
    removed as a leftover)."""
    aside = _killed_overwrite(out_dir)
    if aside is not None:
        _put_back(aside, out_dir)


# ----------------------------------------------------------------------------------- fingerprints


def digest(*parts) -> str:
    """A short SHA-256 of ``parts`` (arrays by dtype and bytes, label lists by their strings)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray) and part.dtype != object:
            h.update(str(part.dtype).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            labels = pd.Index(part if isinstance(part, pd.Index) else np.asarray(part, dtype=object)).astype(str)
            h.update(pd.util.hash_pandas_object(labels, index=False).to_numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:20]


def sample_rows(adata, path=None, key: str | None = None, n: int = SAMPLE_ROWS) -> np.ndarray:
    """``n`` rows spread over ``adata.X`` (or ``.obsm[key]``) as float32, read cheaply even when backed."""
    n_obs = adata.n_obs
    rows = np.unique(np.linspace(0, max(n_obs - 1, 0), min(n, n_obs)).astype(np.int64))
    if rows.size == 0:
        return np.zeros((0, 0), np.float32)
    if adata.isbacked:
        reader = H5Rows(path or adata.filename, "X" if key is None else f"obsm/{key}")
        try:
            return reader.read(rows)
        finally:
            reader.close()
    block = (adata.X if key is None else adata.obsm[key])[rows]
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)


def rows_digest(adata, path=None, n: int = MORE_ROWS) -> str:
    """A digest of ``n`` rows spread over ``X`` and, for a sparse ``X``, its ``indptr`` (every row's
    number of stored values; cheap even at 300,000 cells): a file whose rows changed beyond the
    16 of ``digest`` (reordered, replaced) is told apart."""
    parts = [sample_rows(adata, path, None, n)]
    h = hashlib.sha256()
    step = 1 << 20  # a backed file's indptr is hashed a million entries at a time, never held whole
    if adata.isbacked:
        import h5py

        with h5py.File(path or adata.filename, "r") as f:
            node = f["X"]
            if isinstance(node, h5py.Group):
                indptr = node["indptr"]
                for lo in range(0, indptr.shape[0], step):
                    h.update(np.asarray(indptr[lo:lo + step], np.int64).tobytes())
    elif sp.issparse(adata.X):
        h.update(np.asarray(adata.X.indptr, np.int64).tobytes())
    return digest(*parts, np.frombuffer(h.digest(), np.uint8))


def file_identity(path, adata, extra=(), sample_keys: tuple = (None,)) -> dict:
    """A data file's identity: its path and size (for messages), shape and a digest of its cell and
    gene names, ``extra`` arrays and a few rows of each matrix in ``sample_keys`` (``None``: ``X``),
    and ``X``'s :func:`rows_digest`."""
    path = Path(path).resolve() if path is not None else None
    samples = [sample_rows(adata, path, key) for key in sample_keys]
    return {
        "file": str(path) if path is not None else None,
        "bytes": path.stat().st_size if path is not None and path.is_file() else None,
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "digest": digest(adata.obs_names, adata.var_names, *extra, *samples),
        "rows": rows_digest(adata, path),
    }


def split_identity(index, split) -> dict:
    """The split's identity: the contexts holding cells of each role, and a digest of every cell's role."""
    names = np.asarray(index.context_key_names, dtype=object).astype(str)
    one_dataset = len(index.datasets) == 1
    keys = index.context_key_codes
    contexts = {}
    for role in ("train", "val", "test"):
        found = sorted({str(names[k]) for k in np.unique(keys[split.mask(role)])})
        contexts[role] = [k.split(".", 1)[1] if one_dataset and "." in k else k for k in found]
    return {"contexts": contexts, "digest": digest(split.role_codes)}


def data_identity(data, embed_key: str | None = None) -> dict:
    """A :class:`~vcell.data.dataset.PerturbationData`'s :func:`file_identity`: its file, cells, genes,
    labels (perturbations, contexts, batches, datasets) and values (``.obsm[embed_key]``'s too)."""
    index = data.index
    extra = (index.perts, index.pert_codes, index.contexts, index.context_codes, index.batch_codes, index.dataset_codes)
    return file_identity(data.path, data.adata, extra, (None,) if embed_key is None else (None, embed_key))


def st_fingerprint(data, split, embed_key: str | None = None) -> dict:
    """What an ST run trains on: the data file (cells, genes, labels, values) and the split."""
    return {"data": data_identity(data, embed_key), "split": split_identity(data.index, split)}


# --------------------------------------------------------------------------------------- resuming

_FLAGS = {"pert_col": "--pert-col", "control": "--control", "context_col": "--context-col", "batch_col": "--batch-col"}
#: Training options a resumed run must share with its checkpoint: each changes the weights of every step
#: from the first (the cell sets are drawn with the seed, the set size and the batch size).
_TRAINED_WITH = {"seed": "--seed", "lr": "--lr", "batch_size": "--batch-size", "set_size": "--set-size",
                 "control_strategy": "control_strategy", "precision": "--precision"}


def _file(ident: dict) -> str:
    return f"{ident.get('file') or 'in-memory data'} ({ident.get('cells')} cells x {ident.get('genes')} genes)"


def data_difference(saved: dict, ours: dict, what: str = "data", done: str = "trained") -> str | None:
    """How the data identity ``ours`` (:func:`file_identity`) differs from ``saved``, that of the data
    the run was ``done`` on, as a message clause; ``None`` if it does not."""
    rows = saved.get("rows"), ours.get("rows")  # absent from checkpoints of earlier versions: not compared
    if saved.get("digest") == ours.get("digest") and (None in rows or rows[0] == rows[1]):
        return None
    if saved.get("file") == ours.get("file"):  # the same file, or in-memory data both times
        shape = lambda i: f"{i.get('cells')} cells x {i.get('genes')} genes"  # noqa: E731
        now = f"{shape(saved)} then, {shape(ours)} now" if shape(saved) != shape(ours) else "other cell or gene names, labels or values"
        return f"{what} {ours.get('file') or '(in memory)'} changed since it was {done} on it ({now})"
    return f"it was {done} on {_file(saved)}, not {_file(ours)}"


def _names(items) -> str:
    return ", ".join(map(str, items)) or "none"


def _split_difference(saved: dict, ours: dict) -> str | None:
    if saved.get("digest") == ours.get("digest"):
        return None
    a, b = saved.get("contexts", {}), ours.get("contexts", {})
    labels = {"test": "test (held-out) context(s)", "val": "validation context(s)", "train": "training context(s)"}
    roles = [r for r in ("test", "val") if a.get(r) != b.get(r)] or [r for r in ("train",) if a.get(r) != b.get(r)]
    if roles:
        return "it was trained with " + " and ".join(
            f"{labels[r]} {_names(a.get(r, []))}, not {_names(b.get(r, []))}" for r in roles)
    return "it was trained with another split of the cells (the same contexts per role, other cells or perturbations in them)"


def resume_differences(saved: dict, ours: dict) -> list[str]:
    """Each way the run ``ours`` (``config.json`` content it would write) differs from the checkpoint
    ``saved`` in what it trains on: data columns, embedding key, data files, split, genes,
    perturbation features, expression types, and the options that shape every step (seed,
    learning rate, batch and set sizes, control strategy, precision; not the number of processes).
    Fields a checkpoint lacks are not compared."""
    diffs = []
    for key, flag in _TRAINED_WITH.items():
        if key in saved and key in ours and str(saved[key]) != str(ours[key]):
            diffs.append(f"it was trained with {flag} {saved[key]}, not {ours[key]}")
    cols_a, cols_b = saved.get("columns") or {}, ours.get("columns") or {}
    columns = [key for key in _FLAGS if key in cols_a and cols_a.get(key) != cols_b.get(key)]
    diffs += [f"it was trained with {_FLAGS[key]} {cols_a.get(key)!r}, not {cols_b.get(key)!r}" for key in columns]
    # read through another column, the data's digest (labels, contexts, batches) differs with it: the
    # column is the difference, not a changed file; another perturbation column or control label also
    # changes the split and the features built from the labels
    relabelled = bool({"pert_col", "control"} & set(columns))
    if "embed_key" in saved and saved.get("embed_key") != ours.get("embed_key"):
        show = lambda k: repr(k) if k else "none (gene space)"  # noqa: E731
        diffs.append(f"it was trained with --embed-key {show(saved.get('embed_key'))}, not {show(ours.get('embed_key'))}")
    fa, fb = saved.get("fingerprint") or {}, ours.get("fingerprint") or {}
    data_a, data_b = fa.get("data"), fb.get("data")
    if isinstance(data_a, dict) and isinstance(data_b, dict) and not (columns and data_a.get("file") == data_b.get("file")):
        diffs.append(data_difference(data_a, data_b))
    elif isinstance(data_a, list) and isinstance(data_b, list):
        names = saved.get("datasets") or [f"file {i + 1}" for i in range(len(data_a))]
        for name, a, b in zip(names, data_a, data_b):
            diffs.append(data_difference(a, b, f"data file {name!r}"))
    if "split" in fa and "split" in fb and not relabelled:
        diffs.append(_split_difference(fa["split"], fb["split"]))
    if "genes" in saved and "genes" in ours and list(saved["genes"]) != list(ours["genes"]):
        gone = [g for g in saved["genes"] if g not in set(ours["genes"])]
        detail = f"; not in this data: {preview(gone, n=3)}" if gone else " (in another order)"
        diffs.append(f"it was trained on {len(saved['genes'])} genes, this data has {len(ours['genes'])}{detail}")
    if not relabelled and "pert_vocab" in saved and "pert_vocab" in ours and list(saved["pert_vocab"]) != list(ours["pert_vocab"]):
        a, b = set(saved["pert_vocab"]), set(ours["pert_vocab"])
        parts = ([f"missing here: {preview(sorted(a - b), n=3)}"] if a - b else []) + ([f"new here: {preview(sorted(b - a), n=3)}"] if b - a else [])
        diffs.append(f"its perturbation features differ ({'; '.join(parts) or 'another order'})")
    elif not relabelled and "perturbations" in saved and "perturbations" in ours and list(saved["perturbations"]) != list(ours["perturbations"]):
        diffs.append("its perturbation labels differ (another perturbation column or labels)")
    pf_a, pf_b = saved.get("pert_features"), ours.get("pert_features")
    if pf_a is None:  # written before feature tables: one-hot over pert_vocab (compared above)
        pf_a = {"sources": ["onehot"], "digest": pf_b.get("digest") if pf_b and pf_b.get("sources") == ["onehot"] else None}
    if isinstance(pf_b, dict) and pf_a.get("digest") != pf_b.get("digest"):
        was, now = ", ".join(pf_a.get("sources", [])), ", ".join(pf_b.get("sources", []))
        if was != now:
            diffs.append(f"it was trained with --pert-features {was}, not {now}")
        elif not relabelled:
            diffs.append(f"its perturbation feature table ({was}) has other values now")
    exp_a, exp_b = saved.get("expression"), ours.get("expression")
    if isinstance(exp_a, dict) and isinstance(exp_b, dict):
        for name in exp_a:
            if name in exp_b and exp_a[name] != exp_b[name]:
                diffs.append(f"it read {name!r} as {exp_a[name]}, not {exp_b[name]} (--expression)")
    return [d for d in diffs if d]


def check_kind(start: str | os.PathLike, saved: dict, kind: str) -> None:
    """Refuse to resume a checkpoint (``saved``: its ``config.json``) of another model kind than ``kind``."""
    if checkpoint_kind(saved) != kind:
        raise VcellError(f"{start}: holds a {checkpoint_kind(saved).upper()} model; this run trains {kind.upper()}")


def check_resume(start: str | os.PathLike, saved: dict, ours: dict) -> None:
    """Refuse (one line, naming every difference) to resume ``start`` with a run that trains on something else.

    ``saved``: the checkpoint's ``config.json``; ``ours``: what this run would write. A checkpoint
    written before fingerprints existed resumes with a warning (only the fields it has are compared).
    """
    if "kind" in ours:  # before the differences, which would all follow from it
        check_kind(start, saved, checkpoint_kind(ours))
    diffs = resume_differences(saved, ours)
    if diffs:
        raise VcellError(f"cannot resume {start}: " + "; ".join(diffs) + "; resume with the same data, split, columns and "
                         "training options, or train into a new --out")
    if "fingerprint" not in saved:
        log.warning("%s was written by vcell %s, which did not record the data and split it was trained on; "
                    "resuming without checking them", start, saved.get("vcell_version", "(older)"))


def forget_logged_steps(logs: str | os.PathLike, step: int, current: str | os.PathLike | None = None) -> int:
    """Drop, from the ``metrics.csv`` of every earlier run in ``logs`` (not ``current``, the resumed
    run's own folder), the rows of steps after ``step``, the checkpoint a resumed run continues
    from: a run killed after its last checkpoint (SIGKILL, a lost node) logged steps that the resumed
    run trains and logs again, and the record held them twice. Returns the rows dropped."""
    dropped = 0
    current = Path(current).resolve() if current is not None else None
    for path in sorted(Path(logs).glob("version_*/metrics.csv")):
        if current is not None and path.parent.resolve() == current:
            continue
        try:
            table = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):  # a file cut short by the kill: kept as it is
            continue
        if "step" not in table.columns:
            continue
        later = table["step"] >= step  # the column is Lightning's zero-based step index: step S is row S - 1
        if later.any():
            with atomic_path(path) as tmp:
                table[~later].to_csv(tmp, index=False)
            dropped += int(later.sum())
    return dropped
