#!/usr/bin/env python
"""arc-state 0.11 ``state_sm`` against vcell's ST on one McFaline 2023 fold (held-out A172).

vcell's ``vcell bench`` already ran the McFaline leave-one-line-out benchmark (``--bench-dir``:
``leaderboard.csv``, ``predictions/real_A172.h5ad``, ``eval/cell_mean_A172``). This script
reproduces the A172 fold with arc-state under vcell ST's budget and scores it the same way:

1. Filters the shared data to ``dataset == "mcfaline23"`` (A172, T98G, U87MG; 10 perturbations)
   into ``--workdir`` (the shared file is never written) and adds a ``gem_group`` batch column
   (= cell line; arc-state's batch encoder is off in ``state_sm``, cell-load only needs the column).
2. ``state tx train`` with ``model=state_sm`` (width 672, 4 layers, 8 heads, energy loss),
   ``cell_set_len`` 64, batch 8 sets, ``--steps`` steps, lr 1e-4, on the cell-load split
   ``[training] mcfaline23 = "train"``, ``[zeroshot] "mcfaline23.A172" = "test"``; input and
   output space are the 500 log1p genes of ``.X`` (``embed_key=null``).
3. ``state tx infer`` on the A172 cells (its controls + every perturbed cell, so each perturbation
   gets as many predicted cells as the truth has); arc-state samples A172 control cells as basal
   for every row. The control rows of the output are then set back to the real A172 controls.
4. ``vcell eval run --profile full`` against ``real_A172.h5ad`` and ``vcell eval score`` against
   the bench's ``cell_mean`` agg; prints arc-state next to the bench's rows (st, control_mean,
   cell_mean) for A172.

VCC = 100 x mean of the baseline-scaled MAE, DES (``overlap_at_N``) and PDS
(``discrimination_score_l1``), clipped at 0 per metric (unclipped beside it), as in the leaderboard.

Example::

    .venv/bin/python benchmarks/arc_state_fold.py --workdir /tmp/arcfold --steps 300 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DATASET, FOLD = "mcfaline23", "A172"
PERT_COL, CONTROL, CTX_COL, BATCH_COL = "perturbation", "control", "cell_type", "gem_group"
VCC_METRICS = ("mae", "overlap_at_N", "discrimination_score_l1")


def make_data(src: Path, workdir: Path) -> Path:
    """Filtered copy of the McFaline 2023 cells with a batch column; written once."""
    import anndata as ad

    out = workdir / "data" / f"{DATASET}.h5ad"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(src)
    adata = adata[adata.obs["dataset"].astype(str) == DATASET].copy()
    for col in (PERT_COL, CTX_COL):
        adata.obs[col] = adata.obs[col].astype(str).astype("category")
    adata.obs[BATCH_COL] = adata.obs[CTX_COL].astype(str).astype("category")
    adata.var_names.name = None  # cell-load reads gene names from var/_index
    adata.write_h5ad(out)
    return out


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` with output to ``log``; returns wall seconds, exits with the log tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"{cmd[0]} {' '.join(cmd[1:3])} failed (exit {code}); see {log}:\n{tail}")
    return wall


def train_args(toml: Path, workdir: Path, name: str, steps: int, batch: int, set_len: int, lr: float, seed: int) -> list[str]:
    """``state tx train`` arguments: ``state_sm`` at vcell ST's budget, no validation, no wandb."""
    return [
        "tx", "train",
        f"data.kwargs.toml_config_path={toml}",
        "data.kwargs.embed_key=null",
        "data.kwargs.output_space=all",
        f"data.kwargs.pert_col={PERT_COL}",
        f"data.kwargs.control_pert={CONTROL}",
        f"data.kwargs.cell_type_key={CTX_COL}",
        f"data.kwargs.batch_col={BATCH_COL}",
        "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false",
        "model=state_sm",
        f"model.kwargs.cell_set_len={set_len}",
        f"training.batch_size={batch}",
        f"training.max_steps={steps}",
        f"training.lr={lr}",
        f"training.train_seed={seed}",
        "training.val_freq=1000000",
        "training.ckpt_every_n_steps=1000000",
        "use_wandb=false",
        f"output_dir={workdir}",
        f"name={name}",
        "overwrite=true",
    ]


