#!/usr/bin/env python
"""GPU readiness of vcell in one run (< 10 minutes): ST training, arc-state, predict and DDP on one device.

ST training in bf16 from memory and streamed, arc-state on the same device and data, ``vcell
predict`` and a DDP run.

Steps, each a fresh child process with a time cap (``--budget-s`` shared out over the steps left):

- ``imports``: torch (+ CUDA), lightning, h5py, numba, anndata, scanpy, pandas, scipy, numpy,
  safetensors, typer, rich, pyyaml and vcell itself, imported in a child; arc-state and cell-load in
  ``--arc-python``. Anything missing is named with the way to bring it (below), and nothing else runs.
- ``data``: ``vcell data simulate`` + ``vcell data preprocess`` (log1p, ``--n-genes`` genes).
- ``train-memory`` / ``train-stream``: ``vcell train st --in-memory`` / ``--backed`` in ``bf16-mixed``
  (the child checks how ``load_dataset`` really opened the file).
- ``train-arc``: ``state tx train`` (arc-state, cell-load TOML; ``state`` for the ``default`` preset,
  ``state_sm`` for ``small``) at the same batch, set length, precision and loader workers; skipped, with the reason, when arc-state cannot be imported.
- ``predict``: ``vcell predict`` of one context with the ``train-memory`` model, bf16-mixed.
- ``ddp``: ``vcell train st --strategy ddp`` (1 GPU: nccl; CPU fallback: gloo, 2 processes).

The children are ``benchmarks/train_speed.py``'s timing child (a callback timing every training
batch, every ``DataLoader.__next__`` and every model call without grad) wrapped by this file's
``_child``, which adds the peak GPU memory (``torch.cuda.max_memory_allocated``), whether the data
was read backed, and the process group DDP started. steps/s: from the batch start after
``--warmup`` to the last one; cells/s = steps/s x batch x set size; data wait %: time inside
``DataLoader.__next__`` in that window; predict cells/s: cells through the model / time from the
first model call to the end of the last. Peak RSS: ``os.wait4``'s ``ru_maxrss`` of the child.

Without CUDA (or with ``--cpu``) the same steps run on the CPU at small sizes (``small`` preset).

On a GPU machine that has PyTorch, Lightning, h5py and numba but not anndata, scanpy or the peers,
and no package index. Here, with an index::

    .venv/bin/python benchmarks/gpu_check.py --make-wheelhouse build/gpu_wheels

then copy ``build/gpu_wheels`` (ignored by git, ~26 MB) with the repository and run there::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --wheels build/gpu_wheels --require-gpu --json gpu_check.json

(``--wheels`` runs ``pip install --no-index --no-deps --target WORKDIR/site DIR/*.whl`` and puts
that folder and ``src/`` on every child's ``PYTHONPATH``.) Exits 1 naming each failed step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
import train_speed  # noqa: E402  (its timing child and arc-state's `tx train` arguments)

REQUIRED = {"torch": "torch", "lightning": "lightning", "h5py": "h5py", "numba": "numba", "anndata": "anndata",
            "scanpy": "scanpy", "pandas": "pandas", "scipy": "scipy", "numpy": "numpy", "safetensors": "safetensors",
            "typer": "typer", "rich": "rich", "yaml": "pyyaml", "vcell.cli": "vcell"}
PEERS = {"state": "arc-state", "cell_load": "cell-load"}
# Wheels for a machine holding the package list of .library/device/KINDS.md ('nvidia-h200'): vcell's
# needs that are not on it (anndata, scanpy and theirs), pandas 2 with pytz and tzdata (the list has
# no pytz, the mark of pandas >= 3, which anndata 0.12 refuses), typer and rich at the versions
# tested here (their versions there are unknown) with pydantic, which typer >= 0.25 needs to build any command's
# parameters (the list has none: `import vcell.cli` works without it, `vcell data simulate` does not), then the
# peers' missing needs.
VCELL_WHEELS = ("anndata", "scanpy", "array-api-compat", "legacy-api-wrap", "natsort", "scverse-misc", "session-info2",
                "zarr", "donfig", "google-crc32c", "numcodecs", "pynndescent", "umap-learn", "platformdirs",
                "pandas", "pytz", "tzdata", "typer", "rich",
                "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
PEER_WHEELS = ("arc-state", "cell-load", "geomloss", "hydra-core", "omegaconf", "antlr4-python3-runtime", "toml")
# The peers' versions when no python with arc-state is at hand to read them from: the newest omegaconf (2.4) and
# antlr (4.13) break hydra-core 1.3 ("Could not deserialize ATN"), which pins omegaconf < 2.4 and antlr 4.9.
PEER_PINS = {"arc-state": "0.11.1", "cell-load": "0.10.4", "hydra-core": "1.3.8", "omegaconf": "2.3.0",
             "antlr4-python3-runtime": "4.9.3"}
# What the peers' step imports: a broken arc-state is a skipped step (with the reason), not a failed one.
PEER_IMPORTS = "import state.__main__, cell_load\nfrom state.tx.models.state_transition import StateTransitionPerturbationModel"
#: When the script started: --budget-s counts from here (wheel install and import checks included).
START = time.perf_counter()
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ARC_MODEL = {"small": "state_sm", "default": "state", "large": "state_lg"}
STEPS = ("data", "train-memory", "train-stream", "train-arc", "predict", "ddp")
WEIGHT = {"data": 3, "train-memory": 2, "train-stream": 2, "train-arc": 2.5, "predict": 1, "ddp": 1.5}
PROFILES = {  # (GPU, CPU fallback)
    "preset": ("default", "small"), "batch_size": (16, 4), "set_size": (128, 64), "steps": (120, 30), "warmup": (20, 5),
    "workers": (8, 0), "ddp_devices": (1, 2), "ddp_steps": (30, 8), "n_perts": (60, 20), "cells_per_pert": (512, 128),
    "n_contexts": (3, 2), "n_controls": (2000, 500),
}


def log(msg: str) -> None:
    """One progress line on stderr."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- children


