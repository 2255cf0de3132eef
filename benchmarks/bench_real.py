#!/usr/bin/env python
"""The real-data benchmark of every baseline: McFaline 2023, Kang 2018, Norman 2019.

Runs ``vcell bench`` (a real subprocess each) on the three files in ``../shared/data``:

- McFaline 2023 CRISPRi: leave-one-line-out over A172, T98G, U87MG (``dataset == "mcfaline23"``).
- Kang 2018 IFN-beta: leave-one-cell-type-out over the 5 largest cell types.
- Norman 2019 CRISPRa in K562: 30% of the double perturbations whose two singles are both
  measured are held out (few-shot split written as a cell-load TOML), seeded.

Prints one markdown table per dataset (model x fold, VCC score and its three metrics) for
``benchmarks/README.md``. Usage::

    .venv/bin/python benchmarks/bench_real.py --out /tmp/vcell-bench-real [--seed 0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODELS = "control_mean,cell_mean,pert_mean,context_mean,linear,st"  # st at its default CPU budget


def norman_split(path: Path, out: Path, fraction: float, seed: int) -> Path:
    """Few-shot split: hold out ``fraction`` of the doubles whose two singles are both present."""
    obs = ad.read_h5ad(path, backed="r").obs
    perts = set(obs.loc[obs["dataset"] == "norman19", "perturbation"].astype(str))
    doubles = sorted(p for p in perts if "+" in p and all(s in perts for s in p.split("+")))
    rng = np.random.default_rng(seed)
    n_test = max(1, round(fraction * len(doubles)))
    test = sorted(rng.choice(doubles, size=n_test, replace=False).tolist())
    text = "[training]\nnorman19 = \"train\"\n\n[fewshot.\"norman19.k562\"]\ntest = [" + ", ".join(f'"{p}"' for p in test) + "]\n"
    out.write_text(text)
    print(f"# norman19: {len(doubles)} doubles with both singles seen; held out: {', '.join(test)}")
    return out


def largest_cell_types(path: Path, n: int) -> list[str]:
    obs = ad.read_h5ad(path, backed="r").obs
    counts = obs["seurat_annotations"].astype(str).value_counts()
    return counts.index[:n].tolist()


def bench(args: list[str], out: Path) -> pd.DataFrame:
    cmd = [sys.executable, "-m", "vcell", "-q", "bench", *args, "--models", MODELS, "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"# {' '.join(cmd[3:])}: {time.perf_counter() - t:.0f} s")
    return pd.read_csv(out / "leaderboard.csv")


def markdown(board: pd.DataFrame) -> str:
    cols = {"vcc_score": "VCC", "vcc_score_unclipped": "VCC unclipped", "mae": "MAE",
            "discrimination_score_l1": "PDS (l1)", "overlap_at_N": "DES (overlap_at_N)", "pearson_delta": "r(delta)"}
    keep = ["model", "context"] + [c for c in cols if c in board.columns]
    table = board[keep].rename(columns=cols)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the three bench runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"../shared/data not found at {DATA}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    seed = ["--seed", str(args.seed)]
    mcf = DATA / "mcfaline2023_norman2019.h5ad"
    kang = DATA / "kang2018_ifnb.h5ad"

    runs = {
        "McFaline 2023 (leave one line out)": bench(
            [*seed, "--data", str(mcf), "--pert-col", "perturbation", "--control", "control", "--dataset", "mcfaline23",
             "--holdout-context", "all"], args.out / "mcfaline"),
        "Kang 2018 (leave one of the 5 largest cell types out)": bench(
            [*seed, "--data", str(kang), "--pert-col", "stim", "--control", "CTRL", "--context-col", "seurat_annotations",
             "--allow-missing-controls", *[a for ct in largest_cell_types(kang, 5) for a in ("--holdout-context", ct)]],
            args.out / "kang"),
        "Norman 2019 (30% of doubles with seen singles held out)": bench(
            [*seed, "--data", str(mcf), "--pert-col", "perturbation", "--control", "control", "--dataset", "norman19",
             "--split", str(norman_split(mcf, args.out / "norman_split.toml", 0.3, args.seed))], args.out / "norman"),
    }
    for title, board in runs.items():
        print(f"\n### {title}\n\n{markdown(board)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