def infer_input(data: Path, workdir: Path) -> Path:
    """The A172 cells (controls + perturbed) that ``tx infer`` predicts, one row per truth cell."""
    import anndata as ad

    out = workdir / "data" / f"infer_{FOLD}.h5ad"
    adata = ad.read_h5ad(data)
    adata[adata.obs[CTX_COL].astype(str) == FOLD].copy().write_h5ad(out)
    return out


def restore_controls(pred: Path, real: Path) -> dict:
    """Put the real A172 controls back into the prediction's control rows; returns cells per label."""
    import anndata as ad
    import numpy as np

    p, r = ad.read_h5ad(pred), ad.read_h5ad(real)
    if list(p.var_names) != list(r.var_names):
        p = p[:, list(r.var_names)].copy()
    X = np.asarray(p.X.toarray() if hasattr(p.X, "toarray") else p.X, dtype=np.float32)
    pc = (p.obs[PERT_COL].astype(str) == CONTROL).to_numpy()
    rc = (r.obs[PERT_COL].astype(str) == CONTROL).to_numpy()
    rX = r.X.toarray() if hasattr(r.X, "toarray") else np.asarray(r.X)
    if pc.sum() != rc.sum():
        raise SystemExit(f"prediction has {pc.sum()} control cells, truth {rc.sum()}")
    X[pc] = rX[rc]
    out = ad.AnnData(X=X, obs=p.obs[[PERT_COL, CTX_COL]].copy(), var=p.var[[]].copy())
    out.write_h5ad(pred)
    return out.obs[PERT_COL].value_counts().to_dict()


def vcc_row(agg: Path, score_csv: Path | None) -> dict:
    """MAE, PDS, DES (raw means) and the VCC score (clipped and unclipped) of one agg_results.csv."""
    with open(agg) as fh:
        mean = next(r for r in csv.DictReader(fh) if r["statistic"] == "mean")
    row = {"mae": float(mean["mae"]), "pds": float(mean["discrimination_score_l1"]), "des": float(mean["overlap_at_N"])}
    if score_csv is not None:
        with open(score_csv) as fh:
            rows = {r["metric"]: r for r in csv.DictReader(fh)}
        keys = list(next(iter(rows.values())).keys())
        clip_key = next(k for k in keys if k != "metric" and "unclipped" not in k)
        raw_key = next(k for k in keys if "unclipped" in k)
        row["vcc"] = 100 * sum(float(rows[m][clip_key]) for m in VCC_METRICS) / len(VCC_METRICS)
        row["vcc_unclipped"] = 100 * sum(float(rows[m][raw_key]) for m in VCC_METRICS) / len(VCC_METRICS)
    return row


