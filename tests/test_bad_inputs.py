"""Bad input and ordinary faults, over every command: one table, one set of promises (issue #16).

Each row builds its inputs (small simulated AnnData, corrupt files, wrong columns, an output that
must not be replaced, ...), runs the real ``vcell`` command line in a subprocess and checks what a
user is promised on any refusal:

- exit code 2 and exactly one line starting with ``error:`` on stderr, naming the culprit (the file,
  column, key or value given in the row), and no ``Traceback`` anywhere;
- the output folder exactly as before: nothing under the final name, no temporary file left
  (``.NAME.*.tmp``), an output that existed before byte-identical;
- every input byte-identical, and nothing written anywhere else (the working folder).

Rows cover the faults issue #16 found (NaN embeddings, tracebacks for corrupt checkpoints or a
mistyped config, misleading messages) and those that were already handled, so that all stay so.
The rows' commands run in one module fixture, in one real CLI process per core that runs its
share of the rows one after the other through ``vcell.cli.main`` (each row in its own working
folder, with its own exit status and output); each row is then its own test. The expensive inputs (a tiny trained ST and SE model) are made once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from vcell.data.simulate import simulate_perturbseq

from conftest import error_line, run_cli, run_cli_batch

TINY_ST = {"width": 16, "n_layers": 1, "n_heads": 2, "encoder_layers": 1}
TINY_SE = {"d_model": 16, "n_layers": 1, "n_heads": 2, "sentence_len": 18, "n_mask": 8}
CPU = ["--accelerator", "cpu"]


# ------------------------------------------------------------------------------------ shared inputs


def _counts() -> ad.AnnData:
    adata = simulate_perturbseq(n_genes=30, n_contexts=2, n_perturbations=4, n_combinations=0,
                                cells_per_perturbation=10, n_controls=20, n_programs=4, seed=0)
    adata.X = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float32)
    return adata


def _log1p(counts: ad.AnnData) -> ad.AnnData:
    adata = counts.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.uns["vcell"] = {"expression": "log1p"}
    return adata


@dataclass
class World:
    """Inputs shared by every row (never modified: checked by hash before and after)."""

    root: Path
    counts: Path  # raw counts, 2 contexts (ctx_A, ctx_B), 4 perturbations
    log: Path  # the same, log1p
    real: Path  # the log1p cells of ctx_B (a "truth" for vcell eval)
    agg: Path  # a minimal agg_results.csv
    st: Path  # a `vcell train st` run folder (ctx_B held out)
    se: Path  # a `vcell train se` run folder
    perts: list[str]

    def adata(self, which: str = "log") -> ad.AnnData:
        """A fresh in-memory copy of a shared file."""
        return ad.read_h5ad(getattr(self, which))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    counts = _counts()
    counts.write_h5ad(root / "counts.h5ad")
    log = _log1p(counts)
    log.write_h5ad(root / "log.h5ad")
    log[(log.obs["cell_type"] == "ctx_B").to_numpy()].copy().write_h5ad(root / "real.h5ad")
    (root / "agg.csv").write_text("statistic,mae,overlap_at_N\nmean,0.1,0.5\nstd,0.01,0.1\nmedian,0.1,0.5\n")
    (root / "st.json").write_text(json.dumps(TINY_ST))
    (root / "se.json").write_text(json.dumps(TINY_SE))
    commands = [
        ["genes", "from-data", "--data", root / "log.h5ad", "--out", root / "genes.safetensors", "--dim", "8"],
        ["train", "st", "--data", root / "log.h5ad", "--holdout-context", "ctx_B", "--config", root / "st.json",
         "--max-steps", "2", "--set-size", "8", "--batch-size", "2", *CPU, "--out", root / "st", "--seed", "0"],
        ["train", "se", "--data", root / "counts.h5ad", "--preset", "tiny", "--config", root / "se.json",
         "--max-steps", "2", "--batch-size", "8", "--gene-dim", "8", *CPU, "--out", root / "se", "--seed", "0"],
    ]
    with ThreadPoolExecutor(2) as pool:
        for proc in pool.map(lambda args: run_cli(*args, cwd=root), commands):
            assert proc.returncode == 0, proc.stderr[-3000:]
    perts = sorted(set(log.obs["target_gene"].astype(str)) - {"non-targeting"})
    return World(root, root / "counts.h5ad", root / "log.h5ad", root / "real.h5ad", root / "agg.csv",
                 root / "st", root / "se", perts)


# ------------------------------------------------------------------------------------------- a row


@dataclass
class Ctx:
    """What a row's functions see: the shared inputs, and this row's input and output folders."""

    w: World
    inp: Path
    out: Path

    def h5ad(self, name: str, edit: Callable[[ad.AnnData], ad.AnnData | None], base: str = "log") -> Path:
        """Write ``edit(copy of a shared file)`` to ``inp/name``; returns the path."""
        adata = self.w.adata(base)
        adata = edit(adata) or adata
        path = self.inp / name
        adata.write_h5ad(path)
        return path

    def text(self, name: str, content: str | bytes) -> Path:
        """Write a file into ``inp``."""
        path = self.inp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def copy_run(self, which: str, name: str) -> Path:
        """A copy of a shared run folder in ``inp`` (to damage)."""
        return Path(shutil.copytree(getattr(self.w, which), self.inp / name))


@dataclass
class Case:
    """A command that must refuse: its arguments, and the substrings of its one ``error:`` line."""

    args: Callable[[Ctx], list]
    expect: tuple[str, ...]
    setup: Callable[[Ctx], None] | None = field(default=None)


# ------------------------------------------------------------------------------- building bad files


def _set(r: int, c: int, v: float):
    def edit(a: ad.AnnData) -> None:
        X = a.X.toarray() if sp.issparse(a.X) else np.array(a.X)
        X[r, c] = v
        a.X = X

    return edit


def _rename_obs(**names):
    def edit(a: ad.AnnData) -> None:
        a.obs = a.obs.rename(columns=names)

    return edit


def _no_controls_in(context: str):
    def edit(a: ad.AnnData) -> ad.AnnData:
        keep = ~((a.obs["cell_type"] == context) & (a.obs["target_gene"] == "non-targeting")).to_numpy()
        return a[keep].copy()

    return edit


def _relabel(old: str, new: str):
    def edit(a: ad.AnnData) -> None:
        labels = a.obs["target_gene"].astype(str).to_numpy().copy()
        labels[labels == old] = new
        a.obs["target_gene"] = labels

    return edit


def _dup_genes(a: ad.AnnData) -> None:
    names = a.var_names.to_numpy().copy()
    names[1] = names[0]
    a.var_names = names


def _csr_edited(ctx: Ctx, name: str, edit: Callable, base: str = "log") -> Path:
    """A shared file stored as CSR, its ``data``/``indices``/``indptr`` then rewritten by ``edit`` (a
    corrupt matrix that anndata and scipy read without a word)."""
    import h5py

    path = ctx.h5ad(name, lambda a: setattr(a, "X", sp.csr_matrix(a.X)), base)
    with h5py.File(path, "r+") as f:
        parts = [f["X"][k][()] for k in ("data", "indices", "indptr")]
        for key, value in zip(("data", "indices", "indptr"), edit(*parts)):
            del f["X"][key]
            f["X"].create_dataset(key, data=value)
    return path


def _gene_out_of_range(d, i, p):
    i = i.copy()
    i[5] = 10_000
    return d, i, p


def _rows_backwards(d, i, p):
    p = p.copy()
    p[3], p[4] = p[4], p[3]
    return d, i, p


def _entry_repeated(d, i, p):  # cell 0's first gene stored twice, each half of its value
    return np.insert(d, 0, d[0] / 2), np.insert(i, 0, i[0]), np.concatenate([[0], p[1:] + 1])


def _shape_attr(rows: int, cols: int):
    def edit(path: Path) -> Path:
        import h5py

        with h5py.File(path, "r+") as f:
            f["X"].attrs["shape"] = (rows, cols)
        return path

    return edit


def _blank_gene(a: ad.AnnData) -> None:
    names = a.var_names.to_numpy().copy()
    names[2] = ""
    a.var_names = names


def _shape_attr_scalar(path: Path) -> Path:
    import h5py

    with h5py.File(path, "r+") as f:
        f["X"].attrs["shape"] = 7
    return path


def _truncated(ctx: Ctx, name: str) -> Path:
    """A real .h5ad cut after 3 kB: a valid HDF5 signature, a broken file."""
    return ctx.text(name, ctx.w.log.read_bytes()[:3000])


def _damage(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _pre(ctx: Ctx, name: str, content: str = "an earlier result\n") -> Path:
    """An output that exists already (it must survive, byte-identical)."""
    path = ctx.out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def _st_args(ctx: Ctx, data: Path, *extra) -> list:
    return ["train", "st", "--data", data, "--holdout-context", "ctx_B", "--config", ctx.w.root / "st.json",
            "--max-steps", "2", "--set-size", "8", "--batch-size", "2", *CPU, "--out", ctx.out / "run", *extra]


def _se_args(ctx: Ctx, data: Path, *extra) -> list:
    return ["train", "se", "--data", data, "--preset", "tiny", "--config", ctx.w.root / "se.json", "--max-steps", "2",
            "--batch-size", "8", "--gene-dim", "8", *CPU, "--out", ctx.out / "run", *extra]


def _predict(ctx: Ctx, model, data=None, *extra) -> list:
    return ["predict", "--model", model, "--data", data or ctx.w.log, "--context", "ctx_B", "--out", ctx.out / "pred.h5ad", *extra]


def _embed(ctx: Ctx, model, data, *extra) -> list:
    return ["embed", "--model", model, "--data", data, "--out", ctx.out / "emb.h5ad", *extra]


def _eval(ctx: Ctx, pred, real=None, *extra) -> list:
    return ["eval", "run", "--pred", pred, "--real", real or ctx.w.real, "--profile", "minimal", "--out", ctx.out / "ev", *extra]


def _eval26(ctx: Ctx, pred, real, *extra) -> list:
    return ["eval", "run", "--profile", "vcc2026", "--pred", pred, "--real", real, "--out", ctx.out / "ev", *extra]


def _bench(ctx: Ctx, data, *extra) -> list:
    return ["bench", "--data", data, "--holdout-context", "ctx_B", "--models", "cell_mean", "--no-report",
            "--out", ctx.out / "bench", *extra]


def _from_data(ctx: Ctx, data, *extra) -> list:
    return ["genes", "from-data", "--data", data, "--out", ctx.out / "genes.safetensors", "--dim", "4", *extra]


def _yaml(ctx: Ctx, name: str, text: str) -> Path:
    return ctx.text(name, text)


# ------------------------------------------------------------------------------------------ the table

NAN, NEG = _set(3, 4, np.nan), _set(3, 4, -2.0)

CASES: dict[str, Case] = {
    # ---- vcell data check: "could not run" is exit 2 (problems found in a file is exit 1: below)
    "check_missing_file": Case(lambda c: ["data", "check", c.inp / "nope.h5ad"], ("nope.h5ad: file not found",)),
    "check_text_file": Case(lambda c: ["data", "check", c.text("notes.h5ad", "not an h5ad\n")], ("notes.h5ad: unreadable",)),
    "check_truncated_h5ad": Case(lambda c: ["data", "check", _truncated(c, "cut.h5ad")], ("cut.h5ad: unreadable",)),
    "check_directory": Case(lambda c: ["data", "check", c.inp], ("is a directory",)),
    "check_bad_expression_value": Case(lambda c: ["data", "check", c.w.log, "--expression", "logs"], ("--expression 'logs'",)),
    # ---- vcell data preprocess
    "preprocess_nan": Case(lambda c: ["data", "preprocess", c.h5ad("nan.h5ad", NAN, "counts"), c.out / "pre.h5ad"],
                           ("nan.h5ad", "NaN or infinite", "cell000003")),
    "preprocess_negative": Case(lambda c: ["data", "preprocess", c.h5ad("neg.h5ad", NEG, "counts"), c.out / "pre.h5ad"],
                                ("neg.h5ad", "negative values", "-2")),
    "preprocess_missing_column": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad", "--pert-col", "target_genes"],
                                      ("counts.h5ad", "'target_genes' not found", "did you mean 'target_gene'")),
    "preprocess_columns_named_otherwise": Case(lambda c: ["data", "preprocess", c.h5ad("p.h5ad", _rename_obs(target_gene="perturbation"), "counts"),
                                                          c.out / "pre.h5ad"], ("p.h5ad", "'target_gene' not found", "did you mean 'perturbation'")),
    "preprocess_control_absent": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad", "--control", "NT"],
                                      ("control label 'NT' not found",)),
    "split_control_spelled_otherwise": Case(  # the value list is cut: the control-like label is named
        lambda c: ["data", "split", c.h5ad("nt.h5ad", _relabel("non-targeting", "NTC"), "log"), "--holdout-context", "ctx_B"],
        ("nt.h5ad", "'NTC' reads like a control label: pass --control 'NTC'?")),
    "preprocess_context_without_controls": Case(
        lambda c: ["data", "preprocess", c.h5ad("noctrl.h5ad", _no_controls_in("ctx_B"), "counts"), c.out / "pre.h5ad"],
        ("noctrl.h5ad", "context 'ctx_B'", "--allow-missing-controls")),
    "preprocess_counts_declared_on_log1p": Case(lambda c: ["data", "preprocess", c.w.log, c.out / "pre.h5ad", "--expression", "counts"],
                                                ("log.h5ad", "--expression counts but X has non-integer values")),
    "preprocess_log1p_declared_on_counts": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad", "--expression", "log1p"],
                                                ("counts.h5ad", "--expression log1p but every value is an integer")),
    "preprocess_duplicated_genes": Case(lambda c: ["data", "preprocess", c.h5ad("dupg.h5ad", _dup_genes, "counts"), c.out / "pre.h5ad"],
                                        ("dupg.h5ad", "duplicated gene names")),
    "preprocess_out_is_input": Case(lambda c: ["data", "preprocess", c.h5ad("same.h5ad", lambda a: None, "counts"), c.inp / "same.h5ad"],
                                    ("same.h5ad", "is the input file")),
    "preprocess_out_exists": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad"], ("pre.h5ad", "--overwrite"),
                                  setup=lambda c: _pre(c, "pre.h5ad")),
    "preprocess_out_parent_is_file": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "afile" / "pre.h5ad"],
                                          ("afile", "not a folder"), setup=lambda c: _pre(c, "afile")),
    "preprocess_out_on_a_file_system_without_files": Case(lambda c: ["data", "preprocess", c.w.counts, "/proc/pre.h5ad"],
                                                          ("/proc/pre.h5ad", "cannot write there")),  # root: probed
    "preprocess_genes_file_missing": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad", "--genes", c.inp / "genes.txt"],
                                          ("genes.txt",)),
    "preprocess_genes_file_binary": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad", "--genes",
                                                    c.text("genes.txt", b"\xfe\xff\x00binary")], ("genes.txt", "unreadable gene list")),
    "preprocess_zero_hvgs": Case(lambda c: ["data", "preprocess", c.w.counts, c.out / "pre.h5ad", "--n-top-genes", "0"], ("--n-top-genes", "0")),
    # ---- vcell data split
    "split_neither_split_nor_holdout": Case(lambda c: ["data", "split", c.w.log], ("--split", "--holdout-context")),
    "split_unknown_context": Case(lambda c: ["data", "split", c.w.log, "--holdout-context", "ctx_Z"], ("ctx_Z",)),
    "split_toml_syntax": Case(lambda c: ["data", "split", c.w.log, "--split", c.text("bad.toml", "[training\nx = 1\n")], ("bad.toml",)),
    "split_misspelled_perturbation": Case(
        lambda c: ["data", "split", c.w.log, "--split", c.text(
            "fs.toml", f'[datasets]\nsynthetic = "{c.w.log}"\n[training]\nsynthetic = "train"\n[fewshot."synthetic.ctx_B"]\n'
            f'test = ["{c.w.perts[0]}", "{c.w.perts[0]}x"]\n')],
        ("fs.toml", "x' has no cells", "did you mean")),
    "split_out_exists": Case(lambda c: ["data", "split", c.w.log, "--holdout-context", "ctx_B", "--out", c.out / "split.toml"],
                             ("split.toml", "--overwrite"), setup=lambda c: _pre(c, "split.toml")),
    "split_out_is_folder": Case(lambda c: ["data", "split", c.w.log, "--holdout-context", "ctx_B", "--out", c.out / "dir"],
                                ("dir", "is a folder"), setup=lambda c: (c.out / "dir").mkdir()),
    "split_nan": Case(lambda c: ["data", "split", c.h5ad("nan.h5ad", NAN), "--holdout-context", "ctx_B"], ("nan.h5ad", "NaN")),
    # ---- vcell data simulate / list
    "simulate_out_exists": Case(lambda c: ["data", "simulate", c.out / "sim.h5ad", "--n-genes", "10"], ("sim.h5ad", "--overwrite"),
                                setup=lambda c: _pre(c, "sim.h5ad")),
    "simulate_zero_genes": Case(lambda c: ["data", "simulate", c.out / "sim.h5ad", "--n-genes", "0"], ("n_genes", "0")),
    "simulate_out_parent_is_file": Case(lambda c: ["data", "simulate", c.out / "afile" / "sim.h5ad"], ("afile", "not a folder"),
                                        setup=lambda c: _pre(c, "afile")),
    "list_registry_missing": Case(lambda c: ["data", "list", "--registry", c.inp / "reg.toml"], ("reg.toml", "not found")),
    "list_registry_syntax": Case(lambda c: ["data", "list", "--registry", c.text("reg.toml", "[datasets\nfoo = 1\n")], ("reg.toml", "line 1")),
    # ---- vcell eval run
    "eval_2026_option_on_2025_profile": Case(lambda c: _eval(c, c.w.real, None, "--no-target-genes"),
                                             ("--no-target-genes applies to the vcc2026 profile only",)),
    "eval_context_col_absent_2025": Case(lambda c: _eval(c, c.w.real, None, "--context-col", "celltype"),
                                         ("context column 'celltype' not found", "did you mean 'cell_type'")),
    "baseline_context_col_on_2025_profile": Case(
        lambda c: ["eval", "baseline", "--real", c.w.log, "--out", c.out / "b.h5ad", "--context-col", "cell_type"],
        ("--context-col applies to the vcc2026 profile only",)),
    "eval_prep_2025_option_on_2026_profile": Case(
        lambda c: ["eval", "prep", "--profile", "vcc2026", "--pred", c.w.real, "--genes", c.text("g.csv", "G1\n"),
                   "--max-cells", "10", "--out", c.out / "sub.h5ad"], ("--max-cells applies to the 2025 (vcc) profile only",)),
    "eval_nan_pred": Case(lambda c: _eval(c, c.h5ad("nan.h5ad", NAN, "real")), ("nan.h5ad", "NaN or infinite")),
    "eval_negative_pred": Case(lambda c: _eval(c, c.h5ad("neg.h5ad", NEG, "real")), ("neg.h5ad", "negative values")),
    "eval_genes_differ": Case(lambda c: _eval(c, c.h5ad("fewer.h5ad", lambda a: a[:, 3:].copy(), "real")), ("fewer.h5ad", "genes differ", "missing")),
    "eval_misspelled_perturbation": Case(lambda c: _eval(c, c.h5ad("typo.h5ad", _relabel(c.w.perts[0], c.w.perts[0] + "x"), "real")),
                                         ("typo.h5ad", "x'", "did you mean", "missing from the prediction")),
    "eval_missing_pert_col": Case(lambda c: _eval(c, c.h5ad("cols.h5ad", _rename_obs(target_gene="gene"), "real")),
                                  ("cols.h5ad", "'target_gene' not found", "columns: gene")),
    "eval_input_type_alias_counts_as_log1p": Case(
        lambda c: _eval(c, c.h5ad("cnt.h5ad", lambda a: a[(a.obs["cell_type"] == "ctx_B").to_numpy()].copy(), "counts"), None,
                        "--input-type", "log1p"),
        ("--input-type log1p but every value is an integer",)),
    "eval_expression_bad_value": Case(lambda c: _eval(c, c.w.real, None, "--expression", "logs"), ("--expression 'logs'",)),
    "eval_out_is_file": Case(lambda c: ["eval", "run", "--pred", c.w.real, "--real", c.w.real, "--out", c.out / "ev"], ("ev", "is a file"),
                             setup=lambda c: _pre(c, "ev")),
    "eval_out_holds_results": Case(lambda c: _eval(c, c.w.real), ("ev", "--overwrite"),
                                   setup=lambda c: _pre(c, "ev/agg_results.csv", "statistic,mae\nmean,0\n")),
    "eval_missing_pred": Case(lambda c: _eval(c, c.inp / "pred.h5ad"), ("pred.h5ad: file not found",)),
    "eval_corrupt_pred": Case(lambda c: _eval(c, _truncated(c, "cut.h5ad")), ("cut.h5ad: unreadable",)),
    "eval_unknown_profile": Case(lambda c: ["eval", "run", "--pred", c.w.real, "--real", c.w.real, "--profile", "vcx", "--out", c.out / "ev"],
                                 ("'vcx'",)),
    "eval_unknown_skip_metric": Case(lambda c: _eval(c, c.w.real, None, "--skip-metrics", "mea"), ("--skip-metrics 'mea'", "did you mean", "'mae'")),
    # ---- vcell eval baseline
    "baseline_default_columns_missing": Case(
        lambda c: ["eval", "baseline", "--real", c.h5ad("cols.h5ad", _rename_obs(target_gene="gene", cell_type="ct")), "--out", c.out / "b.h5ad"],
        ("cols.h5ad", "'target_gene' not found", "gene, ct")),
    "baseline_control_absent": Case(lambda c: ["eval", "baseline", "--real", c.w.log, "--out", c.out / "b.h5ad", "--control", "NT"],
                                    ("log.h5ad", "'NT' not found", "non-targeting")),
    "baseline_counts_not_csv": Case(lambda c: ["eval", "baseline", "--real", c.w.log, "--out", c.out / "b.h5ad",
                                               "--counts", c.text("n.csv", b"\x89HDF\r\n\x1a\n\xff\xfe")], ("n.csv", "not a CSV")),
    "baseline_counts_not_numbers": Case(lambda c: ["eval", "baseline", "--real", c.w.log, "--out", c.out / "b.h5ad",
                                                   "--counts", c.text("n.csv", f"target_gene,n_cells\n{c.w.perts[0]},many\n")],
                                        ("n.csv", "'many'")),
    "baseline_nan": Case(lambda c: ["eval", "baseline", "--real", c.h5ad("nan.h5ad", NAN), "--out", c.out / "b.h5ad"], ("nan.h5ad", "NaN")),
    "baseline_out_exists": Case(lambda c: ["eval", "baseline", "--real", c.w.log, "--out", c.out / "b.h5ad"], ("b.h5ad", "--overwrite"),
                                setup=lambda c: _pre(c, "b.h5ad")),
    # ---- vcell eval score
    "score_binary_file": Case(lambda c: ["eval", "score", "--user", c.w.log, "--baseline", c.w.agg], ("log.h5ad", "not a CSV")),
    "score_results_not_agg": Case(lambda c: ["eval", "score", "--user", c.text("results.csv", "perturbation,mae\nA,0.1\n"), "--baseline", c.w.agg],
                                  ("results.csv", "no 'statistic' column")),
    "score_not_numbers": Case(lambda c: ["eval", "score", "--user", c.text("u.csv", "statistic,mae,overlap_at_N\nmean,abc,0.5\n"),
                                         "--baseline", c.w.agg], ("u.csv", "'mae'", "'abc'")),
    "score_missing_file": Case(lambda c: ["eval", "score", "--user", c.inp / "u.csv", "--baseline", c.w.agg], ("u.csv: file not found",)),
    "score_out_exists": Case(lambda c: ["eval", "score", "--user", c.w.agg, "--baseline", c.w.agg, "--out", c.out / "s.csv"],
                             ("s.csv", "--overwrite"), setup=lambda c: _pre(c, "s.csv")),
    "score_folder_given": Case(lambda c: ["eval", "score", "--user", c.inp, "--baseline", c.w.agg], ("is a folder", "agg_results.csv")),
    # ---- vcell eval prep
    "prep_genes_missing": Case(lambda c: ["eval", "prep", "--pred", c.w.real, "--genes", c.inp / "genes.txt", "--out", c.out / "s.vcc"],
                               ("genes.txt", "not found")),
    "prep_nan_pred": Case(lambda c: ["eval", "prep", "--pred", c.h5ad("nan.h5ad", NAN, "real"), "--genes",
                                     c.text("genes.txt", "\n".join(c.w.adata("real").var_names) + "\n"), "--expected-n-genes", "-1",
                                     "--out", c.out / "s.vcc"], ("nan.h5ad", "NaN")),
    "prep_out_exists": Case(lambda c: ["eval", "prep", "--pred", c.w.real, "--genes", c.text("genes.txt", "\n".join(c.w.adata("real").var_names)),
                                       "--expected-n-genes", "-1", "--out", c.out / "s.vcc"], ("s.vcc", "--overwrite"),
                            setup=lambda c: _pre(c, "s.vcc")),
    "prep_max_cells_zero": Case(lambda c: ["eval", "prep", "--pred", c.w.real, "--genes", c.text("genes.txt", "\n".join(c.w.adata("real").var_names)),
                                           "--expected-n-genes", "-1", "--max-cells", "0", "--out", c.out / "s.vcc"],
                                ("real.h5ad", "cap of 0")),  # 0 meant no cap, as -1 does
    # ---- vcell genes from-data
    "from_data_nan": Case(lambda c: _from_data(c, c.h5ad("nan.h5ad", NAN)), ("nan.h5ad", "NaN or infinite")),
    "from_data_counts_declared_on_log1p": Case(lambda c: _from_data(c, c.w.log, "--expression", "counts"),
                                               ("log.h5ad", "--expression counts but X has non-integer values")),
    "from_data_no_controls": Case(lambda c: _from_data(c, c.w.log, "--control", "NT"), ("log.h5ad", "'NT'")),
    "from_data_missing_pert_col": Case(lambda c: _from_data(c, c.w.log, "--pert-col", "gene"), ("log.h5ad", "'gene'")),
    "from_data_out_exists": Case(lambda c: _from_data(c, c.w.log), ("genes.safetensors", "--overwrite"),
                                 setup=lambda c: _pre(c, "genes.safetensors")),
    # ---- vcell train st
    "st_config_wrong_type": Case(lambda c: _st_args(c, c.w.log, "--config", _yaml(c, "c.yaml", 'width: "a"\n')),
                                 ("c.yaml", "width", "'a'")),
    "st_config_yaml_syntax": Case(lambda c: _st_args(c, c.w.log, "--config", _yaml(c, "c.yaml", "width: 32\n  n_layers: [1\n")),
                                  ("c.yaml", "line 2")),
    "st_config_unknown_field": Case(lambda c: _st_args(c, c.w.log, "--config", _yaml(c, "c.yaml", "widht: 32\n")), ("c.yaml", "widht")),
    "st_missing_controls_advice": Case(lambda c: _st_args(c, c.h5ad("noctrl.h5ad", _no_controls_in("ctx_A"))),
                                       ("noctrl.h5ad", "ctx_A", "--allow-missing-controls")),
    # the advice works: the option is accepted (this split then has no training cells left)
    "st_allow_missing_controls_accepted": Case(lambda c: _st_args(c, c.h5ad("noctrl.h5ad", _no_controls_in("ctx_A")), "--allow-missing-controls"),
                                               ("no perturbed cell to train on", "without control cells")),
    "st_counts_input": Case(lambda c: _st_args(c, c.w.counts), ("counts.h5ad", "raw counts")),
    "st_nan_input": Case(lambda c: _st_args(c, c.h5ad("nan.h5ad", NAN)), ("nan.h5ad", "NaN")),
    "st_resume_nothing": Case(lambda c: _st_args(c, c.w.log, "--resume"), ("run", "nothing to resume")),
    "st_resume_corrupt_weights": Case(lambda c: _st_args(c, c.w.log, "--resume", "--max-steps", "4"), ("weights.safetensors", "truncated or corrupt"),
                                      setup=lambda c: _damage(Path(shutil.copytree(c.w.st, c.out / "run")) / "last" / "weights.safetensors")),
    "st_out_holds_trained_run": Case(lambda c: _st_args(c, c.w.log), ("run", "--overwrite"),
                                     setup=lambda c: shutil.copytree(c.w.st, c.out / "run")),
    "st_max_steps_zero": Case(lambda c: _st_args(c, c.w.log, "--max-steps", "0"), ("--max-steps (max_steps=)", "0")),
    "st_bad_precision": Case(lambda c: _st_args(c, c.w.log, "--precision", "64"), ("--precision '64'",)),
    # ---- vcell train se
    "se_negative": Case(lambda c: _se_args(c, c.h5ad("neg.h5ad", NEG, "counts")), ("neg.h5ad", "negative values")),
    "se_nan_log1p": Case(lambda c: _se_args(c, c.h5ad("nan.h5ad", NAN)), ("nan.h5ad", "NaN or infinite")),
    "se_nan_with_gene_table": Case(lambda c: _se_args(c, c.h5ad("nan.h5ad", NAN), "--genes", c.w.root / "genes.safetensors"),
                                   ("nan.h5ad", "NaN or infinite")),
    "se_config_wrong_type": Case(lambda c: _se_args(c, c.w.counts, "--config", _yaml(c, "c.yaml", "d_model: sixteen\n")),
                                 ("c.yaml", "d_model", "'sixteen'")),
    "se_config_yaml_syntax": Case(lambda c: _se_args(c, c.w.counts, "--config", _yaml(c, "c.yaml", "d_model: [16\n")), ("c.yaml", "line")),
    "se_missing_data": Case(lambda c: _se_args(c, c.inp / "nope.h5ad"), ("nope.h5ad", "not found")),
    # two columns of one name shared a token, and the other gene vanished (train st refused the file)
    "se_duplicated_genes": Case(lambda c: _se_args(c, c.h5ad("dupg.h5ad", _dup_genes, "counts")), ("dupg.h5ad", "duplicated gene names")),
    "se_resume_corrupt_optimizer": Case(lambda c: _se_args(c, c.w.counts, "--resume", "--max-steps", "4"), ("optimizer.safetensors", "truncated or corrupt"),
                                        setup=lambda c: _damage(Path(shutil.copytree(c.w.se, c.out / "run")) / "last" / "optimizer.safetensors")),
    "se_out_holds_trained_run": Case(lambda c: _se_args(c, c.w.counts), ("run", "--overwrite"),
                                     setup=lambda c: shutil.copytree(c.w.se, c.out / "run")),
    "se_corrupt_gene_table": Case(lambda c: _se_args(c, c.w.counts, "--genes", c.text("g.safetensors", b"\x10\x00garbage")),
                                  ("g.safetensors", "unreadable")),
    # ---- vcell predict
    "predict_corrupt_weights": Case(lambda c: _predict(c, c.inp / "m"), ("weights.safetensors", "truncated or corrupt"),
                                    setup=lambda c: _damage(c.copy_run("st", "m") / "last" / "weights.safetensors")),
    "predict_shapes_do_not_match": Case(lambda c: _predict(c, c.inp / "m"),
                                        ("weights.safetensors", "config.json", "basal_encoder", "[16,", "[32,", "shape"),
                                        setup=lambda c: _edit_json(c.copy_run("st", "m") / "last" / "config.json",
                                                                   lambda m: m["model"].update(width=32))),
    "predict_config_wrong_type": Case(lambda c: _predict(c, c.inp / "m"), ("config.json", "width", "'wide'"),
                                      setup=lambda c: _edit_json(c.copy_run("st", "m") / "last" / "config.json",
                                                                 lambda m: m["model"].update(width="wide"))),
    "predict_config_not_json": Case(lambda c: _predict(c, c.inp / "m"), ("config.json", "unreadable JSON"),
                                    setup=lambda c: (c.copy_run("st", "m") / "last" / "config.json").write_text("{not json")),
    "predict_unknown_context": Case(lambda c: ["predict", "--model", c.w.st, "--data", c.w.log, "--context", "ctx_Z",
                                               "--out", c.out / "pred.h5ad"], ("ctx_Z",)),
    "predict_misspelled_perturbation": Case(lambda c: _predict(c, c.w.st, None, "--perturbations", c.w.perts[0] + "x"),
                                            ("x'", "did you mean")),
    "predict_counts_input": Case(lambda c: _predict(c, c.w.st, c.w.counts), ("counts.h5ad", "raw counts")),
    "predict_nan_input": Case(lambda c: _predict(c, c.w.st, c.h5ad("nan.h5ad", NAN)), ("nan.h5ad", "NaN")),
    "predict_out_exists": Case(lambda c: _predict(c, c.w.st), ("pred.h5ad", "--overwrite"), setup=lambda c: _pre(c, "pred.h5ad")),
    "predict_model_missing": Case(lambda c: _predict(c, c.inp / "nope"), ("nope", "not found")),
    "predict_model_is_se": Case(lambda c: _predict(c, c.w.se), ("SE model",)),
    "predict_output_unknown": Case(lambda c: _predict(c, c.w.st, None, "--output", "foo"), ("--output 'foo'", "counts")),
    "predict_depth_zero": Case(lambda c: _predict(c, c.w.st, None, "--output", "counts", "--depth", "0"), ("--depth 0", "controls")),
    "predict_depth_without_counts_output": Case(lambda c: _predict(c, c.w.st, None, "--depth", "20000"), ("--depth 20000", "--output counts")),
    "predict_counts_without_library_sizes": Case(lambda c: _predict(c, c.w.st, None, "--output", "counts"),
                                                 ("log.h5ad", "ctx_B", "layers['counts']", "--depth 20000")),
    # ---- vcell embed
    "embed_nan": Case(lambda c: _embed(c, c.w.se, c.h5ad("nan.h5ad", NAN, "counts")), ("nan.h5ad", "NaN or infinite", "cell000003")),
    "embed_duplicated_genes": Case(lambda c: _embed(c, c.w.se, c.h5ad("dupg.h5ad", _dup_genes, "counts")),
                                   ("dupg.h5ad", "duplicated gene names")),
    "embed_negative": Case(lambda c: _embed(c, c.w.se, c.h5ad("neg.h5ad", NEG, "counts")), ("neg.h5ad", "negative values")),
    "embed_counts_declared_on_log1p": Case(lambda c: _embed(c, c.w.se, c.w.log, "--expression", "counts"),
                                           ("log.h5ad", "--expression counts but X has non-integer values")),
    "embed_corrupt_weights": Case(lambda c: _embed(c, c.inp / "m", c.w.counts), ("weights.safetensors", "truncated or corrupt"),
                                  setup=lambda c: _damage(c.copy_run("se", "m") / "last" / "weights.safetensors")),
    "embed_model_is_st": Case(lambda c: _embed(c, c.w.st / "last", c.w.counts), ("ST model",)),
    "embed_out_exists": Case(lambda c: _embed(c, c.w.se, c.w.counts), ("emb.h5ad", "--overwrite"), setup=lambda c: _pre(c, "emb.h5ad")),
    "embed_truncated_data": Case(lambda c: _embed(c, c.w.se, _truncated(c, "cut.h5ad")), ("cut.h5ad: unreadable",)),
    # ---- vcell bench
    "bench_model_config_wrong_type": Case(lambda c: _bench(c, c.w.log, "--models", "st", "--model-config",
                                                           _yaml(c, "m.yaml", "st:\n  max_steps: lots\n")),
                                          ("m.yaml", "max_steps", "'lots'")),
    "bench_model_config_bad_value": Case(lambda c: _bench(c, c.w.log, "--models", "st", "--model-config",
                                                         _yaml(c, "m.yaml", "st:\n  max_steps: 0\n")),
                                         ("m.yaml: st: --max-steps (max_steps=) must be an integer >= 1, got 0",)),  # was 'st: st:'
    "bench_model_config_nested_type": Case(lambda c: _bench(c, c.w.log, "--models", "st", "--model-config",
                                                            _yaml(c, "m.yaml", 'st:\n  config: {width: "a"}\n')),
                                           ("m.yaml", "width", "'a'")),
    "bench_model_config_yaml_syntax": Case(lambda c: _bench(c, c.w.log, "--model-config", _yaml(c, "m.yaml", "st:\n max_steps: [2\n")),
                                           ("m.yaml", "line")),
    "bench_unknown_model": Case(lambda c: _bench(c, c.w.log, "--models", "cell_maen"), ("cell_maen", "did you mean 'cell_mean'")),
    "bench_missing_controls_advice": Case(lambda c: _bench(c, c.h5ad("noctrl.h5ad", _no_controls_in("ctx_A"))),
                                          ("noctrl.h5ad", "--allow-missing-controls")),
    "bench_nan": Case(lambda c: _bench(c, c.h5ad("nan.h5ad", NAN)), ("nan.h5ad", "NaN")),
    "bench_out_holds_results": Case(lambda c: _bench(c, c.w.log), ("bench", "--overwrite"),
                                    setup=lambda c: _pre(c, "bench/leaderboard.csv", "model,context\n")),
    "bench_unknown_profile": Case(lambda c: _bench(c, c.w.log, "--profile", "vcx"), ("'vcx'", "profiles")),
    # ---- found by the eighteenth session's walk
    "usage_seed_negative": Case(lambda c: ["data", "split", c.w.log, "--holdout-perturbations", "0.5", "--seed", "-1"], ("--seed", "-1")),
    "usage_seed_too_large": Case(lambda c: _st_args(c, c.w.log, "--seed", "4294967296"), ("--seed", "4294967296")),
    "usage_threads_zero": Case(lambda c: _eval(c, c.w.real, None, "--threads", "0"), ("--threads", "0")),
    # --data that does not exist: these refusals come before the data is read (they came after it)
    "st_unknown_accelerator": Case(lambda c: ["train", "st", "--data", c.inp / "nope.h5ad", "--holdout-context", "ctx_B",
                                              "--accelerator", "tpu", "--out", c.out / "run"], ("--accelerator 'tpu'", "cpu")),
    "st_resume_an_se_run": Case(lambda c: _st_args(c, c.inp / "nope.h5ad", "--resume", "--max-steps", "4"), ("run", "SE model", "trains ST"),
                                setup=lambda c: shutil.copytree(c.w.se, c.out / "run")),
    "st_resume_already_there": Case(lambda c: _st_args(c, c.inp / "nope.h5ad", "--resume"), ("already at step 2", "--max-steps 2"),
                                    setup=lambda c: shutil.copytree(c.w.st, c.out / "run")),
    "embed_key_with_slash": Case(lambda c: _embed(c, c.w.se, c.w.counts, "--key", "a/b"), ("--key 'a/b'", "'/'")),
    "eval_baseline_unknown_profile": Case(lambda c: ["eval", "baseline", "--real", c.w.real, "--out", c.out / "b.h5ad", "--profile", "nonsense"],
                                          ("'nonsense'", "vcc2026")),
    "eval_vcc2026_context_col_typo": Case(lambda c: ["eval", "run", "--profile", "vcc2026", "--pred", c.w.counts, "--real", c.w.counts,
                                                     "--out", c.out / "ev", "--context-col", "cell_typ"],
                                          ("counts.h5ad", "'cell_typ' not found", "did you mean 'cell_type'")),
    "usage_split_set_size_zero": Case(lambda c: ["data", "split", c.w.log, "--holdout-context", "ctx_B", "--set-size", "0"],
                                      ("--set-size", "0")),  # printed the split's table, then the error
    "st_every_context_held_out": Case(lambda c: _st_args(c, c.w.log, "--holdout-context", "ctx_A"),
                                      ("--holdout-context", "no perturbed cell to train on")),
    "split_every_context_held_out": Case(lambda c: ["data", "split", c.w.log, "--holdout-context", "ctx_A", "--holdout-context", "ctx_B"],
                                         ("--holdout-context", "no perturbed cell to train on")),
    "bench_no_models": Case(lambda c: _bench(c, c.w.log, "--models", ","), ("--models", "names no model")),
    "bench_all_with_named_context": Case(lambda c: _bench(c, c.w.log, "--holdout-context", "all"), ("--holdout-context all", "alone")),
    "bench_context_twice": Case(lambda c: _bench(c, c.w.log, "--holdout-context", "ctx_B"), ("'ctx_B' is given twice",)),
    "predict_out_into_the_model": Case(lambda c: ["predict", "--model", c.inp / "m", "--data", c.w.log, "--context", "ctx_B",
                                                  "--out", c.inp / "m" / "last" / "weights.safetensors", "--overwrite"],
                                       ("weights.safetensors", "input folder"), setup=lambda c: c.copy_run("st", "m")),
    "predict_out_is_the_perturbation_list": Case(lambda c: ["predict", "--model", c.w.st, "--data", c.w.log, "--context", "ctx_B",
                                                            "--perturbations", c.inp / "perts.csv", "--out", c.inp / "perts.csv", "--overwrite"],
                                                 ("perts.csv", "input file"),
                                                 setup=lambda c: c.text("perts.csv", f"target_gene,n_cells\n{c.w.perts[0]},3\n")),
    # ---- a corrupt sparse matrix: read by anndata and scipy without a word (values dropped, rows scrambled,
    # kernels writing outside their buffers); refused when the file is opened, in every command
    "check_csr_gene_index_out_of_range": Case(lambda c: ["data", "check", _csr_edited(c, "idx.h5ad", _gene_out_of_range)],
                                              ("idx.h5ad", "X/indices names gene 10000", "30 genes")),
    "eval_csr_gene_index_out_of_range": Case(lambda c: _eval(c, _csr_edited(c, "idx.h5ad", _gene_out_of_range, "real")),
                                             ("idx.h5ad", "X/indices names gene 10000")),
    "preprocess_csr_rows_backwards": Case(lambda c: ["data", "preprocess", _csr_edited(c, "ptr.h5ad", _rows_backwards, "counts"),
                                                     c.out / "pre.h5ad"], ("ptr.h5ad", "X/indptr decreases at cell 3")),
    "st_csr_entry_repeated": Case(lambda c: _st_args(c, _csr_edited(c, "dup.h5ad", _entry_repeated)),
                                  ("dup.h5ad", "of cell 0 more than once", "sum_duplicates")),
    "eval_vcc2026_x_shape_disagrees": Case(
        lambda c: ["eval", "run", "--profile", "vcc2026", "--pred", _shape_attr(120, 35)(_csr_edited(c, "shp.h5ad", lambda *x: x, "counts")),
                   "--real", c.w.counts, "--out", c.out / "ev"], ("shp.h5ad", "X is 120 x 35", "30 genes (var)")),
    "eval_baseline_bool_x": Case(lambda c: ["eval", "baseline", "--real", c.h5ad("bool.h5ad", lambda a: setattr(a, "X", a.X > 1), "real"),
                                            "--out", c.out / "b.h5ad"], ("bool.h5ad", "X stores bool values", "astype('float32')")),
    "from_data_no_genes": Case(lambda c: _from_data(c, c.h5ad("nog.h5ad", lambda a: a[:, []].copy())), ("nog.h5ad", "x 0 genes")),
    "embed_no_x": Case(lambda c: _embed(c, c.w.se, c.h5ad("nox.h5ad", lambda a: ad.AnnData(obs=a.obs, var=a.var), "counts")),
                       ("nox.h5ad", "no expression matrix X")),
    "preprocess_metadata_says_log1p_on_counts": Case(  # stale metadata (counts put back in X after scanpy's log1p)
        lambda c: ["data", "preprocess", c.h5ad("lie.h5ad", lambda a: a.uns.__setitem__("vcell", {"expression": "log1p"}), "counts"),
                   c.out / "pre.h5ad"], ("lie.h5ad", "the file's metadata says log1p", "every value is an integer", "--expression counts")),
    "check_sparse_float16_x": Case(lambda c: ["data", "check", _csr_edited(c, "f16.h5ad", lambda d, i, p: (d.astype(np.float16), i, p))],
                                   ("f16.h5ad", "X stores sparse float16 values", "astype('float32')")),
    "eval_csr_scalar_shape": Case(lambda c: _eval(c, _shape_attr_scalar(_csr_edited(c, "scal.h5ad", lambda *x: x, "real"))),
                                  ("scal.h5ad", "unreadable .h5ad file")),
    "from_data_duplicated_gene": Case(lambda c: _from_data(c, c.h5ad("dupg.h5ad", _dup_genes)), ("dupg.h5ad", "duplicated")),
    "predict_genes_differ_names_the_file": Case(lambda c: _predict(c, c.w.st, c.h5ad("fewer.h5ad", lambda a: a[:, 3:].copy())),
                                                ("fewer.h5ad", "genes differ from the model's 30 genes", "3 model gene(s) missing")),
    "eval_baseline_duplicated_genes": Case(lambda c: ["eval", "baseline", "--real", c.h5ad("dupg.h5ad", _dup_genes, "real"),
                                                      "--out", c.out / "b.h5ad"], ("dupg.h5ad", "duplicated gene names in var", "GENE0001")),
    "eval_baseline_vcc2026_duplicated_genes": Case(
        lambda c: ["eval", "baseline", "--profile", "vcc2026", "--real", c.h5ad("dupg.h5ad", _dup_genes, "counts"), "--out", c.out / "b"],
        ("dupg.h5ad", "duplicated gene names in var", "GENE0001")),
    # ---- vcell eval run/baseline --profile vcc2026: bad values in the reference or the prediction
    "eval_vcc2026_real_fractional": Case(lambda c: _eval26(c, c.w.counts, c.h5ad("frac.h5ad", _set(5, 4, 2.5), "counts")),
                                         ("frac.h5ad: value 2.5 at row 5", "is not an integer", "raw counts")),
    "eval_vcc2026_real_negative": Case(lambda c: _eval26(c, c.w.counts, c.h5ad("neg.h5ad", _set(5, 4, -3), "counts")),
                                       ("neg.h5ad: value -3.0 at row 5", "is negative")),
    "eval_vcc2026_real_log1p": Case(lambda c: _eval26(c, c.w.counts, c.w.log), ("log.h5ad: value", "is not an integer")),
    "eval_vcc2026_real_control_over_1e6": Case(lambda c: _eval26(c, c.w.counts, c.h5ad("big.h5ad", _set(0, 4, 2e6), "counts")),
                                               ("big.h5ad: cell 0 ('non-targeting') holds 2,000,0", "more than the 1,000,000 allowed per cell")),
    "eval_vcc2026_pred_nan": Case(lambda c: _eval26(c, c.h5ad("nan.h5ad", _set(1, 4, np.nan), "counts"), c.w.counts),
                                  ("nan.h5ad: value nan at row 1 (a 'GENE0024' cell)", "is not finite")),
    "eval_vcc2026_pred_inf": Case(lambda c: _eval26(c, c.h5ad("inf.h5ad", _set(1, 4, np.inf), "counts"), c.w.counts),
                                  ("inf.h5ad: value inf at row 1", "is not finite")),
    "eval_vcc2026_pred_negative": Case(lambda c: _eval26(c, c.h5ad("negp.h5ad", _set(1, 4, -1), "counts"), c.w.counts),
                                       ("negp.h5ad: value -1.0 at row 1", "is negative")),
    "eval_baseline_vcc2026_real_fractional": Case(
        lambda c: ["eval", "baseline", "--profile", "vcc2026", "--real", c.h5ad("frac.h5ad", _set(5, 4, 2.5), "counts"), "--out", c.out / "b"],
        ("frac.h5ad: value 2.5 at row 5", "is not an integer")),
    "st_n_batches_without_a_batch_column": Case(  # every set was batch 0: the embedding learnt one vector
        lambda c: _st_args(c, c.w.log, "--config", c.text("nb.json", json.dumps({**TINY_ST, "n_batches": 2}))),
        ("n_batches is 2", "no batch column", "--batch-col")),
    "st_n_batches_below_the_batches": Case(  # an IndexError traceback mid-training
        lambda c: _st_args(c, c.w.log, "--config", c.text("nb.json", json.dumps({**TINY_ST, "n_batches": 1})), "--batch-col", "gem_group"),
        ("n_batches is 1", "'gem_group' has 2 batches")),
    # ---- vcell demo
    "demo_unknown_model": Case(lambda c: ["demo", "--out", c.out / "demo", "--models", "linaer"], ("linaer", "did you mean 'linear'")),
    "demo_out_is_file": Case(lambda c: ["demo", "--out", c.out / "demo"], ("demo", "is a file"), setup=lambda c: _pre(c, "demo")),
    "demo_out_holds_files": Case(lambda c: ["demo", "--out", c.out / "demo"], ("demo", "--overwrite"),
                                 setup=lambda c: _pre(c, "demo/simulated.h5ad")),
    "demo_unknown_context": Case(lambda c: ["demo", "--out", c.out / "demo", "--holdout-context", "ctx_Q"], ("ctx_Q", "ctx_A")),
    # ---- the command line itself (click's usage errors): one line too, not typer's boxed usage text
    "usage_missing_option": Case(lambda c: ["eval", "run", "--pred", c.w.real, "--out", c.out / "ev"],
                                 ("vcell eval run: missing option '--real'", "vcell eval run --help")),
    "usage_unknown_option": Case(lambda c: ["train", "st", "--data", c.w.log, "--out", c.out / "st", "--max-step", "2"],
                                 ("vcell train st: no such option: --max-step", "--max-steps")),
    "usage_unknown_command": Case(lambda c: ["eval", "rnu"], ("vcell eval: no such command 'rnu'",)),
    "usage_unknown_top_option": Case(lambda c: ["--verbos", "data", "list"], ("vcell: no such option: --verbos",)),
    "usage_bad_integer": Case(lambda c: ["data", "simulate", c.out / "s.h5ad", "--seed", "one"], ("--seed", "one")),
    "usage_option_without_value": Case(lambda c: ["data", "check", c.w.log, "--pert-col"], ("vcell data check: option '--pert-col' requires an argument", "vcell data check --help")),
    "usage_missing_argument": Case(lambda c: ["data", "check"], ("vcell data check: missing argument",)),
}


# ------------------------------------------------------------------------------------------ running


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256; folders -> 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    """A row's run and the file system around it, before and after."""

    proc: object
    inputs_before: dict
    inputs_after: dict
    out_before: dict
    out_after: dict
    cwd_extra: list


