"""Nothing lost, nothing left behind (issue #16, classes 1, 4 and 9), with real CLI subprocesses.

- every command that writes refuses to replace an existing output without ``--overwrite`` (one
  ``error:`` line, exit 2, the output byte-identical), replaces it with ``--overwrite``, and checks
  that it can write there before any work;
- a command killed (SIGKILL) while it writes leaves its temporary file beside the destination; a
  rerun removes it, says so, and writes a complete output;
- ``--resume`` refuses a run trained on other data, another split or other perturbation features,
  naming the difference; checkpoints of older versions (no fingerprint) still resume;
- only ``last/`` keeps the optimiser state, and ``--no-save-optimizer`` drops it there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from safetensors import safe_open

from vcell.data.io import check_output_dir, check_output_path, clean_leftovers, leftovers
from vcell.data.simulate import simulate_perturbseq
from vcell.errors import VcellError
from vcell.nn.checkpoint import BEST, CONFIG, LAST, OPTIMIZER, WEIGHTS

from conftest import error_line, run_cli, run_cli_batch

ST_CFG = {"width": 32, "n_layers": 1, "n_heads": 2}
SE_CFG = {"d_model": 16, "n_layers": 1, "n_heads": 2, "sentence_len": 34, "n_mask": 8}
ST_FAST = ["--set-size", "16", "--batch-size", "4", "--accelerator", "cpu"]
SE_FAST = ["--preset", "tiny", "--batch-size", "16", "--gene-dim", "8", "--accelerator", "cpu"]
REMOVED = re.compile(r"removed (\d+) temporary (?:files?|folders?) \(\d+(\.\d)? [kMG]?B\) left by an interrupted write of ")


# ------------------------------------------------------------------------------------- fixtures


def run_batch(*commands: list) -> list[subprocess.CompletedProcess]:
    """Several ``vcell`` command lines in one real subprocess (:func:`conftest.run_cli_batch`)."""
    return run_cli_batch(list(commands))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Tiny simulated data (3 contexts), an ST and an SE run, a prediction and its eval, all by the CLI."""
    root = tmp_path_factory.mktemp("ws")
    adata = simulate_perturbseq(n_genes=40, n_contexts=3, n_perturbations=4, n_combinations=0,
                                cells_per_perturbation=20, n_controls=40, seed=0)
    paths = {"counts": root / "counts.h5ad", "log": root / "log.h5ad", "st_cfg": root / "st.json",
             "se_cfg": root / "se.json", "genes": root / "genes.csv", "real": root / "real.h5ad"}
    adata.write_h5ad(paths["counts"])
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    adata.write_h5ad(paths["log"])
    adata[adata.obs["cell_type"] == "ctx_B"].copy().write_h5ad(paths["real"])
    paths["st_cfg"].write_text(json.dumps(ST_CFG))
    paths["se_cfg"].write_text(json.dumps(SE_CFG))
    paths["genes"].write_text("\n".join(adata.var_names) + "\n")
    paths["st"], paths["se"], paths["pred"], paths["eval"] = root / "st", root / "se", root / "pred.h5ad", root / "eval"
    for proc in run_batch(
        ["train", "st", "--data", paths["log"], "--holdout-context", "ctx_B", "--val-context", "ctx_C", "--config",
         paths["st_cfg"], "--max-steps", "4", "--checkpoint-every", "2", *ST_FAST, "--out", paths["st"]],
        ["train", "se", "--data", paths["counts"], "--config", paths["se_cfg"], "--max-steps", "2", *SE_FAST, "--out", paths["se"]],
        ["predict", "--model", paths["st"], "--data", paths["log"], "--context", "ctx_B", "--perturbations", "data", "--out", paths["pred"]],
        ["eval", "run", "--pred", paths["pred"], "--real", paths["real"], "--profile", "minimal", "--threads", "1", "--out", paths["eval"]],
    ):
        assert proc.returncode == 0, proc.stderr[-3000:]
    return paths


