"""Training the State Transition model: loss goes down, pickle-free checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vcell.errors import VcellError
from vcell.train.checkpoint import load_checkpoint, resolve_checkpoint_dir, save_checkpoint
from vcell.train.st import CellSetDataModule, build_module, train_st

TINY = {"width": 32, "n_layers": 2, "n_heads": 2, "encoder_layers": 2}
FAST = dict(batch_size=4, set_size=16, accelerator="cpu", log_every=1)

PREP = """
import numpy as np, scanpy as sc
from vcell.data.dataset import from_anndata
from vcell.data.simulate import simulate_perturbseq
from vcell.data.splits import apply_split, holdout_config

def tiny_adata(n_genes=60, n_perturbations=6, cells_per_perturbation=40, n_controls=80, seed=0):
    adata = simulate_perturbseq(n_genes=n_genes, n_contexts=2, n_perturbations=n_perturbations, n_combinations=0,
                                cells_per_perturbation=cells_per_perturbation, n_controls=n_controls, seed=seed)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = adata.X.astype(np.float32)
    adata.uns["vcell"] = {"expression": "log1p"}
    return adata

def tiny_data():
    data = from_anndata(tiny_adata())
    return data, apply_split(data.index, holdout_config(data.index, [], val_contexts=["ctx_B"]))
"""
exec(PREP)  # defines tiny_adata() and tiny_data() here and in the subprocess test


@pytest.fixture(scope="module")
def tiny():
    return tiny_data()  # noqa: F821


def _weights(out: Path) -> dict:
    return load_file(str(out / "last" / "weights.safetensors"))


def test_training_lowers_loss_and_writes_no_pickles(tiny, tmp_path):
    data, split = tiny
    # Without the residual: a residual model starts at the control cells, already near the
    # optimum on this tiny data, so 30 steps at lr 1e-4 show no clear trend there.
    config = {**TINY, "predict_residual": False}
    out = train_st(data, split, tmp_path / "run", config, max_steps=30, seed=0, checkpoint_every=10, **FAST)
    metrics = next((out / "logs").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    col = header.index("train_loss")
    losses = [float(r.split(",")[col]) for r in metrics[1:] if r.split(",")[col]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert any(r.split(",")[header.index("val_loss")] for r in metrics[1:])  # validation ran
    assert (out / "best" / "weights.safetensors").is_file()
    bad = [p for p in out.rglob("*") if p.suffix in {".ckpt", ".pt", ".pth", ".pkl", ".pickle"}]
    assert not bad
    cfg = json.loads((out / "last" / "config.json").read_text())
    assert cfg["genes"] == list(data.adata.var_names)
    assert cfg["pert_vocab"] == sorted(p for p in map(str, data.index.perts) if p != "non-targeting")
    assert cfg["columns"]["pert_col"] == "target_gene" and cfg["columns"]["control"] == "non-targeting"
    assert cfg["step"] == 30 and cfg["seed"] == 0 and cfg["model"]["width"] == 32 and "vcell_version" in cfg
    for f in out.rglob("*.safetensors"):  # safetensors files are plain: magic-free JSON header, no pickle opcodes
        assert not f.read_bytes().startswith(b"\x80")


def test_save_load_round_trip(tiny, tmp_path):
    data, split = tiny
    torch.manual_seed(0)
    module = build_module(data, TINY)
    opt = module.configure_optimizers()
    dm = CellSetDataModule(data, split, batch_size=4, set_size=16)
    batch = next(iter(dm._loader(dm.train_set, batch_size=4)))
    module.train()
    module._loss(batch).backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", module, opt, step=1, epoch=0, extra_meta={"note": "x"})
    model, config, meta, opt_state = load_checkpoint(tmp_path / "ck")
    assert config == module.config and meta["note"] == "x" and meta["step"] == 1
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    ref = opt.state_dict()
    assert opt_state["param_groups"] == ref["param_groups"]
    for pid, st in ref["state"].items():
        for name, t in st.items():
            assert torch.equal(t, opt_state["state"][pid][name])
    module.eval()
    with torch.no_grad():
        feats = module.pert_table[batch["pert"]]
        assert torch.equal(module.model(batch["basal"], feats, mask=batch["mask"]), model(batch["basal"], feats, mask=batch["mask"]))
    with pytest.raises(VcellError):
        load_checkpoint(tmp_path / "missing")


def _record(run: Path) -> pd.DataFrame:
    """Every row the run's logs/version_N/metrics.csv hold, in order (a resumed run adds a version)."""
    parts = sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)[["epoch", "step", "train_loss", "val_loss"]]