def _child(argv: list[str]) -> None:
    """train_speed's timing child, plus peak GPU memory, backed reading and DDP's process group (``--info``)."""
    import atexit

    ap = argparse.ArgumentParser()
    ap.add_argument("--info", required=True)
    ap.add_argument("--watch-load", action="store_true", help="record whether vcell's load_dataset opened the file backed")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    rest = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # Lightning re-runs this command line for DDP ranks > 0
    info_path = ns.info if rank == 0 else f"{ns.info}.rank{rank}"
    if rank:
        rest = [f"{a}.rank{rank}" if i and rest[i - 1] == "--times" else a for i, a in enumerate(rest)]
    info: dict = {"rank": rank}

    import torch
    import torch.distributed as dist

    def dump() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            info.update(device=torch.cuda.get_device_name(), max_allocated=torch.cuda.max_memory_allocated(),
                        max_reserved=torch.cuda.max_memory_reserved())
        Path(info_path).write_text(json.dumps(info))

    atexit.register(dump)
    init = dist.init_process_group

    def init_group(*a, **k):
        out = init(*a, **k)
        info["dist"] = {"backend": str(dist.get_backend()), "world_size": dist.get_world_size()}
        return out

    dist.init_process_group = init_group
    if ns.watch_load:
        import vcell.data.dataset as dataset

        load = dataset.load_dataset

        def watched(*a, **k):
            data = load(*a, **k)
            info["backed"] = bool(data.adata.isbacked)
            return data

        dataset.load_dataset = watched
    train_speed._child(rest)