def snapshot(path: Path) -> dict:
    """Content hash, mtime and inode of a file, or of every file under a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in files}


def temporaries(folder: Path) -> list[Path]:
    """vcell temporary files (``.NAME.PID-XXXXXXXX.tmp``) anywhere under ``folder``."""
    return sorted(p for p in folder.rglob(".*.tmp"))


# ------------------------------------------------------------------ (a) no replacing without --overwrite


def _h5ad(path: Path) -> None:
    assert ad.read_h5ad(path).n_obs > 0


def _safetensors(path: Path) -> None:
    with safe_open(str(path), framework="np") as f:
        assert list(f.keys())


def _run(steps: int, best: bool):
    def check(path: Path) -> None:
        assert json.loads((path / LAST / CONFIG).read_text())["step"] == steps
        assert (path / BEST).is_dir() == best  # the earlier run's best/ never stays beside a new run
    return check


@dataclass
class Writer:
    """A command that writes: its arguments for output ``out``, what an earlier output looks like and
    how a good new one is recognised (``None``: only the refusal is run)."""

    args: Callable[[dict, Path], list]
    out: str
    earlier: Callable[[dict, Path], None]
    check: Callable[[Path], None] | None


def _file(ws, out: Path) -> None:
    out.write_bytes(b"an earlier output\n")


def _folder_with(name: str):
    def make(ws, out: Path) -> None:
        out.mkdir()
        (out / name).write_bytes(b"an earlier output\n")
    return make


def _copy(key: str):
    def make(ws, out: Path) -> None:
        shutil.copytree(ws[key], out)
    return make


WRITERS = {
    "data preprocess": Writer(lambda w, o: ["data", "preprocess", w["counts"], o, "--n-top-genes", "20"], "pp.h5ad", _file, _h5ad),
    "data split": Writer(lambda w, o: ["data", "split", w["log"], "--holdout-context", "ctx_B", "--out", o], "split.toml", _file,
                         lambda p: "[zeroshot]" in p.read_text()),
    "data subset": Writer(lambda w, o: ["data", "subset", w["log"], "--holdout-context", "ctx_B", "--out", o], "real.h5ad", _file,
                          _h5ad),
    "data simulate": Writer(lambda w, o: ["data", "simulate", o, "--n-genes", "20", "--n-contexts", "2", "--n-perturbations", "3",
                                          "--n-combinations", "0", "--cells-per-pert", "5", "--n-controls", "10"],
                            "sim.h5ad", _file, _h5ad),
    "eval run": Writer(lambda w, o: ["eval", "run", "--pred", w["pred"], "--real", w["real"], "--profile", "minimal",
                                     "--threads", "1", "--out", o],
                       "eval", _folder_with("results.csv"), lambda p: (p / "agg_results.csv").is_file() and
                       (p / "results.csv").read_text().startswith("perturbation")),
    "eval baseline": Writer(lambda w, o: ["eval", "baseline", "--real", w["log"], "--out", o], "base.h5ad", _file, _h5ad),
    "eval score": Writer(lambda w, o: ["eval", "score", "--user", w["eval"] / "agg_results.csv", "--baseline",
                                       w["eval"] / "agg_results.csv", "--out", o], "score.csv", _file,
                         lambda p: p.read_text().startswith("metric")),
    "eval prep": Writer(lambda w, o: ["eval", "prep", "--pred", w["pred"], "--genes", w["genes"], "--expected-n-genes", "-1",
                                      "--out", o], "sub.vcc", _file, tarfile.is_tarfile),
    "genes from-data": Writer(lambda w, o: ["genes", "from-data", "--data", w["log"], "--dim", "4", "--out", o], "g.safetensors",
                              _file, _safetensors),
    "genes embed": Writer(lambda w, o: ["genes", "embed", "--fasta", w["genes"], "--esm-model", w["st"], "--out", o],
                          "e.safetensors", _file, None),
    "predict": Writer(lambda w, o: ["predict", "--model", w["st"], "--data", w["log"], "--context", "ctx_B", "--out", o],
                      "p.h5ad", _file, _h5ad),
    "embed": Writer(lambda w, o: ["embed", "--model", w["se"], "--data", w["counts"], "--out", o], "emb.h5ad", _file, _h5ad),
    "train st": Writer(lambda w, o: ["train", "st", "--data", w["log"], "--holdout-context", "ctx_B", "--config", w["st_cfg"],
                                     "--max-steps", "2", *ST_FAST, "--out", o], "run", _copy("st"), _run(2, best=False)),
    "train se": Writer(lambda w, o: ["train", "se", "--data", w["counts"], "--config", w["se_cfg"], "--max-steps", "1",
                                     *SE_FAST, "--out", o], "run", _copy("se"), _run(1, best=False)),
    "bench": Writer(lambda w, o: ["bench", "--data", w["log"], "--holdout-context", "ctx_B", "--models", "cell_mean",
                                  "--profile", "minimal", "--no-report", "--threads", "1", "--out", o],
                    "bench", _folder_with("leaderboard.csv"), lambda p: (p / "bench.json").is_file()),
    "demo": Writer(lambda w, o: ["demo", "--out", o], "demo", _folder_with("simulated.h5ad"), None),
}


@pytest.fixture(scope="module")
def rewritten(ws, tmp_path_factory) -> dict[str, dict]:
    """Every writer run on an earlier output without, then (where it has a check) with --overwrite."""
    runs = {}
    for name, writer in WRITERS.items():
        out = tmp_path_factory.mktemp("w") / writer.out
        writer.earlier(ws, out)
        runs[name] = {"out": out, "before": snapshot(out)}
    for name, proc in zip(WRITERS, run_batch(*(WRITERS[n].args(ws, runs[n]["out"]) for n in WRITERS))):
        runs[name].update(refused=proc, unchanged=snapshot(runs[name]["out"]))
    again = [n for n in WRITERS if WRITERS[n].check is not None]
    for name, proc in zip(again, run_batch(*(WRITERS[n].args(ws, runs[n]["out"]) + ["--overwrite"] for n in again))):
        runs[name].update(replaced=proc, after=snapshot(runs[name]["out"]))
    return runs


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_existing_output_is_replaced_only_with_overwrite(rewritten, name):
    run, writer = rewritten[name], WRITERS[name]
    out = run["out"]
    line = error_line(run["refused"])
    assert str(out) in line and "--overwrite" in line, line
    assert run["unchanged"] == run["before"]  # byte-identical, not even rewritten
    if writer.check is None:
        return
    proc, before, after = run["replaced"], run["before"], run["after"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(after.get(k) != v for k, v in before.items())  # each earlier file replaced (or removed)
    assert writer.check(out) is not False
    assert not temporaries(out.parent)


UNWRITABLE = {
    "preprocess": (lambda w, o: ["data", "preprocess", w["counts"], o], "file"),
    "split": (lambda w, o: ["data", "split", w["log"], "--holdout-context", "ctx_B", "--out", o], "file"),
    "eval-run": (lambda w, o: ["eval", "run", "--pred", w["pred"], "--real", w["real"], "--out", o], "folder"),
    "predict": (lambda w, o: ["predict", "--model", w["st"], "--data", w["log"], "--context", "ctx_B", "--out", o], "file"),
    "train-st": (lambda w, o: ["train", "st", "--data", w["log"], "--max-steps", "1", "--out", o], "folder"),
}


@pytest.fixture(scope="module")
def unwritable(ws, tmp_path_factory) -> dict[str, tuple]:
    """Each command of UNWRITABLE run with --out under a file, then with --out of the wrong kind."""
    cases, commands = {}, []
    for name, (args, kind) in UNWRITABLE.items():
        folder = tmp_path_factory.mktemp(name)
        blocker = folder / "a-file"
        blocker.write_text("not a folder\n")
        wrong = folder / ("a-folder" if kind == "file" else "another-file")
        wrong.mkdir() if kind == "file" else wrong.write_text("x\n")
        cases[name] = (folder, wrong)
        commands += [args(ws, blocker / "out"), args(ws, wrong)]
    results = run_batch(*commands)
    return {name: (*cases[name], results[2 * i], results[2 * i + 1]) for i, name in enumerate(UNWRITABLE)}


@pytest.mark.parametrize("name", list(UNWRITABLE))
def test_an_unwritable_destination_is_refused_before_any_work(unwritable, name):
    folder, wrong, under_a_file, wrong_kind = unwritable[name]
    line = error_line(under_a_file)  # its folder would have to be a file
    assert "a-file is a file, not a folder" in line, line
    line = error_line(wrong_kind)
    assert ("is a folder; give a file name" if UNWRITABLE[name][1] == "file" else "is a file, not a folder") in line, line
    assert sorted(p.name for p in folder.iterdir()) == sorted(["a-file", wrong.name])  # nothing written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(VcellError, match="not writable"):
            check_output_path(locked / "x.h5ad")
        with pytest.raises(VcellError, match="locked/sub cannot be created"):
            check_output_dir(locked / "sub", ["results.csv"])
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------- (b) killed mid-write, then rerun

SLOW_WRITE = """
import importlib, os, sys, time
target, after = sys.argv[1], int(sys.argv[2])
module, _, attr = target.partition(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]

