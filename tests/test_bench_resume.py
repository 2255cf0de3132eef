"""`vcell bench --resume`: a benchmark that stopped keeps the runs it finished (a model on a fold)
and continues from them to the results of an uninterrupted benchmark."""

from __future__ import annotations

import filecmp
import json
import logging
import signal
from pathlib import Path

import pytest
from test_progress import _interrupt

from conftest import error_line, run_cli

KEPT = ("timings", "out", "resumed_runs")  # what may differ between a resumed and an uninterrupted benchmark


def _same_results(a: Path, b: Path) -> None:
    """Two bench folders hold the same files with the same bytes, bench.json aside from ``KEPT``."""
    differ = []

    def walk(cmp: filecmp.dircmp) -> None:
        differ.extend(f"{cmp.left}/{f}" for f in cmp.left_only + cmp.right_only + cmp.funny_files)
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        differ.extend(f"{cmp.left}/{f}" for f in mismatch + errors if f != "bench.json")
        for sub in cmp.subdirs.values():
            walk(sub)

    walk(filecmp.dircmp(a, b, ignore=["report.html"]))
    assert not differ, differ
    ja, jb = (json.loads((d / "bench.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ja.items() if k not in KEPT} == {k: v for k, v in jb.items() if k not in KEPT}


def test_a_failed_benchmark_resumes_from_its_finished_runs_to_the_uninterrupted_results(tmp_path, caplog):
    """A model failing on the second of three folds (vcc2026: each fold's scale, runs beyond the
    replicate): the first fold's runs and the second's finished ones are kept, a new benchmark over
    them is refused, so is a resume with another seed or other model options; the resume ends with
    the files of an uninterrupted benchmark, reads the first fold back without computing it again,
    and leaves no partial folder."""
    import vcell
    from vcell.errors import VcellError
    from vcell.leaderboard import PARTIAL

    a = vcell.simulate_perturbseq(seed=0, n_genes=60, n_perturbations=6, n_combinations=0, n_contexts=3,
                                  cells_per_perturbation=30, n_controls=60)
    data = tmp_path / "sim.h5ad"
    a.write_h5ad(data)
    models = ["control_mean", "pert_mean", "linear"]
    kw = dict(holdout=["all"], profile="vcc2026", report=False, seed=0, model_options={"linear": {"alpha": 1.0}})
    build = lambda name: vcell.make_model(name, seed=0, **({"alpha": 1.0} if name == "linear" else {}))  # noqa: E731
    vcell.run_bench(data, tmp_path / "whole", models, build, **kw)

    fits = []

    def failing(name):  # linear fails on its second fold
        model = build(name)
        if name == "linear":
            fit = model.fit

            def fit_or_fail(d, split):
                fits.append(name)
                if len(fits) == 2:
                    raise VcellError("planted failure")
                return fit(d, split)
            model.fit = fit_or_fail
        return model

    out = tmp_path / "bench"
    with caplog.at_level(logging.WARNING), pytest.raises(VcellError, match="linear on fold ctx_B: planted failure"):
        vcell.run_bench(data, out, models, failing, **kw)
    assert "kept 6 finished run(s) (a model on a fold) in" in caplog.text and "--resume" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL]  # nothing under the results' names

    with pytest.raises(VcellError, match="keeps 6 finished run.*--resume continues it, --overwrite discards them"):
        vcell.run_bench(data, out, models, build, **kw)
    with pytest.raises(VcellError, match="cannot resume .*it was run with --seed 0, not 1"):
        vcell.run_bench(data, out, models, build, **{**kw, "seed": 1}, resume=True)
    with pytest.raises(VcellError, match=r"cannot resume .*its linear was run with options \{'alpha': 1.0\}, not \{'alpha': 2.0\}"):
        vcell.run_bench(data, out, models, build, **{**kw, "model_options": {"linear": {"alpha": 2.0}}}, resume=True)
    other = a.copy()
    other.X = other.X * 2
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(VcellError, match="cannot resume .*the raw counts of .*other.h5ad are not those it was run on"):
        vcell.run_bench(tmp_path / "other.h5ad", out, models, build, **kw, resume=True)  # their log1p is the same
    a[:-1].write_h5ad(data)  # the same file, a cell fewer
    with pytest.raises(VcellError, match=r"cannot resume .*sim.h5ad changed since it was run on it \(681 cells"):
        vcell.run_bench(data, out, models, build, **kw, resume=True)
    a.write_h5ad(data)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = vcell.run_bench(data, out, models, build, **kw, resume=True)
    assert "fold ctx_A, ctx_A: the vcc2026 scale" not in caplog.text  # the first fold was read back, not computed
    assert "fold ctx_B, ctx_B: the vcc2026 scale" in caplog.text
    assert not (out / PARTIAL).exists()
    _same_results(tmp_path / "whole", out)
    assert result.leaderboard.equals(vcell.run_bench(data, tmp_path / "again", models, build, **kw).leaderboard)
    assert json.loads((out / "bench.json").read_text())["resumed_runs"] == [
        "control_mean on fold ctx_A", "pert_mean on fold ctx_A", "linear on fold ctx_A", "cell_mean on fold ctx_A",
        "control_mean on fold ctx_B", "pert_mean on fold ctx_B"]
    with pytest.raises(VcellError, match="nothing to resume"):
        vcell.run_bench(data, out, models, build, **kw, overwrite=True, resume=True)

    fits.clear()  # a resume without a model: its kept runs' files are not among the results, nor said kept
    with pytest.raises(VcellError, match="planted failure"):
        vcell.run_bench(data, tmp_path / "fewer", models, failing, **kw)
    vcell.run_bench(data, tmp_path / "fewer", ["control_mean", "linear"], build, **kw, resume=True)
    files = {p.name for p in (tmp_path / "fewer").glob("*/*")}
    assert not any(name.startswith("pert_mean") for name in files) and "linear_ctx_B.h5ad" in files, files
    assert not any(r.startswith("pert_mean") for r in json.loads((tmp_path / "fewer" / "bench.json").read_text())["resumed_runs"])

    fits.clear()  # a kept run whose files went (a fold's real cells too) is computed again, and said so
    gone = tmp_path / "gone"
    with pytest.raises(VcellError, match="planted failure"):
        vcell.run_bench(data, gone, models, failing, **kw)
    (gone / PARTIAL / "predictions" / "pert_mean_ctx_A.h5ad").unlink()
    (gone / PARTIAL / "predictions" / "real_ctx_A.h5ad").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        vcell.run_bench(data, gone, models, build, **kw, resume=True)
    assert "pert_mean on fold ctx_A: predictions/pert_mean_ctx_A.h5ad is gone from" in caplog.text
    _same_results(tmp_path / "whole", gone)
    assert "pert_mean on fold ctx_A" not in json.loads((gone / "bench.json").read_text())["resumed_runs"]

    fits.clear()  # a record that cannot be read is refused, not taken for nothing, and --overwrite discards it
    bad = tmp_path / "bad"
    with pytest.raises(VcellError, match="planted failure"):
        vcell.run_bench(data, bad, models, failing, **kw)
    for text in ("{not json", '{"runs": {"k": {}}}'):  # not JSON; JSON of another shape
        (bad / PARTIAL / "resume.json").write_text(text)
        with pytest.raises(VcellError, match="resume.json: cannot be read .*--overwrite without --resume discards"):
            vcell.run_bench(data, bad, models, build, **kw, resume=True)
    vcell.run_bench(data, bad, models, build, **kw, overwrite=True)
    _same_results(tmp_path / "whole", bad)


def test_run_bench_in_another_thread_is_refused_while_one_writes_into_its_folder(tmp_path):
    """The lock the command line and the API it calls share is the holding thread's to take again,
    no other thread's: a second benchmark from another thread removed a running one's folder."""
    import threading

    import vcell
    from vcell.data.staging import sole_writer
    from vcell.errors import VcellError

    out = tmp_path / "bench"
    caught = []

    def second():
        try:
            vcell.run_bench(tmp_path / "none.h5ad", out, ["control_mean"], lambda name: vcell.make_model(name, seed=0),
                            holdout=["ctx_B"], report=False)
        except VcellError as exc:
            caught.append(str(exc))

    with sole_writer(out):
        (out / "bench.partial").mkdir()  # the running benchmark's folder, before its first finished run
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert (out / "bench.partial").is_dir()
    assert caught and "another vcell command is writing into this folder now" in caught[0]


def test_run_bench_in_python_is_refused_while_another_process_writes_into_its_folder(tmp_path):
    """The command line locked OUT, the Python API did not: a second benchmark from Python took a
    running one's bench.partial for a killed run's and removed it."""
    import subprocess
    import sys

    import vcell
    from vcell.errors import VcellError

    out = tmp_path / "bench"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "bench.partial").mkdir()  # the running benchmark's folder, before its first finished run
        with pytest.raises(VcellError, match="another vcell command is writing into this folder now"):
            vcell.run_bench(tmp_path / "none.h5ad", out, ["control_mean"], lambda name: vcell.make_model(name, seed=0),
                            holdout=["ctx_B"], report=False)
        assert (out / "bench.partial").is_dir()
    finally:
        holder.kill()
        holder.wait()


class _FinishedRun:
    """A marker for :func:`_interrupt`: the partial folder records a finished run."""

    def __init__(self, out: Path):
        self.path = out / "bench.partial" / "resume.json"

    def exists(self) -> bool:
        try:
            return bool(json.loads(self.path.read_text())["runs"])
        except (OSError, ValueError, KeyError):
            return False

    def __str__(self) -> str:
        return f"a finished run in {self.path}"


def test_ctrl_c_in_bench_keeps_the_finished_runs_and_resume_ends_as_an_uninterrupted_run(tmp_path):
    """Ctrl-C while ST trains in a real `vcell bench` (exit 130, one line saying what was kept);
    `--resume` trains what was left and writes an uninterrupted benchmark's files, ST's included."""
    from conftest import MCFALINE, real_data

    config = tmp_path / "st.yaml"
    config.write_text("st:\n  max_steps: 30\n  set_size: 8\n  batch_size: 2\n  config: {width: 16, n_layers: 1, n_heads: 2, encoder_layers: 1}\n")
    args = ["bench", "--data", real_data(MCFALINE), "--pert-col", "perturbation", "--control", "control", "--dataset", "mcfaline23",
            "--holdout-context", "A172", "--holdout-context", "T98G", "--models", "control_mean,st", "--model-config", config,
            "--profile", "vcc", "--no-report", "--seed", "2"]
    whole = run_cli(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "bench"
    stopped = _interrupt([*args, "--out", out], _FinishedRun(out))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert f"interrupted; the finished runs are kept in {out / 'bench.partial'}: run the same command with --resume" in stopped.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bench.partial"]

    assert stopped.stderr.count("kept in") == 1  # said once
    long = tmp_path / "long.yaml"  # SIGTERM while ST trains (a Slurm time limit): training's own stop, said as the signal
    long.write_text(config.read_text().replace("max_steps: 30", "max_steps: 100000"))
    term_args = [a if a != config else long for a in args]
    term = _interrupt([*term_args, "--out", tmp_path / "term"], _FinishedRun(tmp_path / "term"), settle=4, signum=signal.SIGTERM)
    assert term.returncode == 143 and "SIGTERM: interrupted; the finished runs are kept in" in term.stderr, term.stderr[-2000:]

    refused = run_cli(*args, "--out", out)
    assert "--resume continues it" in error_line(refused)
    resumed = run_cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_results(tmp_path / "whole", out)
    assert json.loads((out / "bench.json").read_text())["resumed_runs"][0] == "control_mean on fold A172"
    from vcell.report import build_report

    build_report(out)  # the report says which runs were kept, and that their timings are the interrupted run's
    assert "kept from an interrupted benchmark" in (out / "report.html").read_text()
    assert "kept from an interrupted" not in build_report(tmp_path / "whole").read_text()