def _imports(out: str) -> None:
    """Import every module vcell needs; write versions (or the one-line error) and the device to ``out``."""
    found: dict = {}
    for module, dist_name in REQUIRED.items():
        try:
            mod = __import__(module, fromlist=["_"])
            found[dist_name] = {"ok": True, "version": str(getattr(mod, "__version__", "") or _version(dist_name))}
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this check reports
            found[dist_name] = {"ok": False, "error": _one_line(exc)}
    found |= _smoke(found)
    device: dict = {}
    if found["torch"]["ok"]:
        import torch

        device = {"cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
        if device["cuda"]:
            device.update(name=torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported(),
                          memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    try:  # the loader workers' batches pass through it (vcell refuses --num-workers that do not fit)
        st = os.statvfs("/dev/shm")
        device["shm_free_gib"] = st.f_bavail * st.f_frsize / 2**30
    except OSError:
        device["shm_free_gib"] = None
    Path(out).write_text(json.dumps({"modules": found, "device": device, "python": sys.version.split()[0]}))


def _one_line(exc: BaseException) -> str:
    """An exception as the one line the import check reports."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _smoke(found: dict) -> dict:
    """Checks that importing cannot make: a vcell command's options parsed (typer builds them with pydantic) and
    an AnnData written and read back through h5py, pandas and numba (their versions against numpy's there)."""
    import tempfile

    checks: dict = {}
    if found["vcell"]["ok"]:
        try:
            from vcell.cli import app

            app(["data", "simulate", "--help"], prog_name="vcell", standalone_mode=False)
            checks["vcell-command"] = {"ok": True, "version": ""}
        except Exception as exc:  # noqa: BLE001 - reported, as an import failure is
            checks["vcell-command"] = {"ok": False, "error": _one_line(exc)}
    if found["anndata"]["ok"] and found["vcell"]["ok"]:
        try:
            import anndata as ad
            import numpy as np
            import pandas as pd
            import scipy.sparse as sp

            from vcell.data.io import read_h5ad

            with tempfile.TemporaryDirectory() as tmp:
                obs = pd.DataFrame({"target_gene": pd.Categorical(["a", "b"] * 5)}, index=[f"c{i}" for i in range(10)])
                X = sp.random(10, 5, density=0.5, format="csr", dtype=np.float32, random_state=0)
                ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(5)])).write_h5ad(f"{tmp}/x.h5ad")
                back = read_h5ad(f"{tmp}/x.h5ad")
                assert (back.X != X).nnz == 0 and list(back.obs["target_gene"]) == list(obs["target_gene"])
            checks["anndata-roundtrip"] = {"ok": True, "version": ""}
        except Exception as exc:  # noqa: BLE001
            checks["anndata-roundtrip"] = {"ok": False, "error": _one_line(exc)}
    return checks