def _selected(request) -> list[str]:
    """The rows whose tests run in this session (so `-k` runs only those)."""
    names = []
    for item in request.session.items:
        if item.module is not None and item.module.__name__ == __name__ and hasattr(item, "callspec"):
            case = item.callspec.params.get("case")
            if case in CASES and case not in names:
                names.append(case)
    return names


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory, request) -> dict[str, Outcome]:
    """Build every selected row's inputs, run the rows concurrently, record what changed."""
    rows = tmp_path_factory.mktemp("rows")
    world_before = _tree(world.root)
    prepared = {}
    for name in _selected(request):
        case = CASES[name]
        base = rows / name
        ctx = Ctx(world, base / "in", base / "out")
        ctx.inp.mkdir(parents=True)
        ctx.out.mkdir()
        if case.setup is not None:
            case.setup(ctx)
        args = case.args(ctx)
        prepared[name] = (ctx, args, _tree(ctx.inp), _tree(ctx.out))

    # One CLI process per core runs its share of the rows one after the other (conftest.run_cli_batch):
    # the interpreter and its imports start once per share, not once per row.
    names = list(prepared)
    shares = [names[i::max(2, os.cpu_count() or 2)] for i in range(max(2, os.cpu_count() or 2))]

    def run(share: list[str]):
        procs = run_cli_batch([prepared[n][1] for n in share], [prepared[n][0].inp.parent for n in share])
        return list(zip(share, procs))

    results = {}
    with ThreadPoolExecutor(len(shares)) as pool:
        for name, proc in [pair for done in pool.map(run, shares) for pair in done]:
            ctx, args, inp_before, out_before = prepared[name]
            extra = sorted(p.name for p in ctx.inp.parent.iterdir() if p.name not in ("in", "out"))
            results[name] = Outcome(proc, inp_before, _tree(ctx.inp), out_before, _tree(ctx.out), extra)
    assert _tree(world.root) == world_before, "a row modified a shared input"
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_refuses_with_one_line_and_leaves_everything_as_it_was(case, outcomes):
    got = outcomes[case]
    proc = got.proc
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{everything[-3000:]}"
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in CASES[case].expect:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert got.out_after == got.out_before, "the output folder changed (an output or a temporary file was left)"
    assert got.inputs_after == got.inputs_before, "an input was modified"
    assert got.cwd_extra == [], f"files written into the working folder: {got.cwd_extra}"


