#!/usr/bin/env python
"""The whole Virtual Cell Challenge job at its real size, step by step: wall time and peak memory.

The claim checked (issue #15): on this 2-core, 23 GB machine every vcell step of the job runs
out of core on a challenge-sized file (300,000 cells x 18,080 genes by default) with peak RSS
<= 4 GB, and everything except training takes <= 15 minutes in total; each step's time sits next
to the peer's where a peer can run the step at all.

What it runs, in ``--workdir`` (files are reused when present, so a run can be continued):

1. ``vcell data simulate --preset vcc`` -> ``raw.h5ad`` (CSR counts; timed, not part of the job).
2. ``vcell data check raw.h5ad``.
3. ``vcell data preprocess raw.h5ad pp.h5ad`` (normalize_total + log1p + 2,000 HVGs + targets,
   raw counts kept); peer: arc-state ``state tx preprocess_train`` on the same file.
4. ``vcell data split pp.h5ad --holdout-perturbations <the simulation's test list>``.
5. ``vcell genes from-data pp.h5ad`` (gene vectors from the controls' co-expression), then
   ``vcell train st --backed --pert-features onehot,genes.safetensors`` (the held-out targets are
   never seen perturbed: a model predicts them from their vectors) on ``pp.h5ad`` for ``--steps``
   steps (``small`` preset = arc-state's
   ``state_sm`` size, 8 sets x 128 cells, matmul precision "medium", arc-state's default);
   peer: arc-state ``state tx train`` with cell-load on the same file and sizes. Both run through
   ``train_speed.py``'s timing child: cells/s after ``--warmup`` steps, the share of step time
   spent waiting for data, peak RSS. arc-state trains on every cell (throughput only).
6. ``vcell data subset`` of the held-out cells + controls: from ``pp.h5ad`` (log1p, the model's
   genes) and from ``raw.h5ad`` with every gene (raw counts: the 2026 reference at full size).
7. ``vcell predict`` of the held-out perturbations, one run writing two files: ``--output counts
   --all-genes raw.h5ad``, a full 2026 submission, every gene of the raw file (the genes the model
   does not predict taken from each predicted cell's control cell), and ``--log1p-out``, the log1p
   cells the counts were drawn from, over the model's genes.
8. ``vcell eval prep --profile vcc2026`` of the counts prediction (every gene).
9. ``vcell eval run --backed``: the 2025 profile (log1p prediction, the model's genes) and the
   2026 profile (the full counts submission against the full raw reference); peers: cell-eval
   0.8.2 and cell-eval2 0.20.0 on the same pairs.
10. At full size (every gene): ``vcell eval baseline --profile vcc2026`` (the mean-response
    baseline scored + the 5-split replicate anchor); peer: ``cell-eval2 baseline`` (the baseline
    end only) on the same file. The 2025 profile's cell-mean baseline is not run at this size: it
    writes every cell as its perturbation's dense mean (125k x 18,080 floats, ~18 GB as CSR), more
    than this machine's free disk; ``eval_speed.py --vcc-scale`` measures the 2025 evaluator at
    188k x 18,080.

Every step is a fresh child process. Peak RSS is ``os.wait4``'s ``ru_maxrss`` (the largest
process); a sampler also records the peak summed RSS of the process tree every 0.5 s and stops a
peer whose tree passes ``--peer-memory-gib`` (the machine would otherwise swap or kill other
work) or whose wall time passes ``--peer-timeout``; such a step is reported as not finished,
with its peak before it was stopped. The orchestrating process imports no numpy/anndata/torch,
so a child cannot inherit a large high-water mark.

The model predicts its own genes (the HVGs + targets); ``--all-genes`` widens its counts to the
18,080 genes a submission holds, so the 2026 run, baseline and anchor all score every gene.

Example (about an hour with the peers; ``--no-peers`` for vcell alone)::

    flock /tmp/vcell_cpu.lock .venv/bin/python benchmarks/vcc_scale.py --workdir /tmp/vcc_scale \\
        --json /tmp/vcc_scale/vcc_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import train_speed as ts  # noqa: E402  (timing child, arc-state arguments, stats)

PY = sys.executable
VCELL = [PY, "-m", "vcell"]
ARC_PY = "/tmp/arcstate/bin/python"
RSS_TARGET_MIB = 4096
BUDGET_S = 15 * 60
SAMPLE_S = 0.5


def _tree_rss_kib(root: int) -> int:
    """Summed resident set size (KiB) of ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total