def _version(dist_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return ""


def run_proc(cmd: list[str], log_path: Path, cap: float, env: dict, cwd: Path) -> dict:
    """Run ``cmd`` in its own session, killed (with its workers and ranks) after ``cap`` seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > cap:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.1)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    return {"code": code, "timed_out": timed_out, "wall_s": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}


class StepFailed(Exception):
    """A step that did not give its figures (the message says why, in one line)."""


# --------------------------------------------------------------------------- the run


class Check:
    """The steps of one run: settings, paths, time budget and results."""

    def __init__(self, opts, device: dict):
        self.o, self.device = opts, device
        self.work = opts.workdir.resolve()
        self.gpu = bool(device.get("cuda")) and not opts.cpu
        self.data = self.work / "data" / "sim.h5ad"
        self.deadline = START + opts.budget_s
        self.results: dict = {}
        self.loadavg: list[float] = []
        self.found: dict | None = None  # the import check's findings, for --json after each step
        self.env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", HDF5_USE_FILE_LOCKING="FALSE",
                        PYTHONPATH=os.pathsep.join([*opts.site, str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if not self.gpu:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # predict and arc-state would take a GPU by themselves

    def cap(self, step: str, todo: list[str]) -> float:
        """This step's share of the time left, by weight over the steps still to run."""
        left = self.deadline - time.perf_counter()
        return max(0.0, left * WEIGHT[step] / sum(WEIGHT[s] for s in todo))

    def proc(self, step: str, cmd: list[str], cap: float, tag: str) -> dict:
        """Run one command of ``step``; a non-zero exit or the cap is a :class:`StepFailed` with the log's tail."""
        log_path = self.work / f"{tag}.log"
        res = run_proc(cmd, log_path, cap, self.env, self.work)
        if res["timed_out"] or res["code"] != 0:
            tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
            why = f"over its {cap:.0f} s cap" if res["timed_out"] else f"exit {res['code']}"
            raise StepFailed(f"{why}; {log_path}: {' / '.join(t.strip()[:160] for t in tail)}")
        return res

    def child(self, step: str, python: str, tool: str, args: list[str], cap: float) -> tuple[dict, dict, dict]:
        """(timing records, info, process figures) of a timed tool command."""
        times, info = self.work / f"{step}.times.json", self.work / f"{step}.info.json"
        times.unlink(missing_ok=True)
        info.unlink(missing_ok=True)
        cmd = [python, str(HERE), "_child", "--info", str(info), *(["--watch-load"] if tool == "vcell" else []), "--",
               "--precision", "bf16-mixed", "--times", str(times), tool, "--", *args]
        res = self.proc(step, cmd, cap, step)
        if not times.exists():
            raise StepFailed(f"no timing records in {times}")
        rec = json.loads(times.read_text()) | {"peak_rss_mib": res["peak_rss_mib"], "peak_pss_mib": None, "wall_s": res["wall_s"]}
        return rec, json.loads(info.read_text()) if info.exists() else {}, res

    def model_args(self) -> list[str]:
        return ["--preset", self.o.preset, *(["--config", str(self.o.model_config)] if self.o.model_config else [])]

    def vcell_train_args(self, out: Path, steps: int, workers: int) -> list[str]:
        return ["train", "st", "--data", str(self.data), *self.model_args(), "--batch-size", str(self.o.batch_size),
                "--set-size", str(self.o.set_size), "--max-steps", str(steps), "--checkpoint-every", "1000000",
                "--accelerator", "gpu" if self.gpu else "cpu", "--num-workers", str(workers), "--out", str(out),
                "--seed", str(self.o.seed)]

    def train_figures(self, rec: dict, info: dict, res: dict, warmup: int, batch: int) -> dict:
        try:
            stats = train_speed.train_stats(rec, warmup)
        except SystemExit as exc:
            raise StepFailed(str(exc)) from None
        stats["cells_per_s"] = stats["steps_per_s"] * batch * self.o.set_size
        stats.pop("peak_pss_mib")
        return stats | self.memory(info, res)

    @staticmethod
    def memory(info: dict, res: dict) -> dict:
        gpu = info.get("max_allocated")
        return {"peak_gpu_mib": gpu / 2**20 if gpu is not None else None, "peak_rss_mib": res["peak_rss_mib"], "wall_s": res["wall_s"]}

    # ----------------------------------------------------------------- steps

    def step_data(self, cap: float) -> dict:
        o = self.o
        counts = self.work / "data" / "sim_counts.h5ad"
        counts.parent.mkdir(parents=True, exist_ok=True)
        vcell = [sys.executable, "-m", "vcell"]
        sizes = ["--n-genes", str(o.n_genes), "--n-contexts", str(o.n_contexts), "--n-perturbations", str(o.n_perts),
                 "--n-combinations", "0", "--cells-per-perturbation", str(o.cells_per_pert), "--n-controls", str(o.n_controls)]
        t0 = time.perf_counter()
        sim = self.proc("data", [*vcell, "data", "simulate", str(counts), *sizes, "--seed", str(o.seed), "--overwrite"], cap, "data-simulate")
        pre = self.proc("data", [*vcell, "data", "preprocess", str(counts), str(self.data), "--n-top-genes", str(o.n_genes),
                                 "--overwrite"], max(1.0, cap - (time.perf_counter() - t0)), "data-preprocess")
        counts.unlink(missing_ok=True)
        found = re.search(r"([\d,]+) cells x ([\d,]+) genes", (self.work / "data-simulate.log").read_text())
        cells = int(found.group(1).replace(",", "")) if found else None
        return {"cells": cells, "genes": o.n_genes, "peak_rss_mib": max(sim["peak_rss_mib"], pre["peak_rss_mib"]),
                "wall_s": time.perf_counter() - t0, "what": f"{cells or 0:,} cells x {o.n_genes:,} genes, log1p (simulate + preprocess)"}

    def step_train(self, step: str, cap: float) -> dict:
        stream = step == "train-stream"
        out = self.work / f"run-{step}"
        shutil.rmtree(out, ignore_errors=True)
        args = [*self.vcell_train_args(out, self.o.steps, self.o.workers), "--backed" if stream else "--in-memory"]
        rec, info, res = self.child(step, sys.executable, "vcell", args, cap)
        if info.get("backed") is not stream:
            raise StepFailed(f"the data was {'not ' if stream else ''}read backed ({info.get('backed')}) with {args[-1]}")
        where = "streamed from the backed file" if stream else "in memory"
        return self.train_figures(rec, info, res, self.o.warmup, self.o.batch_size) | {
            "what": f"vcell ST {self.model_name()}, bf16-mixed, {self.o.batch_size} x {self.o.set_size}, {where}, {self.o.workers} workers"}

    def step_arc(self, cap: float) -> dict:
        if self.o.model_config:
            raise Skipped("--model-config sets a vcell model that no arc-state config matches")
        toml = self.work / "arc.toml"
        toml.write_text(f'[datasets]\nsim = "{self.data.parent}"\n\n[training]\nsim = "train"\n')
        swap = {"model=": f"model={ARC_MODEL[self.o.preset]}", "model.kwargs.cell_set_len=": f"model.kwargs.cell_set_len={self.o.set_size}",
                "training.batch_size=": f"training.batch_size={self.o.batch_size}"}
        args = [next((v for k, v in swap.items() if a.startswith(k)), a) for a in
                train_speed.arc_train_args(self.data, toml, self.work, "run-train-arc", self.o.steps, self.o.workers)]
        rec, info, res = self.child("train-arc", self.o.arc_python, "arc", args, cap)
        return self.train_figures(rec, info, res, self.o.warmup, self.o.batch_size) | {
            "what": f"arc-state {self.peers.get('arc-state', '')} {ARC_MODEL[self.o.preset]}, bf16-mixed, {self.o.batch_size} x "
                    f"{self.o.set_size}, cell-load, {self.o.workers} workers"}

    def step_predict(self, cap: float) -> dict:
        run = self.work / "run-train-memory"
        if not (run / "last").exists():
            raise StepFailed("needs the model of train-memory, which did not finish")
        args = ["predict", "--model", str(run), "--data", str(self.data), "--context", train_speed.CONTEXT, "--perturbations", "data",
                "--set-size", str(self.o.set_size), "--out", str(self.work / "pred.h5ad"), "--overwrite", "--seed", str(self.o.seed)]
        rec, info, res = self.child("predict", sys.executable, "vcell", args, cap)
        try:
            stats = train_speed.predict_stats(rec)
        except SystemExit as exc:
            raise StepFailed(str(exc)) from None
        stats.pop("peak_pss_mib")
        return stats | self.memory(info, res) | {"what": f"vcell predict, context {train_speed.CONTEXT}, bf16-mixed, set size {self.o.set_size}"}

    def step_ddp(self, cap: float) -> dict:
        n = self.o.ddp_devices
        out = self.work / "run-ddp"
        shutil.rmtree(out, ignore_errors=True)
        args = [*self.vcell_train_args(out, self.o.ddp_steps, self.o.workers), "--strategy", "ddp", "--devices", str(n)]
        rec, info, res = self.child("ddp", sys.executable, "vcell", args, cap)
        group = info.get("dist")
        if not group or group["world_size"] != n:
            raise StepFailed(f"no DDP process group of {n} process(es) was started (saw {group})")
        warmup = min(self.o.warmup, max(0, len(rec["batch_start"]) - 3))
        return self.train_figures(rec, info, res, warmup, self.o.batch_size) | group | {
            "what": f"vcell ST {self.model_name()}, --strategy ddp --devices {n} ({group['backend']}), {self.o.ddp_steps} steps"}

    def model_name(self) -> str:
        return f"{self.o.preset} preset" + (f" + {self.o.model_config.name}" if self.o.model_config else "")

    def run(self, peers: dict, skip: set[str]) -> None:
        self.peers = peers
        todo = [s for s in STEPS if s not in skip]
        for s in STEPS:
            if s in skip:
                self.results[s] = {"status": "skipped", "reason": "--skip"}
            elif s == "train-arc" and peers.get("error"):
                self.results[s] = {"status": "skipped", "reason": f"arc-state not importable in {self.o.arc_python}: {peers['error']}"}
                todo.remove(s)
        for s in list(todo):
            cap = self.cap(s, todo)
            todo.remove(s)
            log(f"{s}: starting (cap {cap:.0f} s)")
            t0 = time.perf_counter()
            try:
                if cap < 1:
                    raise StepFailed("no time left in --budget-s")
                fn = {"data": self.step_data, "train-arc": self.step_arc, "predict": self.step_predict, "ddp": self.step_ddp}.get(s)
                out = fn(cap) if fn else self.step_train(s, cap)
                self.results[s] = {"status": "ok", **out}
                cells = out.get("cells_per_s")
                log(f"{s}: ok in {time.perf_counter() - t0:.1f} s" + (f", {cells:,.0f} cells/s" if cells else ""))
            except Skipped as exc:
                self.results[s] = {"status": "skipped", "reason": str(exc)}
                log(f"{s}: skipped ({exc})")
            except StepFailed as exc:
                self.results[s] = {"status": "failed", "reason": str(exc), "wall_s": time.perf_counter() - t0}
                log(f"{s}: FAILED: {exc}")
                if s == "data":
                    for rest in todo:
                        self.results[rest] = {"status": "failed", "reason": "needs the data step"}
                    break
            finally:
                if self.found is not None:
                    write_json(self, self.found, peers, None)


class Skipped(Exception):
    """A step that cannot run here, for a stated reason (not a failure)."""


# --------------------------------------------------------------------------- wheels


def make_wheelhouse(folder: Path, opts) -> int:
    """Download (or build, for pure-Python sdists) the wheels the GPU machine lacks, pinned to the versions here."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    wanted = {name: _local_version(metadata, name) for name in VCELL_WHEELS}
    if not opts.no_peers:
        code = "import importlib.metadata as m, json, sys\nv = {}\nfor n in sys.argv[1:]:\n    try: v[n] = m.version(n)\n    except Exception: v[n] = ''\nprint(json.dumps(v))"
        try:
            out = subprocess.run([opts.arc_python, "-c", code, *PEER_WHEELS], capture_output=True, text=True, check=True).stdout
            wanted |= {n: v or PEER_PINS.get(n, "") for n, v in json.loads(out).items()}
        except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
            wanted |= {n: PEER_PINS.get(n, "") for n in PEER_WHEELS}
    norm = {re.sub(r"[-_.]+", "_", n).lower() for n in wanted}
    for old in folder.glob("*.whl"):  # one version of each: two stop the whole install there
        if re.sub(r"[-_.]+", "_", old.name.split("-")[0]).lower() in norm:
            old.unlink()
    pip = [sys.executable, "-m", "pip"]
    target = ["--python-version", opts.target_python, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)]]
    failed = []
    for name, version in wanted.items():
        spec = f"{name}=={version}" if version else name
        log(f"wheel {spec}")
        got = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(folder), spec],
                             capture_output=True, text=True)
        if got.returncode != 0:  # e.g. antlr4-python3-runtime 4.9.3 (hydra's pin) exists only as an sdist
            built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), spec], capture_output=True, text=True)
            if built.returncode != 0:
                failed.append(f"{spec}: {(got.stderr or built.stderr).strip().splitlines()[-1:]}")
    for whl in folder.glob("*.whl"):
        tag = whl.name.rsplit("-", 3)[-3:]
        if tag[1] not in ("none", "abi3") and not tag[1].startswith(f"cp{opts.target_python.replace('.', '')}"):
            failed.append(f"{whl.name}: built for this machine's Python, not {opts.target_python}")
    size = sum(f.stat().st_size for f in folder.glob("*.whl"))
    inside = folder.resolve().is_relative_to(REPO)
    rel = folder.resolve().relative_to(REPO) if inside else folder
    print(f"{len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {folder}"
          + ("" if inside else f" (outside the repository: put it under {REPO} to send it with the tree)"))
    print("Assumed present there (KINDS.md's list): torch, lightning, h5py, numba, numpy, scipy, matplotlib, scikit-learn, "
          "seaborn, statsmodels, transformers, peft, safetensors, pyyaml, pyarrow; the carried pandas 2, typer, rich and pydantic "
          "take precedence over theirs.")
    print(f"There, with {rel} copied beside the repository's files, run\n  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --wheels {rel} --require-gpu --json gpu_check.json")
    print(f"or by hand: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {rel}/*.whl "
          "&& PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py ...")
    for line in failed:
        print(f"FAILED wheel {line}")
    return 1 if failed else 0


def _local_version(metadata, name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def install_wheels(folder: Path, work: Path) -> str:
    """``pip install --no-index --no-deps`` of ``folder``'s wheels into ``work/site``; returns that folder."""
    site = work / "site"
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {folder} (make them with --make-wheelhouse {folder} where an index is reachable)")
    log(f"installing {len(wheels)} wheels from {folder} into {site}")
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--target", str(site), *wheels], check=True)
    return str(site)


# --------------------------------------------------------------------------- report


def check_imports(opts) -> tuple[dict, dict]:
    """(required modules and device, peers) from child processes; the peers' entry has ``error`` when not importable.
    The children see the GPU unless ``--cpu`` hides it."""
    chk = Check(opts, {"cuda": True})
    out = chk.work / "imports.json"
    res = run_proc([sys.executable, str(HERE), "_imports", str(out)], chk.work / "imports.log", 120, chk.env, chk.work)
    if res["code"] != 0 or not out.exists():
        raise SystemExit(f"error: the import check itself failed; see {chk.work / 'imports.log'}")
    found = json.loads(out.read_text())
    peers: dict = {}
    if "train-arc" in chk.o.skip_set:
        return found, {"error": "--skip"}
    code = (f"import json, importlib.metadata as m\n{PEER_IMPORTS}\n"
            f"print(json.dumps({{n: m.version(n) for n in {tuple(PEERS.values())!r}}}))")
    try:
        got = subprocess.run([chk.o.arc_python, "-c", code], capture_output=True, text=True, env=chk.env, timeout=120)
        if got.returncode == 0:
            peers = json.loads(got.stdout.strip().splitlines()[-1])
        else:
            peers = {"error": (got.stderr.strip().splitlines() or ["import failed"])[-1]}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        peers = {"error": f"{type(exc).__name__}: {exc}"}
    return found, peers


def write_json(chk: Check, found: dict, peers: dict, failed: list[str] | None) -> None:
    """Every figure so far into ``--json`` (``failed`` None: the run goes on), so a run killed from outside
    still leaves the steps it finished."""
    if not chk.o.json:
        return
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(chk.o).items() if k != "skip_set"}
    chk.o.json.write_text(json.dumps({"gpu": chk.gpu, "device": found.get("device", {}), "imports": found.get("modules", {}),
                                      "peers": peers, "settings": settings, "finished": failed is not None,
                                      "steps": {n: chk.results[n] for n in ("imports", *STEPS) if n in chk.results}, "failed": failed,
                                      "loadavg": chk.loadavg, "elapsed_s": time.perf_counter() - START},
                                     indent=2, default=str))


