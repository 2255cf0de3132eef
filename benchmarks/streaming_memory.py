#!/usr/bin/env python
"""Peak memory of cell-set training batches read from a backed ``.h5ad``, as the file grows.

The claim checked: streaming rows from a backed file keeps peak memory flat (at most 1.2x)
when the file grows ``--factor`` times (8x by default) at the same batch size.

What it does:

1. Builds two CSR count ``.h5ad`` files with the same genes, contexts and perturbations: a
   small one of N cells (one call of :func:`vcell.data.simulate.simulate_perturbseq`) and a
   large one of ``factor`` x N cells, written chunk by chunk (the small file's cells, then
   ``factor - 1`` more simulated chunks with other seeds) into resizable HDF5 datasets, so
   the large matrix is never held in memory. Generation runs in its own process and is not
   timed.
2. For each file, in a fresh process (so its peak RSS is that of the measured run alone):
   ``load_dataset(backed=True)``, hold out one context, build ``CellSetSampler`` (train) and
   ``CellSetDataset`` over ``row_source(...)``, and iterate ``--batches`` batches of a torch
   ``DataLoader`` (``collate_cell_sets``). The same is run with ``backed=False`` (whole matrix
   loaded) as a contrast.
3. Prints a markdown table and the peak ratio large/small for streaming: PASS if <= 1.2
   (exit status 1 otherwise). A second line gives the ratio of the increment above the
   post-import RSS, which isolates what the data costs from the fixed cost of the libraries.

Example::

    .venv/bin/python benchmarks/streaming_memory.py --sizes 25k --factor 8 --genes 2000 \\
        --batch-size 16 --set-size 128 --batches 50 --workers 0

Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the measuring process (plus
``RUSAGE_CHILDREN`` with ``--workers > 0``: the largest worker, an upper bound since forked
workers share pages with their parent). The orchestrating process never imports numpy,
anndata or torch, so the high-water mark a child inherits across ``exec`` stays below its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT = 1.2
N_CONTEXTS, N_PERTURBATIONS, N_COMBINATIONS = 3, 40, 10
HOLDOUT_CONTEXT = "ctx_C"


def parse_count(text: str) -> int:
    """``"25k"`` -> 25000, ``"1.5m"`` -> 1500000, ``"800"`` -> 800."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    value = float(t[:-1] if mult > 1 else t) * mult
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a cell count: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    return [parse_count(part) for part in text.split(",") if part.strip()]


def mib(kib_or_bytes: float, unit: str = "kib") -> float:
    return kib_or_bytes / 1024 if unit == "kib" else kib_or_bytes / 2**20


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM); 0 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- generation


def _sim_params(n_cells: int, n_genes: int) -> dict:
    """Simulation settings giving about 1.1 x ``n_cells`` cells (trimmed to exactly n_cells)."""
    per_context = 1.1 * n_cells / N_CONTEXTS
    n_labels = N_PERTURBATIONS + N_COMBINATIONS
    cpp = max(1, round(0.9 * per_context / n_labels))
    return dict(
        n_genes=n_genes,
        n_contexts=N_CONTEXTS,
        n_perturbations=N_PERTURBATIONS,
        n_combinations=N_COMBINATIONS,
        cells_per_perturbation=cpp,
        n_controls=max(1, round(per_context - n_labels * cpp)),
        n_batches=2,
    )


