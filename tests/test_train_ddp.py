"""Distributed ST training: 2 CPU processes (DDP, gloo) match 1 process on the same global batch."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pytest
import scanpy as sc
from safetensors.torch import load_file

from vcell.data.dataset import load_dataset
from vcell.data.simulate import simulate_perturbseq
from vcell.data.spec import DataSpec
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.train.batches import EpochBatches, rank_share
from vcell.train.options import check_run_options
from vcell.train.st import CellSetDataModule, train_st

from conftest import run_cli

# dropout 0: every rank draws its own dropout masks, so with dropout the runs differ by design
TINY = {"width": 32, "n_layers": 2, "n_heads": 2, "encoder_layers": 2, "dropout": 0.0}
# 17 training sets (the last batch of each epoch holds 1 set), 17 validation sets
OPTS = ["--val-context", "ctx_B", "--set-size", "16", "--batch-size", "6", "--lr", "1e-3", "--accelerator", "cpu",
        "--checkpoint-every", "2", "--seed", "3"]
TOL = 1e-5  # fp32 reduction order: gloo sums two half-batch gradients, one process one full batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small log1p dataset on disk and a tiny ST config file."""
    tmp = tmp_path_factory.mktemp("ddp")
    adata = simulate_perturbseq(n_genes=60, n_contexts=2, n_perturbations=6, n_combinations=0,
                                cells_per_perturbation=40, n_controls=80, seed=0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = adata.X.astype(np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    adata.write_h5ad(tmp / "tiny.h5ad")
    (tmp / "tiny.json").write_text(json.dumps(TINY))
    return tmp / "tiny.h5ad", tmp / "tiny.json"


def _val_losses(run: Path) -> list[float]:
    rows = [r for f in sorted((run / "logs").rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    return [float(r["val_loss"]) for r in rows if r.get("val_loss")]


def test_rank_shares_split_each_global_batch():
    """Ranks take disjoint contiguous blocks of each global batch; a short last batch is padded to an
    equal count, its copies weighing 0 and its sets W/N, so the ranks' weighted sums average to its mean."""
    for world in (1, 2, 4):
        single = list(EpochBatches(19, 8))
        per_rank = [list(EpochBatches(19, 8, rank=r, world_size=world)) for r in range(world)]
        for b, batch in enumerate(single[:2]):  # full batches: the ranks' blocks concatenate to the batch
            assert sum((shares[b] for shares in per_rank), []) == batch
            assert all(len(shares[b]) == 8 // world for shares in per_rank)
        last = [shares[2] for shares in per_rank]  # [16, 17, 18]
        assert len({len(share) for share in last}) == 1
        if world == 1:
            assert last == [[16, 17, 18]]
            continue
        pairs = [pair for share in last for pair in share]
        weights = {i: sum(w for j, w in pairs if j == i) for i in (16, 17, 18)}
        assert {j for j, _ in pairs} == {16, 17, 18} and all(w == pytest.approx(world / 3) for w in weights.values())
        assert sum(w == 0 for _, w in pairs) == len(pairs) - 3  # the padded copies
    assert list(EpochBatches(18, 8, skip=1, rank=1, world_size=2)) == [[12, 13, 14, 15], [17]]
    # shares carry the epoch they were cut from, or none (the dataset then reads the plan it holds)
    assert [s.epoch for s in EpochBatches(18, 8)] == [None] * 3
    assert [s.epoch for s in EpochBatches(18, 8, position=lambda: (4, 1))] == [4, 4]
    assert rank_share([5], 1, 2) == [(5, 0.0)] and rank_share([4, 5], 1, 2) == [5]


def test_data_module_gives_each_process_its_share(tiny):
    """Under a 2-process trainer the loaders of rank 0 yield half of each global batch and half of the val sets."""
    data = load_dataset(tiny[0], DataSpec(pert_col="target_gene", control="non-targeting", context_col="cell_type"))
    split = apply_split(data.index, holdout_config(data.index, [], val_contexts=["ctx_B"]))
    dm = CellSetDataModule(data, split, batch_size=8, set_size=16, seed=3)
    dm.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    assert (dm.trainer.global_rank, dm.trainer.world_size) == (0, 2)
    assert list(dm.train_dataloader().batch_sampler) == [[0, 1, 2, 3], [8, 9, 10, 11], [(16, 2.0)]]
    assert [b["basal"].shape[0] for b in dm.val_dataloader()] == [4, 4, 1]  # sets 0, 2, ..., 16 of 17
    dm.batch_size = 5
    with pytest.raises(VcellError, match="batch size 5 is not divisible by the 2 processes"):
        dm.train_dataloader()


@pytest.mark.slow
def test_two_processes_match_one_process(tiny, tmp_path):
    """`vcell train st --devices 2` on CPU (gloo), stopped at step 4 and resumed to 8, ends with the weights of
    one process trained 8 steps on the same global batch of 6 sets, within TOL (measured: ~7e-8). Each epoch's
    last batch (5 of the 17 sets) splits 3 + 2 plus a padded copy, which weighs 0 (it counted as a set: 1.5e-3)."""
    data_path, config = tiny
    ddp = tmp_path / "ddp"
    common = ["train", "st", "--data", data_path, "--config", config, *OPTS, "--devices", "2", "--out", ddp]
    first = run_cli(*common, "--max-steps", "4", timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((ddp / "last" / "config.json").read_text())["step"] == 4
    assert first.stdout.count("checkpoint:") == 1  # rank 1 ran the same command and stayed quiet
    assert "trained ST to step 4 in 2 processes in " in first.stdout, first.stdout[-500:]
    resumed = run_cli(*common, "--max-steps", "8", "--resume", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    data = load_dataset(data_path, DataSpec(pert_col="target_gene", control="non-targeting", context_col="cell_type"))
    split = apply_split(data.index, holdout_config(data.index, [], val_contexts=["ctx_B"]))
    single = train_st(data, split, tmp_path / "single", TINY, max_steps=8, batch_size=6, set_size=16, seed=3, lr=1e-3,
                      checkpoint_every=2, accelerator="cpu")

    meta = json.loads((ddp / "last" / "config.json").read_text())
    assert meta["step"] == 8 and meta["devices"] == 2 and meta["precision"] == "32"
    w_ddp, w_one = load_file(str(ddp / "last" / "weights.safetensors")), load_file(str(single / "last" / "weights.safetensors"))
    diff = max((w_ddp[k] - w_one[k]).abs().max().item() for k in w_one)
    assert diff <= TOL, f"max abs weight difference {diff:.3g} > {TOL}"
    # validation: each rank scores half of the 17 sets; the synced loss is the mean over all of them
    v_ddp, v_one = _val_losses(ddp), _val_losses(single)
    assert len(v_ddp) == len(v_one) == 2 and v_one[1] < v_one[0]
    np.testing.assert_allclose(v_ddp, v_one, rtol=1e-5)
    assert not [p for p in ddp.rglob("*") if p.suffix in {".ckpt", ".pt", ".pth", ".pkl", ".pickle"}]


@pytest.mark.slow
def test_se_two_processes_match_one_process(tiny, tmp_path):
    """`vcell train se --devices 2`: each process takes half of every global batch of cells, each cell's
    padding and masking drawn by its place in the epoch, so the weights match one process's (they
    differed by 0.02 after 12 steps: the draws followed each process's batch number, and an epoch
    dropped other cells). A file smaller than one global batch is one error line, not a traceback
    from each process."""
    data_path, _ = tiny
    cfg = tmp_path / "se.json"
    cfg.write_text(json.dumps({"d_model": 32, "n_layers": 1, "n_heads": 2, "sentence_len": 34, "n_mask": 16}))
    common = ["train", "se", "--preset", "tiny", "--config", cfg, "--gene-dim", "8", "--batch-size", "32",
              "--accelerator", "cpu", "--seed", "3"]
    n_cells = ad.read_h5ad(data_path, backed="r").n_obs
    steps = n_cells // 32 + 3  # into the second epoch
    weights = {}
    for devices in (1, 2):
        out = tmp_path / f"se{devices}"
        proc = run_cli(*common, "--data", data_path, "--max-steps", str(steps), "--devices", str(devices), "--out", out, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[devices] = load_file(str(out / "last" / "weights.safetensors"))
    diff = max((weights[1][k] - weights[2][k]).abs().max().item() for k in weights[1])
    assert diff <= TOL, f"max abs weight difference {diff:.3g} > {TOL}"
    small = tmp_path / "small.h5ad"
    ad.read_h5ad(data_path)[:10].copy().write_h5ad(small)
    proc = run_cli(*common, "--data", small, "--max-steps", "2", "--devices", "2", "--out", tmp_path / "small_run", timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == ["error: 10 cells are fewer than one global batch (--batch-size 32) over 2 processes: lower --batch-size, "
                      "or train in one process"], proc.stderr[-3000:]
    # the other process's own line is labelled (an error only it meets, a file its node lacks, is said there)
    assert "[rank 1] error: 10 cells are fewer" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_process_that_dies_ends_the_run_with_one_line(tiny, tmp_path):
    """SIGKILL of rank 1 (the kernel's out-of-memory killer, a failed node): rank 0 ended with a
    100-line gloo traceback; now one line naming the latest checkpoint, exit 1."""
    import signal
    import subprocess
    import sys
    import time

    data_path, config = tiny
    out = tmp_path / "run"
    args = ["train", "st", "--data", data_path, "--config", config, *OPTS, "--devices", "2", "--max-steps", "100000", "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "vcell", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "last").is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.pid]
        assert children, "rank 1 not found"
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "another process of this distributed run ended" in errors[0], err[-3000:]
    assert f"the latest checkpoint is {out / 'last'} (step" in errors[0]


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_bad_distributed_options_are_one_line_errors(tiny, tmp_path, monkeypatch):
    """fp16 on CPU and a global batch that does not split over the processes fail before training;
    several nodes without a launcher too (they waited for the other nodes without end, deaf to Ctrl-C)."""
    data_path, config = tiny
    proc = run_cli("train", "st", "--data", data_path, "--config", config, "--accelerator", "cpu",
                   "--precision", "16-mixed", "--out", tmp_path / "run")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--precision 16-mixed needs a GPU" in errors[0]
    assert not (tmp_path / "run").exists()
    from vcell.train.options import _LAUNCHED

    for key in _LAUNCHED:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(VcellError, match="--num-nodes 2: start this command on every node with a launcher"):
        check_run_options("cpu", devices=2, num_nodes=2, batch_size=8)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # under srun
    check_run_options("cpu", devices=2, num_nodes=2, batch_size=8)
    with pytest.raises(VcellError, match="--batch-size 6 .* devices x nodes = 4"):
        check_run_options("cpu", devices=2, num_nodes=2, batch_size=6)
    with pytest.raises(VcellError, match="--accelerator 'tpu': use one of auto, cpu, gpu"):  # Lightning's traceback, after the data
        check_run_options("tpu")
    with pytest.raises(VcellError, match="--strategy 'fsdp'"):
        check_run_options("cpu", strategy="fsdp")
    with pytest.raises(VcellError, match="--precision '64'"):
        check_run_options("cpu", precision="64")
