"""Control matching, cell sets, streaming rows and DataLoader workers, on the real datasets."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from vcell.data.cellsets import CellSetDataset, CellSetSampler, collate_cell_sets
from vcell.data.dataset import load_dataset
from vcell.data.rows import H5Rows, MemoryRows, row_source
from vcell.data.spec import DataSpec
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError

MCF_SPEC = DataSpec(pert_col="perturbation", control="control", context_col="cell_type")
KANG_SPEC = DataSpec(pert_col="stim", control="CTRL", context_col="seurat_annotations")
PAP_SPEC = DataSpec(pert_col="target", control="non-targeting", context_col=None, batch_col="bio_rep")


@pytest.fixture(scope="module")
def mcf():
    from conftest import MCFALINE, shared_path

    data = load_dataset(shared_path(MCFALINE), MCF_SPEC, backed=True)
    return data, apply_split(data.index, holdout_config(data.index, ["T98G"]))


@pytest.fixture(scope="module")
def pap():
    from conftest import PAPALEXI, shared_path

    data = load_dataset(shared_path(PAPALEXI), PAP_SPEC, backed=True)
    return data


def _plan_key(sets):
    return [(s.context, s.perturbation, s.batch_codes.tolist(), s.pert_rows.tolist(), s.control_rows.tolist()) for s in sets]


def test_train_sets_are_full_matched_and_deterministic(mcf):
    data, split = mcf
    idx = data.index
    sampler = CellSetSampler(idx, split, "train", set_size=64, control_strategy="random", seed=3)
    sets = sampler.plan(epoch=0)
    assert sets and all(s.size == 64 for s in sets)
    keys = idx.context_keys()
    train_rows = np.flatnonzero(split.roles == "train")
    for s in sets:
        assert (idx.pert_codes[s.pert_rows] == s.pert_code).all()
        assert len(set(keys[s.pert_rows])) == 1 and len(set(keys[s.control_rows])) == 1
        assert keys[s.control_rows[0]] == keys[s.pert_rows[0]]  # controls of the same context
        assert idx.is_control[s.control_rows].all()
        assert np.isin(s.pert_rows, train_rows).all()
        assert len(set(s.control_rows.tolist())) == 64  # 100 controls per line: drawn without replacement
    # every training cell is used at least once per epoch
    used = np.unique(np.concatenate([s.pert_rows for s in sets]))
    assert np.array_equal(used, train_rows)
    assert _plan_key(sets) == _plan_key(CellSetSampler(idx, split, "train", 64, "random", seed=3).plan(0))
    assert _plan_key(sets) != _plan_key(sampler.plan(epoch=1))
    assert _plan_key(sets) != _plan_key(CellSetSampler(idx, split, "train", 64, "random", seed=4).plan(0))


def test_short_groups_padded_in_train_left_short_in_test(mcf):
    data, split = mcf
    idx = data.index
    S = 128  # mcfaline groups have 46-100 cells: all shorter than S
    train = CellSetSampler(idx, split, "train", S, "random", seed=0).plan()
    for s in train:
        group = np.flatnonzero((idx.pert_codes == s.pert_code) & (idx.context_keys() == f"{s.dataset}.{s.context}") & (split.roles == "train"))
        assert s.size == S and s.n_distinct == len(group) < S
        assert set(s.pert_rows.tolist()) == set(group.tolist())  # padding resamples the same group
    test = CellSetSampler(idx, split, "test", 32, "random", train=False, seed=0).plan()
    test_rows = np.flatnonzero(split.roles == "test")
    rows = np.concatenate([s.pert_rows for s in test])
    assert np.array_equal(np.sort(rows), test_rows)  # each held-out cell exactly once
    assert any(s.size < 32 for s in test)
    t98_ctrl = np.flatnonzero((idx.context_keys() == "mcfaline23.T98G") & idx.is_control)
    for s in test:
        assert s.context == "T98G" and np.isin(s.control_rows, t98_ctrl).all()
        assert len(s.control_rows) == s.size


def test_control_sets_map_each_training_context_controls_to_other_controls(mcf, pap):
    data, split = mcf
    idx = data.index
    plain = CellSetSampler(idx, split, "train", 32, "random", seed=5).plan()
    sets = CellSetSampler(idx, split, "train", 32, "random", seed=5, control_sets=True).plan()
    ctrl = [s for s in sets if s.pert_code == idx.control_code]
    assert len(sets) - len(ctrl) == len(plain) and ctrl
    assert {s.perturbation for s in ctrl} == {"control"}
    keys = idx.context_keys()
    for line in ("A172", "U87MG"):  # the training lines; T98G is held out and gets no control sets
        mine = [s for s in ctrl if s.context == line]
        groups = [g for g in CellSetSampler(idx, split, "train", 32, "random").groups.itertuples() if g.context == line]
        targets = np.unique(np.concatenate([s.pert_rows for s in mine]))
        assert len(targets) == int(np.ceil(np.mean([g.n_cells for g in groups])))  # as many as an average perturbation
        basal = np.concatenate([s.control_rows for s in mine])
        pool = np.flatnonzero(idx.is_control & (keys == f"mcfaline23.{line}"))
        assert np.isin(targets, pool).all() and np.isin(basal, pool).all()
        assert not np.isin(basal, targets).any()  # the basal cells are other controls
        assert all(s.size == 32 for s in mine)
    assert not [s for s in ctrl if s.context == "T98G"]
    again = CellSetSampler(idx, split, "train", 32, "random", seed=5, control_sets=True)
    assert _plan_key(again.plan(0)) == _plan_key(sets) and _plan_key(again.plan(1)) != _plan_key(sets)
    # evaluation sets never hold control sets
    assert not [s for s in CellSetSampler(idx, split, "test", 32, "random", train=False, control_sets=True).plan()
                if s.pert_code == idx.control_code]
    # with batch-matched controls: one draw per context, each target control's basal cell another
    # control of its batch
    pidx = pap.index
    bsets = [s for s in CellSetSampler(pidx, None, "train", 64, "batch", seed=1, control_sets=True).plan()
             if s.pert_code == pidx.control_code]
    assert len({pidx.batches[b] for s in bsets for b in s.batch_codes}) == 3
    for s in bsets:
        assert (pidx.batch_codes[s.pert_rows] == s.batch_codes).all() and (pidx.batch_codes[s.control_rows] == s.batch_codes).all()
        assert not np.isin(s.control_rows, s.pert_rows).any()


def test_drift_probe_draws_each_training_context_controls_by_seed(mcf):
    """Where a control_relative model measures its reference drift: the training lines' controls only
    (not the held-out line's), sets of S per line, the same rows for the same seed."""
    data, split = mcf
    idx = data.index
    keys = idx.context_keys()
    probe = CellSetSampler(idx, split, "train", 32, "random", seed=5).drift_probe(n_sets=3)
    lines = ("mcfaline23.A172", "mcfaline23.U87MG", "norman19.k562")  # in code order; T98G is held out
    assert len(probe) == len(lines) and all(rows.shape == (3, 32) for rows in probe)
    for rows, line in zip(probe, lines):
        assert (keys[rows] == line).all() and idx.is_control[rows].all()
        assert len(np.unique(rows)) == rows.size  # enough controls: no cell twice
    again = CellSetSampler(idx, split, "train", 32, "batch", seed=5, control_sets=True).drift_probe(n_sets=3)
    assert all((a == b).all() for a, b in zip(again, probe))  # the seed alone decides
    other = CellSetSampler(idx, split, "train", 32, "random", seed=6).drift_probe(n_sets=3)
    assert not all((a == b).all() for a, b in zip(other, probe))
    # by default 8 sets per line (DRIFT_PROBE_SETS: ahead of 2 in benchmarks/README.md)
    assert all(rows.shape == (8, 32) for rows in CellSetSampler(idx, split, "train", 32, seed=5).drift_probe())


def test_batch_matched_controls_with_fallback(pap):
    """As cell-load's batch mapping cuts and pairs them (its sampler groups by batch, cell type and
    perturbation when the mapping is by batch): a set holds one batch, its controls from that batch;
    the random strategy cuts sets per (context, perturbation), of any batch."""
    idx = pap.index
    sampler = CellSetSampler(idx, None, "train", 64, control_strategy="batch", seed=1)
    sets = sampler.plan()
    assert {int(b) for s in sets for b in s.batch_codes} == {0, 1, 2}
    for s in sets:
        assert len(np.unique(s.batch_codes)) == 1  # no set mixes batches
        assert (idx.batch_codes[s.pert_rows] == s.batch_codes).all()
        assert (idx.batch_codes[s.control_rows] == s.batch_codes).all()
    assert len(sets) == sum(int(np.ceil(n / 64)) for n in idx.groups(by_batch=True)["n_cells"])
    random_sets = CellSetSampler(idx, None, "train", 64, control_strategy="random", seed=1).plan()
    assert len(random_sets) == sum(int(np.ceil(n / 64)) for n in idx.groups()["n_cells"]) < len(sets)
    assert sum(len(np.unique(s.batch_codes)) > 1 for s in random_sets) > len(random_sets) / 2
    # remove the controls of rep_2: its sets fall back to any control of the context
    rep2 = int(np.flatnonzero(idx.batches == "rep_2")[0])
    from vcell.data.splits import Split

    roles = np.where(idx.is_control, "control", "train").astype(object)
    roles[idx.is_control & (idx.batch_codes == rep2)] = "unused"
    split = Split.from_roles(roles)
    planned = CellSetSampler(idx, split, "train", 64, "batch", seed=1).plan()
    fallback = [s for s in planned if s.batch_codes[0] == rep2]
    assert len(fallback) > 2
    ctrl_batches = np.unique(np.concatenate([idx.batch_codes[s.control_rows] for s in fallback]))
    assert rep2 not in ctrl_batches and len(ctrl_batches) == 2
    for s in planned:  # the other batches' sets keep their own batch's controls
        if s.batch_codes[0] != rep2:
            assert (idx.batch_codes[s.control_rows] == s.batch_codes[0]).all()


def test_h5_rows_match_memory(tmp_path, pap, mcf):
    rng = np.random.default_rng(0)
    for path in (pap.path, mcf[0].path):
        mem = ad.read_h5ad(path)
        rows = rng.integers(0, mem.n_obs, 300)
        rows[:5] = rows[0]  # repeats
        rows[5:20] = np.arange(100, 115)  # a run of consecutive rows
        h5 = H5Rows(path)
        np.testing.assert_array_equal(h5.read(rows), MemoryRows(mem.X).read(rows))
        csr = h5.read_csr(rows)  # the same rows without a dense block
        assert sp.issparse(csr) and csr.format == "csr" and csr.dtype == np.float32
        np.testing.assert_array_equal(csr.toarray(), MemoryRows(mem.X).read(rows))
        np.testing.assert_array_equal(h5.read_csr(np.sort(np.unique(rows))).toarray(), MemoryRows(mem.X).read(np.sort(np.unique(rows))))
    dense = ad.read_h5ad(pap.path)[:500].copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    rows = rng.integers(0, 500, 100)
    np.testing.assert_array_equal(H5Rows(tmp_path / "dense.h5ad").read(rows), dense.X[rows].astype(np.float32))
    np.testing.assert_array_equal(H5Rows(tmp_path / "dense.h5ad").read_csr(rows).toarray(), dense.X[rows].astype(np.float32))
    with pytest.raises(VcellError, match="no matrix at 'layers/counts'"):
        H5Rows(pap.path, "layers/counts")


def test_dataloader_workers_give_identical_batches(mcf):
    data, split = mcf
    sampler = CellSetSampler(data.index, split, "train", 32, "random", seed=5)

    def batches(workers):
        ds = CellSetDataset(sampler, row_source(data.adata, data.path), epoch=2)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_cell_sets)
        return [b for _, b in zip(range(6), loader)]

    single, multi = batches(0), batches(2)
    for a, b in zip(single, multi, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])
    mem = ad.read_h5ad(data.path)
    s = sampler.plan(2)[0]
    np.testing.assert_allclose(single[0]["target"][0].numpy(), mem.X[s.pert_rows].toarray(), rtol=1e-6)
    np.testing.assert_allclose(single[0]["basal"][0].numpy(), mem.X[s.control_rows].toarray(), rtol=1e-6)
    assert single[0]["pert"][0].item() == s.pert_code