@pytest.mark.parametrize("how", ["max_steps", "ctrl_c"])
@pytest.mark.parametrize("stop", [10, 12])  # 5 steps per epoch: stop at an epoch's end, and mid-epoch
def test_resume_equals_uninterrupted_run(tiny, tmp_path, stop, how, monkeypatch):
    """The weights, best/ and the training record. A run stopped at an epoch's last step (a first
    Ctrl-C, or --max-steps) wrote last/ before that epoch's validation, which the resumed run then
    skipped: another best/ (what `vcell predict` loads); and one stopped at --max-steps logged the
    resumed epochs one ahead (and, from an epoch's end, each loss a step late)."""
    from vcell.train import progress as prog

    data, split = tiny
    a = train_st(data, split, tmp_path / "a", TINY, max_steps=20, seed=1, checkpoint_every=5, **FAST)
    b = tmp_path / "b"
    if how == "max_steps":
        train_st(data, split, b, TINY, max_steps=stop, seed=1, checkpoint_every=5, **FAST)
    else:
        batch_end = prog.TrainProgress.on_train_batch_end

        def ctrl_c(self, trainer, *args):
            self.stop_requested = self.stop_requested or trainer.global_step == stop  # what the first Ctrl-C sets
            return batch_end(self, trainer, *args)

        monkeypatch.setattr(prog.TrainProgress, "on_train_batch_end", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            train_st(data, split, b, TINY, max_steps=20, seed=1, checkpoint_every=7, **FAST)
        monkeypatch.setattr(prog.TrainProgress, "on_train_batch_end", batch_end)
    assert json.loads((b / "last" / "config.json").read_text())["step"] == stop
    train_st(data, split, b, TINY, max_steps=20, seed=1, checkpoint_every=5, resume=True, **FAST)
    wa, wb = _weights(a), _weights(b)
    assert json.loads((b / "last" / "config.json").read_text())["step"] == 20
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ba, bb = (load_file(str(run / "best" / "weights.safetensors")) for run in (a, b))
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    for ck in ("last", "best"):
        ca, cb = (json.loads((run / ck / "config.json").read_text()) for run in (a, b))
        assert (ca["step"], ca["epoch"]) == (cb["step"], cb["epoch"]), ck
    pd.testing.assert_frame_equal(_record(a), _record(b))


def test_resume_with_another_config_or_model_kind_is_a_clear_error(tiny, tmp_path):
    data, split = tiny
    run = train_st(data, split, tmp_path / "run", TINY, max_steps=2, seed=1, **FAST)
    before = _weights(run)
    with pytest.raises(VcellError, match=r"cannot resume: .*width 32 -> 48"):
        train_st(data, split, run, {**TINY, "width": 48}, max_steps=4, seed=1, resume=True, **FAST)
    assert all(torch.equal(before[k], v) for k, v in _weights(run).items())  # the checkpoint is untouched
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]  # no empty version_1 beside it
    meta = json.loads((run / "last" / "config.json").read_text())
    (run / "last" / "config.json").write_text(json.dumps({**meta, "kind": "se"}))
    with pytest.raises(VcellError, match="holds a SE model; this run trains ST"):
        train_st(data, split, run, TINY, max_steps=4, seed=1, resume=True, **FAST)
    with pytest.raises(VcellError, match="holds a SE model, not a State Transition model"):
        load_checkpoint(run / "last")


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def test_trainer_state_of_the_older_single_file_layout_still_resumes(tiny, tmp_path):
    """SE checkpoints written before ST and SE shared one checkpoint IO kept the trainer state in one file."""
    from vcell.nn.checkpoint import STATE, TRAINER_STATE
    from vcell.nn.checkpoint import save_tree as _save_tree
    from vcell.train.checkpoint import _trainer_state

    data, split = tiny
    run = train_st(data, split, tmp_path / "run", TINY, max_steps=3, seed=1, **FAST)
    state = _trainer_state(run / "last")
    (run / "last" / TRAINER_STATE).unlink()
    _save_tree(state, run / "last" / STATE)
    assert _same_tree(_trainer_state(run / "last"), state)
    train_st(data, split, run, TINY, max_steps=5, seed=1, resume=True, **FAST)
    assert json.loads((run / "last" / "config.json").read_text())["step"] == 5
    (run / "last" / STATE).unlink()
    with pytest.raises(VcellError, match="no trainer state"):
        _trainer_state(run / "last")


