"""benchmarks/gpu_check.py: its CPU fallback runs every step end to end; a failed step is named and fails the run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
VCELL_STEPS = ("train-memory", "train-stream", "predict", "ddp")


@pytest.mark.slow
def test_cpu_fallback_runs_every_step(tmp_path):
    """At a tiny size: data, training in memory and streamed, predict and DDP all give figures; arc-state
    (not importable in this python) is skipped with the reason; the table names every step."""
    (tmp_path / "tiny.yaml").write_text("width: 16\nn_layers: 1\nn_heads: 2\nencoder_layers: 1\n")
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--workdir", str(tmp_path / "work"), "--json", str(out),
           "--model-config", str(tmp_path / "tiny.yaml"), "--arc-python", sys.executable, "--n-genes", "32",
           "--n-perts", "3", "--cells-per-pert", "8", "--n-contexts", "2", "--n-controls", "16", "--batch-size", "2",
           "--set-size", "8", "--steps", "5", "--warmup", "1", "--ddp-devices", "1", "--ddp-steps", "4", "--budget-s", "240"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert list(steps) == ["data", "train-memory", "train-stream", "train-arc", "predict", "ddp"]
    assert result["gpu"] is False and result["failed"] == []
    assert steps["data"]["status"] == "ok" and steps["data"]["cells"] >= 2 * (3 * 8 + 16) and steps["data"]["genes"] == 32
    for name in VCELL_STEPS:
        step = steps[name]
        assert step["status"] == "ok", step
        assert step["cells_per_s"] > 0 and step["peak_rss_mib"] > 100 and step["peak_gpu_mib"] is None
    for name in ("train-memory", "train-stream", "ddp"):
        assert 0 <= steps[name]["data_pct"] < 100 and steps[name]["steps_timed"] >= 2
    assert "in memory" in steps["train-memory"]["what"] and "streamed" in steps["train-stream"]["what"]
    assert steps["ddp"]["backend"] == "gloo" and steps["ddp"]["world_size"] == 1
    assert steps["predict"]["cells"] > 0
    assert steps["train-arc"]["status"] == "skipped" and "not importable" in steps["train-arc"]["reason"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in table[1:]] == list(steps)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failed_step_is_named(tmp_path, capsys, monkeypatch):
    """A step that fails is reported by name with its reason; when the data step fails, every later step fails
    as needing it, and the JSON lists them."""
    gc = _module()
    opts = type("Opts", (), {"workdir": tmp_path, "cpu": True, "budget_s": 60, "site": [], "json": tmp_path / "r.json",
                             "skip_set": set(), "arc_python": sys.executable})()
    chk = gc.Check(opts, {"cuda": False})

    def broken(cap):
        raise gc.StepFailed("exit 2; data.log: error: disk full")

    monkeypatch.setattr(chk, "step_data", broken)
    chk.run({"error": "no module named state"}, set())
    failed = gc.report(chk, {"modules": {}, "device": {}}, {"error": "x"})
    assert failed == ["data", "train-memory", "train-stream", "predict", "ddp"]
    printed = capsys.readouterr().out
    assert "FAILED data: exit 2; data.log: error: disk full" in printed
    assert "FAILED predict: needs the data step" in printed
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["failed"] == failed and saved["steps"]["train-arc"]["status"] == "skipped"


def _opts(tmp_path, cpu: bool):
    return type("Opts", (), {"workdir": tmp_path, "cpu": cpu, "budget_s": 60, "site": [], "json": tmp_path / "r.json",
                             "skip_set": {"train-arc"}, "arc_python": sys.executable})()


@pytest.mark.parametrize("cpu", [False, True])
def test_the_import_check_sees_the_gpu_unless_cpu(tmp_path, monkeypatch, cpu):
    """The import check's child finds the device the run then uses: it ran with CUDA hidden, so on a GPU machine
    --require-gpu failed and a plain run fell back to the CPU."""
    gc = _module()
    seen = {}

    def fake_run(cmd, log_path, cap, env, cwd):
        seen["env"] = env
        Path(cmd[-1]).write_text(json.dumps({"modules": {}, "device": {"cuda": True}}))
        return {"code": 0}

    monkeypatch.setattr(gc, "run_proc", fake_run)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found, _ = gc.check_imports(_opts(tmp_path, cpu))
    assert found["device"] == {"cuda": True}
    assert seen["env"].get("CUDA_VISIBLE_DEVICES") == ("" if cpu else None)


def test_smoke_names_what_imports_cannot_show(tmp_path):
    """A vcell command's options need pydantic (typer builds them with it), which `import vcell.cli` does not
    import: the import check parses one command and round-trips an AnnData, and names what failed."""
    code = ("import sys, importlib.util, json\nsys.modules['pydantic'] = None\n"
            f"spec = importlib.util.spec_from_file_location('gc', {str(SCRIPT)!r})\n"
            "gc = importlib.util.module_from_spec(spec); spec.loader.exec_module(gc)\n"
            "print(json.dumps(gc._smoke({'vcell': {'ok': True}, 'anndata': {'ok': True}})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["vcell-command"]["ok"] is False and "pydantic" in found["vcell-command"]["error"]
    assert found["anndata-roundtrip"]["ok"] is True
    gc = _module()
    assert gc.missing_imports({"modules": found}, None)[0].startswith("missing: vcell-command (")


def test_json_holds_each_step_as_it_ends(tmp_path, monkeypatch):
    """A run killed from outside (the device's time limit) still leaves the steps it finished in --json."""
    gc = _module()
    chk = gc.Check(_opts(tmp_path, True), {"cuda": False})
    chk.found = {"modules": {}, "device": {}}
    during = {}

    def data(cap):
        return {"cells": 10, "genes": 4, "peak_rss_mib": 1.0, "wall_s": 0.1, "what": "tiny"}

    def train(step, cap):
        during[step] = json.loads((tmp_path / "r.json").read_text())
        raise gc.StepFailed("stop")

    monkeypatch.setattr(chk, "step_data", data)
    monkeypatch.setattr(chk, "step_train", train)
    monkeypatch.setattr(chk, "step_predict", lambda cap: train("predict", cap))
    monkeypatch.setattr(chk, "step_ddp", lambda cap: train("ddp", cap))
    chk.run({"error": "--skip"}, {"train-arc"})
    first = during["train-memory"]
    assert first["finished"] is False and first["steps"]["data"]["status"] == "ok" and "train-memory" not in first["steps"]
    assert during["ddp"]["steps"]["predict"]["status"] == "failed"