def slow(*args, **kwargs):  # the write happens; then the process waits to be killed before the rename
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] >= after:
        open(os.environ["VCELL_TEST_MARK"], "w").close()
        time.sleep(600)
    return out

setattr(owner, name, slow)
from vcell.cli import main
main(sys.argv[3:])
"""


def kill_while_writing(args: list, target: str, after: int, folder: Path, tmp_path: Path) -> list[Path]:
    """Run the CLI with ``args``, SIGKILL it once ``target`` (``module:attr``) wrote its ``after``-th
    time; returns the temporary files it left under ``folder``."""
    mark, log = tmp_path / "written.mark", tmp_path / "killed.log"
    mark.unlink(missing_ok=True)
    env = {**os.environ, "VCELL_TEST_MARK": str(mark), "COLUMNS": "200", "NO_COLOR": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, target, str(after), *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 120
            while not mark.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the command never reached the write"
                time.sleep(0.05)
            left = temporaries(folder)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert left, "killed mid-write, the temporary file should be there"
    assert any(p.is_dir() or p.stat().st_size > 0 for p in left)  # the data was written, not yet renamed
    return left


def _cleaned(proc, left: list[Path], folder: Path) -> None:
    """``proc`` (a rerun) succeeded, said it removed ``left``, and no temporary file is left."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = REMOVED.search(" ".join(proc.stderr.split()))
    assert said and int(said.group(1)) == len(left), proc.stderr[-2000:]
    assert left[0].name in proc.stderr
    assert not temporaries(folder) and not any(p.exists() for p in left)


