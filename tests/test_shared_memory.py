"""The data loader's batches in flight fit the machine's /dev/shm, or one error line says what to change."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys

import pytest
import torch
from test_st_cli import TINY, _tiny_adata

from vcell.data.dataset import from_anndata
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.train.shared_memory import HELD, PREFETCH, USABLE, batch_nbytes, shm_free, worker_prefetch
from vcell.train.st import CellSetDataModule

from conftest import private_mounts

MIB = 2**20


def test_batch_nbytes_counts_each_storage_once_in_whole_pages():
    block = torch.zeros(2, 4, 8, 100)  # 25,600 bytes: 7 pages
    batch = {"target": block[0], "basal": block[1], "mask": torch.ones(4, 8, dtype=torch.bool), "codes": [torch.zeros(3)]}
    assert batch_nbytes(batch) == (7 + 1 + 1) * 4096


def test_prefetch_is_torch_default_when_it_fits():
    assert worker_prefetch(10 * MIB, 4, free=(4 * PREFETCH + HELD) * 10 * MIB / USABLE + 1) == PREFETCH


def test_prefetch_drops_to_one_with_a_warning(caplog):
    free = (4 + HELD) * 10 * MIB / USABLE + 1
    with caplog.at_level(logging.WARNING, logger="vcell"):
        assert worker_prefetch(10 * MIB, 4, free=free) == 1
    assert "room for one batch" in caplog.text and "--num-workers 4" in caplog.text


def test_no_room_for_one_batch_per_worker_is_one_error_naming_what_fits():
    free = 64 * MIB  # Docker's default
    with pytest.raises(VcellError) as exc:
        worker_prefetch(10 * MIB, 8, free=free)
    msg = str(exc.value)
    most = int(USABLE * free / (10 * MIB)) - HELD
    assert "\n" not in msg and "--num-workers 8" in msg and f"--num-workers {most} or fewer" in msg and "67.1 MB free" in msg
    assert worker_prefetch(10 * MIB, most, free=free) == 1  # the advice works
    with pytest.raises(VcellError, match="--num-workers 0,"):
        worker_prefetch(40 * MIB, 1, free=free)


def test_processes_on_one_machine_share_it():
    free = 2 * (4 * PREFETCH + HELD) * 10 * MIB / USABLE + 1
    assert worker_prefetch(10 * MIB, 4, processes=1, free=free) == PREFETCH
    assert worker_prefetch(10 * MIB, 4, processes=2, free=free) == PREFETCH
    with pytest.raises(VcellError):
        worker_prefetch(10 * MIB, 4, processes=5, free=free)


def test_shm_free_of_a_missing_folder_is_unknown(tmp_path):
    assert shm_free(str(tmp_path / "none")) is None
    assert shm_free(str(tmp_path)) > 0
    if private_mounts():  # a tmpfs without a size limit reports no blocks: unknown (torch's default), not 0 B free
        probe = f"from vcell.train.shared_memory import shm_free; print(shm_free({str(tmp_path)!r}))"
        script = f"mount -t tmpfs -o size=0 tmpfs {shlex.quote(str(tmp_path))} && exec {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"
        out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-2000:]


@pytest.mark.parametrize("world", [1, 2])
def test_sample_batch_is_the_size_of_the_loaders_batches(world):
    data = from_anndata(_tiny_adata())
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    dm = CellSetDataModule(data, split, batch_size=4, set_size=16, seed=0)
    batch = next(iter(dm.train_dataloader()))
    full = batch_nbytes(batch) - 4096 * ("weight" in batch)
    share = batch_nbytes(dm.sample_batch(world))
    assert share == full if world == 1 else share < full



@pytest.mark.skipif(not private_mounts(), reason="needs `unshare -m` and mount rights to give a run a small /dev/shm of its own")
def test_training_in_a_small_dev_shm(tmp_path):
    """Real training runs in a private 256 KiB /dev/shm: a worker count that fits trains (one batch
    ahead, with a warning); one that does not is one error line, not a hang with a traceback per batch."""
    data = tmp_path / "tiny.h5ad"
    _tiny_adata().write_h5ad(data)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))

    def train(workers: int, out: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "vcell", "train", "st", "--data", str(data), "--holdout-context", "ctx_B", "--config",
                str(cfg), "--max-steps", "6", "--set-size", "16", "--batch-size", "4", "--accelerator", "cpu",
                "--num-workers", str(workers), "--out", str(tmp_path / out), "--seed", "0"]
        script = f"mount -t tmpfs -o size=256k tmpfs /dev/shm && exec {shlex.join(argv)}"
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)

    ok = train(2, "fits")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "room for one batch" in ok.stderr and "Traceback" not in ok.stderr
    assert (tmp_path / "fits" / "last").is_dir()

    refused = train(4, "refused")
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "--num-workers 4" in lines[0] and "/dev/shm" in lines[0]
    assert not (tmp_path / "refused" / "last").exists()
