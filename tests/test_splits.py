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
