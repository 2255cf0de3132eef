"""Per-cell labels as integer codes, without building one Python string per cell.

Large datasets have millions of cells but only thousands of distinct labels; every per-cell
operation in the data layer works on these codes so memory stays flat as files grow.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd


def factorize(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (``-1`` for missing) and the sorted distinct labels, as strings.

    Categorical columns reuse their codes; unused categories are dropped. Labels are compared
    as strings, so ``1`` and ``"1"`` are the same label.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        cat = values.cat.remove_unused_categories()
        codes = np.asarray(cat.cat.codes, dtype=np.int32)
        names = np.asarray(cat.cat.categories.astype(str), dtype=object)
    else:
        codes, uniques = pd.factorize(values, sort=False, use_na_sentinel=True)
        codes = codes.astype(np.int32, copy=False)
        names = np.asarray(pd.Index(uniques).astype(str), dtype=object)
    # merge labels that are equal as strings, then sort, remapping codes once
    unique_names, merged = np.unique(names.astype(str), return_inverse=True)
    lookup = np.append(merged.astype(np.int32), -1)  # code -1 stays -1
    return lookup[codes], np.asarray(unique_names, dtype=object)


def blank_codes(names: np.ndarray) -> np.ndarray:
    """Codes of labels that are empty or whitespace (or the strings 'nan'/'None' from missing values)."""
    return np.flatnonzero([str(n).strip() in ("", "nan", "None") for n in names])


def names_list(value) -> list:
    """``value`` as a list of names: one name (a ``str``) is one name, ``None`` none, else each item.

    Examples
    --------
    >>> names_list("T98G"), names_list(None), names_list(("A", "B"))
    (['T98G'], [], ['A', 'B'])
    """
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def gene_name_column(var: pd.DataFrame, labels) -> tuple[str, set[str]] | None:
    """The first text column of ``var`` whose values name some of ``labels`` (gene symbols kept beside
    Ensembl IDs as var_names), and the labels it names; ``None`` if no column does.

    Digit-only labels are never counted (``'1'`` would match a chromosome column).
    """
    wanted = {str(lab) for lab in labels}
    for col in var.columns:
        if var[col].dtype.kind not in "OSU" and str(var[col].dtype) != "category":
            continue  # counts and flags are no gene names
        hits = {lab for lab in wanted & set(var[col].astype(str)) if not lab.isdigit()}
        if hits:
            return str(col), hits
    return None


def label_rng(seed: int, label, stream: int | None = None) -> np.random.Generator:
    """The generator of one label's draws (a perturbation's, a cell's), seeded by ``seed`` and the
    label's CRC-32, so a label's draws do not depend on the others drawn with it; ``stream`` gives
    the label another, independent stream (its counts beside its control cells)."""
    key = [int(seed), zlib.crc32(str(label).encode())]
    return np.random.default_rng(key if stream is None else [*key, int(stream)])