def test_collate_pads_short_sets(mcf):
    data, split = mcf
    sampler = CellSetSampler(data.index, split, "test", 40, "random", train=False, seed=0)
    ds = CellSetDataset(sampler, row_source(data.adata, data.path))
    sizes = [s.size for s in ds.sets]
    short = int(np.argmin(sizes))
    batch = collate_cell_sets([ds[0], ds[short]])
    assert batch["target"].shape == (2, 40, data.adata.n_vars)
    assert batch["mask"][1].sum().item() == sizes[short] < 40
    assert batch["target"][1, sizes[short]:].abs().sum() == 0


def test_kang_sets(kang):
    data = load_dataset(kang, KANG_SPEC, backed=False, require_context_controls=False)
    split = apply_split(data.index, holdout_config(data.index, ["CD14 Mono"]))
    sets = CellSetSampler(data.index, split, "test", 64, "random", train=False, seed=0).plan()
    assert sum(s.size for s in sets) == int(((data.adata.obs.seurat_annotations == "CD14 Mono") & (data.adata.obs.stim == "STIM")).sum())
    # pDC has 4 controls: a set of 11 perturbed cells draws its controls with replacement from those 4
    pdc = [s for s in CellSetSampler(data.index, split, "train", 11, "random", seed=0).plan() if s.context == "pDC"]
    assert pdc and all(len(set(s.control_rows.tolist())) == 4 for s in pdc)


def test_bad_sampler_options(mcf):
    data, split = mcf
    with pytest.raises(VcellError, match="cell set size must be >= 1"):
        CellSetSampler(data.index, split, set_size=0)
    with pytest.raises(VcellError, match="unknown control strategy 'nearest'"):
        CellSetSampler(data.index, split, control_strategy="nearest")
