"""Tests of the challenge-sized simulator written chunk by chunk (``vcell data simulate --preset vcc``)."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import h5py
import numpy as np
import pytest
from scipy import sparse

from vcell.data import simulate_vcc
from vcell.data.simulate_vcc import CHUNK_CELLS, write_vcc_simulation
from vcell.errors import VcellError

from conftest import error_line, run_cli_batch

SMALL = dict(n_cells=3000, n_genes=500, n_perturbations=30, n_controls=400, n_batches=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("vcc") / "sim.h5ad"
    summary = write_vcc_simulation(path, **SMALL, threads=2, seed=1)
    return path, summary


def _x_datasets(path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {k: f["X"][k][...].tobytes() for k in ("data", "indices", "indptr")}


def test_structure_roles_controls_and_counts(small):
    path, summary = small
    a = ad.read_h5ad(path)
    sim = a.uns["simulation"]
    assert a.shape == (3000, 500) and sparse.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.float32
    assert np.array_equal(a.X.data, np.round(a.X.data)) and a.X.data.min() >= 1  # positive integral counts, zeros implicit
    roles = {k: set(v) for k, v in sim["roles"].items()}
    assert {k: len(v) for k, v in roles.items()} == {"train": 15, "val": 5, "test": 10} == summary.roles
    assert not (roles["train"] & roles["val"] or roles["train"] & roles["test"] or roles["val"] & roles["test"])
    assert set().union(*roles.values()) == set(sim["targets"]) == set(a.obs["target_gene"].cat.categories) - {"non-targeting"}
    assert set(sim["targets"]) <= set(a.var_names)  # CRISPRi: the label is a measured gene
    counts = a.obs["target_gene"].value_counts()
    assert counts["non-targeting"] == 400 and counts.drop("non-targeting").min() >= 1
    assert counts.sum() == 3000 and set(a.obs["gem_group"].cat.categories) == {"gem1", "gem2", "gem3"}
    assert sim["true_lfc"].shape == (1, 30, 500) and sim["true_lfc"].dtype == np.float32
    # interleaved like a barcode order, not sorted by group
    labels = a.obs["target_gene"].cat.codes.to_numpy()
    assert np.count_nonzero(np.diff(labels)) > 2000
    # about the asked depth, and the knockdown shows on each target in its own cells
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    assert abs(np.median(totals) / 20_000 - 1) < 0.1 and summary.median_umi == np.median(totals)
    norm = sparse.diags(1e4 / totals) @ a.X
    ctrl = np.asarray(norm[labels == 0].mean(axis=0)).ravel()
    genes = {g: i for i, g in enumerate(a.var_names)}
    ratios = [norm[labels == code][:, genes[t]].mean() / ctrl[genes[t]]
              for code, t in enumerate(a.obs["target_gene"].cat.categories) if code]
    assert np.median(ratios) < 0.4


def test_same_seed_same_file_whatever_the_threads(small, tmp_path):
    path, _ = small
    one = tmp_path / "one.h5ad"
    write_vcc_simulation(one, **SMALL, threads=1, seed=1)
    assert one.read_bytes() == path.read_bytes()
    other = tmp_path / "other.h5ad"
    write_vcc_simulation(other, **SMALL, threads=2, seed=2)
    assert _x_datasets(other)["data"] != _x_datasets(path)["data"]


def test_two_contexts_split_cells_and_controls(tmp_path):
    path = tmp_path / "two.h5ad"
    write_vcc_simulation(path, n_cells=1200, n_genes=200, n_contexts=2, n_perturbations=10, n_controls=200, seed=0)
    a = ad.read_h5ad(path, backed="r")
    assert a.n_obs == 1200 and a.uns["simulation"]["true_lfc"].shape == (2, 10, 200)
    groups = a.obs.groupby(["cell_type", "target_gene"], observed=False).size()
    assert groups.min() >= 1 and groups.xs("non-targeting", level="target_gene").tolist() == [100, 100]
    assert abs(groups.xs("ctx_A").sum() - 600) < 120  # split between the contexts
    rows = np.array([5, 17, 901])
    assert np.array_equal(a.X[rows].toarray(), a.to_memory().X[rows].toarray())  # readable backed


def _traced_peak(path, n_cells: int, n_genes: int) -> int:
    tracemalloc.start()
    try:
        write_vcc_simulation(path, n_cells=n_cells, n_genes=n_genes, n_perturbations=20, n_controls=1000, threads=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_never_holds_more_than_a_few_blocks(tmp_path, monkeypatch):
    seen = []
    original = simulate_vcc.H5adWriter.append

    def append(self, **blocks):
        seen.append(blocks["X"].shape[0])
        original(self, **blocks)

    monkeypatch.setattr(simulate_vcc.H5adWriter, "append", append)
    _traced_peak(tmp_path / "warm.h5ad", 1200, 400)  # numba's first compile allocates too
    seen.clear()
    peaks = {n: _traced_peak(tmp_path / f"m{n}.h5ad", n, 400) for n in (10_000, 20_000)}
    assert max(seen) == CHUNK_CELLS and sum(seen) == 30_000  # written block by block
    dense = {n: n * 400 * 4 for n in peaks}  # the float32 matrix: 16 and 32 MB (~90% non-zero at this depth)
    assert peaks[20_000] < dense[20_000] / 3, peaks
    # twice the cells: the matrix grows by 16 MB, what is held only by obs (a few bytes per cell)
    assert peaks[20_000] - peaks[10_000] < 0.15 * (dense[20_000] - dense[10_000]), peaks


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "x.h5ad"

    def stop(_rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_vcc_simulation(out, n_cells=2000, n_genes=100, n_perturbations=5, n_controls=100, progress=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_cells=100, n_controls=95, n_perturbations=10), ("n_cells", "100")),
    (dict(n_perturbations=6, n_test_perturbations=4, n_val_perturbations=2), ("training", "6")),
    (dict(n_perturbations=600, n_genes=500), ("n_perturbations", "600")),
    (dict(umi_per_cell=0), ("umi_per_cell", "0")),
])
def test_bad_sizes_are_one_line_errors(tmp_path, kwargs, words):
    args = {**SMALL, **kwargs}
    with pytest.raises(VcellError) as exc:
        write_vcc_simulation(tmp_path / "bad.h5ad", **args)
    assert all(w in str(exc.value) for w in words) and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_checks_and_refuses_to_replace(tmp_path):
    out = tmp_path / "vcc.h5ad"
    sizes = ["--n-cells", "1500", "--n-genes", "300", "--n-perturbations", "12", "--n-controls", "200", "--seed", "3"]
    made, again, check, no_preset, combos, scaled = run_cli_batch([
        ["data", "simulate", out, "--preset", "vcc", *sizes],
        ["data", "simulate", out, "--preset", "vcc", *sizes],
        ["data", "check", out, "--batch-col", "gem_group"],
        ["data", "simulate", tmp_path / "y.h5ad", "--n-cells", "100"],
        ["data", "simulate", tmp_path / "z.h5ad", "--preset", "vcc", "--n-combinations", "2"],
        # a smaller challenge: the controls keep their share (12.7%), not their full-size count (it was refused)
        ["data", "simulate", tmp_path / "small.h5ad", "--preset", "vcc", "--n-cells", "3000", "--n-genes", "200",
         "--n-perturbations", "12"],
    ])
    assert scaled.returncode == 0 and "+ 380 controls" in scaled.stdout, scaled.stderr[-1500:]
    for name in ("small.h5ad", "small.gene_names.csv", "small.pert_counts.csv"):
        (tmp_path / name).unlink()
    assert made.returncode == 0, made.stderr
    assert "1,500 cells x 300 genes, 12 perturbations (6 train / 2 val / 4 test) + 200 controls" in made.stdout
    assert "already exists" in error_line(again) and "--overwrite" in error_line(again)
    assert check.returncode == 0 and "no problems found" in check.stdout and "counts" in check.stdout, check.stdout
    assert "--n-cells" in error_line(no_preset) and "--n-combinations" in error_line(combos)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vcc.gene_names.csv", "vcc.h5ad", "vcc.pert_counts.csv"]


def test_cli_writes_the_challenges_two_lists(tmp_path):
    """Beside the file, as the challenge hands them out: its genes in order (no header) and its test
    perturbations with their cells, which `vcell eval prep` and `predict --perturbations` read; a list
    already there is refused before anything is simulated."""
    import anndata as ad

    from vcell.data.perturbation_lists import read_perturbation_table
    from vcell.eval.prep import read_gene_list

    out = tmp_path / "vcc.h5ad"
    sizes = ["--n-cells", "1500", "--n-genes", "300", "--n-perturbations", "12", "--n-controls", "200"]
    (tmp_path / "taken.pert_counts.csv").write_text("mine\n")
    made, taken = run_cli_batch([["data", "simulate", out, "--preset", "vcc", *sizes],
                                 ["data", "simulate", tmp_path / "taken.h5ad", "--preset", "vcc", *sizes]])
    assert made.returncode == 0, made.stderr[-1500:]
    assert "taken.pert_counts.csv" in error_line(taken) and "already exists" in error_line(taken)
    assert not (tmp_path / "taken.h5ad").exists() and (tmp_path / "taken.pert_counts.csv").read_text() == "mine\n"
    adata = ad.read_h5ad(out)
    assert read_gene_list(tmp_path / "vcc.gene_names.csv") == list(adata.var_names)
    listed = read_perturbation_table(tmp_path / "vcc.pert_counts.csv")
    test = sorted(map(str, adata.uns["simulation"]["roles"]["test"]))
    assert sorted(listed) == test and len(test) == 4
    labels = adata.obs["target_gene"].astype(str)
    assert all(listed[p] == int((labels == p).sum()) > 0 for p in test)


def test_split_takes_the_roles_the_simulator_recorded(tmp_path):
    """`data split --simulated-roles`: the test perturbations held out and the val ones validating, as
    uns['simulation']['roles'] lists them (a user had to extract them in Python); a file without
    them, or with --holdout-perturbations too, is one line."""
    import anndata as ad

    from vcell.data.split_files import read_split_toml

    out = tmp_path / "vcc.h5ad"
    made, split, none = run_cli_batch([
        ["data", "simulate", out, "--preset", "vcc", "--n-cells", "1500", "--n-genes", "300", "--n-perturbations", "12",
         "--n-controls", "200"],
        ["data", "split", out, "--simulated-roles", "--batch-col", "gem_group", "--out", tmp_path / "split.toml"],
        ["data", "split", out, "--simulated-roles", "--holdout-perturbations", "0.2"],
    ])
    assert made.returncode == 0 and split.returncode == 0, split.stderr[-1500:]
    roles = ad.read_h5ad(out, backed="r").uns["simulation"]["roles"]
    cfg = read_split_toml(tmp_path / "split.toml")
    assert sorted(cfg.holdout_perturbations) == sorted(map(str, roles["test"]))
    assert sorted(cfg.val_perturbations) == sorted(map(str, roles["val"]))
    assert "--simulated-roles gives the held-out" in error_line(none)


def test_a_file_too_large_for_its_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    """The size estimate is checked against the device's free space; a filesystem without sizes
    (FUSE) is not taken for a full one."""
    out = tmp_path / "new" / "vcc.h5ad"
    with pytest.raises(VcellError, match=r"vcc\.h5ad: the file needs about .* but its device has .* free"):
        simulate_vcc._check_disk(out, 2.0**62)
    simulate_vcc._check_disk(out, 1)
    monkeypatch.setattr(simulate_vcc, "free_space", lambda folder: None)
    simulate_vcc._check_disk(out, 2.0**62)
    assert not out.parent.exists()