KILLED_RUN = PREP + """
import sys, time
from vcell.train import st

def slow_step(self, batch, batch_idx, _step=st.STModule.training_step):
    if self.global_step >= 10:
        time.sleep(0.2)  # leave the parent time to kill us mid-run
    return _step(self, batch, batch_idx)

st.STModule.training_step = slow_step
data, split = tiny_data()
st.train_st(data, split, sys.argv[1], {"width": 32, "n_layers": 2, "n_heads": 2, "encoder_layers": 2},
            max_steps=20, batch_size=4, set_size=16, seed=1, checkpoint_every=2, accelerator="cpu", log_every=1)
"""


def test_resume_after_sigkill_equals_uninterrupted_run(tiny, tmp_path):
    data, split = tiny
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            cfg = out / "last" / "config.json"
            try:  # last/ is swapped by renames while the run saves: it can vanish between two calls
                if json.loads(cfg.read_text())["step"] >= 10:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the training subprocess wrote no checkpoint at step >= 10 in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((resolve_checkpoint_dir(out / "last") / "config.json").read_text())["step"]
    assert 10 <= killed_at < 20
    train_st(data, split, out, TINY, max_steps=20, seed=1, checkpoint_every=2, resume=True, **FAST)
    a = train_st(data, split, tmp_path / "a", TINY, max_steps=20, seed=1, checkpoint_every=5, **FAST)
    wa, wb = _weights(a), _weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the steps the killed run logged after its checkpoint are not in the record twice
    pd.testing.assert_frame_equal(_record(a), _record(out))


