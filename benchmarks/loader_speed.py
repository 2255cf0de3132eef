#!/usr/bin/env python
"""Cell-set loader throughput: vcell (in memory and streaming) against cell-load, on one file.

The claims checked (issue #15, item 3): streaming cell sets from a 300,000-cell x 2,000-gene
log1p file, vcell's loader delivers >= 50,000 perturbed cells/s per worker (a GPU step of
16 sets x 128 cells at 20 steps/s needs ~41,000) and >= 5x cell-load's figure in the same run,
with peak memory that grows <= 1.2x when the file doubles.

What it does, in one run:

1. Builds (once, kept in ``--workdir``; or takes ``--file``) a CSR log1p ``.h5ad`` with the
   structure of the Virtual Cell Challenge training data: one context, ~300 perturbations x
   ~870 cells, ~38,000 controls (``non-targeting``), 8 ``gem_group`` batches. It is written chunk
   by chunk with :class:`vcell.data.h5write.H5adWriter`: each chunk is one
   :func:`vcell.data.simulate.simulate_perturbseq` call (30 perturbations + ~3,900 controls,
   cells in random order) followed by ``log1p``. The doubled file (600,000 cells, for the memory
   check) takes the same chunks plus as many more. Generation is not timed.
2. In a fresh child process per row (so each peak RSS is that run's alone), measures:
   - ``vcell in memory``: ``load_dataset(backed=False)``, ``CellSetDataset`` over the in-memory
     rows, a torch ``DataLoader`` of ``collate_cell_sets`` batches, 0 workers;
   - ``vcell streaming``: the same with ``backed=True`` (rows read from the file), 0 workers, and
     with 2 workers (total throughput, and per worker); and with the direct reads switched off
     (rows through h5py, each run of consecutive rows in one read per CSR array: what a
     compressed file gets, and about what every file got before);
   - ``cell-load``: arc-state's ``PerturbationDataModule`` (cell-load) built from a TOML over the
     same file (pert col ``target_gene``, control ``non-targeting``, cell type ``cell_type``,
     batch ``gem_group``, ``embed_key`` null, ``output_space`` gene, cell_set_len 128,
     batch_size 16 sets), its ``train_dataloader()``, 0 workers, in the arc-state venv; once with
     ``basal_mapping_strategy`` batch (controls of the same ``gem_group``, as vcell) and once
     with random (arc-state's default). Its ``use_consecutive_loading`` refuses this file (cells
     in barcode order, not grouped by perturbation), so it is not measured.
   - ``vcell streaming`` on the doubled file, for the memory ratio.
   Settings: sets of 128 cells, 16 sets per batch, the training plan (control strategy
   ``batch``), ``--batches`` timed batches after ``--warmup`` untimed ones.
3. cells/s = perturbed cells delivered (their paired control rows are read too) / time spent in
   the loader's ``next()``; with 0 workers also per CPU second of the process (less sensitive to
   other load on the machine). Peak RSS = ``os.wait4`` ``ru_maxrss`` of the child (workers: the
   largest of the child and its reaped workers, reported separately). Prints a markdown table
   and PASS/FAIL lines; ``--json`` writes the raw numbers.

Example::

    flock /tmp/vcell_cpu.lock .venv/bin/python benchmarks/loader_speed.py \\
        --workdir /tmp/i15/loader --json /tmp/i15/loader/loader_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
SET_LEN, BATCH = 128, 16
CHUNK_CELLS = 30_000  # cells per simulated chunk: 30 perturbations x ~870 + ~3,900 controls
CHUNK_PERTS, CHUNK_CPP, CHUNK_CONTROLS = 30, 900, 4_000  # ~31,000 simulated, first 30,000 kept
N_BATCHES_GEM = 8
TARGET_CELLS_PER_S, TARGET_VS_PEER, MEMORY_LIMIT = 50_000, 5.0, 1.2
ARC_PYTHON = "/tmp/arcstate/bin/python"


# --------------------------------------------------------------------------- data


def _chunk(k: int, n_genes: int, seed: int):
    """Chunk ``k``: ``CHUNK_CELLS`` simulated cells as log1p CSR plus their obs columns."""
    import numpy as np

    from vcell.data.simulate import simulate_perturbseq

    a = simulate_perturbseq(n_genes=n_genes, n_contexts=1, n_perturbations=CHUNK_PERTS, n_combinations=0,
                            cells_per_perturbation=CHUNK_CPP, cell_jitter=0.1, n_controls=CHUNK_CONTROLS,
                            n_batches=N_BATCHES_GEM, seed=seed + k)  # fmt: skip
    if a.n_obs < CHUNK_CELLS:
        raise SystemExit(f"chunk {k}: simulation gave {a.n_obs} < {CHUNK_CELLS} cells")
    X = a.X[:CHUNK_CELLS].tocsr()  # cells come in random order: the first ones are a random subset
    X.data = np.log1p(X.data)
    labels = a.obs["target_gene"].iloc[:CHUNK_CELLS].astype(str).to_numpy()
    labels = np.where(labels == "non-targeting", labels, np.char.add(f"c{k:02d}_", labels.astype(str)))
    gem = a.obs["gem_group"].iloc[:CHUNK_CELLS].astype(str).to_numpy()
    return X, labels, gem, a.var_names


def generate(paths: dict[int, Path], n_genes: int, seed: int) -> None:
    """Write one ``.h5ad`` per entry of ``paths`` (n chunks -> path), sharing their first chunks."""
    import numpy as np
    import pandas as pd
    from rich.progress import Progress

    from vcell.data.h5write import H5adWriter
    from vcell.data.io import atomic_path

    n_max = max(paths)
    with Progress() as bar:
        task = bar.add_task("simulating chunks", total=n_max)
        with __import__("contextlib").ExitStack() as stack:
            tmps = {n: stack.enter_context(atomic_path(p)) for n, p in paths.items()}
            writers = {n: stack.enter_context(H5adWriter(tmps[n], n_genes)) for n in paths}
            labels, gems, var_names = [], [], None
            for k in range(n_max):
                X, lab, gem, var_names = _chunk(k, n_genes, seed)
                for n, w in writers.items():
                    if k < n:
                        w.append(X=X)
                labels.append(lab)
                gems.append(gem)
                bar.advance(task)
            var = pd.DataFrame(index=pd.Index(var_names))
            for n, w in writers.items():
                lab, gem = np.concatenate(labels[:n]), np.concatenate(gems[:n])
                obs = pd.DataFrame(
                    {"target_gene": pd.Categorical(lab), "cell_type": pd.Categorical(["ctx_A"] * lab.size),
                     "gem_group": pd.Categorical(gem), "dataset": pd.Categorical(["synthetic"] * lab.size)},
                    index=pd.Index([f"cell{i:07d}" for i in range(lab.size)]),
                )  # fmt: skip
                w.finish(obs, var, uns={"vcell": {"expression": "log1p"}, "log1p": {"base": None}})


def main_generate(argv: list[str]) -> None:
    """``_generate N1=PATH1 N2=PATH2 --genes G --seed S``: write the simulated files."""
    ap = argparse.ArgumentParser()
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--genes", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ns = ap.parse_args(argv)
    paths = {int(t.split("=", 1)[0]): Path(t.split("=", 1)[1]) for t in ns.targets}
    generate(paths, ns.genes, ns.seed)


# --------------------------------------------------------------------------- measurement (child side)


def _timed(loader, n_batches: int, warmup: int, count, on_timed=None) -> dict:
    """Iterate ``warmup + n_batches`` batches; time the last ``n_batches`` (loader ``next()`` only).

    ``on_timed`` is called once the warm-up batches are done."""
    it = iter(loader)
    t_first = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t_warm = time.perf_counter()
    if on_timed is not None:
        on_timed()
    cells, busy, cpu0 = 0, 0.0, time.process_time()
    for _ in range(n_batches):
        t0 = time.perf_counter()
        batch = next(it)
        busy += time.perf_counter() - t0
        cells += count(batch)
    cpu = time.process_time() - cpu0
    del it
    return {"cells": cells, "batches": n_batches, "seconds": busy, "cpu_s": cpu, "warmup_s": t_warm - t_first}


def _peaks(workers: int) -> dict:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0
    return {"self_peak_mib": own, "worker_peak_mib": kids}


def child_vcell(path: str, mode: str, workers: int, n_batches: int, warmup: int, seed: int, via_hdf5: bool = False) -> dict:
    """vcell's ST cell-set loader over ``path`` (``mode``: ``memory`` or ``stream``).

    ``via_hdf5``: stream through h5py as for a compressed file (the direct reads switched off)."""
    t0 = time.perf_counter()
    import torch
    from torch.utils.data import DataLoader

    from vcell.data import h5direct
    from vcell.data import rows as rows_mod

    if via_hdf5:
        h5direct.AVAILABLE = False
    from vcell.data.cellsets import CellSetDataset, CellSetSampler, collate_cell_sets
    from vcell.data.dataset import load_dataset
    from vcell.data.rows import row_source
    from vcell.data.spec import DataSpec

    torch.set_num_threads(1)
    t_load = time.perf_counter()
    data = load_dataset(path, DataSpec(batch_col="gem_group"), backed=(mode == "stream"))
    sampler = CellSetSampler(data.index, None, "train", SET_LEN, "batch", True, seed)
    source = row_source(data.adata, data.path)
    dataset = CellSetDataset(sampler, source)
    load_s = time.perf_counter() - t_load
    reading = [0.0]
    if workers == 0:  # time inside the row reader: the rest is set assembly, collation and DataLoader
        cls = type(source)
        orig = cls.read

        def read(self, rows):
            t = time.perf_counter()
            try:
                return orig(self, rows)
            finally:
                reading[0] += time.perf_counter() - t

        cls.read = read
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=False, collate_fn=collate_cell_sets, num_workers=workers)
    rec = _timed(loader, n_batches, warmup, lambda b: int(b["mask"].sum()), on_timed=lambda: reading.__setitem__(0, 0.0))
    rec["read_share"] = reading[0] / rec["seconds"] if workers == 0 and rec["seconds"] else None
    rec["direct"] = bool(getattr(source, "direct", False)) if isinstance(source, rows_mod.H5Rows) else None
    rec.update(load_s=load_s, start_s=t_load - t0, n_sets_epoch=len(dataset), n_cells=int(data.adata.n_obs))
    del loader
    rec.update(_peaks(workers))
    return rec


def _file_cells(path: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].attrs["shape"][0])


def child_cellload(path: str, workers: int, n_batches: int, warmup: int, seed: int, mapping: str, consecutive: bool) -> dict:
    """cell-load's ``PerturbationDataModule`` train loader over ``path`` (arc-state's settings)."""
    t0 = time.perf_counter()
    import torch
    from cell_load.data_modules import PerturbationDataModule

    torch.set_num_threads(1)
    toml = Path(tempfile.mkdtemp(prefix="loader_speed_")) / "data.toml"
    toml.write_text(f'[datasets]\nsim = "{path}"\n\n[training]\nsim = "train"\n')
    t_load = time.perf_counter()
    dm = PerturbationDataModule(
        toml_config_path=str(toml), batch_size=BATCH, num_workers=workers, random_seed=seed,
        pert_col="target_gene", batch_col="gem_group", cell_type_key="cell_type", control_pert="non-targeting",
        embed_key=None, output_space="gene", cell_sentence_len=SET_LEN, basal_mapping_strategy=mapping,
        use_consecutive_loading=consecutive, n_basal_samples=1, should_yield_control_cells=True, barcode=True,
    )  # fmt: skip
    dm.setup(stage="fit")
    loader = dm.train_dataloader()
    load_s = time.perf_counter() - t_load
    rec = _timed(loader, n_batches, warmup, lambda b: int(b["pert_cell_emb"].shape[0]))
    rec.update(load_s=load_s, start_s=t_load - t0, read_share=None, direct=None, n_sets_epoch=len(loader) * BATCH,
               n_cells=_file_cells(path))
    del loader, dm
    rec.update(_peaks(workers))
    return rec


def main_child(argv: list[str]) -> None:
    """``_child TOOL ...``: one measurement; prints its JSON record on the last line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("tool", choices=["vcell", "cell-load"])
    ap.add_argument("--file", required=True)
    ap.add_argument("--mode", default="stream", choices=["memory", "stream"])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batches", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mapping", default="batch")
    ap.add_argument("--consecutive", action="store_true")
    ap.add_argument("--via-hdf5", action="store_true")
    ns = ap.parse_args(argv)
    if ns.tool == "vcell":
        rec = child_vcell(ns.file, ns.mode, ns.workers, ns.batches, ns.warmup, ns.seed, ns.via_hdf5)
    else:
        rec = child_cellload(ns.file, ns.workers, ns.batches, ns.warmup, ns.seed, ns.mapping, ns.consecutive)
    print(json.dumps(rec))


