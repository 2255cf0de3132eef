"""Perturbation features: the vector a model sees for a perturbation label, from gene tables.

A :class:`PertFeatures` is a target x dim table. A perturbation ``"A+B"`` is the **sum** of its
targets' rows (as a multi-hot vector is the sum of one-hots: effects of combined targets add up
to first order), a control is the zero vector. Where the table comes from is one string,
the same everywhere (``vcell train st --pert-features``, ``pert_features:`` in a
``vcell bench --model-config`` entry, ``pert_features=`` in Python):

- ``onehot``: one column per training target (the default); a model predicts only the targets
  it was trained on;
- ``FILE``: a gene table vcell reads (:meth:`~vcell.features.genes.GeneEmbeddings.load`:
  ``vcell genes embed`` ESM2 vectors, ``vcell genes from-data`` co-expression vectors,
  safetensors / parquet / pt tables). A model then predicts any target in the table, seen or not;
- ``onehot,FILE`` (several sources, comma-separated): a target's vector is the concatenation of
  its rows in each source, zeros where a source lacks it (so a seen target keeps its own one-hot
  column and an unseen one relies on the table).

Each table read from a file is scaled to mean row norm 1 (one-hot rows have norm 1), so
tables of any origin enter a model on the same scale; its all-zero rows (e.g. genes constant in the
cells a co-expression table was made from) are left out. A target in no source is an error naming
it, never a silent zero vector.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vcell.data.spec import split_combo
from vcell.errors import VcellError, did_you_mean, preview

log = logging.getLogger(__name__)

ONEHOT = "onehot"


def parse_sources(spec) -> list:
    """The sources named by a ``pert_features`` value: ``["onehot"]``, ``["FILE"]``, ``["onehot", "FILE"]``.

    Parameters
    ----------
    spec
        ``None`` or ``"onehot"`` (the default), a path, ``"onehot,FILE"``, a
        :class:`~vcell.features.genes.GeneEmbeddings` table, or a list of these.

    Examples
    --------
    >>> parse_sources("onehot, genes.safetensors")
    ['onehot', 'genes.safetensors']
    """
    if spec is None:
        return [ONEHOT]
    from vcell.features.genes import GeneEmbeddings

    items = [spec] if isinstance(spec, (str, os.PathLike, GeneEmbeddings)) else list(spec)
    out: list = []
    for item in items:
        if isinstance(item, GeneEmbeddings):
            out.append(item)
            continue
        parts = [str(item)] if isinstance(item, os.PathLike) else [p.strip() for p in str(item).split(",")]
        out += [p for p in parts if p]
    if not out:
        raise VcellError(f"pert_features {spec!r} names no source; use 'onehot', a gene table file or 'onehot,FILE'")
    names = [s for s in out if isinstance(s, str)]
    for i, s in enumerate(names):
        if s in names[:i]:
            raise VcellError(f"pert_features: source {s!r} is named twice")
        if s.lower() == ONEHOT and s != ONEHOT:
            raise VcellError(f"pert_features: write {ONEHOT!r} in lower case, got {s!r}")
    return out


def check_sources(spec, name: str | None = None, read: bool = True) -> None:
    """Refuse a bad ``pert_features`` value before any data is read (one line, starting with ``name``).

    Parameters
    ----------
    spec
        The value (see :func:`parse_sources`).
    name
        Who is asking (a model name), put at the start of the message.
    read
        Also read every table (the CLI does; a model being built checks each file's existence
        and kind only, and reads it when it is fitted).
    """
    from vcell.features.genes import TABLE_SUFFIXES, GeneEmbeddings

    where = f"{name}: " if name else ""
    try:
        sources = parse_sources(spec)
    except VcellError as exc:
        raise VcellError(f"{where}{exc}") from None
    except TypeError:
        raise VcellError(f"{where}pert_features must be 'onehot', a gene table file, 'onehot,FILE' or a GeneEmbeddings table, "
                         f"got {spec!r}") from None
    for source in sources:
        if not isinstance(source, str) or source == ONEHOT:
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            raise VcellError(f"{where}pert_features file {source!r} not found (give 'onehot', a gene table file or 'onehot,FILE')")
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise VcellError(f"{where}pert_features file {source!r} is not a gene table ({', '.join(TABLE_SUFFIXES)})")
        if read:
            GeneEmbeddings.load(path)


@dataclass
class PertFeatures:
    """A target x dim table of perturbation features (see the module docs).

    ``names[i]`` is the target whose vector is ``vectors[i]``; ``sources`` says where the columns
    came from (``"onehot"`` or a table's source), in column order, with ``widths`` columns each.
    """

    names: list[str]
    vectors: torch.Tensor
    sources: list[str]
    widths: list[int]

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.vectors = torch.as_tensor(self.vectors, dtype=torch.float32).contiguous()
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.names):
            raise VcellError(f"perturbation features: {len(self.names)} targets but a table of shape {tuple(self.vectors.shape)}")
        if sum(self.widths) != self.vectors.shape[1]:
            raise VcellError(f"perturbation features: source widths {self.widths} do not add up to dim {self.vectors.shape[1]}")
        if len(set(self.names)) != len(self.names):
            raise VcellError("perturbation features: a target appears twice in the table")
        self._row = {n: i for i, n in enumerate(self.names)}

    # construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, spec, targets: Sequence[str]) -> PertFeatures:
        """The features a model trained on ``targets`` uses.

        Parameters
        ----------
        spec
            A ``pert_features`` value (:func:`parse_sources`).
        targets
            The training targets (single genes): the one-hot columns, in this order.

        Returns
        -------
        PertFeatures
            One row per target known to any source: the training targets first, then the other
            targets of the tables in table order.
        """
        from vcell.features.genes import GeneEmbeddings

        sources = parse_sources(spec)
        targets = [str(t) for t in targets]
        if len(set(targets)) != len(targets):
            dup = next(t for i, t in enumerate(targets) if t in targets[:i])
            raise VcellError(f"perturbation features: training target {dup!r} is listed twice")
        blocks: list[tuple[list[str], torch.Tensor, str]] = []
        for s in sources:
            if s == ONEHOT:
                if not targets:
                    raise VcellError("pert_features 'onehot' needs at least one training target")
                blocks.append((targets, torch.eye(len(targets)), ONEHOT))
                continue
            table = s if isinstance(s, GeneEmbeddings) else GeneEmbeddings.load(s)
            label = table.source if isinstance(s, GeneEmbeddings) else f"{table.source} ({Path(s).name})"
            norms = table.vectors.norm(dim=1)
            scale = float(norms[norms > 0].mean()) if bool((norms > 0).any()) else 0.0
            if scale == 0.0:
                raise VcellError(f"{label}: every vector in the gene table is zero; it cannot tell targets apart")
            nonzero = (norms > 0).tolist()  # a zero row (a gene constant where the table was made) carries no information
            names = [n for n, k in zip(table.names, nonzero) if k]
            blocks.append((names, table.vectors[torch.tensor(nonzero)] / scale, label))
        names = list(dict.fromkeys([*targets, *(n for b in blocks for n in b[0])]))
        row = {n: i for i, n in enumerate(names)}
        widths = [int(b[1].shape[1]) for b in blocks]
        vectors = torch.zeros(len(names), sum(widths))
        col = 0
        for (bnames, bvec, _), w in zip(blocks, widths):
            vectors[torch.tensor([row[n] for n in bnames], dtype=torch.long), col:col + w] = bvec
            col += w
        have = {n for b in blocks for n in b[0]}
        if len(have) != len(names):  # training targets in no source have no row
            names = [n for n in names if n in have]
            vectors = vectors[[row[n] for n in names]]
        return cls(names=names, vectors=vectors, sources=[b[2] for b in blocks], widths=widths)

    # use -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Length of a perturbation vector."""
        return int(self.vectors.shape[1])

    @property
    def is_onehot(self) -> bool:
        """Whether the only source is the one-hot of the training targets."""
        return self.sources == [ONEHOT]

    def __contains__(self, target: str) -> bool:
        return str(target) in self._row

    def missing(self, labels: Iterable[str], control: str | Iterable[str] = ()) -> list[str]:
        """Targets of ``labels`` (control labels skipped) that have no vector, in order of appearance."""
        controls = {control} if isinstance(control, str) else set(control)
        out: dict[str, None] = {}
        for label in labels:
            if str(label) in controls:
                continue
            targets = split_combo(str(label))
            if not targets:
                out[str(label)] = None
            out.update((t, None) for t in targets if t not in self._row)
        return list(out)

    def check(self, labels: Iterable[str], control: str | Iterable[str] = (), what: str = "perturbation") -> None:
        """Raise one :class:`VcellError` line naming the first target of ``labels`` without a vector."""
        labels = list(labels)
        missing = self.missing(labels, control)
        if not missing:
            return
        first = missing[0]
        label = next(str(p) for p in labels if first in split_combo(str(p)) or str(p) == first)
        where = "the model's training targets (one-hot)" if self.is_onehot else \
            f"the perturbation feature table ({', '.join(self.sources)}; a gene with an all-zero vector there counts as absent)"
        hint = "; train with --pert-features FILE (pert_features=FILE; a gene table) to predict targets never seen perturbed" if self.is_onehot else ""
        more = f" ({len(missing)} such targets: {preview(missing)})" if len(missing) > 1 else ""
        raise VcellError(f"{what} {label!r}: target {first!r} is not in {where}{did_you_mean(first, self.names)}{more}{hint}")

    def encode(self, labels: Iterable[str], control: str | Iterable[str] = ()) -> torch.Tensor:
        """Vectors ``[len(labels), dim]``: a label's targets' rows summed; control labels give zeros.

        A target without a vector raises :class:`VcellError` naming it (:meth:`check`).
        """
        labels = [str(p) for p in labels]
        self.check(labels, control)
        controls = {control} if isinstance(control, str) else set(control)
        out = torch.zeros(len(labels), self.dim)
        for i, label in enumerate(labels):
            if label not in controls:
                out[i] = self.vectors[[self._row[t] for t in split_combo(label)]].sum(dim=0)
        return out

    def encode_known(self, labels: Sequence[str], control: str | Iterable[str] = ()) -> tuple[torch.Tensor, np.ndarray]:
        """Like :meth:`encode` but a label with a target lacking a vector gets a zero row instead
        of an error; the second value says which rows are real (for tables indexed by code,
        whose unusable rows must never be looked up)."""
        labels = [str(p) for p in labels]
        ok = np.array([not self.missing([p], control) for p in labels], dtype=bool)
        out = torch.zeros(len(labels), self.dim)
        if ok.any():
            out[torch.from_numpy(ok)] = self.encode([p for p, k in zip(labels, ok) if k], control)
        return out, ok

    # storage ---------------------------------------------------------------------------------
    @property
    def digest(self) -> str:
        """SHA-256 of the names and vectors: two tables with the same digest give the same vectors."""
        import hashlib

        h = hashlib.sha256("\n".join(self.names).encode())
        h.update(self.vectors.numpy().tobytes())
        return h.hexdigest()

    def to_meta(self) -> dict:
        """What ``config.json`` records (the vectors go in the weights, see :meth:`from_meta`)."""
        return {"sources": list(self.sources), "widths": list(self.widths), "combine": "sum", "digest": self.digest,
                "names": list(self.names)}

    @classmethod
    def from_meta(cls, meta: dict, vectors: torch.Tensor) -> PertFeatures:
        """The inverse of :meth:`to_meta` given the stored table."""
        try:
            return cls(names=meta["names"], vectors=vectors, sources=list(meta["sources"]), widths=[int(w) for w in meta["widths"]])
        except (KeyError, TypeError) as exc:
            raise VcellError(f"config.json: malformed 'pert_features' entry ({exc})") from None

    @classmethod
    def onehot(cls, targets: Sequence[str]) -> PertFeatures:
        """One-hot features over ``targets``."""
        return cls.build(ONEHOT, targets)


def untrained(labels: Sequence[str], trained: Sequence[str], control: str) -> list[str]:
    """The labels (the control aside) with a target that none of the ``trained`` labels has: under
    one-hot features, their columns are never taught (a validation-only target's, say)."""
    learned = {t for p in trained for t in split_combo(str(p))}
    return [str(p) for p in labels if str(p) != control and not set(split_combo(str(p))) <= learned]


def warn_untrained_validation(features: PertFeatures, labels: Sequence[str], trained: Sequence[str], control: str) -> None:
    """Warn that one-hot features give the validation-only targets columns that never learn."""
    found = sorted(set(untrained(labels, trained, control))) if features.is_onehot else []
    if found:
        log.warning("one-hot features: %d validation perturbation(s) (%s) have targets no training cell has, whose columns "
                    "never learn: their val_loss (and the best/ checkpoint it picks) measures untrained columns; validate "
                    "on held-out contexts, or give --pert-features FILE (a gene table)", len(found), preview(found, 3))