def test_a_resumed_run_forgets_the_steps_logged_after_its_checkpoint(tmp_path):
    """A run killed after its last checkpoint had logged (and flushed) later steps, which the resumed
    run trains and logs again: the record held them twice (as after a DDP rank's SIGKILL)."""
    from vcell.train.runs import forget_logged_steps

    logs = tmp_path / "logs"
    for version, steps in (("version_0", range(0, 15)), ("version_1", range(10, 20))):
        (logs / version).mkdir(parents=True)
        pd.DataFrame({"epoch": [s // 5 for s in steps], "step": list(steps), "train_loss": [float(s) for s in steps],
                      "val_loss": [np.nan] * len(steps)}).to_csv(logs / version / "metrics.csv", index=False)
    assert forget_logged_steps(logs, 10, current=logs / "version_1") == 5  # checkpoint at step 10: rows 10-14 go
    kept = pd.read_csv(logs / "version_0" / "metrics.csv")
    assert kept["step"].tolist() == list(range(10)) and list(kept.columns) == ["epoch", "step", "train_loss", "val_loss"]
    assert pd.read_csv(logs / "version_1" / "metrics.csv")["step"].tolist() == list(range(10, 20))  # the resumed run's own
    assert forget_logged_steps(logs, 10, current=logs / "version_1") == 0
    (logs / "version_2").mkdir()
    (logs / "version_2" / "metrics.csv").write_bytes(b"")  # killed while it was being created
    assert forget_logged_steps(logs, 3, current=logs / "version_1") == 7


def test_a_cell_without_a_batch_gets_the_mean_of_the_trained_batches_only(tmp_path):
    # Batch codes span the whole file: a batch only the held-out context has keeps its random
    # initial row, which must not enter the vector a prediction (no batch given) adds.
    from vcell.data.dataset import from_anndata
    from vcell.data.spec import DataSpec
    from vcell.data.splits import apply_split, holdout_config
    from vcell.nn.transition import StateTransition

    adata = tiny_adata(n_genes=40, n_perturbations=4, cells_per_perturbation=30, n_controls=60, seed=1)  # noqa: F821
    held = (adata.obs["cell_type"] == "ctx_B").to_numpy()
    gem = adata.obs["gem_group"].astype(str).to_numpy()
    gem[held] = "gem_only_B"
    adata.obs["gem_group"] = pd.Categorical(gem)
    data = from_anndata(adata, DataSpec(batch_col="gem_group"))
    split = apply_split(data.index, holdout_config(data.index, [], val_contexts=["ctx_B"]))
    out = train_st(data, split, tmp_path / "run", {**TINY, "n_batches": 3}, max_steps=2, seed=0, **FAST)

    batches = list(map(str, data.index.batches))
    trained = sorted(batches.index(b) for b in ("gem1", "gem2"))
    assert json.loads((out / "last" / "config.json").read_text())["trained_batches"] == trained
    model, _ = StateTransition.from_checkpoint(out / "last")
    assert model.batch_rows.tolist() == trained
    # control_relative trains control-label sets on the training contexts' controls: their batches count too
    from vcell.data.trained import trained_batches

    ctrl = ((adata.obs["cell_type"] == "ctx_A") & (adata.obs["target_gene"] == "non-targeting")).to_numpy()
    gem[ctrl & (np.arange(adata.n_obs) % 2 == 0)] = "gem_controls_only"
    adata.obs["gem_group"] = pd.Categorical(gem)
    data2 = from_anndata(adata, DataSpec(batch_col="gem_group"))
    split2 = apply_split(data2.index, holdout_config(data2.index, [], val_contexts=["ctx_B"]))
    only = list(map(str, data2.index.batches)).index("gem_controls_only")
    assert only not in trained_batches(data2, split2) and only in trained_batches(data2, split2, control_sets=True)
    assert list(map(str, data2.index.batches)).index("gem_only_B") not in trained_batches(data2, split2, control_sets=True)
    basal, pert = torch.rand(1, 5, 40), torch.rand(1, model.config.pert_dim)
    with torch.no_grad():
        unbatched = model(basal, pert)
        weight = model.batch_embedding.weight
        weight[batches.index("gem_only_B")] += 100.0  # an untrained row: no effect on a cell without a batch
        torch.testing.assert_close(model(basal, pert), unbatched)
        weight[trained[0]] += 1.0
        assert not torch.allclose(model(basal, pert), unbatched)


def test_one_loader_serves_every_epoch_and_its_workers_draw_each_plan(tiny):
    """The train loader is built once and its worker processes persist (a loader rebuilt each epoch forked its
    workers again: ~0.3 s an epoch at GPU sizes); each epoch's batches, read by 2 workers, are those of that
    epoch's plan read in this process."""
    data, split = tiny
    position = {"now": (0, 0)}

    def batches(workers: int) -> list:
        dm = CellSetDataModule(data, split, batch_size=4, set_size=16, seed=5, num_workers=workers)
        dm._position = lambda: position["now"]
        loader = dm.train_dataloader()
        assert loader.persistent_workers is (workers > 0)
        out = []
        for epoch, skip in ((0, 0), (1, 0), (2, 3)):  # the last: a run resumed mid-epoch
            position["now"] = (epoch, skip)
            out.append([(b["target"].clone(), b["basal"].clone(), b["pert"].clone()) for b in loader])
        return out

    here, workers = batches(0), batches(2)
    assert [len(e) for e in here] == [len(e) for e in workers] and len(here[2]) == len(here[0]) - 3
    for a, b in zip(here, workers, strict=True):
        for x, y in zip(a, b, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    assert not torch.equal(here[0][0][0], here[1][0][0])  # a new plan each epoch