def _chunk(n_cells: int, n_genes: int, seed: int, k: int, labels0=None):
    """Chunk ``k``: exactly ``n_cells`` simulated cells; perturbation labels mapped onto chunk 0's."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from vcell.data.simulate import simulate_perturbseq

    a = simulate_perturbseq(seed=seed + k, **_sim_params(n_cells, n_genes))
    if a.n_obs < n_cells:
        raise SystemExit(f"simulation gave {a.n_obs} < {n_cells} cells; raise the 1.1 margin in _sim_params")
    # Cells come in random order, so the first n are a random subset (obs sliced directly, so
    # categories and their codes stay those of the simulation).
    obs = a.obs.iloc[:n_cells].copy()
    if labels0 is not None:
        # Same label *index* -> same label name as chunk 0, so both files share one vocabulary
        # (their effects differ; that does not matter for memory).
        codes = obs["target_gene"].cat.codes.to_numpy()
        obs["target_gene"] = pd.Categorical.from_codes(codes, categories=labels0)
    obs.index = pd.Index([f"c{k}_{i:07d}" for i in range(n_cells)])
    X = sp.csr_matrix(a.X[:n_cells], dtype=np.float32)
    return X, obs, a.var.copy(), list(obs["target_gene"].cat.categories)


def _write_h5ad(path: Path, chunks, var, index_dtype) -> dict:
    """Write CSR chunks ``(X, obs)`` one after another into a new ``.h5ad`` at ``path``.

    ``indices`` and ``indptr`` get the same ``index_dtype``, as scipy (and so anndata's own
    writer) would store them: a file with int64 ``indptr`` but int32 ``indices`` makes every
    in-memory row read of scipy upcast the whole ``indices`` array, which would distort the
    in-memory contrast.
    """
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import write_elem

    n_genes = len(var)
    obs_parts, n_rows, nnz = [], 0, 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        opts = dict(maxshape=(None,), chunks=(1 << 16,))
        data = g.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
        indices = g.create_dataset("indices", shape=(0,), dtype=index_dtype, **opts)
        indptr = g.create_dataset("indptr", shape=(1,), dtype=index_dtype, **opts)
        indptr[0] = 0
        for X, obs in chunks:
            X.sort_indices()
            m, k = X.shape[0], X.nnz
            data.resize((nnz + k,))
            indices.resize((nnz + k,))
            data[nnz:] = X.data
            indices[nnz:] = X.indices
            indptr.resize((n_rows + m + 1,))
            if nnz + k > np.iinfo(index_dtype).max:
                raise SystemExit(f"{path}: {nnz + k} non-zeros overflow {np.dtype(index_dtype)} indices")
            indptr[n_rows + 1 :] = X.indptr[1:].astype(np.int64) + nnz
            n_rows, nnz = n_rows + m, nnz + k
            obs_parts.append(obs)
            del X
        g.attrs["shape"] = (n_rows, n_genes)
        write_elem(f, "obs", pd.concat(obs_parts))
        write_elem(f, "var", var)
        write_elem(f, "uns", {"vcell": {"expression": "counts"}})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
    return {"path": str(path), "n_cells": n_rows, "nnz": nnz, "bytes": path.stat().st_size}


def generate(n_cells: int, factor: int, n_genes: int, seed: int, out_dir: Path) -> dict:
    """Write ``small_<n>.h5ad`` and ``large_<n*factor>.h5ad``; return their descriptions."""
    import numpy as np

    X0, obs0, var, labels0 = _chunk(n_cells, n_genes, seed, 0)
    # Both files share one index dtype: int32 unless the large one could overflow it.
    index_dtype = np.int32 if n_cells * factor * n_genes < np.iinfo(np.int32).max else np.int64
    small = _write_h5ad(out_dir / f"small_{n_cells}.h5ad", [(X0, obs0)], var, index_dtype)

    def chunks():
        yield X0, obs0
        for k in range(1, factor):
            X, obs, _, _ = _chunk(n_cells, n_genes, seed, k, labels0)
            yield X, obs

    large = _write_h5ad(out_dir / f"large_{n_cells * factor}.h5ad", chunks(), var, index_dtype)
    return {"small": small, "large": large}


# --------------------------------------------------------------------------- measurement


class _Cycle:
    """``length`` items: item ``i`` is ``base[i % len(base)]``."""

    def __init__(self, base, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.base[i % len(self.base)]


def measure(path: str, mode: str, batch_size: int, set_size: int, n_batches: int, workers: int, seed: int) -> dict:
    """One measured run (call in a fresh process): load, split, sample, iterate batches."""
    t_start = time.perf_counter()
    import numpy as np  # noqa: F401
    import torch
    from torch.utils.data import DataLoader

    from vcell.data.cellsets import CellSetDataset, CellSetSampler, collate_cell_sets
    from vcell.data.dataset import load_dataset
    from vcell.data.rows import row_source
    from vcell.data.spec import DataSpec
    from vcell.data.splits import apply_split, holdout_config

    torch.set_num_threads(1)
    rss_import = proc_status_kib("VmRSS")
    import_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    data = load_dataset(path, DataSpec(batch_col="gem_group"), backed=(mode == "stream"))
    load_s = time.perf_counter() - t0
    rss_load = proc_status_kib("VmRSS")
    hwm_load = proc_status_kib("VmHWM")  # includes the validation scan of the whole matrix

    split = apply_split(data.index, holdout_config(data.index, [HOLDOUT_CONTEXT]))
    sampler = CellSetSampler(data.index, split, "train", set_size=set_size, seed=seed)
    dataset = CellSetDataset(sampler, row_source(data.adata, data.path))
    n_sets = len(dataset)

    # One loader over n_batches * batch_size items, cycling through the epoch-0 plan when it
    # has fewer sets (the small file), so that DataLoader workers live for the same number of
    # batches whatever the file size (with one loader per epoch the small file's short epochs
    # would re-fork fresh workers every few batches and flatter its peak).
    loader = DataLoader(_Cycle(dataset, n_batches * batch_size), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_cell_sets, num_workers=workers)  # fmt: skip
    done, rows_read, checksum = 0, 0, 0.0
    t0 = time.perf_counter()
    it = iter(loader)
    for batch in it:
        rows_read += int(batch["mask"].sum()) * 2  # perturbed + control rows
        checksum += float(batch["target"][0, 0].sum())
        done += 1
    del it, loader  # shuts the workers down and reaps them (RUSAGE_CHILDREN)
    iter_s = time.perf_counter() - t0

    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if workers > 0 else 0
    return {
        "mode": mode,
        "path": path,
        "n_cells": int(data.index.n_cells),
        "n_genes": int(data.adata.n_vars),
        "file_bytes": os.path.getsize(path),
        "n_sets_epoch": n_sets,
        "passes_over_plan": n_batches * batch_size / n_sets,
        "batches": done,
        "import_s": import_s,
        "load_s": load_s,
        "iter_s": iter_s,
        "batches_per_s": done / iter_s,
        "cells_per_s": rows_read / iter_s,
        "rss_import_mib": mib(rss_import),
        "rss_load_mib": mib(rss_load),
        "hwm_load_mib": mib(hwm_load),
        "peak_self_mib": mib(self_kib),
        "hwm_self_mib": mib(proc_status_kib("VmHWM")),
        "peak_children_mib": mib(child_kib),
        "peak_mib": mib(self_kib + child_kib),
        "checksum": checksum,
    }


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child run failed ({' '.join(args[:2])}), exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def _table(rows: list[dict]) -> str:
    head = ("mode", "cells", "file MiB", "RSS after imports MiB", "RSS after load MiB", "peak in load MiB", "peak RSS MiB",
            "peak - imports MiB", "load s", "batches/s", "cells/s")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        mode = "streaming (backed)" if r["mode"] == "stream" else "in memory"
        cells = [
            mode,
            f"{r['n_cells']:,}",
            f"{mib(r['file_bytes'], 'bytes'):,.0f}",
            f"{r['rss_import_mib']:,.0f}",
            f"{r['rss_load_mib']:,.0f}",
            f"{r['hwm_load_mib']:,.0f}",
            f"{r['peak_mib']:,.0f}",
            f"{r['peak_mib'] - r['rss_import_mib']:,.0f}",
            f"{r['load_s']:.1f}",
            f"{r['batches_per_s']:.2f}",
            f"{r['cells_per_s']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratios(small: dict, large: dict) -> tuple[float, float]:
    peak = large["peak_mib"] / small["peak_mib"]
    inc_small = small["peak_mib"] - small["rss_import_mib"]
    inc_large = large["peak_mib"] - large["rss_import_mib"]
    return peak, inc_large / inc_small if inc_small > 0 else float("inf")


def _versions() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import torch, anndata, h5py, importlib.metadata as m; "
         "print(torch.__version__, m.version('anndata'), h5py.__version__)"],  # fmt: skip
        capture_output=True, text=True,
    ).stdout.split()
    torch_v, anndata_v, h5py_v = (out + ["?"] * 3)[:3]
    return (f"python {platform.python_version()}, torch {torch_v}, anndata {anndata_v}, h5py {h5py_v}; "
            f"{os.cpu_count()} CPUs (nproc), {platform.machine()} {platform.system()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_generate"]:
        n, factor, genes, seed, out = argv[1:6]
        print(json.dumps(generate(int(n), int(factor), int(genes), int(seed), Path(out))))
        return 0
    if argv[:1] == ["_measure"]:
        path, mode, b, s, nb, w, seed = argv[1:8]
        print(json.dumps(measure(path, mode, int(b), int(s), int(nb), int(w), int(seed))))
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=[25_000], help="base cell count(s) N, e.g. 25k or 10k,25k (default 25k)")
    p.add_argument("--factor", type=int, default=8, help="the large file has factor x N cells (default 8)")
    p.add_argument("--genes", type=int, default=2000, help="genes (default 2000)")
    p.add_argument("--batch-size", type=int, default=16, help="cell sets per batch (default 16)")
    p.add_argument("--set-size", type=int, default=128, help="cells per set, S (default 128)")
    p.add_argument("--batches", type=int, default=50, help="batches iterated per run (default 50)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--seed", type=int, default=0, help="simulation and sampling seed (default 0)")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write the files (default: a temp dir, removed)")
    p.add_argument("--no-memory-contrast", action="store_true", help="skip the in-memory (backed=False) runs")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements to this JSON file")
    a = p.parse_args(argv)
    if a.factor < 2:
        p.error("--factor must be >= 2")

    tmp = None
    if a.out_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="vcell-streaming-"))
        out_dir = tmp
    else:
        out_dir = a.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    results = []
    try:
        print(f"# streaming memory: {' '.join(sys.argv)}")
        print(f"# {_versions()}")
        modes = ["stream"] + ([] if a.no_memory_contrast else ["memory"])
        for n in a.sizes:
            t0 = time.perf_counter()
            files = _run_child(["_generate", str(n), str(a.factor), str(a.genes), str(a.seed), str(out_dir)])
            print(f"# generated {files['small']['n_cells']:,} and {files['large']['n_cells']:,} cells x {a.genes} genes "
                  f"({mib(files['small']['bytes'], 'bytes'):,.0f} / {mib(files['large']['bytes'], 'bytes'):,.0f} MiB) "
                  f"in {time.perf_counter() - t0:.0f} s (not measured)", flush=True)  # fmt: skip
            runs = {}
            for mode in modes:
                for which in ("small", "large"):
                    args = [files[which]["path"], mode, a.batch_size, a.set_size, a.batches, a.workers, a.seed]
                    runs[mode, which] = _run_child(["_measure", *map(str, args)])
                    r = runs[mode, which]
                    print(f"# {mode:6s} {r['n_cells']:>9,} cells: peak {r['peak_mib']:,.0f} MiB "
                          f"(VmHWM {r['hwm_self_mib']:,.0f}), {r['batches_per_s']:.2f} batches/s", flush=True)  # fmt: skip
            if tmp is not None:  # free the disk before the next size
                for which in ("small", "large"):
                    Path(files[which]["path"]).unlink(missing_ok=True)
            rows = [runs[m, w] for m in modes for w in ("small", "large")]
            results.extend(rows)
            print()
            print(f"N = {n:,}, factor {a.factor}, {a.genes} genes, batch {a.batch_size} sets x S={a.set_size} "
                  f"(x2: perturbed + control rows), {a.batches} batches, {a.workers} workers, held-out context {HOLDOUT_CONTEXT}")  # fmt: skip
            print()
            print(_table(rows))
            print()
            peak, inc = _ratios(runs["stream", "small"], runs["stream", "large"])
            ok = peak <= LIMIT
            failed |= not ok
            print(f"streaming peak RSS ratio large/small ({a.factor}x cells): {peak:.3f} (limit {LIMIT}) -> {'PASS' if ok else 'FAIL'}")
            small, large = runs["stream", "small"], runs["stream", "large"]
            print(f"streaming increment above post-import RSS, large/small: {inc:.2f} "
                  f"({large['peak_mib'] - large['rss_import_mib']:,.0f} vs {small['peak_mib'] - small['rss_import_mib']:,.0f} MiB)")
            if "memory" in modes:
                peak_m, inc_m = _ratios(runs["memory", "small"], runs["memory", "large"])
                print(f"in-memory contrast: peak ratio {peak_m:.2f}, increment ratio {inc_m:.2f}")
            print()
        if a.json:
            a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": results}, indent=2))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
