#!/usr/bin/env python
"""Speed and peak memory of vcell's differential expression against pdex as cell-eval calls it.

The claim checked: on the Virtual Cell Challenge shape (50 perturbations x 200 cells + 2,000
controls, 18,080 genes, dense float32 log1p), ``vcell.eval.de.differential_expression`` gives the
same table as ``pdex(..., mode="ref", is_log1p=True, epsilon=0, threads=2)`` (what ``cell-eval
run`` writes to ``real_de.csv``/``pred_de.csv``) and is much faster, on 2 threads, in less memory.

What it does:

1. Simulates the data once (own process, not timed): negative-binomial counts (gene means
   log-normal, 200 affected genes per perturbation, cell size factors), normalised to 10,000
   counts per cell, log1p, float32, cells shuffled; fixed seed. Saved as ``.npy`` in ``--workdir``.
2. Runs each tool in a fresh process: load the data into an AnnData, warm up on 50 genes (JIT
   compile / cache load, not timed), then time the DE over all (or ``--pdex-genes``) genes:
   vcell ``--repeat`` times (best and median wall time), pdex once. Peak memory is that
   process's ``ru_maxrss`` (data included; the row "data only" is a process that just loads
   it). Each run saves its table. On a shared machine, compare CPU seconds too.
3. Checks the tables agree (statistic, p, fdr, means, fold changes, significant sets) and prints
   a markdown table.

Example::

    .venv/bin/python benchmarks/de_speed.py --threads 2
    .venv/bin/python benchmarks/de_speed.py --pdex-genes 2000   # time pdex on a gene subset
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTROL = "non-targeting"
PERT_COL = "target_gene"


# --------------------------------------------------------------------------- simulation


def simulate(workdir: Path, n_perts: int, cells: int, n_ctrl: int, n_genes: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    n = n_perts * cells + n_ctrl
    gene_mean = np.exp(rng.normal(-2.0, 1.8, n_genes))
    effect = np.ones((n_perts + 1, n_genes))
    for p in range(1, n_perts + 1):
        idx = rng.choice(n_genes, 200, replace=False)
        effect[p, idx] = np.exp(rng.normal(0.0, 1.0, idx.size))
    group = np.concatenate([np.zeros(n_ctrl, np.int64), np.repeat(np.arange(1, n_perts + 1), cells)])
    X = np.empty((n, n_genes), np.float32)
    for s in range(0, n, 1000):
        e = min(n, s + 1000)
        size = rng.lognormal(0.0, 0.3, (e - s, 1))
        lam = gene_mean[None, :] * effect[group[s:e]] * size
        counts = rng.poisson(rng.gamma(2.0, lam / 2.0))  # NB, dispersion 2
        total = counts.sum(axis=1, keepdims=True)
        total[total == 0] = 1
        X[s:e] = np.log1p(counts / total * 1e4)
    labels = np.array([CONTROL] + [f"PERT{p:03d}" for p in range(1, n_perts + 1)])[group]
    perm = rng.permutation(n)
    X = X[perm]
    np.save(workdir / "labels.npy", labels[perm])
    import scipy.sparse as sp

    csr = sp.csr_matrix(X)
    np.savez(workdir / "X_csr.npz", data=csr.data, indices=csr.indices, indptr=csr.indptr, shape=np.array(csr.shape))
    del csr
    np.save(workdir / "X.npy", X)  # last: its presence marks a complete simulation
    print(f"simulated {n} cells x {n_genes} genes, {100 * (X == 0).mean():.1f}% zeros", file=sys.stderr)


# --------------------------------------------------------------------------- workers


def _load(workdir: Path, n_genes: int | None, sparse: bool):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    if sparse:
        z = np.load(workdir / "X_csr.npz")
        X = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        if n_genes is not None and n_genes < X.shape[1]:
            X = X[:, :n_genes].tocsr()
    else:
        X = np.load(workdir / "X.npy")
        if n_genes is not None and n_genes < X.shape[1]:
            X = np.ascontiguousarray(X[:, :n_genes])
    labels = np.load(workdir / "labels.npy")
    obs = pd.DataFrame({PERT_COL: labels}, index=[f"c{i}" for i in range(labels.size)])
    var = pd.DataFrame(index=[f"G{j:05d}" for j in range(X.shape[1])])
    return ad.AnnData(X, obs=obs, var=var)


def worker(tool: str, workdir: Path, threads: int, n_genes: int | None, sparse: bool, out: Path, repeat: int) -> None:
    import numpy as np

    adata = _load(workdir, n_genes, sparse)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if tool == "data":
        print(json.dumps({"rss_data_mib": rss_data, "peak_mib": rss_data}))
        return
    if tool == "vcell":
        from vcell.eval.de import differential_expression

        def run(a):
            return differential_expression(a, pert_col=PERT_COL, control=CONTROL, threads=threads)

    else:
        import logging

        from pdex import pdex

        logging.getLogger("pdex").setLevel(logging.ERROR)

        def run(a):  # exactly cell-eval 0.8.2's call (_load_or_build_de + _build_pdex_kwargs)
            return pdex(
                adata=a, mode="ref", reference=CONTROL, groupby=PERT_COL, threads=threads, is_log1p=True, epsilon=0.0,
                cpm_filter=None,
            ).to_pandas()

    run(adata[:, :50].copy())  # JIT compile / cache load, outside the timing
    walls, cpus = [], []
    for _ in range(repeat):
        table = None
        t0, c0 = time.perf_counter(), os.times()
        table = run(adata)
        walls.append(time.perf_counter() - t0)
        c1 = os.times()
        cpus.append((c1.user - c0.user) + (c1.system - c0.system))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = int(np.argmin(walls))
    wall, cpu, median = walls[best], cpus[best], float(np.median(walls))
    np.savez(
        out,
        **{c: table[c].to_numpy() for c in table.columns if c not in ("target", "feature")},
        target=table["target"].to_numpy().astype(str),
        feature=table["feature"].to_numpy().astype(str),
    )
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "median_wall_s": median, "runs": repeat, "peak_mib": peak,
                      "rss_data_mib": rss_data}))


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {args} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- comparison


def compare(a_path: Path, b_path: Path) -> dict:
    import numpy as np

    a, b = np.load(a_path, allow_pickle=False), np.load(b_path, allow_pickle=False)
    n = min(a["p_value"].size, b["p_value"].size)
    res = {}
    if a["p_value"].size != b["p_value"].size:  # pdex on a gene subset: align on the common genes
        ka = {(t, f): i for i, (t, f) in enumerate(zip(a["target"], a["feature"]))}
        idx_a = np.array([ka[(t, f)] for t, f in zip(b["target"], b["feature"])])
        sel = lambda arr, which: arr[idx_a] if which == "a" else arr  # noqa: E731
        n = idx_a.size
    else:
        sel = lambda arr, which: arr  # noqa: E731
        res["same_rows"] = bool((a["target"] == b["target"]).all() and (a["feature"] == b["feature"]).all())
    res["rows"] = int(n)
    res["statistic_equal"] = bool(np.array_equal(sel(a["statistic"], "a"), b["statistic"]))
    for col in ("p_value", "fdr"):
        x, y = sel(a[col], "a"), b[col]
        res[f"{col}_max_rel"] = float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-300)))
        res[f"{col}_bit_identical"] = bool(np.array_equal(x, y))
    for col in ("target_mean", "ref_mean", "log2_fold_change", "percent_change"):
        x, y = sel(a[col], "a"), b[col]
        res[f"{col}_bit_identical"] = bool(np.array_equal(x, y))
        fin = np.isfinite(y)
        res[f"{col}_same_inf"] = bool(np.array_equal(x[~fin], y[~fin]))
        xf, yf = x[fin].astype(np.float64), y[fin].astype(np.float64)
        res[f"{col}_max_abs_diff"] = float(np.max(np.abs(xf - yf))) if xf.size else 0.0
        res[f"{col}_dtype"] = f"{x.dtype}/{y.dtype}"
    sig_a = sel(a["fdr"], "a") < 0.05
    res["significant_ours"] = int(sig_a.sum())
    res["significant_same"] = bool(np.array_equal(sig_a, b["fdr"] < 0.05))
    return res


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perts", type=int, default=50)
    ap.add_argument("--cells", type=int, default=200, help="cells per perturbation")
    ap.add_argument("--controls", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pdex-genes", type=int, default=None, help="time pdex on the first N genes only")
    ap.add_argument("--skip-pdex", action="store_true")
    ap.add_argument("--sparse", action="store_true", help="also time both tools on the CSR version")
    ap.add_argument("--repeat", type=int, default=5, help="timed vcell runs per process (best and median shown)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep/reuse the simulated data here")
    ap.add_argument("--worker", choices=["vcell", "pdex", "data", "simulate"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-csr", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-genes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "simulate":
        simulate(args.workdir, args.perts, args.cells, args.controls, args.genes, args.seed)
        print(json.dumps({}))
        return
    if args.worker:
        worker(args.worker, args.workdir, args.threads, args.worker_genes, args.worker_csr, args.out, args.repeat)
        return

    # This process stays small (no numpy until the end): ru_maxrss survives fork + exec, so a
    # large orchestrator would inflate every worker's reported peak.
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vcell_de_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape = [str(args.perts), str(args.cells), str(args.controls), str(args.genes), str(args.seed)]
    stamp = workdir / "shape.txt"
    if not (workdir / "X.npy").exists() or not stamp.exists() or stamp.read_text() != " ".join(shape):
        _spawn(["--worker", "simulate", "--workdir", str(workdir), "--perts", shape[0], "--cells", shape[1],
                "--controls", shape[2], "--genes", shape[3], "--seed", shape[4]])
        stamp.write_text(" ".join(shape))

    common = ["--workdir", str(workdir), "--threads", str(args.threads)]
    rows = []
    kinds = [False, True] if args.sparse else [False]
    runs = []
    for csr in kinds:
        runs.append(("vcell", csr, None, args.repeat))
        if not args.skip_pdex:
            runs.append(("pdex", csr, args.pdex_genes, 1))
    results = {}
    for csr in kinds:
        data = _spawn(["--worker", "data", *common, *(["--worker-csr"] if csr else [])])
        kind = "csr" if csr else "dense"
        rows.append(("data only (load, no DE)", kind, args.genes, None, None, None, data["peak_mib"]))
    for tool, csr, n_genes, repeat in runs:
        out = workdir / f"{tool}_{'csr' if csr else 'dense'}.npz"
        extra = (["--worker-csr"] if csr else []) + (["--worker-genes", str(n_genes)] if n_genes else [])
        r = _spawn(["--worker", tool, "--out", str(out), "--repeat", str(repeat), *extra, *common])
        results[(tool, csr)] = (r, out)
        rows.append((tool, "csr" if csr else "dense", n_genes or args.genes, r["wall_s"], r["median_wall_s"],
                     r["cpu_s"], r["peak_mib"]))
        print(f"{tool} {'csr' if csr else 'dense'}: {r}", file=sys.stderr)

    n = args.perts * args.cells + args.controls
    print(f"\n## DE speed: {n} cells ({args.perts} perturbations x {args.cells} + {args.controls} controls) "
          f"x {args.genes} genes, float32 log1p, threads={args.threads}\n")
    print("| run | input | genes | best wall s | median wall s | CPU s (best run) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for name, kind, g, wall, median, cpu, peak in rows:
        print(f"| {name} | {kind} | {g} | {fmt(wall)} | {fmt(median)} | {fmt(cpu)} | {peak:.0f} |")
    for csr in (False, True):
        if ("vcell", csr) in results and ("pdex", csr) in results:
            (rv, ov), (rp, op) = results[("vcell", csr)], results[("pdex", csr)]
            g = args.pdex_genes or args.genes
            scale = args.genes / g
            kind = "csr" if csr else "dense"
            note = "" if g == args.genes else f", pdex timed on {g} genes and scaled to {args.genes}"
            print(f"\nspeed-up ({kind}{note}): wall {rp['wall_s'] * scale / rv['wall_s']:.1f}x (vs vcell best), "
                  f"{rp['wall_s'] * scale / rv['median_wall_s']:.1f}x (vs vcell median); "
                  f"CPU {rp['cpu_s'] * scale / rv['cpu_s']:.1f}x")
            print(f"agreement ({kind}): {json.dumps(compare(ov, op))}")
    if args.sparse and ("vcell", False) in results and ("vcell", True) in results:
        print(f"\nvcell dense vs csr: {json.dumps(compare(results[('vcell', False)][1], results[('vcell', True)][1]))}")
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end; data in {workdir}")


if __name__ == "__main__":
    main()