def main() -> None:
    """Train, predict and score arc-state on the A172 fold; print it beside the bench's rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/arc-fold"))
    ap.add_argument("--steps", type=int, default=300, help="training steps (vcell ST's default: 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="sets per batch")
    ap.add_argument("--set-len", type=int, default=64, help="cell_set_len")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/mcfaline2023_norman2019.h5ad"))
    ap.add_argument("--bench-dir", type=Path, default=Path("/tmp/acc/mcf"), help="output of `vcell bench` on McFaline")
    ap.add_argument("--arc", default="/tmp/arcstate/bin/state", help="arc-state's `state` executable")
    ap.add_argument("--vcell", default=str(REPO / ".venv" / "bin" / "vcell"))
    ap.add_argument("--skip-train", action="store_true", help="reuse the trained run in --workdir")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    opts = ap.parse_args()

    work = opts.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    real = opts.bench_dir / "predictions" / f"real_{FOLD}.h5ad"
    base_agg = opts.bench_dir / "eval" / f"cell_mean_{FOLD}" / "agg_results.csv"
    for p in (real, base_agg, opts.bench_dir / "leaderboard.csv"):
        if not p.exists():
            raise SystemExit(f"missing bench output: {p}")
    data = make_data(opts.data, work)
    toml = work / "split.toml"
    toml.write_text(f'[datasets]\n{DATASET} = "{data.parent}"\n\n[training]\n{DATASET} = "train"\n\n'
                    f'[zeroshot]\n"{DATASET}.{FOLD}" = "test"\n')
    name = f"arc_{FOLD}"
    env = {"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    walls: dict = {}
    if not opts.skip_train:
        walls["train_s"] = run([opts.arc, *train_args(toml, work, name, opts.steps, opts.batch, opts.set_len, opts.lr, opts.seed)],
                               work / "train.log", env)
    run_dir = work / name
    pred = work / f"arc_pred_{FOLD}.h5ad"
    walls["infer_s"] = run([opts.arc, "tx", "infer", "--model-dir", str(run_dir), "--adata", str(infer_input(data, work)),
                            "--pert-col", PERT_COL, "--celltype-col", CTX_COL, "--celltypes", FOLD, "--batch-col", BATCH_COL,
                            "--control-pert", CONTROL, "--output", str(pred), "--seed", str(opts.seed), "--quiet"],
                           work / "infer.log", env)
    counts = restore_controls(pred, real)
    eval_dir = work / "eval"
    walls["eval_s"] = run([opts.vcell, "eval", "run", "--pred", str(pred), "--real", str(real), "--pert-col", PERT_COL,
                           "--control", CONTROL, "--profile", "full", "--out", str(eval_dir), "--overwrite"], work / "eval.log")
    score_csv = work / "score.csv"
    run([opts.vcell, "eval", "score", "--user", str(eval_dir / "agg_results.csv"), "--baseline", str(base_agg),
         "--out", str(score_csv), "--overwrite"], work / "score.log")

    rows = {"arc-state state_sm": vcc_row(eval_dir / "agg_results.csv", score_csv) | walls}
    with open(opts.bench_dir / "leaderboard.csv") as fh:
        board = {r["model"]: r for r in csv.DictReader(fh) if r["context"] == FOLD}
    timings = json.loads((opts.bench_dir / "bench.json").read_text()).get("timings", {})
    for model in ("st", "control_mean", "cell_mean"):
        r = board[model]
        rows[f"vcell {model}"] = {"mae": float(r["mae"]), "pds": float(r["discrimination_score_l1"]), "des": float(r["overlap_at_N"]),
                                  "vcc": float(r["vcc_score"]), "vcc_unclipped": float(r["vcc_score_unclipped"]),
                                  "train_s": timings.get(f"fit {model} {FOLD}"), "infer_s": timings.get(f"predict {model} {FOLD}")}

    print(f"\nMcFaline 2023, held-out {FOLD}; VCC vs cell_mean, profile full; arc-state: state_sm, {opts.steps} steps, "
          f"batch {opts.batch} sets x {opts.set_len} cells, lr {opts.lr}, seed {opts.seed}")
    print("| model | VCC | VCC unclipped | MAE | PDS | DES | train s | predict s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model, r in rows.items():
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {model} | {r['vcc']:.2f} | {r['vcc_unclipped']:.2f} | {r['mae']:.4f} | {r['pds']:.4f} | {r['des']:.4f} | "
              f"{fmt(r.get('train_s'))} | {fmt(r.get('infer_s'))} |")
    print(f"\narc-state predicted cells per label: {dict(sorted(counts.items()))}")
    if opts.json:
        opts.json.write_text(json.dumps({"rows": rows, "settings": vars(opts), "counts": counts}, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