def test_h5ad_writers_killed_mid_write_leave_nothing_after_a_rerun(ws, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    keep = folder / ".pp.h5ad.mine"  # not a vcell temporary name: never touched
    keep.write_text("mine\n")
    args = {
        "pp.h5ad": ["data", "preprocess", ws["counts"], folder / "pp.h5ad", "--n-top-genes", "20"],
        "pred.h5ad": ["predict", "--model", ws["st"], "--data", ws["log"], "--context", "ctx_B", "--perturbations", "data",
                      "--out", folder / "pred.h5ad"],
        "emb.h5ad": ["embed", "--model", ws["se"], "--data", ws["counts"], "--out", folder / "emb.h5ad"],
    }
    # preprocess and predict stream their output with H5adWriter (no AnnData.write_h5ad); embed writes an AnnData
    writes = {"pp.h5ad": "vcell.data.h5write:H5adWriter.finish", "pred.h5ad": "vcell.data.h5write:H5adWriter.finish"}
    left = {}
    for name, argv in args.items():
        target = writes.get(name, "anndata:AnnData.write_h5ad")
        left[name] = [p for p in kill_while_writing(argv, target, 1, folder, tmp_path) if name in p.name]
        assert len(left[name]) == 1 and left[name][0].name.startswith(f".{name}.") and not (folder / name).exists()
    reruns = run_batch(*args.values())
    for (name, argv), proc in zip(args.items(), reruns):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert REMOVED.search(" ".join(proc.stderr.split())) and left[name][0].name in proc.stderr, proc.stderr[-2000:]
        assert ad.read_h5ad(folder / name).n_obs > 0
    assert not temporaries(folder) and keep.read_text() == "mine\n"


def test_eval_run_killed_mid_write_leaves_nothing_after_a_rerun(ws, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "run", "--pred", ws["pred"], "--real", ws["real"], "--profile", "de", "--threads", "1", "--out", out]
    left = kill_while_writing(args, "vcell.eval.run:write_csv", 1, out, tmp_path)
    assert not (out / "results.csv").exists() and len(left) == 4  # results, agg_results and the two DE tables
    _cleaned(run_cli(*args), left, out)
    assert (out / "results.csv").read_text().startswith("perturbation") and (out / "real_de.csv").is_file()


def test_a_folder_another_run_is_writing_into_is_refused(ws, tmp_path):
    """Two runs into one --out would both pass the "already holds" check (their outputs land at the
    end) and leave a mix; while one holds the folder, the other is one error line, and writes nothing."""
    import fcntl

    out = tmp_path / "eval"
    out.mkdir()
    args = ["eval", "run", "--pred", ws["pred"], "--real", ws["real"], "--profile", "minimal", "--threads", "1", "--out", out]
    fd = os.open(out, os.O_RDONLY)  # what a running vcell command holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = run_cli(*args)
    finally:
        os.close(fd)
    assert busy.returncode == 2, busy.stderr
    assert error_line(busy) == f"error: {out}: another vcell command is writing into this folder now; wait for it to finish or choose another --out"
    assert not any(out.iterdir())
    done = run_cli(*args)  # the lock went with its holder
    assert done.returncode == 0, done.stderr
    assert (out / "results.csv").is_file() and not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["st", "se"])
def test_a_checkpoint_write_killed_midway_is_cleaned_by_resume(ws, tmp_path, kind):
    run = tmp_path / "run"
    if kind == "st":
        args = ["train", "st", "--data", ws["log"], "--holdout-context", "ctx_B", "--config", ws["st_cfg"], *ST_FAST]
    else:
        args = ["train", "se", "--data", ws["counts"], "--config", ws["se_cfg"], *SE_FAST]
    args += ["--max-steps", "4", "--checkpoint-every", "2", "--out", run]
    # each checkpoint writes two safetensors files (weights, trainer state): the 3rd write is the step-4 weights
    left = kill_while_writing(args, "vcell.train.checkpoint:write_safetensors", 3, run, tmp_path)
    assert [p.parent for p in left] == [run] and left[0].name.startswith(f".{LAST}.") and left[0].is_dir()
    assert json.loads((run / LAST / CONFIG).read_text())["step"] == 2  # the complete step-2 checkpoint is intact
    refused, resumed = run_batch(args, [*args, "--resume"])
    line = error_line(refused)  # without --resume the killed run is not replaced either
    assert "already holds a trained run (last/ at step 2)" in line
    _cleaned(resumed, left, run)
    assert json.loads((run / LAST / CONFIG).read_text())["step"] == 4