def report(chk: Check, found: dict, peers: dict) -> list[str]:
    """Print the markdown table; write ``--json``; return the failed steps."""
    dev = found.get("device", {})
    where = f"{dev['name']} ({dev.get('memory_gib', 0):.0f} GiB, CUDA {dev.get('torch_cuda')})" if chk.gpu else "CPU fallback"
    mods = found.get("modules", {})
    print(f"\nDevice: {where}; Python {found.get('python')}, torch {mods.get('torch', {}).get('version', '?')}, "
          f"lightning {mods.get('lightning', {}).get('version', '?')}, anndata {mods.get('anndata', {}).get('version', '?')}; "
          f"arc-state: {peers.get('arc-state') or 'not importable'}; /dev/shm free: "
          f"{'?' if dev.get('shm_free_gib') is None else format(dev['shm_free_gib'], '.1f')} GiB")
    print("| step | what | status | cells/s | steps/s | data wait % | peak GPU MiB | peak RSS MiB | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for name in STEPS:
        r = chk.results.get(name, {"status": "failed", "reason": "not run"})
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        print(f"| {name} | {r.get('what', '')} | {status} | {fmt(r.get('cells_per_s'), ',.0f')} | {fmt(r.get('steps_per_s'), '.2f')} "
              f"| {fmt(r.get('data_pct'), '.1f')} | {fmt(r.get('peak_gpu_mib'), ',.0f')} | {fmt(r.get('peak_rss_mib'), ',.0f')} "
              f"| {fmt(r.get('wall_s'), '.1f')} |")
    failed = [n for n in STEPS if chk.results.get(n, {}).get("status", "failed") == "failed"]
    write_json(chk, found, peers, failed)
    if chk.loadavg:
        print(f"load average: start {chk.loadavg[0]:.2f}, end {chk.loadavg[-1]:.2f} ({os.cpu_count()} cores)")
    for name in failed:
        print(f"FAILED {name}: {chk.results.get(name, {}).get('reason', 'not run')}")
    return failed


def missing_imports(found: dict, opts) -> list[str]:
    """Lines naming each module that did not import, and how to bring it."""
    bad = {name: m["error"] for name, m in found["modules"].items() if not m["ok"]}
    if not bad:
        return []
    lines = [f"missing: {name} ({err})" for name, err in bad.items()]
    lines.append("bring them as wheels: here (with a package index) `python benchmarks/gpu_check.py --make-wheelhouse build/gpu_wheels`, "
                 "carry build/gpu_wheels, and run this script there with `--wheels build/gpu_wheels`")
    if "vcell" in bad:
        lines.append(f"vcell itself: run from the repository ({REPO}); src/ is put on the children's PYTHONPATH")
    return lines


def main() -> None:
    """Parse the options, run the steps, print the table; ``_child`` / ``_imports``: a child process's part."""
    if len(sys.argv) > 1 and sys.argv[1] in ("_child", "_imports"):
        (_child if sys.argv[1] == "_child" else lambda a: _imports(a[0]))(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run the CPU fallback even where CUDA is seen")
    ap.add_argument("--require-gpu", action="store_true", help="fail (step imports) when CUDA is not seen")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="time for the whole run from the script's start (wheels and import checks included); each step gets a share of what is left")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vcell-gpu-check"), help="data, runs, logs (and --wheels' site)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--skip", default="", help=f"comma-separated steps not to run ({', '.join(STEPS)})")
    for name, (gpu, cpu) in PROFILES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(gpu), default=None, help=f"on a GPU: {gpu}; on the CPU: {cpu}")
    ap.add_argument("--model-config", type=Path, default=None, help="STConfig overrides for vcell (`--config`); skips train-arc")
    ap.add_argument("--n-genes", type=int, default=2000, help="genes of the simulated data (all kept as HVGs)")
    ap.add_argument("--arc-python", default=None, help="python with arc-state and cell-load (default: /tmp/arcstate/bin/python if there, else this one)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and of every run")
    ap.add_argument("--wheels", type=Path, default=None, help="install these wheels (no index, no deps) into WORKDIR/site first")
    ap.add_argument("--make-wheelhouse", type=Path, default=None, metavar="DIR", help="only download the wheels a GPU machine lacks into DIR")
    ap.add_argument("--no-peers", action="store_true", help="with --make-wheelhouse: leave arc-state and cell-load out")
    ap.add_argument("--target-python", default="3.12", help="with --make-wheelhouse: the GPU machine's Python version")
    opts = ap.parse_args()
    if opts.require_gpu and opts.cpu:
        ap.error("give --require-gpu (fail without CUDA) or --cpu (the CPU fallback), not both")
    default_arc = Path("/tmp/arcstate/bin/python")
    opts.arc_python = opts.arc_python or (str(default_arc) if default_arc.exists() else sys.executable)
    if opts.make_wheelhouse:
        sys.exit(make_wheelhouse(opts.make_wheelhouse, opts))
    opts.skip_set = {s.strip() for s in opts.skip.split(",") if s.strip()}
    if opts.skip_set - set(STEPS):
        ap.error(f"--skip: unknown step(s) {', '.join(sorted(opts.skip_set - set(STEPS)))}")
    opts.workdir.mkdir(parents=True, exist_ok=True)
    opts.site = [install_wheels(opts.wheels, opts.workdir.resolve())] if opts.wheels else []
    log("imports: checking")
    found, peers = check_imports(opts)
    chk = Check(opts, found["device"])
    chk.found = found
    chk.o.profile = "gpu" if chk.gpu else "cpu"
    for name, values in PROFILES.items():
        if getattr(opts, name) is None:
            setattr(opts, name, values[0] if chk.gpu else values[1])
    problems = missing_imports(found, opts)
    if opts.require_gpu and not chk.gpu:
        problems.append(f"no CUDA device seen by torch (torch.version.cuda={found['device'].get('torch_cuda')})")
    if not found["device"].get("cuda") or opts.cpu:
        log("no CUDA device (or --cpu): running the CPU fallback at small sizes")
    if problems:
        chk.results = {"imports": {"status": "failed", "reason": "; ".join(problems)}}
        for line in problems:
            print(line)
        write_json(chk, found, peers, ["imports"])
        print("FAILED imports")
        sys.exit(2)
    chk.loadavg = [os.getloadavg()[0]]
    chk.run(peers, opts.skip_set)
    chk.loadavg.append(os.getloadavg()[0])
    failed = report(chk, found, peers)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
