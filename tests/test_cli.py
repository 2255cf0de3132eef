"""The `vcell` command end to end, in real subprocesses."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell import __version__

from conftest import run_cli


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vcell {__version__}"
    helped = run_cli("data", "--help")
    assert helped.returncode == 0
    for command in ("check", "preprocess", "split", "simulate", "list", "fetch"):
        assert command in helped.stdout


_HELP_AT_80 = """
import contextlib, io, json, sys
import typer
from vcell.cli import app, main

def walk(cmd, path):
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from walk(sub, [*path, name])

out = []
for path, cmd in walk(typer.main.get_command(app), []):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main([*path, "--help"])
        except SystemExit:
            pass
    names = [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    out.append([path, names, buf.getvalue()])
print(json.dumps(out))
"""


def test_help_keeps_every_option_whole_in_80_columns():
    """Every command's help in an 80-column terminal names each of its options whole (typer's rich
    tables cut them: `--holdout-conte…`), and a group lists its commands' summaries whole."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-c", _HELP_AT_80], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(helps) > 15
    for path, names, text in helps:
        body = "\n".join(line for line in text.splitlines() if not line.startswith("Usage:"))  # "[ARGS]..." is click's
        assert "…" not in body and not any(line.endswith("...") for line in body.splitlines()), (path, text)
        assert max(len(line) for line in text.splitlines()) <= 80, (path, text)
        for name in names:
            assert name in text.split() or any(w.startswith(name) for w in text.split()), (path, name, text)
        # one spelling for replacing outputs: a bare `--overwrite` flag on every command that writes one
        assert "--no-overwrite" not in names, path
        if "--out" in names or path in (["data", "preprocess"], ["data", "simulate"]):
            assert "--overwrite" in names, path


@pytest.mark.slow
def test_demo_runs(tmp_path):
    result = run_cli("demo", "--out", tmp_path / "demo", "--seed", "1", "--models", "control_mean,pert_mean")
    assert result.returncode == 0, result.stderr
    assert "demo done" in result.stdout and "held out" in result.stdout and "leaderboard" in result.stdout
    assert (tmp_path / "demo" / "simulated.h5ad").exists()
    board = pd.read_csv(tmp_path / "demo" / "bench" / "leaderboard.csv")
    assert set(board["model"]) == {"control_mean", "pert_mean", "cell_mean"}
    # on simulated data with planted shared effects, the perturbation mean beats no-change
    held = board[board["context"] != "mean"].set_index("model")
    assert held.loc["pert_mean", "vcc_score"] > held.loc["control_mean", "vcc_score"]
    assert (tmp_path / "demo" / "bench" / "report.html").exists()


def test_simulate_is_seeded_and_never_overwrites(tmp_path):
    args = ["--n-genes", "300", "--n-contexts", "2", "--n-perturbations", "8", "--n-combinations", "2",
            "--cells-per-perturbation", "20", "--n-controls", "50"]
    a, b, c = (tmp_path / n for n in ("a.h5ad", "b.h5ad", "c.h5ad"))
    for path, seed in ((a, "5"), (b, "5"), (c, "6")):
        result = run_cli("data", "simulate", path, *args, "--seed", seed)
        assert result.returncode == 0, result.stderr
    xa, xb, xc = (ad.read_h5ad(p).X.toarray() for p in (a, b, c))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    before = a.read_bytes()
    again = run_cli("data", "simulate", a, *args, "--seed", "9")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert a.read_bytes() == before
    check = run_cli("data", "check", a, "--batch-col", "gem_group")
    assert check.returncode == 0 and "counts" in check.stdout and "no problems found" in check.stdout


@pytest.fixture
def kang():
    """The Kang file, else its small subset in tests/data (overrides conftest's full-file-only fixture)."""
    from conftest import KANG, real_data

    return real_data(KANG)


def test_preprocess_cli_on_real_counts(kang, tmp_path):
    out = tmp_path / "kang_pre.h5ad"
    result = run_cli("data", "preprocess", kang, out, "--pert-col", "stim", "--control", "CTRL",
                     "--context-col", "seurat_annotations", "--allow-missing-controls", "--n-top-genes", "500")
    assert result.returncode == 0, result.stderr
    pre = ad.read_h5ad(out)
    assert pre.n_vars == 500 and "counts" in pre.layers
    raw = ad.read_h5ad(kang)
    totals = raw.X.sum(axis=1).A1  # library size over all genes, before the HVG subset
    expected = pre.layers["counts"].toarray() / totals[:, None] * 1e4
    np.testing.assert_allclose(np.expm1(pre.X.toarray()), expected, rtol=1e-4, atol=1e-4)
    assert np.array_equal(pre.layers["counts"].toarray(), raw[:, pre.var_names].X.toarray())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kang_pre.h5ad"]  # no temp file left
    refused = run_cli("data", "preprocess", kang, kang, "--pert-col", "stim", "--control", "CTRL",
                      "--context-col", "seurat_annotations", "--allow-missing-controls")
    assert refused.returncode == 2 and "inputs are never modified" in refused.stderr


