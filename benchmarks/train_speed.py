#!/usr/bin/env python
"""Training and prediction throughput of vcell's State Transition model against arc-state 0.11.

The claim checked: at arc-state's ``state_sm`` size (width 672, 4 layers, 8 heads, set
length 128, batch 8 sets) on the same simulated data, on CPU, vcell trains at >= 2x arc-state's
cells/s with data loading <= 10% of its step time and <= 50% of its peak memory, and predicts at
>= 3x arc-state's ``tx infer`` cells/s.

What it does, in one run:

1. Simulates the data once (``vcell data simulate`` + ``vcell data preprocess``: ~16k cells x
   2,000 HVGs, log1p) in ``--workdir``; both tools read the same ``.h5ad``.
2. For each precision setting (``--precisions``, default ``highest,medium,bf16-mixed``), trains
   each tool for ``--steps`` steps in a fresh process of its own venv:
   - ``highest`` / ``medium``: ``torch.set_float32_matmul_precision``, fp32 model. arc-state sets
     "medium" itself (its default), which makes CPU matmuls bf16 (inputs rounded, fp32 out).
   - ``bf16-mixed``: matmul precision "highest", model under bf16 autocast. vcell: its own
     ``--precision bf16-mixed`` (train and predict). arc-state has no such option: the child
     passes ``precision="bf16-mixed"`` to its Lightning ``Trainer`` and runs its ``predict_step``
     under ``torch.autocast("cpu", bfloat16)`` (outputs back to float32, as vcell does) - the
     same mechanism, so the row compares like with like.
   The child is this file in ``_child`` mode: it sets the precision (and keeps the tool from
   changing it), adds a timing callback to every Lightning ``Trainer``, times every
   ``DataLoader`` ``next()``, then calls the tool's own entry point (``state tx train ...`` /
   ``vcell train st ...``).
   - steps/s: over the steps after ``--warmup`` (first batch start to last batch start).
   - data %: time inside ``DataLoader.__next__`` in that window / window time.
   - peak RSS: ``os.wait4`` ``ru_maxrss`` of the child (largest of it and its reaped children).
   - job PSS: the largest sum, over the child and all its descendants (data-loader workers),
     of their proportional set sizes (``/proc/PID/smaps_rollup``), sampled every 0.25 s: the
     memory the whole run takes, shared pages counted once.
3. Prediction: ``state tx infer`` vs ``vcell predict`` with the models just trained, on the
   cells of one context (``ctx_A``), set length 128. cells/s = cells through the model / time
   from the start of the first to the end of the last model call (the tool's own batching and
   per-set preparation included; loading, start-up and writing are not). Wall time of the
   whole command is reported too.
4. PASS/FAIL lines compare each setting with arc-state at the same setting, and vcell at each
   setting with arc-state at its own default ("medium").

Example::

    flock /tmp/vcell_cpu.lock .venv/bin/python benchmarks/train_speed.py --steps 40 \\
        --workdir /tmp/speed --json /tmp/speed/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
BATCH, SET_LEN = 8, 128
PSS_EVERY_S = 0.25  # job-memory sampling interval (reading smaps_rollup costs ~1-3 ms per process)
CONTEXT = "ctx_A"


# --------------------------------------------------------------------------- child side


def _child(argv: list[str]) -> None:
    """Run a tool's entry point with timing hooks; write the records to ``--times`` at exit."""
    import atexit
    import resource

    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", required=True)
    parser.add_argument("--times", required=True)
    parser.add_argument("tool", choices=["arc", "vcell"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args

    import torch

    bf16 = ns.precision == "bf16-mixed"
    torch.set_float32_matmul_precision("highest" if bf16 else ns.precision)
    torch.set_float32_matmul_precision = lambda *_a, **_k: None  # the tool may not change it
    rec: dict = {"batch_start": [], "batch_end": [], "next": [], "model_calls": [], "precision": ns.precision}

    def dump() -> None:
        rec["self_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(ns.times).write_text(json.dumps(rec))

    atexit.register(dump)

    from torch.utils.data import dataloader

    orig_next = dataloader._BaseDataLoaderIter.__next__

    def timed_next(self):
        t0 = time.perf_counter()
        try:
            return orig_next(self)
        finally:
            rec["next"].append((t0, time.perf_counter()))

    dataloader._BaseDataLoaderIter.__next__ = timed_next

    from lightning.pytorch import Callback, Trainer

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rec["batch_start"].append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec["batch_end"].append(time.perf_counter())

    orig_init = Trainer.__init__

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [Timer()]
        if bf16 and ns.tool == "arc":
            k["precision"] = "bf16-mixed"  # arc-state has no precision option; vcell passes its own
        orig_init(self, *a, **k)

    Trainer.__init__ = init

    def record_calls(cls, name, count):
        orig = getattr(cls, name)

        def wrapped(self, *a, **k):
            t0 = time.perf_counter()
            out = orig(self, *a, **k)
            if not torch.is_grad_enabled():
                rec["model_calls"].append((t0, time.perf_counter(), count(*a, **k)))
            return out

        setattr(cls, name, wrapped)

    if ns.tool == "arc":
        from state.tx.models.state_transition import StateTransitionPerturbationModel

        if bf16:
            # tx infer converts outputs with .numpy(), which has no bfloat16: autocast inside
            # the model call and hand back float32, as vcell does
            orig_step = StateTransitionPerturbationModel.predict_step

            def bf16_step(self, *a, **k):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = orig_step(self, *a, **k)
                as32 = lambda v: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v  # noqa: E731
                return {key: as32(v) for key, v in out.items()} if isinstance(out, dict) else as32(out)

            StateTransitionPerturbationModel.predict_step = bf16_step
        record_calls(StateTransitionPerturbationModel, "predict_step", lambda batch, *a, **k: int(batch["ctrl_cell_emb"].shape[0]))
        from state.__main__ import main

        sys.argv = ["state", *args]
        main()
    else:
        from vcell.nn.transition import StateTransition

        def n_cells(basal, pert, batch=None, mask=None):
            return int(mask.sum()) if mask is not None else int(basal.shape[0] * basal.shape[1])

        record_calls(StateTransition, "forward", n_cells)
        from vcell.cli import main

        main([*args, "--precision", "bf16-mixed"] if bf16 else args)


# --------------------------------------------------------------------------- parent side


def _tree_pss_kib(root: int) -> int:
    """Proportional set size (KiB) of ``root`` and all its descendants: each shared page counted
    once over the processes that share it, so forked loader workers are not double counted."""
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
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total


def _sample_pss(pid: int, every: float, out: list[int], stop: threading.Event) -> None:
    while not stop.wait(every):
        out.append(_tree_pss_kib(pid))


def run_child(python: str, tool: str, precision: str, tool_args: list[str], workdir: Path, tag: str, env_extra: dict | None = None) -> dict:
    """Run one timed child process; returns its records plus peak RSS, peak job PSS and wall time."""
    times = workdir / f"{tag}.times.json"
    log = workdir / f"{tag}.log"
    times.unlink(missing_ok=True)
    cmd = [python, str(HERE), "_child", "--precision", precision, "--times", str(times), tool, "--", *tool_args]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        pss: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_pss, args=(proc.pid, PSS_EVERY_S, pss, stop), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not times.exists():
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"{tag} failed (exit {code}); see {log}:\n" + "\n".join(tail))
    rec = json.loads(times.read_text())
    rec["peak_rss_mib"] = usage.ru_maxrss / 1024
    rec["peak_pss_mib"] = max(pss, default=0) / 1024
    rec["wall_s"] = wall
    rec["cmd"] = " ".join(cmd)
    return rec


def train_stats(rec: dict, warmup: int) -> dict:
    """steps/s, cells/s and data-loading share over the steps after ``warmup``."""
    starts = rec["batch_start"]
    if len(starts) < warmup + 3:
        raise SystemExit(f"only {len(starts)} steps recorded; use --steps > --warmup + 2")
    t0, t1 = starts[warmup], starts[-1]
    n = len(starts) - 1 - warmup
    window = t1 - t0
    data = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in rec["next"])
    steps_s = n / window
    return {
        "steps_timed": n,
        "steps_per_s": steps_s,
        "cells_per_s": steps_s * BATCH * SET_LEN,
        "data_pct": 100 * data / window,
        "peak_rss_mib": rec["peak_rss_mib"],
        "peak_pss_mib": rec["peak_pss_mib"],
        "wall_s": rec["wall_s"],
    }


def predict_stats(rec: dict) -> dict:
    """cells/s through the model, from the first call's start to the last call's end."""
    calls = rec["model_calls"]
    if not calls:
        raise SystemExit("no model calls recorded during prediction")
    cells = sum(c for _, _, c in calls)
    span = calls[-1][1] - calls[0][0]
    return {"cells": cells, "calls": len(calls), "cells_per_s": cells / span, "span_s": span,
            "peak_rss_mib": rec["peak_rss_mib"], "peak_pss_mib": rec["peak_pss_mib"], "wall_s": rec["wall_s"]}


def make_data(workdir: Path, seed: int) -> Path:
    """The simulated log1p dataset (made once)."""
    data = workdir / "data" / "sim.h5ad"
    if data.exists():
        return data
    data.parent.mkdir(parents=True, exist_ok=True)
    vcell = [sys.executable, "-m", "vcell"]
    counts = workdir / "sim_counts.h5ad"
    subprocess.run([*vcell, "data", "simulate", str(counts), "--seed", str(seed), "--overwrite"], check=True, capture_output=True)
    subprocess.run([*vcell, "data", "preprocess", str(counts), str(data), "--overwrite"], check=True, capture_output=True)
    return data


def arc_train_args(data: Path, toml: Path, out: Path, name: str, steps: int, workers: int) -> list[str]:
    """``state tx train`` arguments for ``state_sm`` at vcell's sizes, no validation, no wandb."""
    return [
        "tx", "train",
        f"data.kwargs.toml_config_path={toml}",
        "data.kwargs.embed_key=null",
        "data.kwargs.output_space=gene",
        "data.kwargs.pert_col=target_gene",
        "data.kwargs.control_pert=non-targeting",
        "data.kwargs.cell_type_key=cell_type",
        "data.kwargs.batch_col=gem_group",
        f"data.kwargs.num_workers={workers}",
        "model=state_sm",
        f"model.kwargs.cell_set_len={SET_LEN}",
        f"training.batch_size={BATCH}",
        f"training.max_steps={steps}",
        "training.val_freq=1000000",
        "training.ckpt_every_n_steps=1000000",
        "use_wandb=false",
        f"output_dir={out}",
        f"name={name}",
        "overwrite=true",
    ]


def main() -> None:
    """Parent: run every child, print the tables; ``_child``: run one timed tool command."""
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vcell-train-speed"))
    ap.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    ap.add_argument("--precisions", default="highest,medium,bf16-mixed",
                    help="highest / medium (torch.set_float32_matmul_precision) and/or bf16-mixed (autocast)")
    ap.add_argument("--arc-python", default="/tmp/arcstate/bin/python", help="python of the arc-state venv")
    ap.add_argument("--arc-workers", type=int, default=0, help="arc-state data.kwargs.num_workers")
    ap.add_argument("--vcell-workers", type=int, default=0, help="vcell --num-workers")
    ap.add_argument("--no-predict", action="store_true", help="skip the prediction comparison")
    ap.add_argument("--no-peer", action="store_true", help="vcell only: no arc-state runs (its venv is not needed)")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    if not opts.no_peer and not Path(opts.arc_python).is_file():
        ap.error(f"arc-state's python {opts.arc_python} not found: make its venv (README), pass --arc-python, or --no-peer")

    work = opts.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, opts.seed)
    toml = work / "arc.toml"
    toml.write_text(f'[datasets]\nsim = "{data.parent}"\n\n[training]\nsim = "train"\n')
    precisions = [p.strip() for p in opts.precisions.split(",") if p.strip()]
    load0 = os.getloadavg()
    results: dict = {"train": {}, "predict": {}, "settings": vars(opts) | {"workdir": str(work)}, "loadavg_start": load0}
    vpy = sys.executable

    for prec in precisions:
        arc_out = work / f"arc-{prec}"
        if not opts.no_peer:
            arc = run_child(opts.arc_python, "arc", prec, arc_train_args(data, toml, work, f"arc-{prec}", opts.steps, opts.arc_workers),
                            work, f"train-arc-{prec}")
            results["train"][f"arc-state/{prec}"] = train_stats(arc, opts.warmup)
        v_out = work / f"vcell-{prec}"
        shutil.rmtree(v_out, ignore_errors=True)
        vargs = ["train", "st", "--data", str(data), "--preset", "small", "--batch-size", str(BATCH), "--set-size", str(SET_LEN),
                 "--max-steps", str(opts.steps), "--checkpoint-every", "1000000", "--accelerator", "cpu",
                 "--num-workers", str(opts.vcell_workers), "--out", str(v_out), "--seed", str(opts.seed)]
        vc = run_child(vpy, "vcell", prec, vargs, work, f"train-vcell-{prec}")
        results["train"][f"vcell/{prec}"] = train_stats(vc, opts.warmup)
        if not opts.no_predict and not opts.no_peer:
            pa = run_child(opts.arc_python, "arc", prec, [
                "tx", "infer", "--model-dir", str(arc_out), "--adata", str(data), "--pert-col", "target_gene",
                "--celltype-col", "cell_type", "--celltypes", CONTEXT, "--output", str(work / f"arc-pred-{prec}.h5ad"),
                "--seed", str(opts.seed), "--quiet",
            ], work, f"predict-arc-{prec}", {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})  # its own pickled checkpoint
            results["predict"][f"arc-state/{prec}"] = predict_stats(pa)
        if not opts.no_predict:
            pv = run_child(vpy, "vcell", prec, [
                "predict", "--model", str(v_out), "--data", str(data), "--context", CONTEXT, "--perturbations", "data",
                "--set-size", str(SET_LEN), "--out", str(work / f"vcell-pred-{prec}.h5ad"), "--overwrite", "--seed", str(opts.seed),
            ], work, f"predict-vcell-{prec}")
            results["predict"][f"vcell/{prec}"] = predict_stats(pv)
    results["loadavg_end"] = os.getloadavg()
    report(results, precisions, opts)


