"""``vcell eval compile``: after it, a first evaluation compiles nothing.

Real subprocesses with their own empty numba cache (``NUMBA_CACHE_DIR``); numba's compile events
are counted in the evaluating process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import error_line, run_cli

#: Runs ``vcell`` command lines (argv[2]: JSON list of them) in one process and prints how many
#: functions numba compiled meanwhile and the exit code of each command line.
_COUNTING = """
import json, sys
from numba.core import event
compiled = []
class Listener(event.Listener):
    def on_start(self, e):
        compiled.append(str(e.data["dispatcher"]))
    def on_end(self, e):
        pass
event.register("numba:compile", Listener())
from vcell.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code or 0)
print(json.dumps({"compiled": compiled, "codes": codes}))
"""


def _pair(folder: Path, dtype) -> dict[str, Path]:
    """A pair other than the one the step compiles on (3 knockdowns x 30 cells, 40 controls, 200
    genes): raw counts, their log1p, and the prediction's log1p dense and without ties."""
    from vcell.eval.precompile import _tiny_pair

    return _tiny_pair(folder, np.dtype(dtype), perts=3, cells=30, controls=40, genes=200)


def _evaluate(files: dict[str, Path], out: Path, cache: Path, runs: tuple[str, ...]) -> dict:
    lines = {
        "run": ["eval", "run", "--profile", "vcc2026", "--pred", files["pred"], "--real", files["real"], "--out", out / "run"],
        "scale": ["eval", "baseline", "--profile", "vcc2026", "--real", files["real"], "--out", out / "scale"],
        "run25": ["eval", "run", "--pred", files["pred_log1p_dense"], "--real", files["real_log1p"], "--out", out / "run25"],
    }
    argv = [[str(a) for a in lines[r]] for r in runs]
    proc = subprocess.run([sys.executable, "-c", _COUNTING, json.dumps(argv)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(cache), "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * len(runs), proc.stderr[-3000:]
    return result


def test_after_compile_a_first_evaluation_compiles_nothing(tmp_path):
    cache = tmp_path / "numba_cache"
    proc = run_cli("eval", "compile", env={"NUMBA_CACHE_DIR": str(cache)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled the evaluator's kernels for float32" in proc.stdout and str(cache) in proc.stdout.replace("\n", "")
    files = _pair(tmp_path, np.float32)
    warm = _evaluate(files, tmp_path / "out", cache, ("run", "scale", "run25"))
    assert warm["compiled"] == []
    # the count sees compilation: integer counts were not compiled for (numba compiles per dtype)
    (tmp_path / "int64").mkdir()
    cold = _evaluate(_pair(tmp_path / "int64", np.int64), tmp_path / "out_int64", cache, ("run",))
    assert len(cold["compiled"]) > 0


def test_compile_refuses_an_unknown_dtype(tmp_path):
    proc = run_cli("eval", "compile", "--dtypes", "float16", env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert "float16" in error_line(proc)
    assert not (tmp_path / "cache").exists()


def test_compile_says_when_the_cache_is_not_where_later_runs_look(tmp_path, monkeypatch, caplog):
    """numba falls back to another cache folder when NUMBA_CACHE_DIR is unusable, or to a per-user
    folder when the package is read-only: said, not silent."""
    import vcell.eval.precompile as pc

    monkeypatch.setattr(pc, "_paths_of_the_evaluator", lambda files, out, threads: [])
    monkeypatch.setattr(pc, "_tiny_pair", lambda folder, dtype: {})
    monkeypatch.setattr(pc, "cache_folder", lambda: tmp_path / "elsewhere")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "asked"))
    with caplog.at_level("WARNING", logger="vcell"):
        assert pc.precompile_evaluator()["cache"] == tmp_path / "elsewhere"
    assert "could not use NUMBA_CACHE_DIR" in caplog.text
    caplog.clear()
    monkeypatch.setattr(pc, "cache_folder", lambda: tmp_path / "asked")
    with caplog.at_level("WARNING", logger="vcell"):
        pc.precompile_evaluator()
    assert "could not use" not in caplog.text
    # no NUMBA_CACHE_DIR: a cache outside the package is numba's per-user folder, which others do not read
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    with caplog.at_level("WARNING", logger="vcell"):
        pc.precompile_evaluator()
    assert "per-user folder" in caplog.text
    caplog.clear()
    monkeypatch.setattr(pc, "cache_folder", lambda: Path(pc.__file__).resolve().parents[1] / "eval")
    with caplog.at_level("WARNING", logger="vcell"):
        pc.precompile_evaluator()
    assert caplog.text == ""