def test_a_checkpoint_caught_between_its_two_renames_is_put_back(ws, tmp_path):
    from vcell.train.runs import run_dir

    run = tmp_path / "run"
    shutil.copytree(ws["st"], run)
    os.replace(run / LAST, run / f".{LAST}.old")  # killed after moving last/ aside, before the new one moved in
    (run / ".best.old").mkdir()  # and a stale previous best/ beside the real one
    with run_dir(run, resume=True) as start:
        assert start == run / LAST
    assert (run / LAST / WEIGHTS).is_file() and not (run / f".{LAST}.old").exists() and not (run / ".best.old").exists()


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_overwrite_moves_only_what_a_run_wrote_and_a_failed_one_loses_nothing(ws, tmp_path):
    """--overwrite removed logs/, last/ and best/ whole (a user's logs/2024-runs/ went with them) and
    deleted the earlier run before the new one had written anything (a full disk then left neither).
    Now: a last/ that is no checkpoint is refused; logs/ keeps all but Lightning's version_N; the
    earlier run is put back when the new one fails, and removed when it ends or saved a step."""
    from vcell.train.runs import REPLACED, run_dir

    run = tmp_path / "run"
    shutil.copytree(ws["st"], run)
    (run / "logs" / "2024-runs").mkdir(parents=True)
    (run / "logs" / "2024-runs" / "a.log").write_text("mine\n")
    before = _tree(run)
    with pytest.raises(OSError, match="No space left"):
        with run_dir(run, overwrite=True):
            assert not (run / LAST).exists() and (run / "logs" / "2024-runs" / "a.log").is_file()
            (run / LAST).mkdir()
            (run / LAST / "weights.safetensors").write_bytes(b"partial")  # a new run's write, cut short
            raise OSError(28, "No space left on device")
    assert _tree(run) == before and not leftovers(run / REPLACED)
    with pytest.raises(KeyboardInterrupt):  # interrupted before its first checkpoint: the earlier run stays
        with run_dir(run, overwrite=True):
            raise KeyboardInterrupt
    assert _tree(run) == before
    with pytest.raises(RuntimeError, match="diverged"):  # a checkpoint without optimiser state cannot be resumed: put back
        with run_dir(run, overwrite=True):
            (run / LAST).mkdir()
            (run / LAST / CONFIG).write_text("{}")
            raise RuntimeError("loss diverged at step 9000")
    assert _tree(run) == before
    with pytest.raises(RuntimeError, match="diverged"):  # failed after a checkpoint: resumable, it replaces the old run
        with run_dir(run, overwrite=True):
            (run / LAST).mkdir()
            (run / LAST / CONFIG).write_text("{}")
            (run / LAST / OPTIMIZER).write_text("")
            raise RuntimeError("loss diverged at step 9000")
    assert _tree(run) == {"last/config.json": b"{}", f"last/{OPTIMIZER}": b"", "logs/2024-runs/a.log": b"mine\n"}

    # killed after its first validation wrote best/ but before a last/ to resume from: the earlier run is put back
    early = tmp_path / "early"
    shutil.copytree(ws["st"], early)
    before = _tree(early)
    aside = early / f".{REPLACED}.999999999-abcdefgh.tmp"
    aside.mkdir()
    for name in (LAST, BEST, "logs"):
        if (early / name).exists():
            os.replace(early / name, aside / name)
    (early / BEST).mkdir()
    (early / BEST / CONFIG).write_text("{}")  # the killed run's
    with run_dir(early, resume=True) as start:  # "nothing to resume" before: the set-aside last/ is resumed
        assert start == early / LAST
    assert _tree(early) == before and not leftovers(early / REPLACED)

    # killed after setting the earlier run aside, before the new one's first checkpoint: put back
    killed = tmp_path / "killed"
    shutil.copytree(ws["st"], killed)
    before = _tree(killed)
    aside = killed / f".{REPLACED}.999999999-abcdefgh.tmp"
    aside.mkdir()
    for name in (LAST, BEST, "logs"):  # as _set_aside leaves them (logs: its version_N inside)
        if (killed / name).exists():
            os.replace(killed / name, aside / name)
    with run_dir(killed, resume=True) as start:
        assert start == killed / LAST
    assert _tree(killed) == before

    import fcntl  # a run training into the folder now (its lock): a second run is refused, nothing moved

    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(VcellError, match="another vcell run is training into this folder now"):
            with run_dir(run, overwrite=True):
                pass
    finally:
        os.close(fd)
    assert (run / LAST / CONFIG).read_text() == "{}"

    mine = tmp_path / "mine"
    (mine / LAST).mkdir(parents=True)
    (mine / LAST / "todo.txt").write_text("mine\n")
    for overwrite in (False, True):
        with pytest.raises(VcellError, match=r"last: not a vcell checkpoint \(no config.json\).*move it away"):
            with run_dir(mine, overwrite=overwrite):
                pass
    assert (mine / LAST / "todo.txt").read_text() == "mine\n"


