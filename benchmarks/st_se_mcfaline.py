#!/usr/bin/env python
"""ST in SE-embedding space vs ST in gene space vs the baselines, McFaline 2023 leave-one-line-out.

For each held-out line L (A172, T98G, U87MG), all through the real ``vcell`` CLI:

1. ``vcell train se`` on the McFaline cells *without L's perturbed cells* (L's control cells stay:
   they are the model's input at test time), so the embedding never saw what it is asked to
   predict. Data-derived gene embeddings (no protein model), ``--preset small``.
2. ``vcell embed`` writes every McFaline cell's SE embedding to ``.obsm["X_vcell"]`` of a copy.
3. ``vcell bench --holdout-context L`` on that copy with the baselines, ``st`` (gene space) and
   ``st_se`` (``st`` with ``embed_key: X_vcell``: transition in SE space, gene decoder with its own
   energy-distance loss, residual gene decoding), both at the bench's default ST budget.

Prints the per-fold and mean table (VCC score x100 against ``cell_mean``, unclipped, MAE, PDS,
DES) for ``benchmarks/README.md``. Usage::

    .venv/bin/python benchmarks/st_se_mcfaline.py --out /tmp/st_se_mcf [--se-steps 1000] [--seed 0]
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
DATA = REPO.parent / "shared" / "data" / "mcfaline2023_norman2019.h5ad"
LINES = ("A172", "T98G", "U87MG")
MODELS = "control_mean,cell_mean,pert_mean,context_mean,linear,st,st_se"


def vcell(*args: str) -> None:
    cmd = [sys.executable, "-m", "vcell", "-q", *map(str, args)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"# vcell {' '.join(map(str, args))}: {time.perf_counter() - t:.0f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--se-steps", type=int, default=1000)
    p.add_argument("--se-preset", default="small")
    p.add_argument("--lines", default=",".join(LINES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not DATA.is_file():
        print(f"{DATA} not found", file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    full = ad.read_h5ad(DATA)
    mcf = full[(full.obs["dataset"] == "mcfaline23").to_numpy()].copy()
    mcf_path = out / "mcfaline23.h5ad"
    mcf.write_h5ad(mcf_path)
    cfg = out / "models.yaml"
    cfg.write_text("st_se:\n  model: st\n  embed_key: X_vcell\n")
    boards = []
    for line in args.lines.split(","):
        fold = out / line
        fold.mkdir(exist_ok=True)
        keep = ~((mcf.obs["cell_type"] == line) & (mcf.obs["perturbation"] != "control")).to_numpy()
        se_data = fold / "se_train.h5ad"
        mcf[keep].copy().write_h5ad(se_data)
        print(f"# {line}: SE trains on {int(keep.sum())} of {mcf.n_obs} cells ({line}'s perturbed cells left out)")
        vcell("train", "se", "--data", se_data, "--out", fold / "se", "--preset", args.se_preset,
              "--max-steps", args.se_steps, "--accelerator", "cpu", "--seed", args.seed)
        embedded = fold / "embedded.h5ad"
        vcell("embed", "--model", fold / "se", "--data", mcf_path, "--out", embedded, "--key", "X_vcell",
              "--overwrite", "--seed", args.seed)
        vcell("bench", "--data", embedded, "--pert-col", "perturbation", "--control", "control",
              "--holdout-context", line, "--models", MODELS, "--model-config", cfg, "--out", fold / "bench",
              "--no-report", "--seed", args.seed)
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