def report(results: dict, precisions: list[str], opts) -> None:
    """Print the tables and the PASS/FAIL lines; write ``--json``."""
    train, pred = results["train"], results["predict"]
    default = "arc-state/medium"  # what arc-state runs with unless told otherwise

    def ratios(table: dict, key: str) -> tuple[float, float]:
        prec = key.split("/", 1)[1]
        same, dflt = table.get(f"arc-state/{prec}"), table.get(default)
        v = table[key]["cells_per_s"]
        return (v / same["cells_per_s"] if same else float("nan"), v / dflt["cells_per_s"] if dflt else float("nan"))

    print(f"\nTraining: batch {BATCH} sets x {SET_LEN} cells, state_sm size, {opts.steps} steps ({opts.warmup} warm-up not timed)")
    print("| tool | precision | steps/s | cells/s | data-loading % | peak RSS MiB | job PSS MiB | vs arc-state, same precision | vs arc-state default (medium) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, s in train.items():
        tool, prec = key.split("/", 1)
        same, dflt = ratios(train, key)
        print(f"| {tool} | {prec} | {s['steps_per_s']:.2f} | {s['cells_per_s']:,.0f} | {s['data_pct']:.1f} | {s['peak_rss_mib']:,.0f} "
              f"| {s['peak_pss_mib']:,.0f} | {same:.2f}x | {dflt:.2f}x |")
    if pred:
        print(f"\nPrediction: context {CONTEXT}, set length {SET_LEN}")
        print("| tool | precision | cells | cells/s (model loop) | wall s (whole command) | peak RSS MiB | vs arc-state, same precision | vs arc-state default (medium) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for key, s in pred.items():
            tool, prec = key.split("/", 1)
            same, dflt = ratios(pred, key)
            print(f"| {tool} | {prec} | {s['cells']:,} | {s['cells_per_s']:,.0f} | {s['wall_s']:.1f} | {s['peak_rss_mib']:,.0f} | {same:.2f}x | {dflt:.2f}x |")
    print(f"\nload average: start {results['loadavg_start'][0]:.2f}, end {results['loadavg_end'][0]:.2f} (2 cores)")
    print("Targets: training >= 2x and prediction >= 3x arc-state's cells/s, data loading <= 10% of the step,")
    print("peak memory <= 50% of arc-state's. Each vcell setting against arc-state at the same setting and at its default:")
    for prec in precisions:
        v = train[f"vcell/{prec}"]
        bases = [("same precision", f"arc-state/{prec}")]
        if prec != "medium" and default in train:
            bases.append(("arc-state default", default))
        for label, base_key in bases:
            if base_key not in train:  # --no-peer
                continue
            a = train[base_key]
            r, m = v["cells_per_s"] / a["cells_per_s"], v["peak_rss_mib"] / a["peak_rss_mib"]
            j = v["peak_pss_mib"] / a["peak_pss_mib"] if a["peak_pss_mib"] else float("nan")
            lines = [("train speed", r >= 2.0, f"{r:.2f}x cells/s (>= 2x)"),
                     ("peak memory", m <= 0.5, f"{m:.0%} of peak RSS, largest process (<= 50%)"),
                     ("job memory", j <= 0.5, f"{j:.0%} of peak PSS, all processes (<= 50%)")]
            if pred and f"vcell/{prec}" in pred and base_key in pred:
                rp = pred[f"vcell/{prec}"]["cells_per_s"] / pred[base_key]["cells_per_s"]
                lines.append(("predict speed", rp >= 3.0, f"{rp:.2f}x cells/s (>= 3x)"))
            for name, good, text in lines:
                print(f"{'PASS' if good else 'FAIL'} vcell {prec} vs {base_key} ({label}): {name} {text}")
        good = v["data_pct"] <= 10.0
        print(f"{'PASS' if good else 'FAIL'} vcell {prec}: data loading {v['data_pct']:.1f}% of step time (<= 10%)")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
