#!/usr/bin/env python
"""ST in SE-embedding space vs ST in gene space vs the baselines, leave one context out.

Datasets: McFaline 2023 (``--dataset mcfaline``: lines A172, T98G, U87MG) or Kang 2018
(``--dataset kang``: the 5 largest cell types, IFN-beta STIM vs CTRL). For each held-out
context C, all through the real ``vcell`` CLI:

1. ``vcell train se`` on the cells *without C's perturbed cells* (C's control cells stay: they
   are the model's input at test time), so the embedding never saw what it is asked to predict.
   Data-derived gene embeddings (no protein model), ``--preset small``.
2. ``vcell embed`` writes every cell's SE embedding to ``.obsm["X_vcell"]`` of a copy.
3. ``vcell bench --holdout-context C`` on that copy with the baselines and ``st_se`` (``st`` with
   ``embed_key: X_vcell``: transition in SE space, gene decoder with its own energy-distance
   loss, residual gene decoding), plus ``st`` (gene space) unless ``--no-gene-st``, at the
   bench's default ST budget.

Prints the per-fold and mean table (VCC score x100 against ``cell_mean``, unclipped, MAE, PDS,
DES) for ``benchmarks/README.md``. Usage::

    .venv/bin/python benchmarks/st_se_bench.py --dataset mcfaline --out /tmp/st_se_mcf [--se-steps 1000] [--seed 0]
    .venv/bin/python benchmarks/st_se_bench.py --dataset kang --contexts "CD14 Mono,B" --no-gene-st --out /tmp/kang_se
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    # file, rows kept (obs column, value), perturbation column, control, context column, contexts, extra bench flags
    "mcfaline": ("mcfaline2023_norman2019.h5ad", ("dataset", "mcfaline23"), "perturbation", "control", "cell_type",
                 ("A172", "T98G", "U87MG"), ()),
    "kang": ("kang2018_ifnb.h5ad", None, "stim", "CTRL", "seurat_annotations",
             ("CD14 Mono", "CD4 Naive T", "CD4 Memory T", "CD16 Mono", "B"), ("--allow-missing-controls",)),
}
BASELINES = "control_mean,cell_mean,pert_mean,context_mean,linear"


def vcell(*args: str) -> None:
    cmd = [sys.executable, "-m", "vcell", "-q", *map(str, args)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"# vcell {' '.join(map(str, args))}: {time.perf_counter() - t:.0f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mcfaline")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--se-steps", type=int, default=1000)
    p.add_argument("--se-preset", default="small")
    p.add_argument("--contexts", help="comma-separated held-out contexts (default: all of the dataset's)")
    p.add_argument("--no-gene-st", action="store_true", help="leave out st in gene space")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    name, rows, pert_col, control, context_col, contexts, flags = DATASETS[args.dataset]
    data = SHARED / name
    if not data.is_file():
        print(f"{data} not found", file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    full = ad.read_h5ad(data)
    if rows is not None:
        full = full[(full.obs[rows[0]] == rows[1]).to_numpy()].copy()
    src = out / f"{args.dataset}.h5ad"
    full.write_h5ad(src)
    cfg = out / "models.yaml"
    cfg.write_text("st_se:\n  model: st\n  embed_key: X_vcell\n")
    models = BASELINES + ("" if args.no_gene_st else ",st") + ",st_se"
    boards = []
    for ctx in (args.contexts.split(",") if args.contexts else contexts):
        fold = out / ctx.replace(" ", "_")
        fold.mkdir(exist_ok=True)
        keep = ~((full.obs[context_col].astype(str) == ctx) & (full.obs[pert_col].astype(str) != control)).to_numpy()
        se_data = fold / "se_train.h5ad"
        full[keep].copy().write_h5ad(se_data)
        print(f"# {ctx}: SE trains on {int(keep.sum())} of {full.n_obs} cells ({ctx}'s perturbed cells left out)")
        vcell("train", "se", "--data", se_data, "--out", fold / "se", "--preset", args.se_preset,
              "--max-steps", args.se_steps, "--accelerator", "cpu", "--overwrite", "--seed", args.seed)
        embedded = fold / "embedded.h5ad"
        vcell("embed", "--model", fold / "se", "--data", src, "--out", embedded, "--key", "X_vcell",
              "--overwrite", "--seed", args.seed)
        vcell("bench", "--data", embedded, "--pert-col", pert_col, "--control", control, "--context-col", context_col,
              *flags, "--holdout-context", ctx, "--models", models, "--model-config", cfg, "--out", fold / "bench",
              "--no-report", "--overwrite", "--seed", args.seed)
        boards.append(pd.read_csv(fold / "bench" / "leaderboard.csv").query("context != 'mean'"))
    board = pd.concat(boards, ignore_index=True)
    metrics = ["vcc_score", "vcc_score_unclipped", "mae", "discrimination_score_l1", "overlap_at_N", "pearson_delta"]
    mean = board.groupby("model", sort=False)[metrics].mean().reset_index().assign(context="mean")
    board = pd.concat([board, mean], ignore_index=True)[["model", "context", *metrics]]
    board.to_csv(out / "leaderboard_all_folds.csv", index=False)
    names = {"vcc_score": "VCC", "vcc_score_unclipped": "VCC unclipped", "mae": "MAE",
             "discrimination_score_l1": "PDS (l1)", "overlap_at_N": "DES (overlap_at_N)", "pearson_delta": "r(delta)"}
    table = board.rename(columns=names)
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
