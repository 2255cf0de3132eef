"""Long work shows progress and ends with one summary line; Ctrl-C says what was saved (issue #16, classes 5 and 6).

Real subprocess CLI runs on tiny simulated data: the summary lines of `train st`, `train se`,
`embed` and `predict`; the progress bar on a (pseudo-)terminal and nothing of it with `-q` or in
a pipe; the resume messages; SIGINT during `train st` (a checkpoint at the step reached, exit 130,
one line, and `--resume` continuing from that step to the weights of an uninterrupted run) and
during `bench` (nothing left under the output folder).
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from vcell.data.dataset import load_dataset
from vcell.data.simulate import simulate_perturbseq
from vcell.data.spec import DataSpec
from vcell.data.splits import apply_split, holdout_config
from vcell.nn.transition import STConfig
from vcell.train.st import train_st

from conftest import error_line, run_cli

TINY_ST = {"width": 32, "n_layers": 1, "n_heads": 2}
TINY_SE = {"d_model": 32, "n_layers": 1, "n_heads": 2, "sentence_len": 66, "n_mask": 32}
ST_OPTS = ["--set-size", "16", "--batch-size", "4", "--accelerator", "cpu", "--seed", "1"]
ANSI = re.compile(r"\x1b\[")
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
SUMMARY_ST = re.compile(r"trained ST to step (\d+) in \S+ \([\d,]+ cells/s\); checkpoint: (\S+) \([\d.]+ [kMG]?B\)")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny simulated Perturb-seq dataset as raw counts and as log1p, and tiny ST / SE configs."""
    tmp = tmp_path_factory.mktemp("progress")
    adata = simulate_perturbseq(n_genes=50, n_contexts=2, n_perturbations=5, n_combinations=0,
                                cells_per_perturbation=30, n_controls=60, seed=0)
    adata.write_h5ad(tmp / "counts.h5ad")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    adata.write_h5ad(tmp / "tiny.h5ad")
    (tmp / "st.json").write_text(json.dumps(TINY_ST))
    (tmp / "se.json").write_text(json.dumps(TINY_SE))
    return {"dir": tmp, "counts": tmp / "counts.h5ad", "data": tmp / "tiny.h5ad", "st": tmp / "st.json", "se": tmp / "se.json"}


def _st_args(files, out: Path, *extra: str) -> list:
    return ["train", "st", "--data", files["data"], "--config", files["st"], "--out", out, *ST_OPTS, *extra]


def run_in_terminal(*args, timeout: int = 300) -> tuple[int, str]:
    """Run ``python -m vcell ARGS`` with stdout and stderr on a pseudo-terminal; ``(exit code, all it printed)``
    (terminal control sequences removed)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "vcell", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(master)
    return code, CONTROL.sub("", b"".join(chunks).decode(errors="replace"))


def _plain(proc: subprocess.CompletedProcess) -> None:
    """Output of a run in a pipe: no traceback, no terminal control codes."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not ANSI.search(proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]


# ----------------------------------------------------------------------------------- train st


@pytest.fixture(scope="module")
def st_run(files) -> Path:
    """`vcell train st` to step 60 with validation, on a pseudo-terminal: the bar is drawn, the summary printed."""
    out = files["dir"] / "st-run"
    code, text = run_in_terminal(*_st_args(files, out, "--val-context", "ctx_A", "--max-steps", "60", "--checkpoint-every", "20"))
    assert code == 0, text[-3000:]
    # the progress bar: steps done/total, loss, cells/s (the bar's line is erased at the end)
    assert re.search(r"training ST.*\d+/60 steps", text), text[-3000:]
    assert "cells/s" in text and "loss " in text
    summary = SUMMARY_ST.search(text)
    assert summary and summary.group(1) == "60" and summary.group(2) == str(out / "last"), text[-2000:]
    assert re.search(rf"best: {re.escape(str(out / 'best'))} \(val_loss [\d.]+ at step \d+\)", text), text[-2000:]
    return out


