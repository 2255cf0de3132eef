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
