"""The Python API names a bad argument in one line (a notebook user's walk met tracebacks and silence)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import vcell
from vcell.errors import VcellError


@pytest.mark.parametrize("kwargs, words", [
    ({"pert_col": 3}, "DataSpec pert_col=3: a column name or label is text"),
    ({"control": None}, "DataSpec control=None"),
    ({"expression": "log"}, "DataSpec expression='log': use 'counts', 'log1p' or None"),
])
def test_dataspec_checks_its_fields(kwargs, words):
    with pytest.raises(VcellError, match=words.replace("(", r"\(").replace(")", r"\)")):
        vcell.DataSpec(**kwargs)
    assert vcell.DataSpec(context_col=None, batch_col=None).context_col is None


@pytest.mark.parametrize("kwargs, words", [
    ({"max_steps": -3}, "st: --max-steps (max_steps=) must be an integer >= 1, got -3"),
    ({"lr": "x"}, "st: training option: lr must be a number"),
    ({"checkpoint": "first"}, "st: checkpoint must be 'best' or 'last'"),
])
def test_st_options_are_named_as_the_baselines_name_theirs(kwargs, words):
    with pytest.raises(VcellError, match=re.escape(words)):
        vcell.make_model("st", **kwargs)


def test_to_counts_refuses_counts(tmp_path):
    """A counts prediction given to to_counts: named (it overflowed in expm1 and said 'finite and >= 0')."""
    a = vcell.simulate_perturbseq(n_genes=20, n_contexts=1, n_perturbations=2, n_combinations=0,
                                  cells_per_perturbation=5, n_controls=5, seed=0)
    a.X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32) * 50
    with pytest.raises(VcellError, match="is not log1p-normalised .*counts already"):
        vcell.to_counts(a, depth=100)
    a.uns["vcell"] = {"output": "counts"}
    with pytest.raises(VcellError, match=r"counts already \(uns\['vcell'\]\['output'\] == 'counts'\)"):
        vcell.to_counts(a, depth=100)
