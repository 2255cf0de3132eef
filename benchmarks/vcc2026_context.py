"""One VCC 2026-sized context scored with both ends of its scale: time and peak memory.

A context of the 2026 challenge: 300 perturbations x 400 cells + 3,000 controls on 18,533 genes,
raw counts (CSR float32) at ~20,000 UMI per cell. The script simulates it chunk by chunk (no
whole matrix in memory; reused from --workdir when the parameters match), with a model-like
prediction (counts drawn from the true means with each effect shrunk, no control rows), then
runs, each as a fresh CLI subprocess, and records wall time and peak RSS (``ru_maxrss``):

1. ``vcell eval baseline --profile vcc2026`` (the mean-response baseline scored, and the
   split-half replicate anchor, 5 splits);
2. ``vcell eval run --profile vcc2026`` (the prediction);
3. ``vcell eval score --profile vcc2026``.

The dense matrix of the reference would take ``cells x genes x 4`` bytes (float32); the
summary compares each step's peak with it. The evaluator reads a matrix larger than its
``--memory-budget`` (vcell's default 2 GB) in gene bands on disk; ``--memory-budget`` and
``--in-memory`` are passed through. The challenge's size of issue #15 (100 perturbations x
1,000 cells + 38,000 controls on 18,080 genes, ~6,000 non-zeros per cell)::

    .venv/bin/python benchmarks/vcc2026_context.py --workdir /tmp/vcell_vcc2026_context
    .venv/bin/python benchmarks/vcc2026_context.py --workdir /tmp/vcc140k --perts 100 --cells 1000 --controls 38000 --genes 18080

``--simulate-only`` stops after writing the data; ``--no-pred`` writes the reference only and
scores it against itself (a file twice as large for a memory-growth check costs half the disk).
``--two-predictions`` adds a step 4: the prediction and a second name of it (a symlink) scored in
one ``eval run`` (``--pred`` twice), whose reference is read and summarised once; compare its
time with twice step 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHUNK = 2000


def simulate(workdir: Path, perts: int, cells: int, controls: int, genes: int, umi: float, seed: int,
             sides: tuple[str, ...] = ("real", "pred")) -> dict:
    """Write real.h5ad and pred.h5ad (those of ``sides``) chunk by chunk; returns their description."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from eval_speed import _CSRWriter  # benchmark helper, same folder

    rng = np.random.default_rng(seed)
    names = [f"G{i:05d}" for i in range(genes)]
    mu = rng.lognormal(-1.0, 1.8, genes)
    mu = mu / mu.sum()  # composition of a control cell
    targets = rng.choice(genes, perts, replace=False)
    pert_names = [names[t] for t in targets]
    n_effect = min(400, len(genes))  # genes each perturbation moves
    effect_genes = [rng.choice(genes, n_effect, replace=False) for _ in range(perts)]
    effect_sizes = [rng.normal(0, 0.6, n_effect) for _ in range(perts)]
    labels = np.array(["non-targeting"] * controls + [p for p in pert_names for _ in range(cells)], dtype=object)
    order = rng.permutation(labels.size)  # cells in random order, as in a real file
    labels = labels[order]
    code = {p: i for i, p in enumerate(pert_names)}
    comp_real = np.empty((perts + 1, genes))
    comp_pred = np.empty((perts + 1, genes))
    comp_real[perts] = comp_pred[perts] = mu
    for i in range(perts):
        log_fc = np.zeros(genes)
        log_fc[effect_genes[i]] = effect_sizes[i]
        log_fc[targets[i]] = np.log(0.15)  # the knockdown
        for out, shrink in ((comp_real, 1.0), (comp_pred, 0.7)):
            c = mu * np.exp(shrink * log_fc)
            out[i] = c / c.sum()
    group = np.array([code.get(lab, perts) for lab in labels])
    desc = {}
    for side, comp, keep in (("real", comp_real, np.ones(labels.size, bool)), ("pred", comp_pred, labels != "non-targeting")):
        if side not in sides:
            continue
        path = workdir / f"{side}.h5ad"
        rows = np.flatnonzero(keep)
        writer = _CSRWriter(workdir / f"{side}.h5ad.tmp", genes, np.int32 if labels.size * genes * 0.6 < 2**31 - 1 else np.int64)
        t0 = time.perf_counter()
        srng = np.random.default_rng([seed, 1 if side == "real" else 2])
        for s in range(0, rows.size, CHUNK):
            r = rows[s:s + CHUNK]
            lib = umi * srng.lognormal(0.0, 0.35, r.size)
            lam = comp[group[r]] * lib[:, None]
            counts = srng.poisson(srng.gamma(5.0, lam / 5.0)).astype(np.float32)
            writer.append(sp.csr_matrix(counts))
            if (s // CHUNK) % 10 == 0:
                print(f"  {side}: {s + r.size:,}/{rows.size:,} cells, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        obs = pd.DataFrame({"target_gene": pd.Categorical(labels[rows])}, index=[f"c{i}" for i in rows])
        writer.close(obs, pd.DataFrame(index=names))
        desc[side] = {"cells": int(rows.size), "nnz": int(writer.nnz), "bytes": os.path.getsize(workdir / f"{side}.h5ad.tmp")}
        os.replace(workdir / f"{side}.h5ad.tmp", path)
    return desc


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall time and the child's peak RSS."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 2), "peak_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vcell_vcc2026_context"))
    ap.add_argument("--perts", type=int, default=300, help="perturbations in the context")
    ap.add_argument("--cells", type=int, default=400, help="cells per perturbation")
    ap.add_argument("--controls", type=int, default=3000, help="control cells")
    ap.add_argument("--genes", type=int, default=18533, help="genes (each perturbation moves 400 of them, or all if fewer)")
    ap.add_argument("--umi", type=float, default=20000.0, help="median UMIs per cell")
    ap.add_argument("--threads", type=int, default=2, help="threads for both tools")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulated data")
    ap.add_argument("--memory-budget", type=float, default=None, help="vcell's --memory-budget (GB; default: vcell's)")
    ap.add_argument("--in-memory", action="store_true", help="pass --in-memory to vcell (each matrix read whole)")
    ap.add_argument("--simulate-only", action="store_true", help="write the data and stop")
    ap.add_argument("--no-pred", action="store_true", help="no prediction file: score the reference against itself")
    ap.add_argument("--two-predictions", action="store_true", help="also score two predictions in one `eval run` (step 4)")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    params = {k: getattr(args, k) for k in ("perts", "cells", "controls", "genes", "umi", "seed")}
    if args.no_pred:
        params["no_pred"] = True
    meta_path = work / "data.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("params") == params:
        data = json.loads(meta_path.read_text())["data"]
        print(f"reusing the data in {work}", file=sys.stderr)
    else:
        t = time.perf_counter()
        data = simulate(work, args.perts, args.cells, args.controls, args.genes, args.umi, args.seed,
                        ("real",) if args.no_pred else ("real", "pred"))
        data["simulate_s"] = round(time.perf_counter() - t, 1)
        meta_path.write_text(json.dumps({"params": params, "data": data}, indent=2))
        if not args.simulate_only:
            # Start afresh on the data just written: a child's ru_maxrss counts the peak of the
            # process it was forked from (Linux carries it across exec), here ~1.3 GB of simulation.
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.simulate_only:
        print(json.dumps({"params": params, "data": data}, indent=2))
        return 0
    vcell = str(Path(sys.executable).with_name("vcell"))
    threads = ["--threads", str(args.threads)]
    threads += ["--in-memory"] if args.in_memory else []
    threads += ["--memory-budget", str(args.memory_budget)] if args.memory_budget is not None and not args.in_memory else []
    pred = work / ("real.h5ad" if args.no_pred else "pred.h5ad")
    steps = {
        "scale (baseline + anchor)": [vcell, "eval", "baseline", "--profile", "vcc2026", "--real", str(work / "real.h5ad"),
                                      "--out", str(work / "scale"), "--overwrite", *threads],
        "run (prediction)": [vcell, "eval", "run", "--profile", "vcc2026", "--pred", str(pred), "--real",
                             str(work / "real.h5ad"), "--out", str(work / "run"), "--overwrite", *threads],
        "score": [vcell, "eval", "score", "--profile", "vcc2026", "--user", str(work / "run"), "--baseline", str(work / "scale"),
                  "--out", str(work / "score.csv"), "--overwrite"],
    }
    if args.two_predictions:
        again = work / "pred_again.h5ad"  # the same file under another name: its own output folder
        if not again.exists():
            again.symlink_to(pred.name)
        steps["run (two predictions)"] = [vcell, "eval", "run", "--profile", "vcc2026", "--pred", str(pred), "--pred", str(again),
                                          "--real", str(work / "real.h5ad"), "--out", str(work / "run_two"), "--overwrite", *threads]
    results = {}
    for name, cmd in steps.items():
        log = name.split()[0] + ("_two" if "two" in name else "")  # run.log, run_two.log, scale.log, score.log
        results[name] = timed(cmd, work / f"{log}.log")
        print(f"{name}: {results[name]['wall_s']} s, peak {results[name]['peak_mib']:,.0f} MiB", file=sys.stderr, flush=True)
    n_cells = args.perts * args.cells + args.controls
    dense_mib = n_cells * args.genes * 4 / 2**20
    summary = {"params": params, "data": data, "dense_float32_mib": round(dense_mib, 1), "steps": results,
               "peak_fraction_of_dense": {k: round(v["peak_mib"] / dense_mib, 3) for k, v in results.items()},
               "self_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