def measure(name: str, cmd: list[str], work: Path, timeout: float | None = None, limit_gib: float | None = None,
            env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process group; wall time, peak RSS, peak tree RSS and how it ended."""
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = [*map(str, cmd[:2]), "<script>"] if len(cmd) > 1 and cmd[1] == "-c" else map(str, cmd)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(shown)}", file=sys.stderr, flush=True)
    peak = [0]
    ended = {"why": None}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=work,
                                env={**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})},
                                start_new_session=True)
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(SAMPLE_S):
                peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
                over_mem = limit_gib is not None and peak[0] > limit_gib * 2**20
                over_time = timeout is not None and time.perf_counter() - t0 > timeout
                if over_mem or over_time:
                    ended["why"] = f"stopped at {limit_gib:g} GiB" if over_mem else f"stopped after {timeout / 60:g} min"
                    os.killpg(proc.pid, signal.SIGKILL)
                    return

        sampler = threading.Thread(target=watch, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    row = {"step": name, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "peak_tree_mib": peak[0] / 1024,
           "exit": code, "status": ended["why"] or ("ok" if code == 0 else f"failed (exit {code})"), "log": str(log)}
    if row["status"] != "ok":
        tail = log.read_text(errors="replace").splitlines()[-6:]
        print(f"  {name}: {row['status']}\n    " + "\n    ".join(tail), file=sys.stderr, flush=True)
    else:
        print(f"  {name}: {wall:.1f} s, peak {row['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return row


def _record(work: Path, row: dict) -> dict:
    """Keep a finished step's figures, so a continued run (``--reuse``) still reports them."""
    if row.get("status") == "ok":
        path = work / "figures" / f"{row['step'].replace('/', '_')}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(row))
    return row


def _recorded(work: Path, name: str) -> dict | None:
    path = work / "figures" / f"{name.replace('/', '_')}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _probe(work: Path, raw: Path, pp: Path | None = None) -> dict:
    """Roles, contexts and the model's genes, read in a child (the parent stays small)."""
    out = work / "probe.json"
    code = f"""
import json, anndata as ad
a = ad.read_h5ad({str(raw)!r}, backed="r")
sim = a.uns.get("simulation", {{}})
roles = {{k: list(map(str, v)) for k, v in dict(sim.get("roles", {{}})).items()}}
info = {{"n_obs": a.n_obs, "n_vars": a.n_vars, "roles": roles, "all_genes": list(map(str, a.var_names)),
         "contexts": sorted(map(str, a.obs["cell_type"].unique()))}}
if {str(pp) if pp else ''!r}:
    info["genes"] = list(map(str, ad.read_h5ad({str(pp)!r}, backed="r").var_names))
open({str(out)!r}, "w").write(json.dumps(info))
"""
    subprocess.run([PY, "-c", code], check=True)
    return json.loads(out.read_text())


def _with_controls(work: Path, pred: Path, real: Path, out: Path) -> list[str]:
    """Command writing ``pred`` + ``real``'s control rows (cell-eval2 takes its controls from the prediction)."""
    code = f"""
import anndata as ad, numpy as np, scipy.sparse as sp
p = ad.read_h5ad({str(pred)!r}); r = ad.read_h5ad({str(real)!r}, backed="r")
c = r[(r.obs["target_gene"] == "non-targeting").to_numpy()].to_memory()
c = c[:, p.var_names].copy()
keep = ["target_gene"]
p.obs, c.obs = p.obs[keep].copy(), c.obs[keep].copy()
both = ad.concat([p, c], join="outer"); both.obs_names_make_unique()
both.X = sp.csr_matrix(both.X, dtype=np.float32)
both.write_h5ad({str(out)!r})
"""
    return [PY, "-c", code]


def vcell_steps(o, work: Path) -> list[dict]:
    rows: list[dict] = []
    raw, pp = work / "raw.h5ad", work / "pp" / "pp.h5ad"
    seed = ["--seed", str(o.seed)]

    def step(name, cmd, output: Path | None, part_of_job=True, **kw):
        if output is not None and output.exists() and o.reuse:
            earlier = _recorded(work, name)
            print(f"  {name}: reusing {output}" + (" and its earlier figures" if earlier else ""), file=sys.stderr)
            if earlier:
                rows.append({**earlier, "status": "ok (earlier run)"})
            return
        row = measure(name, cmd, work, **kw)
        row["job"] = part_of_job
        rows.append(_record(work, row))
        if row["status"] != "ok":
            raise SystemExit(f"{name} failed; see {row['log']}")

    controls = round(o.cells * 38_000 / 300_000) if o.cells else None  # the preset's share of controls
    sizes = [a for k, v in (("--n-cells", o.cells), ("--n-controls", controls), ("--n-genes", o.genes)) if v for a in (k, str(v))]
    step("simulate", [*VCELL, "data", "simulate", raw, "--preset", "vcc", *sizes, *seed, "--overwrite"], raw, part_of_job=False)
    step("check", [*VCELL, "data", "check", raw, "--batch-col", "gem_group"], None)
    pp.parent.mkdir(exist_ok=True)
    step("preprocess", [*VCELL, "data", "preprocess", raw, pp, "--n-top-genes", "2000", "--overwrite", *seed], pp)
    info = _probe(work, raw, pp)
    (work / "genes.txt").write_text("\n".join(info["genes"]) + "\n")
    (work / "genes_all.txt").write_text("\n".join(info["all_genes"]) + "\n")
    test = info["roles"]["test"]
    split = work / "split.toml"
    step("split", [*VCELL, "data", "split", pp, "--holdout-perturbations", ",".join(test), "--out", split, "--overwrite", *seed],
         split, part_of_job=False)
    subsets = {"real_pp.h5ad": [pp], "real_full.h5ad": [raw]}
    for name, src in subsets.items():
        step(f"subset {name}", [*VCELL, "data", "subset", *src, "--split", split, "--out", work / name, "--overwrite", *seed],
             work / name)
    table = work / "genes.safetensors"
    step("genes from-data", [*VCELL, "genes", "from-data", "--data", pp, "--out", table, "--overwrite", *seed], table,
         part_of_job=False)
    ctx = info["contexts"][0]
    run = work / "run"
    if (run / "last").exists() and o.reuse and _recorded(work, "train (vcell)"):
        rows.append({**_recorded(work, "train (vcell)"), "status": "ok (earlier run)"})
    else:
        rows.append(train(o, "vcell", work, [
            "train", "st", "--data", str(pp), "--split", str(split), "--backed", "--preset", "small",
            "--batch-size", str(ts.BATCH), "--set-size", str(ts.SET_LEN), "--max-steps", str(o.steps),
            "--accelerator", "cpu", "--num-workers", str(o.workers), "--pert-features", f"onehot,{table}",
            "--out", str(run), "--overwrite", *seed]))
    # one prediction, two files: raw counts over every gene of the raw file (the genes the model does not predict taken
    # from each cell's control cell: a full 2026 submission) and the log1p cells they were drawn from, over the model's
    # genes (scored by the 2025 profile)
    step("predict pred_counts.h5ad + pred.h5ad", [
        *VCELL, "predict", "--model", run, "--checkpoint", "last", "--data", work / "real_pp.h5ad", "--context", ctx,
        "--output", "counts", "--all-genes", raw, "--out", work / "pred_counts.h5ad", "--log1p-out", work / "pred.h5ad",
        "--overwrite", *seed], work / "pred.h5ad")
    step("eval prep (vcc2026)", [*VCELL, "eval", "prep", "--profile", "vcc2026", "--pred", work / "pred_counts.h5ad",
                                 "--genes", work / "genes_all.txt",
                                 "--out", work / "prep.h5ad", "--overwrite", *seed], work / "prep.h5ad")
    threads = ["--threads", "2"]
    step("eval run vcc (model genes)", [*VCELL, "eval", "run", "--profile", "vcc", "--backed", "--pred", work / "pred.h5ad",
                                        "--real", work / "real_pp.h5ad", "--out", work / "eval25", "--overwrite", *threads, *seed],
         work / "eval25" / "agg_results.csv")
    step("eval run vcc2026 (all genes)", [*VCELL, "eval", "run", "--profile", "vcc2026", "--backed", "--pred", work / "prep.h5ad",
                                          "--real", work / "real_full.h5ad", "--out", work / "eval26", "--overwrite", *threads,
                                          *seed], work / "eval26" / "agg_results.csv")
    step("eval baseline+anchor vcc2026 (all genes)", [*VCELL, "eval", "baseline", "--profile", "vcc2026", "--real",
                                                      work / "real_full.h5ad", "--out", work / "ends26", "--overwrite", *threads,
                                                      *seed], work / "ends26")
    return rows


def train(o, tool: str, work: Path, args: list[str]) -> dict:
    """One timed training child (``train_speed.py``'s hooks): cells/s, data share, peak memory."""
    python = PY if tool == "vcell" else ARC_PY
    print(f"[{time.strftime('%H:%M:%S')}] train {tool}", file=sys.stderr, flush=True)
    try:
        rec = ts.run_child(python, tool, "medium", args, work, f"train-{tool}")
        stats = ts.train_stats(rec, o.warmup)
    except SystemExit as e:
        return {"step": f"train ({tool})", "status": f"failed: {str(e).splitlines()[0]}", "job": False,
                "tool": "arc-state" if tool == "arc" else tool}
    print(f"  train {tool}: {stats['cells_per_s']:.0f} cells/s, data {stats['data_pct']:.1f}%", file=sys.stderr, flush=True)
    return _record(work, {"step": f"train ({tool})", "tool": "arc-state" if tool == "arc" else tool, "status": "ok", "job": False, "wall_s": stats["wall_s"],
                          "peak_rss_mib": stats["peak_rss_mib"], "peak_tree_mib": stats["peak_pss_mib"], **stats})


def peer_steps(o, work: Path) -> list[dict]:
    rows = []
    lim = dict(timeout=o.peer_timeout * 60, limit_gib=o.peer_memory_gib)
    state = str(Path(ARC_PY).parent / "state")
    ce, ce2 = str(Path(PY).parent / "cell-eval"), str(Path(PY).parent / "cell-eval2")
    cev = ["--pert-col", "target_gene", "--control-pert", "non-targeting", "--num-threads", "2"]
    ce2v = ["--preset", "vcc2026", "--pert-col", "target_gene", "--control", "non-targeting",
            "--set", "num_threads=2", "--set", "gather_threads=2"]
    pairs = [
        ("preprocess", [state, "tx", "preprocess_train", "--adata", work / "raw.h5ad", "--output", work / "arc_pp.h5ad",
                        "--num_hvgs", "2000"]),
    ]
    if "arc" in o.peers:
        for name, cmd in pairs:
            rows.append({**measure(f"{name} (arc-state)", cmd, work, **lim), "tool": "arc-state"})
        (work / "arc").mkdir(exist_ok=True)
        toml = work / "arc" / "data.toml"
        toml.write_text(f'[datasets]\nsim = "{work / "pp"}"\n\n[training]\nsim = "train"\n')
        rows.append(train(o, "arc", work, ts.arc_train_args(work / "pp" / "pp.h5ad", toml, work / "arc", "scale", o.steps, o.arc_workers)))
    if "eval" not in o.peers:
        return rows
    ctrl = work / "prep_with_controls.h5ad"
    if not ctrl.exists():
        measure("prediction + controls for cell-eval2", _with_controls(work, work / "prep.h5ad", work / "real_full.h5ad", ctrl), work)
    evals = [
        ("eval run vcc (model genes)", [ce, "run", "-ap", work / "pred.h5ad", "-ar", work / "real_pp.h5ad", "--profile", "vcc",
                                        "-o", work / "ce_eval25", *cev], "cell-eval 0.8.2"),
        ("eval run vcc2026 (all genes)", [ce2, "run", "-ap", ctrl, "-ar", work / "real_full.h5ad", "-o", work / "ce2_eval26",
                                            *ce2v], "cell-eval2 0.20.0"),
        ("eval baseline vcc2026 (all genes)", [ce2, "baseline", "-ar", work / "real_full.h5ad", "-o", work / "ce2_base26", *ce2v],
         "cell-eval2 0.20.0"),
    ]
    for name, cmd, tool in evals:
        rows.append({**measure(f"{name} ({tool})", cmd, work, **lim), "tool": tool})
    return rows


def report(rows: list[dict], o) -> str:
    def mib(v):
        return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"

    lines = ["| step | tool | in the 15-min job | wall s | peak RSS MiB | peak tree MiB | status |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        job = "yes" if r.get("job") else "-"
        lines.append(f"| {r['step']} | {r.get('tool', 'vcell')} | {job} | {r.get('wall_s', float('nan')):.1f} | "
                     f"{mib(r.get('peak_rss_mib'))} | {mib(r.get('peak_tree_mib'))} | {r['status']} |")
    job = [r for r in rows if r.get("tool", "vcell") == "vcell" and r.get("job")]
    total = sum(r["wall_s"] for r in job)
    worst = max((r["peak_rss_mib"] for r in rows if r.get("tool", "vcell") == "vcell" and "peak_rss_mib" in r), default=0)
    lines.append("")
    lines.append(f"vcell job without training and simulation: {total:.0f} s ({'PASS' if total <= BUDGET_S else 'FAIL'}: "
                 f"limit {BUDGET_S} s); largest vcell peak RSS {worst:,.0f} MiB "
                 f"({'PASS' if worst <= RSS_TARGET_MIB else 'FAIL'}: limit {RSS_TARGET_MIB} MiB)")
    for r in rows:
        if r["step"].startswith("train") and r["status"].startswith("ok"):
            lines.append(f"train ({r['tool']}): {r['cells_per_s']:,.0f} cells/s, data waiting {r['data_pct']:.1f}% of step time, "
                         f"{r['steps_timed']} steps timed")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--cells", type=int, default=None, help="cells of the simulated file (default: the vcc preset's 300,000)")
    ap.add_argument("--genes", type=int, default=None, help="genes (default: the preset's 18,080)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per tool")
    ap.add_argument("--warmup", type=int, default=5, help="training steps left out of the timing")
    ap.add_argument("--workers", type=int, default=0, help="vcell data-loader workers")
    ap.add_argument("--arc-workers", type=int, default=4, help="arc-state data-loader workers (its fastest here)")
    ap.add_argument("--no-peers", action="store_true", help="vcell steps only")
    ap.add_argument("--peers", default="arc,eval", help="which peers run: arc (arc-state preprocess and training), eval "
                    "(cell-eval and cell-eval2), comma-separated")
    ap.add_argument("--peer-timeout", type=float, default=30, help="minutes before a peer's step is stopped")
    ap.add_argument("--peer-memory-gib", type=float, default=18, help="tree RSS at which a peer's step is stopped")
    ap.add_argument("--reuse", action="store_true", help="skip vcell steps whose output exists (their earlier figures are reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    o = ap.parse_args()
    o.peers = {p.strip() for p in o.peers.split(",") if p.strip()}
    if o.peers - {"arc", "eval"}:
        ap.error(f"--peers: unknown peer(s) {', '.join(sorted(o.peers - {'arc', 'eval'}))} (use arc, eval)")
    work = o.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = vcell_steps(o, work)
    if not o.no_peers:
        rows += peer_steps(o, work)
    text = report(rows, o)
    print(text)
    if o.json:
        o.json.write_text(json.dumps({"rows": rows, "options": {k: str(v) for k, v in vars(o).items()}}, indent=1))


if __name__ == "__main__":
    main()