def test_train_st_resume_says_the_step_and_quiet_hides_progress(files, st_run):
    resumed = run_cli(*_st_args(files, st_run, "--val-context", "ctx_A", "--max-steps", "65", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _plain(resumed)
    assert f"resuming from {st_run / 'last'} at step 60 of 65" in resumed.stderr
    assert re.search(r"^trained ST from step 60 to step 65 in ", resumed.stdout, re.M), resumed.stdout
    assert json.loads((st_run / "last" / "config.json").read_text())["step"] == 65

    # -q on a terminal: no bar, no resume note, but the summary line
    code, text = run_in_terminal("-q", *_st_args(files, st_run, "--val-context", "ctx_A", "--max-steps", "70", "--resume"))
    assert code == 0, text[-3000:]
    assert "training ST" not in text and "cells/s)" in text and "resuming" not in text
    assert "trained ST from step 65 to step 70" in text


def test_resume_to_fewer_steps_than_done_is_one_clear_error_even_with_q(files, st_run):
    before = (st_run / "last" / "weights.safetensors").read_bytes()
    done = json.loads((st_run / "last" / "config.json").read_text())["step"]
    proc = run_cli("-q", *_st_args(files, st_run, "--val-context", "ctx_A", "--max-steps", "50", "--resume"))
    line = error_line(proc)
    assert f"the run is already at step {done} >= --max-steps 50; pass a larger --max-steps" in line
    assert (st_run / "last" / "weights.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------ predict, SE, embed


def test_predict_prints_one_summary_line(files, st_run, tmp_path):
    out = tmp_path / "pred.h5ad"
    proc = run_cli("predict", "--model", st_run, "--data", files["data"], "--context", "ctx_B", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _plain(proc)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"wrote {re.escape(str(out))} in \S+: [\d,]+ predicted cells of 5 perturbation", lines[0]), proc.stdout


def test_train_se_and_embed_print_one_summary_line_each(files, tmp_path):
    run = tmp_path / "se"
    proc = run_cli("train", "se", "--data", files["counts"], "--out", run, "--preset", "tiny", "--config", files["se"],
                   "--max-steps", "6", "--batch-size", "16", "--gene-dim", "16", "--accelerator", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _plain(proc)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert re.match(rf"trained SE to step 6 in \S+ \([\d,]+ cells/s\); checkpoint: {re.escape(str(run / 'last'))} \([\d.]+ [kM]B\)$",
                    lines[0]), lines[0]

    out = tmp_path / "emb.h5ad"
    proc = run_cli("embed", "--model", run, "--data", files["counts"], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _plain(proc)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"wrote {re.escape(str(out))} in \S+: \.obsm\['X_vcell'\] = \d+ cells x 32$", lines[0]), proc.stdout


# -------------------------------------------------------------------------------------- Ctrl-C


class _Glob:
    """A path pattern under ``root`` that exists once one path matches (bench writes in a staging folder)."""

    def __init__(self, root: Path, pattern: str):
        self.root, self.pattern = root, pattern

    def exists(self) -> bool:
        return self.root.is_dir() and any(self.root.glob(self.pattern))

    def __str__(self) -> str:
        return f"{self.root}/{self.pattern}"


def _wait_for(path: Path | _Glob, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {path} appeared: {proc.communicate()[1][-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


# ``python -m vcell`` with its threads' stacks dumped to stderr on SIGUSR1: a run that ignores the
# Ctrl-C shows where it was. SIGINT goes back to Python's default first: a suite started in the
# background by a non-interactive shell (`make test &`) passes SIGINT and SIGQUIT down ignored, as
# POSIX says, and vcell, like any program, keeps an ignored SIGINT ignored (why this test used to
# time out inside `make test` only); the Ctrl-C tests stand for a user at a terminal.
_VCELL_WITH_STACK_DUMPS = ("import faulthandler, runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                           "faulthandler.register(signal.SIGUSR1, all_threads=True); "
                           "sys.argv[0] = 'vcell'; runpy.run_module('vcell', run_name='__main__', alter_sys=True)")


def _signal_state(pid: int) -> str:
    """The signal masks of process ``pid`` (``SigBlk``, ``SigIgn``, ``SigCgt`` from ``/proc``) and its thread count."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"unreadable ({exc})"
    return ", ".join(line.replace("\t", " ") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt", "Threads")))


def _interrupt(args: list, marker: Path, settle: float = 0.0, signum: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Start ``vcell ARGS``, send SIGINT (``signum``) once ``marker`` exists (and ``settle`` seconds more), wait for the end."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _VCELL_WITH_STACK_DUMPS, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(marker, proc)
        time.sleep(settle)
        signals = _signal_state(proc.pid)
        proc.send_signal(signum)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"vcell {args[0]} still ran 120 s after Ctrl-C (signal state when it was sent: {signals}); "
                        f"its stacks:\n{err[-8000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_in_train_st_saves_the_step_reached_and_resume_continues_exactly(files, tmp_path):
    out = tmp_path / "run"
    proc = _interrupt(_st_args(files, out, "--max-steps", "100000", "--checkpoint-every", "3"), out / "last" / "config.json")
    assert proc.returncode == 130, proc.stderr[-3000:]
    _plain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    m = re.fullmatch(r"interrupted at step (\d+) of 100000: saved (\S+) \(step (\d+)\); continue with --resume", lines[0])
    assert m and m.group(1) == m.group(3) and m.group(2) == str(out / "last"), lines[0]
    step = int(m.group(1))
    assert step >= 3 and json.loads((out / "last" / "config.json").read_text())["step"] == step
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    resumed = run_cli(*_st_args(files, out, "--max-steps", str(step + 2), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'last'} at step {step} of {step + 2}" in resumed.stderr
    assert f"trained ST from step {step} to step {step + 2}" in resumed.stdout

    # the same weights as a run never interrupted (same data, split, options and seed)
    data = load_dataset(files["data"], DataSpec(pert_col="target_gene", control="non-targeting", context_col="cell_type"))
    split = apply_split(data.index, holdout_config(data.index, []))
    ref = train_st(data, split, tmp_path / "ref", STConfig.preset_values("small", TINY_ST), max_steps=step + 2, set_size=16, batch_size=4, seed=1,
                   accelerator="cpu")
    a, b = load_file(str(out / "last" / "weights.safetensors")), load_file(str(ref / "last" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_train_st_stops_as_ctrl_c_does_with_its_own_status(files, tmp_path):
    """`timeout`, Slurm and Kubernetes send SIGTERM: the run saves the step reached and says so,
    exit 143 (Lightning turned it into exit status 0 with no word: a `train && predict` chain went on)."""
    out = tmp_path / "run"
    proc = _interrupt(_st_args(files, out, "--max-steps", "100000", "--checkpoint-every", "3"), out / "last" / "config.json",
                      signum=signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(r"SIGTERM: interrupted at step (\d+) of 100000: saved \S+ \(step \1\); "
                                            r"continue with --resume", lines[0]), proc.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


_SIGNAL_IN_VALIDATION = """
import os, signal, sys
import vcell.train.st as st
from vcell.cli import main

SIG = sys.argv.pop(1)
step = st.STModule.validation_step
def validation_step(self, batch, batch_idx):  # the first validation after step 5: the signal lands in it
    if self.trainer.global_step >= 5 and not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.kill(os.getpid(), getattr(signal, SIG))
    return step(self, batch, batch_idx)
st.STModule.validation_step = validation_step
sys.exit(main())  # the process's own command line, as the vcell script runs it
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_in_validation_saves_the_next_step(files, tmp_path, signum):
    """SIGTERM (a Slurm preemption) landing in validation: Lightning's own handler ended the run there,
    before last/ was written ("no checkpoint was written"), where a Ctrl-C finished the next step and
    kept it. Both now stop as Ctrl-C does."""
    out = tmp_path / "run"
    args = _st_args(files, out, "--max-steps", "100000", "--checkpoint-every", "1000", "--val-context", "ctx_B")
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_IN_VALIDATION, signal.Signals(signum).name, *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    saved = json.loads((out / "last" / "config.json").read_text())["step"]
    assert saved > 5 and f"interrupted at step {saved} of 100000: saved" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("signum", [signal.SIGHUP])
def test_sighup_in_a_command_that_writes_a_file_leaves_nothing(files, tmp_path, signum):
    """A closed terminal (SIGHUP) or SIGTERM removes the partial output as Ctrl-C does (Python's
    default left the hidden temporary file), exit 128 + N."""
    out = tmp_path / "bench"
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"st": {"max_steps": 100000, "set_size": 16, "batch_size": 4, "accelerator": "cpu", "config": TINY_ST}}))
    args = ["bench", "--data", files["data"], "--holdout-context", "ctx_B", "--models", "st", "--model-config", cfg,
            "--no-report", "--out", out]
    proc = _interrupt(args, _Glob(out, "bench.partial/predictions/real_ctx_B.h5ad"), settle=1.0, signum=signum)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"{signal.Signals(signum).name}: interrupted; nothing written", proc.stderr
    assert not out.exists()


def test_ctrl_c_in_bench_leaves_nothing_under_its_output(files, tmp_path):
    out = tmp_path / "bench"
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"st": {"max_steps": 100000, "set_size": 16, "batch_size": 4, "accelerator": "cpu", "config": TINY_ST}}))
    args = ["bench", "--data", files["data"], "--holdout-context", "ctx_B", "--models", "st", "--model-config", cfg,
            "--no-report", "--out", out]
    # bench writes the held-out real cells (in OUT/bench.partial), then trains st: interrupt it while it trains
    proc = _interrupt(args, _Glob(out, "bench.partial/predictions/real_ctx_B.h5ad"), settle=1.0)
    assert proc.returncode == 130, proc.stderr[-3000:]
    _plain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == "interrupted; nothing written", proc.stderr
    assert not any(line.startswith("error") for line in lines)
    assert not out.exists()


def test_ctrl_c_in_bench_overwrite_leaves_the_earlier_results_whole(files, tmp_path):
    """--overwrite replaces an earlier benchmark only once the new one is done: interrupted, the
    earlier files are byte for byte as they were (they were a mix of old and new runs); a staging
    folder a killed run left is removed by the next run, which says so."""
    out = tmp_path / "bench"
    first = run_cli("bench", "--data", files["data"], "--holdout-context", "ctx_B", "--models", "control_mean", "--no-report",
                    "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"st": {"max_steps": 100000, "set_size": 16, "batch_size": 4, "accelerator": "cpu", "config": TINY_ST}}))
    args = ["bench", "--data", files["data"], "--holdout-context", "ctx_B", "--models", "st", "--model-config", cfg,
            "--no-report", "--out", out, "--overwrite"]
    proc = _interrupt(args, _Glob(out, "bench.partial/predictions/real_ctx_B.h5ad"), settle=1.0)
    assert proc.returncode == 130, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"interrupted; nothing written: {out} holds the earlier results as they were", proc.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "bench.partial").exists()  # interrupted before a run was finished: nothing kept to resume
    killed = out / ".staging.999999-abcdefgh.tmp"  # as a killed run of an older vcell (no such process) leaves it
    (killed / "predictions").mkdir(parents=True)
    (killed / "predictions" / "x.h5ad").write_bytes(b"partial")
    (out / "bench.partial" / "predictions").mkdir(parents=True)  # a run killed before its first finished run
    (out / "bench.partial" / "predictions" / "real_ctx_B.h5ad").write_bytes(b"partial")
    again = run_cli("bench", "--data", files["data"], "--holdout-context", "ctx_B", "--models", "pert_mean", "--no-report",
                    "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    said = " ".join(again.stderr.split())
    assert "left by an interrupted write" in said and not killed.exists()
    assert "left by an interrupted benchmark with no record of a finished run" in said and not (out / "bench.partial").exists()
    assert not any(p.name.startswith(".staging") for p in out.iterdir())
    assert set(pd.read_csv(out / "leaderboard.csv")["model"]) == {"pert_mean", "cell_mean"}
    assert not (out / "predictions" / "control_mean_ctx_B.h5ad").exists()  # the earlier run's files went whole


def test_progress_is_on_by_default_in_an_interactive_session_only(monkeypatch):
    """A notebook user training ST saw nothing for minutes: progress is on at a prompt or in a
    Jupyter kernel, off in a script (and in this test run) unless vcell.show_progress says otherwise."""
    import sys

    import vcell
    from vcell.train import display

    monkeypatch.setitem(display._settings, "enabled", None)
    monkeypatch.delattr(sys, "ps1", raising=False)
    assert not display.progress_enabled()
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert display.progress_enabled()
    vcell.show_progress(False)
    assert not display.progress_enabled()
    monkeypatch.delattr(sys, "ps1")
    vcell.show_progress(True)
    assert display.progress_enabled()
    # and it is drawn in a notebook, whose stderr is no terminal (rich draws there with widgets)
    from rich.console import Console

    assert display.on_terminal(Console(force_jupyter=True)) and not display.on_terminal(Console(file=io.StringIO()))


def test_the_summary_says_when_no_validation_ran(tmp_path):
    """A run with validation cells that stopped before its first validation (the end of an epoch) has
    no best/: the summary says so (predict then used last/ without a word)."""
    from vcell.train.progress import RunSummary

    (tmp_path / "last").mkdir()
    short = RunSummary("st", tmp_path, 0, 60, 60, 48.0, 7680.0, validation_every=97)
    assert "no validation ran yet (one at the end of each epoch, every 97 steps): no best/ (predict uses last/)" in short.line()
    assert "validation" not in RunSummary("st", tmp_path, 0, 60, 60, 48.0, 7680.0).line()  # no validation cells: nothing to say
    (tmp_path / "best").mkdir()
    assert "no validation ran" not in short.line()


def test_a_log_file_gets_a_plain_progress_line_every_few_seconds(files, tmp_path):
    """Off a terminal (a batch job's log) nothing is drawn, but each step says where it is every
    VCELL_PROGRESS_EVERY seconds: steps done, share, loss, speed, time left; no control codes."""
    proc = run_cli(*_st_args(files, tmp_path / "a", "--max-steps", "60"), env={"VCELL_PROGRESS_EVERY": "0.02"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _plain(proc)
    # loss and speed are read once a second (_REFRESH_S): a tiny run's lines may come before them
    lines = re.findall(r"^training ST: (\d+)/60 steps \((\d+)%\)(?:, loss [\d.e+-]+, [\d,]+ cells/s)?, ETA \S+$", proc.stderr, re.M)
    assert len(lines) >= 2, proc.stderr[-3000:]
    steps = [int(s) for s, _ in lines]
    assert steps == sorted(steps) and steps[-1] < 60  # none once done: the summary line says so
    assert all(int(p) == round(100 * int(s) / 60) for s, p in lines)
    assert "validating" not in proc.stderr  # this run has no validation split
    # a validation has its own line: a long one (a large held-out split) no longer leaves the log silent
    val = run_cli(*_st_args(files, tmp_path / "w", "--max-steps", "30", "--val-context", "ctx_B"), env={"VCELL_PROGRESS_EVERY": "1e-9"})
    assert val.returncode == 0, val.stderr[-3000:]
    counts = re.findall(r"^validating ST: (\d+)/(\d+) batches \(\d+%\)", val.stderr, re.M)
    assert counts and all(0 < int(k) < int(n) for k, n in counts), val.stderr[-3000:]
    for every in ("0", "60"):  # off, and the default: a short run prints none
        quiet = run_cli(*_st_args(files, tmp_path / f"b{every}", "--max-steps", "20"), env={"VCELL_PROGRESS_EVERY": every})
        assert quiet.returncode == 0 and "training ST:" not in quiet.stderr, quiet.stderr[-3000:]


def test_a_log_line_reads_as_the_bar_does():
    from vcell.train.display import _LogLine

    line = _LogLine("training ST", 2000, "steps", 100, every=1e9)
    line.update(completed=600, info="loss 0.41, 2,345 cells/s")
    assert line.text(line._t0 + 100) == "training ST: 600/2,000 steps (30%), loss 0.41, 2,345 cells/s, ETA 4m40s"
    spinner = _LogLine("reading x.h5ad", None, "cells", 0, every=1e9)
    assert spinner.text(spinner._t0 + 12) == "reading x.h5ad: 12s so far"
    spinner.advance(1500)
    assert spinner.text(spinner._t0 + 12) == "reading x.h5ad: 1,500 cells, 12s so far"