def test_tables_keep_names_and_numbers_whole_at_80_columns(monkeypatch):
    """A log or a narrow terminal is 80 columns: the 2026 score table once showed every DE metric as
    'de_wilcox…'. Metric names and numbers stay whole; a table too wide wraps text after its first column."""
    import pandas as pd
    from rich.console import Console

    from vcell.cli import common
    from vcell.eval.vcc2026.metrics import SCORED

    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "console", narrow)
    scores = pd.DataFrame({"metric": SCORED, "value": -0.4238711, "baseline": 0.7777777, "replicate": -0.4335123, "score": 0.07885})
    narrow.print(common.table(scores))
    text = narrow.export_text()
    assert all(m in text for m in SCORED) and text.count("-0.4239") == len(SCORED) and "…" not in text and "replicate" in text
    names = pd.DataFrame({"name": ["replogle2022_k562_essential_raw"], "citation": ["Replogle et al. 2022, a long citation"],
                          "kind": ["CRISPRi"], "checksum": ["unknown"], "cached": ["no"]})
    narrow.print(common.table(names))
    assert "replogle2022_k562_essential_raw" in narrow.export_text()
    # a split's table: a numeric column's header ("controls") is not cut to fit the text columns; they wrap
    split = pd.DataFrame({"context": ["pp_noext.all"], "controls": [2386], "train (perts/cells)": ["12 / 8015"],
                          "val (perts/cells)": ["5 / 4224"], "test (perts/cells)": ["8 / 6104"]})
    narrow.print(common.table(split))
    text = narrow.export_text()
    assert "…" not in text and "controls" in text and "8 / 6104" in text and "(perts/cells)" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_ctrl_c_while_the_command_line_loads_prints_no_traceback():
    """The installed `vcell` script imports the command line (about 0.2 s): a Ctrl-C then printed a
    30-line KeyboardInterrupt traceback (`python -m vcell` did not); now it ends quietly."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = Path(sys.executable).parent / "vcell"
    if not script.is_file():
        pytest.skip(f"no installed vcell script beside {sys.executable}")
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc to see when the command line starts loading")

    def loading_the_command_line(pid: int) -> bool:
        # numpy's extension is mapped once run() imports the command line (`import vcell` alone does not
        # import numpy): a Ctrl-C in the interpreter's own start-up, earlier, prints Python's traceback
        # in any program, and a loaded machine can stretch that start-up past a fixed delay
        try:
            return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return True  # already ended

    for delay in (0.0, 0.05, 0.1, 0.15):
        proc = subprocess.Popen([str(script), "eval", "score", "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 30
        while not loading_the_command_line(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert "Traceback" not in err and proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err[-2000:])


@pytest.mark.parametrize(("env", "label"), [
    ({}, None),
    ({"RANK": "1"}, None),  # a scheduler's variable for a command that is not distributed: its messages stay
    ({"SLURM_PROCID": "2"}, None),
    ({"WORLD_SIZE": "4", "RANK": "0"}, None),
    ({"WORLD_SIZE": "4", "RANK": "3"}, "rank 3"),  # torchrun
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}, "rank 1"),  # the processes Lightning starts
    ({"WORLD_SIZE": "8", "LOCAL_RANK": "0", "NODE_RANK": "1"}, "node 1, process 0"),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, "rank 2"),  # srun
    ({"WORLD_SIZE": "two", "RANK": "x"}, None),
])
def test_which_process_of_a_distributed_run_this_is(monkeypatch, env, label):
    from vcell.cli.common import secondary_rank

    for key in ("WORLD_SIZE", "SLURM_NTASKS", "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert secondary_rank() == label



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an address-space limit (RLIMIT_AS) as ulimit -v sets it")
def test_out_of_memory_is_one_line_and_leaves_nothing(tmp_path):
    """A command that runs out of memory under ``ulimit -v`` (a cluster job's limit): one ``error:``
    line saying so and what to do, exit 1 (the machine's fault, not the input's), no file left."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    out = tmp_path / "big.h5ad"
    proc = subprocess.run([sys.executable, "-m", "vcell", "data", "simulate", str(out), "--n-genes", "20000",
                           "--cells-per-perturbation", "500"], capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                               "MALLOC_ARENA_MAX": "2"})  # no thread per core to start inside the limit
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: out of memory (") and "ulimit -v" in lines[0]
    assert list(tmp_path.iterdir()) == []