def test_only_that_outputs_dead_temporaries_are_removed(tmp_path):
    out = tmp_path / "x.h5ad"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".x.h5ad.{sleeper.pid}-abcdefgh.tmp": False,  # a running writer's: kept
            f".x.h5ad.{os.getpid()}-abcdefgh.tmp": False,  # this process's own: kept
            ".x.h5ad.999999999-abcdefgh.tmp": True,  # a dead writer's: removed
            ".x.h5ad.ab_defgh.tmp": True,  # an older vcell's (no pid): removed
            ".y.h5ad.999999999-abcdefgh.tmp": False,  # another output's
            ".x.h5ad.backup": False, "x.h5ad.tmp": False, ".x.h5ad.999999999-abc.tmp": False,
        }
        for name in names:
            (tmp_path / name).write_text("x")
        assert sorted(p.name for p in leftovers(out)) == sorted(n for n, gone in names.items() if gone)
        assert clean_leftovers(out) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in names.items() if not gone)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [p.name for p in leftovers(out)] == [f".x.h5ad.{sleeper.pid}-abcdefgh.tmp"]  # its writer is gone now


# ------------------------------------------------------------------------ (c) resume must match


def _resume_st(ws, run, data=None, holdout="ctx_B", val="ctx_C") -> list:
    return ["train", "st", "--data", data or ws["log"], "--holdout-context", holdout, "--val-context", val, "--config",
            ws["st_cfg"], "--max-steps", "6", *ST_FAST, "--out", run, "--resume"]


def test_resume_with_another_split_or_data_is_refused_naming_the_difference(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws["st"], run)
    before = snapshot(run)
    adata = ad.read_h5ad(ws["log"])
    other = tmp_path / "other.h5ad"  # the same cells and genes, other values
    changed = adata.copy()
    changed.X = changed.X * 1.5
    changed.write_h5ad(other)
    fewer = tmp_path / "fewer.h5ad"  # one perturbation fewer: the perturbation features differ too
    gone = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})[0]
    adata[(adata.obs["target_gene"].astype(str) != gone).to_numpy()].copy().write_h5ad(fewer)
    split, data, perts = run_batch(_resume_st(ws, run, holdout="ctx_C", val="ctx_B"), _resume_st(ws, run, data=other),
                                   _resume_st(ws, run, data=fewer))
    line = error_line(split)
    assert "cannot resume" in line and "test (held-out) context(s) ctx_B, not ctx_C" in line, line
    assert "validation context(s) ctx_C, not ctx_B" in line, line
    line = error_line(data)
    assert f"it was trained on {ws['log']} (365 cells x 40 genes), not {other} (365 cells x 40 genes)" in line, line
    line = error_line(perts)
    assert f"perturbation features differ (missing here: '{gone}')" in line, line
    assert snapshot(run) == before  # nothing written: the checkpoint is untouched, no new logs


def test_resume_with_other_training_options_is_refused_naming_them(ws, tmp_path):
    """The seed, batch and set sizes draw the cell sets, and the learning rate and precision shape every
    step: a run resumed with others would match neither run, and its config.json would claim the new
    seed for steps trained with the old one. Refused, each named; the number of processes may change."""
    run = tmp_path / "run"
    shutil.copytree(ws["st"], run)
    before = snapshot(run)
    se_run = tmp_path / "se_run"
    shutil.copytree(ws["se"], se_run)
    se_before = snapshot(se_run)
    se_resume = ["train", "se", "--data", ws["counts"], "--config", ws["se_cfg"], "--max-steps", "3", *SE_FAST, "--out", se_run, "--resume"]
    sizes, rate, se = run_batch([*_resume_st(ws, run), "--seed", "1", "--batch-size", "2", "--set-size", "8"],
                                [*_resume_st(ws, run), "--lr", "0.001", "--precision", "bf16-mixed"],
                                [*se_resume, "--seed", "3", "--lr", "0.01"])
    line = error_line(se)
    assert "--seed 0, not 3" in line and "--lr 0.003, not 0.01" in line, line
    assert snapshot(se_run) == se_before
    line = error_line(sizes)
    for part in ("--seed 0, not 1", "--batch-size 4, not 2", "--set-size 16, not 8", "training options"):
        assert part in line, line
    line = error_line(rate)
    assert "--lr 0.0001, not 0.001" in line and "--precision 32, not bf16-mixed" in line, line
    assert snapshot(run) == before