# --------------------------------------------------------------------------- parent side


def run_child(python: str, args: list[str], label: str) -> dict:
    """One measurement in a fresh process; adds its peak RSS (``os.wait4``) and wall time."""
    cmd = [python, str(HERE), "_child", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO / "src") if python == sys.executable else ""}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, and its reaped workers'
        code = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if code != 0 or not out.strip():
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"{label} failed (exit {code}): {' '.join(cmd)}")
    rec = json.loads(out.strip().splitlines()[-1])
    rec.update(label=label, peak_rss_mib=usage.ru_maxrss / 1024, wall_s=time.perf_counter() - t0, cmd=" ".join(cmd))
    rec["cells_per_s"] = rec["cells"] / rec["seconds"]
    return rec


def _fmt(x, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    head = ("loader", "file cells", "workers", "batches timed", "cells/s (total)", "cells/s per worker",
            "cells per CPU s", "time in row reads", "setup s", "peak RSS MiB", "largest worker MiB")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        per = r["cells_per_s"] / max(1, r["workers"])
        share = None if r.get("read_share") is None else f"{100 * r['read_share']:.0f}%"
        lines.append("| " + " | ".join([
            r["label"], f"{r['n_cells']:,}", str(r["workers"]), str(r["batches"]), _fmt(r["cells_per_s"]), _fmt(per),
            _fmt(r["cells"] / r["cpu_s"] if r["workers"] == 0 and r["cpu_s"] else None), share or "-", _fmt(r["load_s"], ".1f"), _fmt(r["peak_rss_mib"]), _fmt(r.get("worker_peak_mib") or None),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    """Parent: build the data, run every measurement in its own process, print the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        main_generate(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        main_child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vcell-loader-speed"), help="where the files are built")
    ap.add_argument("--file", type=Path, default=None, help="use this .h5ad instead of building one (no doubling check)")
    ap.add_argument("--genes", type=int, default=2000, help="genes of the built file (default 2000)")
    ap.add_argument("--chunks", type=int, default=10, help="30,000-cell chunks of the built file (default 10: 300k)")
    ap.add_argument("--batches", type=int, default=120, help="timed batches of vcell (default 120)")
    ap.add_argument("--peer-batches", type=int, default=5, help="timed batches of cell-load (default 5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    ap.add_argument("--arc-python", default=ARC_PYTHON, help="python of the venv with cell-load")
    ap.add_argument("--no-peer", action="store_true", help="skip cell-load")
    ap.add_argument("--no-double", action="store_true", help="skip the doubled file (memory check)")
    ap.add_argument("--no-memory", action="store_true", help="skip the in-memory row (for files larger than memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    opts = ap.parse_args()

    work = opts.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    n_cells = opts.chunks * CHUNK_CELLS
    if opts.file is not None:
        path, double = opts.file.resolve(), None
    else:
        path = work / f"sim_{n_cells // 1000}k_{opts.genes}g.h5ad"
        double = None if opts.no_double else work / f"sim_{2 * n_cells // 1000}k_{opts.genes}g.h5ad"
        need = {n: p for n, p in ((opts.chunks, path), (2 * opts.chunks, double)) if p is not None and not p.exists()}
        if need:
            print(f"building {', '.join(str(p) for p in need.values())} (once)", file=sys.stderr)
            subprocess.run([sys.executable, str(HERE), "_generate", *(f"{n}={p}" for n, p in need.items()),
                            "--genes", str(opts.genes), "--seed", str(opts.seed)], check=True)  # fmt: skip
    common = ["--batches", str(opts.batches), "--warmup", str(opts.warmup), "--seed", str(opts.seed)]
    vpy, results, load_start = sys.executable, [], os.getloadavg()

    def vcell(label, file, mode, workers, extra=(), timing=common):
        print(f"measuring: {label}", file=sys.stderr)
        args = ["vcell", "--file", str(file), "--mode", mode, "--workers", str(workers), *timing, *extra]
        results.append(run_child(vpy, args, label))
        results[-1]["workers"] = workers

    if not opts.no_memory:
        vcell("vcell in memory", path, "memory", 0)
    vcell("vcell streaming", path, "stream", 0)
    vcell("vcell streaming", path, "stream", 2)
    slow = ["--batches", str(opts.peer_batches), "--warmup", "1", "--seed", str(opts.seed)]
    vcell("vcell streaming via h5py (direct reads off)", path, "stream", 0, ["--via-hdf5"], slow)
    if not opts.no_peer:
        peer = ["--batches", str(opts.peer_batches), "--warmup", "1", "--seed", str(opts.seed)]
        for label, extra in (("cell-load (batch mapping)", ["--mapping", "batch"]),
                             ("cell-load (random mapping, arc-state's default)", ["--mapping", "random"])):
            print(f"measuring: {label}", file=sys.stderr)
            results.append(run_child(opts.arc_python, ["cell-load", "--file", str(path), *peer, *extra], label))
            results[-1]["workers"] = 0
    if double is not None:
        vcell("vcell streaming (doubled file)", double, "stream", 0)

    print(table(results))
    print(f"\nload average at start / end: {load_start[0]:.1f} / {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    stream0 = next(r for r in results if r["label"] == "vcell streaming" and r["workers"] == 0)
    verdicts = {"cells_per_s_per_worker": stream0["cells_per_s"] >= TARGET_CELLS_PER_S}
    print(f"\nstreaming, 0 workers: {stream0['cells_per_s']:,.0f} cells/s (target >= {TARGET_CELLS_PER_S:,}) -> "
          f"{'PASS' if verdicts['cells_per_s_per_worker'] else 'FAIL'}")  # fmt: skip
    peers = [r for r in results if r["label"].startswith("cell-load")]
    if peers:
        best = max(peers, key=lambda r: r["cells_per_s"])
        ratio = stream0["cells_per_s"] / best["cells_per_s"]
        verdicts["vs_cell_load"] = ratio >= TARGET_VS_PEER
        print(f"vs cell-load's fastest ({best['label']}, {best['cells_per_s']:,.0f} cells/s): {ratio:.1f}x "
              f"(target >= {TARGET_VS_PEER:g}x) -> {'PASS' if verdicts['vs_cell_load'] else 'FAIL'}")  # fmt: skip
    big = next((r for r in results if r["label"].endswith("(doubled file)")), None)
    if big is not None:
        ratio = big["peak_rss_mib"] / stream0["peak_rss_mib"]
        verdicts["memory_flat"] = ratio <= MEMORY_LIMIT
        print(f"streaming peak RSS, doubled file / file: {ratio:.3f} (limit {MEMORY_LIMIT}) -> "
              f"{'PASS' if verdicts['memory_flat'] else 'FAIL'}")  # fmt: skip
    if opts.json:
        opts.json.write_text(json.dumps({"results": results, "verdicts": verdicts, "settings": {k: str(v) for k, v in vars(opts).items()},
                                         "loadavg_start": load_start, "loadavg_end": os.getloadavg()}, indent=2))  # fmt: skip
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
