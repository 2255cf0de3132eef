"""Splits: cell-load TOML files and --holdout-context, on the real datasets."""

from __future__ import annotations

import numpy as np
import pytest

from vcell.data.dataset import load_dataset
from vcell.data.spec import DataSpec
from vcell.data.splits import apply_split, holdout_config, read_split_toml
from vcell.errors import VcellError

from conftest import run_cli

MCF_SPEC = DataSpec(pert_col="perturbation", control="control", context_col="cell_type")
KANG_SPEC = DataSpec(pert_col="stim", control="CTRL", context_col="seurat_annotations")
PAP_SPEC = DataSpec(pert_col="target", control="non-targeting", context_col=None)

SPLIT_TOML = """
[datasets]
mcfaline23 = "{path}"
norman19 = "{path}"

[training]
mcfaline23 = "train"
norman19 = "train"

[zeroshot]
"mcfaline23.U87MG" = "test"

[fewshot]
[fewshot."mcfaline23.T98G"]
val = ["MAPK1"]
test = ["PLK4", "SGK1"]
"""


@pytest.fixture
def mcf(mcfaline):
    return load_dataset(mcfaline, MCF_SPEC, backed=True)


def _write(tmp_path, text, name="split.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_split_roles(mcf, mcfaline, tmp_path):
    cfg = read_split_toml(_write(tmp_path, SPLIT_TOML.format(path=mcfaline)))
    split = apply_split(mcf.index, cfg)
    obs = mcf.adata.obs
    ctx, pert = obs["cell_type"].astype(str).to_numpy(), obs["perturbation"].astype(str).to_numpy()
    ctrl = pert == "control"
    roles = split.roles
    assert (roles[ctrl] == "control").all()  # controls of every context, held-out ones too, stay available
    assert (roles[(ctx == "U87MG") & ~ctrl] == "test").all()
    assert (roles[(ctx == "T98G") & (pert == "MAPK1")] == "val").all()
    assert (roles[(ctx == "T98G") & np.isin(pert, ["PLK4", "SGK1"])] == "test").all()
    t98_rest = (ctx == "T98G") & ~ctrl & ~np.isin(pert, ["MAPK1", "PLK4", "SGK1"])
    assert t98_rest.any() and (roles[t98_rest] == "train").all()
    assert (roles[(ctx == "A172") & ~ctrl] == "train").all()
    assert (roles[(ctx == "k562") & ~ctrl] == "train").all()
    summary = split.summary(mcf.index).set_index("context")
    assert summary.loc["mcfaline23.U87MG", "test_perts"] == 9
    assert summary.loc["mcfaline23.U87MG", "controls"] == 100
    assert summary.loc["mcfaline23.T98G", "train_perts"] == 6


def test_training_section_limits_datasets(mcf, tmp_path):
    text = '[training]\nmcfaline23 = "train"\n[zeroshot]\n"mcfaline23.A172" = "val"\n'
    split = apply_split(mcf.index, read_split_toml(_write(tmp_path, text)))
    k562 = mcf.adata.obs["cell_type"].astype(str).to_numpy() == "k562"
    ctrl = mcf.index.is_control
    assert (split.roles[k562 & ~ctrl] == "unused").all()
    assert (split.roles[k562 & ctrl] == "control").all()


def test_holdout_context_matches_toml(mcf, tmp_path):
    cfg = holdout_config(mcf.index, ["A172"])
    assert cfg.zeroshot == {"mcfaline23.A172": "test"}
    # the rendered TOML reads back to the same roles
    again = read_split_toml(_write(tmp_path, cfg.to_toml()))
    assert (apply_split(mcf.index, again).roles == apply_split(mcf.index, cfg).roles).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ('[zeroshot]\n"replogle.A172" = "test"\n', "unknown dataset 'replogle'"),
        ('[zeroshot]\n"mcfaline23.A17" = "test"\n', "unknown context 'mcfaline23.A17'; did you mean"),
        ('[fewshot."mcfaline23.T98G"]\ntest = ["MAPK9"]\n', "perturbation 'MAPK9' has no cells in 'mcfaline23.T98G'"),
        ('[zeroshot]\n"mcfaline23.A172" = "holdout"\n', "expected \"val\" or \"test\""),
        ('[zeroshot]\nA172 = "test"\n', "must be \"dataset.context\""),
        ('[testing]\nx = 1\n', "unknown section [testing]"),
        ('[zeroshot\n', "not a valid TOML file"),
        ('[datasets]\nmcfaline23 = "x.h5ad"\n[zeroshot]\n"norman19.k562" = "test"\n', "'norman19' is used but not listed in [datasets]"),
        ('[fewshot."mcfaline23.T98G"]\nval = ["PLK4"]\ntest = ["PLK4"]\n', "'PLK4' is in both val and test"),
    ],
)
def test_bad_split_files(mcf, tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(VcellError) as err:
        apply_split(mcf.index, read_split_toml(path))
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_holdout_context(mcf):
    with pytest.raises(VcellError, match="unknown context 'A171'; did you mean 'A172'"):
        holdout_config(mcf.index, ["A171"])


def test_kang_holdout(kang):
    data = load_dataset(kang, KANG_SPEC, backed=True, require_context_controls=False)
    split = apply_split(data.index, holdout_config(data.index, ["CD14 Mono"], val_contexts=["B"]))
    ct = data.adata.obs["seurat_annotations"].astype(str).to_numpy()
    stim = data.adata.obs["stim"].astype(str).to_numpy() == "STIM"
    assert (split.roles[(ct == "CD14 Mono") & stim] == "test").all()
    assert (split.roles[(ct == "B") & stim] == "val").all()
    assert (split.roles[(ct == "NK") & stim] == "train").all()
    assert (split.roles[~stim] == "control").all()


def test_papalexi_single_context(papalexi):
    data = load_dataset(papalexi, PAP_SPEC, backed=True)
    assert list(data.index.contexts) == ["all"]
    split = apply_split(data.index, _fewshot_config(data))
    roles = split.roles
    target = data.adata.obs["target"].astype(str).to_numpy()
    assert (roles[target == "STAT1"] == "test").all() and (roles[target == "CAV1"] == "train").all()


def _fewshot_config(data):
    from vcell.data.splits import SplitConfig

    key = f"{data.index.datasets[0]}.all"
    return SplitConfig(fewshot={key: {"test": ["STAT1", "IFNGR1"]}})


def test_split_cli_writes_toml(mcfaline, tmp_path):
    out = tmp_path / "split.toml"
    result = run_cli(
        "data", "split", mcfaline, "--pert-col", "perturbation", "--control", "control",
        "--holdout-context", "T98G", "--set-size", "64", "--out", out,
    )
    assert result.returncode == 0, result.stderr
    assert "mcfaline23.T98G" in result.stdout and "cell sets of 64" in result.stdout
    cfg = read_split_toml(out)
    assert cfg.zeroshot == {"mcfaline23.T98G": "test"}
    assert set(cfg.datasets) == {"mcfaline23", "norman19"}
    bad = run_cli("data", "split", mcfaline, "--pert-col", "perturbation", "--control", "control", "--holdout-context", "T98")
    assert bad.returncode == 2 and "unknown context 'T98'" in bad.stderr


def _simulated(tmp_path):
    from vcell.data.simulate import simulate_perturbseq

    adata = simulate_perturbseq(n_genes=20, n_contexts=3, n_perturbations=3, n_combinations=0,
                                cells_per_perturbation=5, n_controls=6, seed=0)
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    return path, adata


def test_select_cells_roles_contexts_controls(tmp_path):
    from vcell.data.splits import select_cells

    path, adata = _simulated(tmp_path)
    data = load_dataset(path, DataSpec())
    ctx = adata.obs["cell_type"].astype(str).to_numpy()
    ctrl = adata.obs["target_gene"].astype(str).to_numpy() == "non-targeting"
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    # the held-out context's cells and its own controls, nothing else: what a prediction is scored against
    assert (select_cells(data.index, split) == (ctx == "ctx_B")).all()
    assert (select_cells(data.index, split, ["test"], ["synthetic.ctx_B"]) == (ctx == "ctx_B")).all()
    assert (select_cells(data.index, split, controls=False) == ((ctx == "ctx_B") & ~ctrl)).all()
    # training cells come with the controls of the training contexts
    assert (select_cells(data.index, split, ["train"]) == (ctx != "ctx_B")).all()
    assert (select_cells(data.index, split, ["train"], ["ctx_A"]) == (ctx == "ctx_A")).all()
    assert (select_cells(data.index, split, ["control"]) == ctrl).all()
    with pytest.raises(VcellError, match=r"unknown role 'tst'; did you mean 'test'"):
        select_cells(data.index, split, ["tst"])
    with pytest.raises(VcellError, match=r"no test cells in context\(s\) ctx_A"):
        select_cells(data.index, split, ["test"], ["ctx_A"])
    with pytest.raises(VcellError, match=r"unknown context 'ctx_Z'"):
        select_cells(data.index, split, ["test"], ["ctx_Z"])


def test_subset_cli(tmp_path):
    path, adata = _simulated(tmp_path)
    out = tmp_path / "real.h5ad"
    proc = run_cli("data", "subset", path, "--holdout-context", "ctx_C", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import anndata as ad

    real = ad.read_h5ad(out)
    expected = adata[(adata.obs["cell_type"] == "ctx_C").to_numpy()]
    n_ctrl = int((expected.obs["target_gene"] == "non-targeting").sum())
    summary = f"{expected.n_obs - n_ctrl} test cells of 3 perturbation(s) + {n_ctrl} controls (ctx_C)"
    assert summary in " ".join(proc.stdout.split())
    assert list(real.obs_names) == list(expected.obs_names) and list(real.obs.columns) == list(adata.obs.columns)
    assert np.array_equal(real.X.toarray() if hasattr(real.X, "toarray") else real.X,
                          expected.X.toarray() if hasattr(expected.X, "toarray") else expected.X)
    before = out.read_bytes()
    again = run_cli("data", "subset", path, "--holdout-context", "ctx_C", "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr and out.read_bytes() == before
    bad = run_cli("data", "subset", path, "--holdout-context", "ctx_C", "--role", "tst", "--out", tmp_path / "x.h5ad")
    assert bad.returncode == 2 and "did you mean 'test'" in bad.stderr and not (tmp_path / "x.h5ad").exists()
    neither = run_cli("data", "subset", path, "--out", tmp_path / "y.h5ad")
    assert neither.returncode == 2 and "--split" in neither.stderr