def test_resume_of_a_checkpoint_without_fingerprint_still_works(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws["st"], run)
    for name in (LAST, BEST):
        meta = json.loads((run / name / CONFIG).read_text())
        assert set(meta["fingerprint"]) == {"data", "split"}
        del meta["fingerprint"]
        (run / name / CONFIG).write_text(json.dumps(meta))
    proc = run_cli(*_resume_st(ws, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "did not record the data and split" in " ".join(proc.stderr.split())
    assert json.loads((run / LAST / CONFIG).read_text())["step"] == 6


def test_se_resume_with_another_file_of_the_same_name_is_refused(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws["se"], run)
    before = snapshot(run)
    other = tmp_path / "elsewhere" / "counts.h5ad"  # the same dataset name (file stem), other cells
    other.parent.mkdir()
    ad.read_h5ad(ws["counts"])[::2].copy().write_h5ad(other)
    line = error_line(run_cli("train", "se", "--data", other, "--config", ws["se_cfg"], "--max-steps", "3", *SE_FAST,
                              "--out", run, "--resume"))
    assert f"cannot resume {run / LAST}: it was trained on {ws['counts']} (365 cells x 40 genes), not {other} (183 cells" in line, line
    assert snapshot(run) == before


# ------------------------------------------------------------------- (d) checkpoint size, optimiser


def test_only_last_keeps_the_optimizer_and_no_save_optimizer_cannot_resume(ws, tmp_path):
    assert (ws["st"] / LAST / OPTIMIZER).is_file() and not (ws["st"] / BEST / OPTIMIZER).exists()
    run = tmp_path / "run"
    args = ["train", "st", "--data", ws["log"], "--holdout-context", "ctx_B", "--config", ws["st_cfg"], *ST_FAST, "--out", run]
    proc, resumed = run_batch([*args, "--max-steps", "2", "--no-save-optimizer"], [*args, "--max-steps", "4", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / LAST / OPTIMIZER).exists() and (run / LAST / WEIGHTS).is_file()
    size = sum(p.stat().st_size for p in (run / LAST).iterdir())
    full = sum(p.stat().st_size for p in (ws["st"] / LAST).iterdir())
    assert size < 0.5 * full  # Adam keeps two moments per weight
    summary = " ".join(proc.stdout.split())
    assert re.search(rf"checkpoint: {re.escape(str(run / LAST))} \(\d+(\.\d)? [kM]B\)", summary), summary
    line = error_line(resumed)
    assert "saved without the optimiser state (--no-save-optimizer)" in line, line
    assert json.loads((run / LAST / CONFIG).read_text())["step"] == 2


def test_resume_through_another_column_names_the_column_not_a_changed_file():
    """Labels read through another --pert-col change the data's digest, the split and the features:
    the refusal named the file as 'changed since the run was trained on it' (it was not) and the one
    cause three times; now the column alone. A changed file with the same columns is still named."""
    from vcell.train.runs import resume_differences

    def run(col: str, digest: str, vocab: list[str]) -> dict:
        data = {"file": "/data/x.h5ad", "digest": digest, "cells": 10, "genes": 5}
        return {"columns": {"pert_col": col, "control": "control"}, "pert_vocab": vocab,
                "fingerprint": {"data": data, "split": {"digest": digest, "contexts": {"test": ["T98G"]}}},
                "pert_features": {"sources": ["onehot"], "digest": digest}}

    saved = run("perturbation", "a", ["MAPK1", "PLK4"])
    assert resume_differences(saved, run("perturbation_raw", "b", ["MAPK1_sg1", "PLK4_sg2"])) == \
        ["it was trained with --pert-col 'perturbation', not 'perturbation_raw'"]
    batches = run("perturbation", "b", ["MAPK1", "PLK4"])  # another batch column: its codes are in the data's digest
    batches["columns"]["batch_col"], saved["columns"]["batch_col"] = "gem_group", None
    assert not any("changed since" in d for d in resume_differences(saved, batches))
    assert "it was trained with --batch-col None, not 'gem_group'" in resume_differences(saved, batches)
    del saved["columns"]["batch_col"]
    changed = resume_differences(saved, run("perturbation", "b", ["MAPK1", "PLK4"]))
    assert any("/data/x.h5ad changed since it was trained on it" in d for d in changed), changed


def test_a_file_changed_beyond_its_sampled_rows_is_not_the_file_a_run_resumes_on(tmp_path):
    """The data's digest samples 16 rows: a file with those rows kept and the others shuffled was
    resumed on (646 of 662 cells changed). 512 rows and every row's number of stored values (CSR
    indptr) are in the identity too; a checkpoint of an earlier version, without them, is compared
    as before."""
    from vcell.train.runs import MORE_ROWS, SAMPLE_ROWS, data_difference, file_identity

    rng = np.random.default_rng(0)
    n = 2000  # more rows than the 512 hashed: the row layout tells the rest
    X = sp.random(n, 30, density=0.3, format="csr", random_state=1, dtype=np.float32)
    a = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=[f"g{j}" for j in range(30)]))
    a.write_h5ad(tmp_path / "x.h5ad")
    sampled = {int(i) for k in (SAMPLE_ROWS, MORE_ROWS) for i in np.linspace(0, n - 1, k).astype(np.int64)}  # only the layout tells
    others = np.array([i for i in range(n) if i not in sampled])
    order = np.arange(n)
    order[others] = rng.permutation(others)
    b = a.copy()
    b.X = a.X[order]
    b.obs_names = a.obs_names  # same names, other values in the unsampled rows
    b.write_h5ad(tmp_path / "x.h5ad")
    saved = file_identity(tmp_path / "x.h5ad", ad.read_h5ad(tmp_path / "x.h5ad", backed="r"))
    a.write_h5ad(tmp_path / "x.h5ad")
    ours = file_identity(tmp_path / "x.h5ad", ad.read_h5ad(tmp_path / "x.h5ad", backed="r"))
    assert saved["digest"] == ours["digest"]  # what the sampled rows alone could not tell
    assert "changed since it was trained on it" in data_difference(saved, ours)
    assert file_identity(tmp_path / "x.h5ad", ad.read_h5ad(tmp_path / "x.h5ad"))["rows"] == ours["rows"]  # in memory too
    assert data_difference({k: v for k, v in saved.items() if k != "rows"}, ours) is None


def test_a_prediction_beside_the_model_can_be_replaced_but_not_the_model(ws, tmp_path):
    """The model's checkpoint folders are inputs of predict (an --overwrite wrote a prediction over
    weights.safetensors); a prediction kept in the run folder is not, and is replaced with --overwrite."""
    run = Path(shutil.copytree(ws["st"], tmp_path / "run"))
    weights = snapshot(run / "last")
    args = ["predict", "--model", run, "--data", ws["log"], "--context", "ctx_B", "--overwrite", "--out"]
    first, again, into = run_batch([*args, run / "pred.h5ad"], [*args, run / "pred.h5ad"],
                                   [*args, run / "last" / "weights.safetensors"])
    assert first.returncode == 0 and again.returncode == 0, again.stderr[-1500:]
    assert "weights.safetensors" in error_line(into) and "input folder" in error_line(into)
    # a model named by one checkpoint folder: its sibling is the run's too (last/ is what --resume needs)
    assert (run / "best").is_dir()
    sibling = run_batch(["predict", "--model", run / "best", "--data", ws["log"], "--context", "ctx_B", "--overwrite",
                         "--out", run / "last" / "weights.safetensors"])[0]
    assert "input folder" in error_line(sibling)
    assert snapshot(run / "last") == weights


def test_a_folder_with_only_best_is_a_trained_run(tmp_path):
    """A run folder that kept only best/ (last/ removed to save room, or a run stopped before its
    first last/) is a trained run too: refused without --overwrite, never replaced silently."""
    from vcell.train.runs import check_run_dir

    (tmp_path / BEST).mkdir()
    (tmp_path / BEST / CONFIG).write_text(json.dumps({"model": {}, "step": 5}))
    with pytest.raises(VcellError, match=r"already holds a trained run \(best/ at step 5\).*--overwrite"):
        check_run_dir(tmp_path)
    assert check_run_dir(tmp_path, overwrite=True) is None


def test_resume_differences_see_order_and_values_not_only_names():
    """Genes in another order map the model's outputs to other genes; a feature table rewritten under
    the same file name trains on other vectors: both are differences a resume must refuse."""
    from vcell.train.runs import resume_differences

    assert resume_differences({"genes": ["a", "b"]}, {"genes": ["b", "a"]}) == [
        "it was trained on 2 genes, this data has 2 (in another order)"]
    assert resume_differences({"genes": ["a", "b"]}, {"genes": ["a", "b"]}) == []
    table = ["planted (genes.safetensors)"]
    assert resume_differences({"pert_features": {"sources": table, "digest": "a"}},
                              {"pert_features": {"sources": table, "digest": "b"}}) == [
        "its perturbation feature table (planted (genes.safetensors)) has other values now"]
    assert resume_differences({"pert_features": {"sources": table, "digest": "a"}},
                              {"pert_features": {"sources": table, "digest": "a"}}) == []
