"""A training run whose checkpoints will not fit on the disk is refused before it trains."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from test_st_cli import TINY, _tiny_adata

from vcell.data import io
from vcell.errors import VcellError
from vcell.train.checkpoint import check_checkpoint_space, checkpoint_bytes

from conftest import private_mounts


def _module() -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Linear(50, 10))
    m.register_buffer("table", torch.zeros(7, 3))
    m[1].bias.requires_grad_(False)
    return m


def test_checkpoint_bytes_are_weights_and_adams_moments():
    m = _module()
    weights = (100 * 50 + 50 + 50 * 10 + 10 + 21) * 4
    assert checkpoint_bytes(m, optimizer=False) == weights
    assert checkpoint_bytes(m, optimizer=True) == weights + 2 * 4 * (100 * 50 + 50 + 50 * 10)  # trained parameters only


@pytest.mark.parametrize("max_steps, every, validate, start, resumed, best_there, copies_last, copies_weights", [
    (200, 100, False, 0, False, False, 2, 0),  # last/ replaced once: old and new at once
    (100, 100, False, 0, False, False, 1, 0),  # written once
    (50, 100, False, 0, False, False, 1, 0),   # only at the end
    (200, 100, True, 0, False, False, 2, 1),   # and one best/ (written after last/, not with it)
    (300, 100, True, 100, True, True, 1, 0),   # resumed here: last/ and best/ on the disk, one more copy at a time
    (300, 100, True, 100, True, False, 1, 1),  # ... best/ not written yet
    (300, 100, False, 100, False, False, 2, 0),  # resumed from another folder: this disk holds none of it
])
def test_needs_what_the_run_will_hold_at_once(tmp_path, monkeypatch, max_steps, every, validate, start, resumed, best_there,
                                             copies_last, copies_weights):
    m = _module()
    if best_there:
        (tmp_path / "run" / "best").mkdir(parents=True)
    need = copies_last * checkpoint_bytes(m, True) + copies_weights * checkpoint_bytes(m, False)
    for free, fits in ((need, True), (need - 1, False)):
        monkeypatch.setattr(io, "free_space", lambda folder, free=free: free)
        if fits:
            check_checkpoint_space(m, tmp_path / "run", max_steps, every, True, validate, start, resumed)
        else:
            with pytest.raises(VcellError) as exc:
                check_checkpoint_space(m, tmp_path / "run", max_steps, every, True, validate, start, resumed)
            msg = str(exc.value)
            assert msg.startswith(f"{tmp_path / 'run'}: ") and "--no-save-optimizer" in msg
            assert ("kept twice" in msg) == (copies_last == 2)
    monkeypatch.setattr(io, "free_space", lambda folder: None)  # unknown, e.g. a FUSE mount without sizes
    check_checkpoint_space(m, tmp_path / "run", max_steps, every, True, validate, start, resumed)


@pytest.mark.skipif(not private_mounts(), reason="needs `unshare -m` and mount rights to give a run a small disk of its own")
def test_training_onto_a_small_disk_is_refused_before_it_trains(tmp_path):
    """A real `vcell train st` whose run folder is on a 64 KiB disk: one error line, nothing trained or left."""
    data = tmp_path / "tiny.h5ad"
    _tiny_adata().write_h5ad(data)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = [sys.executable, "-m", "vcell", "train", "st", "--data", str(data), "--holdout-context", "ctx_B", "--config",
            str(cfg), "--max-steps", "4", "--set-size", "16", "--batch-size", "4", "--accelerator", "cpu", "--out", str(disk / "run")]
    script = f"mount -t tmpfs -o size=64k tmpfs {disk} && exec {shlex.join(argv)}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "checkpoints need about" in lines[0] and "trained ST" not in proc.stdout + proc.stderr
