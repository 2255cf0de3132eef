#!/usr/bin/env python
"""Perturbations never seen in training (issue #14): every model, VCC 2025 and 2026 scores.

Runs ``vcell bench --profile vcc2026 --holdout-perturbations ...`` (a real subprocess each) on
the real files in ``../shared/data`` and prints one markdown table per benchmark, the mean over
folds (± their standard deviation) of the VCC 2025 score (x100, scaled against ``cell_mean``) and of the 2026 scaled score
(0 = the context's mean-response baseline, 1 = a replicate of the experiment):

- ``papalexi``: Papalexi 2021 THP-1 CRISPR knockouts, 30% of the 25 targets held out (seeds 0-2).
- ``norman_singles``: Norman 2019 K562 CRISPRa, 30% of the single-target perturbations held out,
  together with the doubles that contain one of them (seeds 0-2; drawn among the singles whose
  doubles' targets all have a Kang vector).
- ``norman_doubles``: Norman 2019, 30% of the doubles whose two singles are both measured held
  out; their singles stay in training (seeds 0-2).
- ``mcfaline``: McFaline 2023 CRISPRi, one glioblastoma line held out and 3 of the 9 targets held
  out everywhere (unseen context x unseen perturbation), one fold per line, seed = fold number.

Gene features: the co-expression of the Kang 2018 PBMC control cells (``vcell genes from-data``,
64 dimensions, 13,215 genes), with one-hot where the target was seen (``onehot,FILE``). Only
targets that have a Kang vector are drawn for holding out (MAP3K21, KLF1 and 5 Norman targets
have none: absent from Kang or constant in its controls), since no model can be asked about a
target it knows nothing of. The 2026 score needs raw counts: Papalexi's are in the file, and
McFaline's and Norman's are recovered exactly from their log1p values (the data README).

ST runs at ``vcell bench``'s default CPU budget (preset ``small``, 300 steps x 8 sets x 64 cells,
lr 1e-4, fp32) in five variants: ``st_kang`` (``onehot,KANG`` features), ``st_kang_drop`` (the
same with ``onehot_dropout: 0.5``), ``st_kang_krr`` (``st_kang`` with ``effect_anchor:
kernel_ridge``), ``st_kang_ctrl`` (``st_kang`` with ``control_relative: true``) and
``st_kang_drop_ctrl`` (both options). ``st_kang_drop`` and ``st_kang_krr`` were chosen on the
Papalexi folds (the developer folds) and confirmed on the others; ``control_relative`` was
designed for McFaline's unseen lines, and since commit 619bb5c it shifts relative to the drift
the model makes on its training contexts' controls (benchmarks/README.md says how each table was
run and at which commit)::

    .venv/bin/python benchmarks/unseen_perturbations.py --work /tmp/vcell-unseen --only papalexi \
        --models control_mean,pert_mean,linear,linear_kang,kernel_ridge_kang,st_kang
    .venv/bin/python benchmarks/unseen_perturbations.py --work /tmp/vcell-unseen --only papalexi \
        --models st_kang_drop,st_kang_krr --tag variants
    .venv/bin/python benchmarks/unseen_perturbations.py --work /tmp/vcell-unseen --only mcfaline,norman_singles,norman_doubles
    .venv/bin/python benchmarks/unseen_perturbations.py --work /tmp/vcell-unseen --only papalexi,mcfaline \
        --models control_mean,pert_mean,linear,linear_kang,kernel_ridge_kang,st_kang,st_kang_drop,st_kang_ctrl --tag ctrl
    .venv/bin/python benchmarks/unseen_perturbations.py --work /tmp/vcell-unseen \
        --only papalexi,mcfaline,norman_singles,norman_doubles --models st_kang_ctrl --tag cal

(benchmarks/README.md says which models each recorded table ran.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SEEDS = (0, 1, 2)
FRACTION = 0.3
#: The models and their options (a ``vcell bench --model-config``); KANG is the gene table.
MODELS = {
    "control_mean": {},
    "pert_mean": {},
    "linear": {},
    "linear_kang": {"model": "linear", "pert_features": "onehot,KANG"},
    "kernel_ridge_kang": {"model": "kernel_ridge", "pert_features": "onehot,KANG"},
    "st_kang": {"model": "st", "pert_features": "onehot,KANG"},
    "st_kang_drop": {"model": "st", "pert_features": "onehot,KANG", "config": {"onehot_dropout": 0.5}},
    "st_kang_krr": {"model": "st", "pert_features": "onehot,KANG", "effect_anchor": "kernel_ridge"},
    "st_kang_ctrl": {"model": "st", "pert_features": "onehot,KANG", "config": {"control_relative": True}},
    "st_kang_drop_ctrl": {"model": "st", "pert_features": "onehot,KANG", "config": {"onehot_dropout": 0.5, "control_relative": True}},
}
#: The models of one run unless --models says otherwise (cell_mean is added by vcell bench).
DEFAULT_MODELS = "control_mean,pert_mean,linear,linear_kang,kernel_ridge_kang,st_kang,st_kang_drop"


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t


def vcell(*args: str) -> list[str]:
    return [sys.executable, "-m", "vcell", "-q", *map(str, args)]


def kang_table(work: Path) -> Path:
    """The Kang co-expression gene table (64 dims), made once."""
    out = work / "kang_genes.safetensors"
    if not out.exists():
        log1p = work / "kang_log1p.h5ad"
        if not log1p.exists():
            run(vcell("data", "preprocess", DATA / "kang2018_ifnb.h5ad", log1p, "--pert-col", "stim", "--control", "CTRL",
                      "--context-col", "none", "--flag-hvg"))
        run(vcell("genes", "from-data", "--data", log1p, "--pert-col", "stim", "--control", "CTRL", "--dim", "64",
                  "--out", out, "--seed", "0"))
    return out


def counts_file(work: Path, dataset: str) -> Path:
    """McFaline or Norman cells of the PerturBench file with their raw counts in X (exact recovery)."""
    out = work / f"{dataset}_counts.h5ad"
    if out.exists():
        return out
    adata = ad.read_h5ad(DATA / "mcfaline2023_norman2019.h5ad")
    adata = adata[adata.obs["dataset"].astype(str) == dataset].copy()
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    X.data = np.expm1(X.data)
    unit = np.array([X.data[a:b].min() if b > a else 1.0 for a, b in zip(X.indptr[:-1], X.indptr[1:])])
    X = sp.diags(1.0 / unit) @ X
    X.data = np.rint(X.data)
    adata.X = sp.csr_matrix(X, dtype=np.float32)
    adata.uns["vcell"] = {"expression": "counts"}
    adata.write_h5ad(out)
    return out


def known(table: Path) -> set[str]:
    from vcell.features import GeneEmbeddings

    t = GeneEmbeddings.load(table)
    return {n for n, v in zip(t.names, t.vectors.norm(dim=1).tolist()) if v > 0}


def draw(labels: list[str], fraction: float, seed: int) -> list[str]:
    labels = sorted(labels)
    n = max(1, round(fraction * len(labels)))
    return sorted(np.random.default_rng(seed).permutation(labels)[:n].tolist())


def folds(name: str, work: Path, table: Path, seeds=SEEDS) -> list[dict]:
    """Each fold of benchmark ``name``: its data, columns, held-out labels and contexts (Papalexi and
    Norman: one per seed of ``seeds``, any seed a new draw; McFaline: one per line)."""
    have = known(table)
    if name == "papalexi":
        path = DATA / "papalexi2021_thp1.h5ad"
        targets = [t for t in set(ad.read_h5ad(path, backed="r").obs["target"].astype(str)) if t != "non-targeting"]
        cols = ["--pert-col", "target", "--control", "non-targeting", "--context-col", "none"]
        return [{"data": path, "cols": cols, "held": draw([t for t in targets if t in have], FRACTION, s), "seed": s} for s in seeds]
    if name.startswith("norman"):
        path = counts_file(work, "norman19")
        labels = sorted(set(ad.read_h5ad(path, backed="r").obs["perturbation"].astype(str)) - {"control"})
        singles = [p for p in labels if "+" not in p]
        cols = ["--pert-col", "perturbation", "--control", "control", "--context-col", "cell_type"]
        out = []
        for s in seeds:
            if name == "norman_singles":
                # a held-out single takes its doubles with it, so every target of those doubles needs a vector too
                ok = [p for p in singles if all(t in have for d in labels if p in d.split("+") for t in d.split("+"))]
                held_singles = draw(ok, FRACTION, s)
                held = sorted(set(held_singles) | {p for p in labels if "+" in p and set(p.split("+")) & set(held_singles)})
            else:
                doubles = [p for p in labels if "+" in p and all(t in singles for t in p.split("+"))]
                held = draw(doubles, FRACTION, s)
            out.append({"data": path, "cols": cols, "held": held, "seed": s})
        return out
    if name == "mcfaline":
        path = counts_file(work, "mcfaline23")
        obs = ad.read_h5ad(path, backed="r").obs
        targets = sorted(set(obs["perturbation"].astype(str)) - {"control"})
        lines = sorted(set(obs["cell_type"].astype(str)))
        cols = ["--pert-col", "perturbation", "--control", "control", "--context-col", "cell_type"]
        return [{"data": path, "cols": cols, "held": draw([t for t in targets if t in have], 3 / 8, i), "seed": i,
                 "context": line} for i, line in enumerate(lines)]
    raise SystemExit(f"unknown benchmark {name!r}")


def bench_fold(name: str, fold: dict, work: Path, config: Path, models: str, tag: str) -> pd.DataFrame:
    out = work / "runs" / f"{name}_{fold['seed']}{'_' + tag if tag else ''}"
    board = out / "leaderboard.csv"
    if not board.exists():
        args = ["bench", "--data", fold["data"], *fold["cols"], "--holdout-perturbations", ",".join(fold["held"]),
                "--models", models, "--model-config", config, "--profile", "vcc2026", "--seed", fold["seed"],
                "--out", out, "--overwrite", "--no-report"]
        if "context" in fold:
            args += ["--holdout-context", fold["context"]]
        secs = run(vcell(*args))
        (out / "wall_seconds.txt").write_text(f"{secs:.1f}\n")
        print(f"# {name} seed {fold['seed']}: held out {', '.join(fold['held'])}"
              + (f" in every context, {fold['context']} held out" if "context" in fold else "") + f"; {secs:.0f} s", flush=True)
    return pd.read_csv(board)


def table(name: str, boards: pd.DataFrame) -> str:
    cols = {"vcc_score": "VCC 2025 (x100)", "vcc_score_unclipped": "VCC 2025 unclipped", "vcc2026_score": "VCC 2026 (scaled)",
            "mae": "MAE", "vcc2026_pds_cosine": "2026 pds_cosine", "vcc2026_de_wilcoxon_direction_fidelity_yield_raw": "2026 fidelity",
            "vcc2026_de_wilcoxon_lfc_nmae": "2026 lfc_nmae"}
    cols = {k: v for k, v in cols.items() if k in boards.columns}
    per_fold = boards.groupby(["model", "fold"])[list(cols)].mean()
    mean, sd = per_fold.groupby("model").mean(), per_fold.groupby("model").std()
    order = [m for m in MODELS if m in mean.index] + [m for m in mean.index if m not in MODELS]
    lines = [f"### {name}", "", "| model | " + " | ".join(cols.values()) + " |", "|---|" + "---|" * len(cols)]
    for m in order:
        cells = []
        for c in cols:
            cells.append(f"{mean.loc[m, c]:.3g} ± {sd.loc[m, c]:.2g}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the data, the gene table and every bench run")
    p.add_argument("--only", default="papalexi,norman_singles,norman_doubles,mcfaline",
                   help="benchmarks to run, comma-separated: papalexi, norman_singles, norman_doubles, mcfaline")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"models to run, comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--tag", default="", help="name of this set of runs (runs/NAME_SEED_TAG); the tables join every tag's models")
    p.add_argument("--seeds", default="0,1,2", help="folds to run (by seed, any seed a new draw for Papalexi and Norman; "
                   "McFaline's fold number 0-2), e.g. 1,2 or 3,4,5")
    p.add_argument("--st", default="{}", help="JSON of extra st options, e.g. '{\"max_steps\": 600}'")
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"../shared/data not found at {DATA}", file=sys.stderr)
        return 1
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    table_path = kang_table(work)
    options = {}
    for m, o in MODELS.items():
        o = {k: (v.replace("KANG", str(table_path)) if isinstance(v, str) else v) for k, v in o.items()}
        if o.get("model", m) == "st":
            o.update(json.loads(args.st))
        if o:
            options[m] = o
    seeds = {int(s) for s in args.seeds.split(",")}
    config = work / "models.json"
    config.write_text(json.dumps(options, indent=1))
    for name in args.only.split(","):
        for f in folds(name, work, table_path, sorted(seeds | set(SEEDS))):
            if f["seed"] not in seeds:
                continue
            bench_fold(name, f, work, config, args.models, args.tag)
        boards = []
        # a model run under several tags (cell_mean, added to every run) counts from its latest run
        for board in sorted((work / "runs").glob(f"{name}_*/leaderboard.csv"), key=lambda p: p.stat().st_mtime):
            df = pd.read_csv(board)
            df["fold"] = int(board.parent.name[len(name) + 1:].split("_")[0])
            boards.append(df[df["context"] != "mean"])
        boards = pd.concat(boards).drop_duplicates(["model", "context", "fold"], keep="last")
        print(table(name, boards), flush=True)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
