"""Which perturbations a command names: a fraction to draw, a list of labels, or a file of them
(:func:`read_perturbation_table`: with each one's number of cells, as the challenge lists them).

``--holdout-perturbations`` and ``--val-perturbations`` take ``FRACTION|LIST|FILE``
(:func:`parse_perturbations`); :mod:`vcell.data.splits` draws or checks the labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from vcell.errors import VcellError

#: Endings of a file of perturbation labels (``--holdout-perturbations FILE``).
LIST_FILES = (".csv", ".tsv", ".txt")


def read_label_file(path: str | os.PathLike, option: str = "--holdout-perturbations") -> list[str]:
    """Perturbation labels from a file: the first column of a CSV/TSV with a header (as the
    challenge's ``pert_counts.csv``), or one label per line of a ``.txt``; blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise VcellError(f"{option} {p}: file not found")
    try:
        if p.suffix.lower() == ".txt":
            labels = [line.strip() for line in p.read_text().splitlines()]
        else:
            table = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
            labels = [str(v).strip() for v in table.iloc[:, 0]] if table.shape[1] else []
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise VcellError(f"{option} {p}: not a readable list of labels ({str(exc).splitlines()[0]})") from None
    labels = [label for label in labels if label]
    if not labels:
        raise VcellError(f"{option} {p}: no perturbation label in the file")
    return list(dict.fromkeys(labels))


def parse_perturbations(text: str, option: str = "--holdout-perturbations") -> float | list[str]:
    """``FRACTION|LIST|FILE`` as the command line gives it: a fraction in (0, 1), comma-separated
    labels, or a file of labels (``.csv``/``.tsv`` with a header, first column; ``.txt``, one a line:
    :func:`read_label_file`).

    A value with a comma is always a list (``"0.5,"`` is the one label ``0.5``); without one, a
    number is a fraction, a name ending in ``.csv``/``.tsv``/``.txt`` a file, and anything else one label.

    Examples
    --------
    >>> parse_perturbations("0.3")
    0.3
    >>> parse_perturbations("PLK4, SGK1")
    ['PLK4', 'SGK1']
    """
    text = str(text).strip()
    if "," not in text and text.lower().endswith(LIST_FILES):
        return read_label_file(text, option)
    if "," in text or not text:
        labels = [t.strip() for t in text.split(",") if t.strip()]
        if not labels:
            raise VcellError(f"{option} {text!r}: give a fraction in (0, 1) or comma-separated perturbation labels")
        return list(dict.fromkeys(labels))
    try:
        fraction = float(text)
    except ValueError:
        return [text]
    if not 0 < fraction < 1:
        raise VcellError(f"{option} {text}: a fraction must be between 0 and 1 (exclusive); or give perturbation labels")
    return fraction


def read_perturbation_table(path: str | os.PathLike) -> dict[str, int | None]:
    """Perturbations to predict (first column of a CSV with a header, as the challenge's
    ``pert_counts.csv``) and, when there is a second column, their cell counts."""
    p = Path(path)
    if not p.is_file():
        raise VcellError(f"{p}: perturbation list not found")
    table = pd.read_csv(p, dtype=str, keep_default_na=False)
    if table.shape[1] == 0 or len(table) == 0:
        raise VcellError(f"{p}: the perturbation list is empty")
    out: dict[str, int | None] = {}
    for i, row in enumerate(table.itertuples(index=False), start=2):
        name = row[0]
        if name in out:
            raise VcellError(f"{p}: perturbation {name!r} is listed twice (line {i})")
        count = None
        if table.shape[1] > 1:
            try:
                count = int(row[1])
            except ValueError:
                raise VcellError(f"{p}: line {i}: cell count {row[1]!r} of {name!r} is not an integer") from None
        out[name] = count
    return out