def test_table_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    prefixes = {n.split("_")[0] for n in CASES}
    for command in ("check", "preprocess", "split", "simulate", "list", "eval", "baseline", "score", "prep", "from",
                    "st", "se", "predict", "embed", "bench", "demo"):
        assert command in prefixes, command


# ------------------------------------------------------------- what the user reads besides errors


def test_data_check_exit_1_lists_problems_found_in_the_file(world, tmp_path):
    """Problems found in a file: exit 1, every problem listed (duplicated cell names too), no `error:`
    line and no library warning; a file that cannot be read is exit 2 (rows above)."""
    adata = world.adata("counts")
    adata.obs_names = [f"c{i % 50}" for i in range(adata.n_obs)]
    _blank_gene(adata)  # listed here; the other commands warn and go on
    _set(3, 4, np.nan)(adata)
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    proc = run_cli("data", "check", path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # anndata's own duplicate-names warning stays out
    listed = [line for line in proc.stdout.splitlines() if line.strip().startswith("- ")]
    assert any("duplicated cell names" in line and "'c0'" in line for line in listed), proc.stdout
    assert any("NaN or infinite" in line for line in listed), proc.stdout
    assert any("1 gene(s) without a name" in line for line in listed), proc.stdout
    assert run_cli("data", "check", world.log).returncode == 0


def test_inferred_expression_is_said_only_with_v_and_once_per_file(world, tmp_path):
    quiet = run_cli("eval", "run", "--pred", world.real, "--real", world.real, "--profile", "minimal", "--out", tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    assert "inferred" not in quiet.stderr and "DEBUG" not in quiet.stderr, quiet.stderr
    # the same file read twice (as prediction and as truth): said once
    loud = run_cli("-v", "eval", "run", "--pred", world.real, "--real", world.real, "--profile", "minimal", "--out", tmp_path / "b")
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.count("expression type inferred as 'log1p'") == 1, loud.stderr
    assert "Registering codec" not in loud.stderr  # other libraries' DEBUG lines never show


@pytest.mark.parametrize("command, shown", [
    (["data", "check"], ["--backed", "--allow-missing-controls"]),
    (["eval", "run"], ["--expression", "--input-type", "--overwrite"]),
    (["train", "st"], ["--allow-missing-controls", "--expression", "--resume"]),
])
def test_help_shows_flags_as_flags(command, shown):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout, proc.stdout
    for option in shown:
        assert option in proc.stdout, option


def test_predict_says_nothing_of_other_contexts_without_controls(world, tmp_path):
    """`vcell predict` reads one context's controls: another context without any is not its concern
    (training warns that its cells go unused; predict said so too). The context asked for still must
    have controls (a row above)."""
    data = tmp_path / "noctrl.h5ad"
    adata = _no_controls_in("ctx_A")(world.adata("log"))
    adata.write_h5ad(data)
    proc = run_cli("predict", "--model", world.st, "--data", data, "--context", "ctx_B", "--out", tmp_path / "pred.h5ad")
    assert proc.returncode == 0, proc.stderr
    assert "ctx_A" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


def test_a_file_locked_by_another_process_says_what_to_do(world, tmp_path):
    """A file another process holds open for writing (HDF5 locks it; so do filesystems without
    locks): one line naming the file and HDF5_USE_FILE_LOCKING, for each way vcell opens an .h5ad."""
    import h5py

    data = tmp_path / "held.h5ad"
    world.adata("log").write_h5ad(data)
    commands = [["data", "check", data], ["data", "preprocess", data, tmp_path / "pp.h5ad"],
                ["eval", "run", "--pred", data, "--real", data, "--out", tmp_path / "e25"],
                ["eval", "run", "--profile", "vcc2026", "--pred", data, "--real", data, "--out", tmp_path / "e26"],
                ["predict", "--model", world.st, "--data", data, "--context", "ctx_B", "--out", tmp_path / "pred.h5ad"]]
    with h5py.File(data, "r+"):
        procs = run_cli_batch(commands)
    for argv, proc in zip(commands, procs):
        line = error_line(proc)
        assert str(data) in line and "HDF5_USE_FILE_LOCKING=FALSE" in line, (argv, line)
    assert not any((tmp_path / name).exists() for name in ("pp.h5ad", "e25", "e26", "pred.h5ad"))
