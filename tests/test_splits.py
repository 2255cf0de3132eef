"""Splits: cell-load TOML files and --holdout-context, on the real datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vcell.data.dataset import load_dataset
from vcell.data.spec import DataSpec
from vcell.data.split_files import read_split_toml
from vcell.data.splits import apply_split, holdout_config
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


def test_training_section_limits_datasets(mcf, tmp_path, caplog):
    text = '[training]\nmcfaline23 = "train"\n[zeroshot]\n"mcfaline23.A172" = "val"\n'
    split = apply_split(mcf.index, read_split_toml(_write(tmp_path, text)))
    k562 = mcf.adata.obs["cell_type"].astype(str).to_numpy() == "k562"
    ctrl = mcf.index.is_control
    assert (split.roles[k562 & ~ctrl] == "unused").all()
    assert (split.roles[k562 & ctrl] == "control").all()
    # as cell-load reads it: without [training] no dataset trains, only a fewshot context's other perturbations
    ctx, pert = mcf.adata.obs["cell_type"].astype(str).to_numpy(), mcf.adata.obs["perturbation"].astype(str).to_numpy()
    text = '[zeroshot]\n"mcfaline23.A172" = "test"\n[fewshot."mcfaline23.T98G"]\ntest = ["MAPK1"]\n'
    with caplog.at_level("WARNING", logger="vcell.data.splits"):
        roles = apply_split(mcf.index, read_split_toml(_write(tmp_path, text, "no_training.toml"))).roles
    assert "no_training.toml: no [training] table: as cell-load reads the file, only the other perturbations of its " \
        '[fewshot] contexts train; name the datasets to train on in [training] (e.g. "mcfaline23" = "train")' in caplog.text
    assert (roles[(ctx == "U87MG") & ~ctrl] == "unused").all() and (roles[k562 & ~ctrl] == "unused").all()
    assert (roles[(ctx == "T98G") & (pert == "MAPK1")] == "test").all()
    assert (roles[(ctx == "T98G") & ~ctrl & (pert != "MAPK1")] == "train").all()


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
    from vcell.data.split_files import SplitConfig

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
    # cell-load has no dataset column: it would read the whole shared file under each name, training on
    # the held-out T98G cells through norman19; the file says so first, and so does the command
    assert out.read_text().startswith(f"# note: the file {Path(mcfaline).resolve()} holds datasets mcfaline23, norman19 and [datasets] "
                                      "points mcfaline23, norman19 at it: cell-load reads every cell of a dataset's file ")
    assert "cell-load reads every cell of a dataset's file under its name" in " ".join(result.stderr.split())
    # one name pointing at the file of two datasets: cell-load would read norman19's cells as mcfaline23's
    one = _write(tmp_path, f'[datasets]\nmcfaline23 = "{mcfaline}"\n[training]\nmcfaline23 = "train"\n'
                           '[zeroshot]\n"mcfaline23.T98G" = "test"\n', "one.toml")
    again = run_cli("data", "split", mcfaline, "--pert-col", "perturbation", "--control", "control", "--split", one,
                    "--out", tmp_path / "again.toml")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.toml").read_text().startswith(f"# note: the file {Path(mcfaline)} holds datasets mcfaline23, "
                                                            "norman19 and [datasets] points mcfaline23 at it: ")
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


def test_subset_takes_the_validation_options_of_split_and_train(tmp_path):
    """`data subset --role val` with `--val-perturbations` inline (as `train st` takes them) writes
    the cells `data split --val-perturbations` writes to its TOML for that role."""
    import anndata as ad

    from conftest import run_cli_batch

    path, _ = _simulated(tmp_path)
    inline, toml = tmp_path / "inline.h5ad", tmp_path / "toml.h5ad"
    opts = ["--holdout-perturbations", "0.3", "--val-perturbations", "0.3", "--seed", "4"]
    procs = run_cli_batch([
        ["data", "subset", path, *opts, "--role", "val", "--out", inline],
        ["data", "split", path, *opts, "--out", tmp_path / "split.toml"],
        ["data", "subset", path, "--split", tmp_path / "split.toml", "--role", "val", "--out", toml],
    ])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = ad.read_h5ad(inline), ad.read_h5ad(toml)
    assert a.n_obs > 0 and list(a.obs_names) == list(b.obs_names)
    assert "val cells" in procs[0].stdout


def test_a_split_made_on_one_file_applies_to_another_of_the_same_cells(tmp_path):
    """The README's job: split the preprocessed file, take the held-out cells' raw counts from the raw
    file. Without a dataset column each file is named after itself; the split's one dataset wins."""
    import anndata as ad

    _, adata = _simulated(tmp_path)
    del adata.obs["dataset"]
    pp, raw = tmp_path / "pp.h5ad", tmp_path / "raw.h5ad"
    adata.write_h5ad(pp)
    adata.write_h5ad(raw)
    made = run_cli("data", "split", pp, "--holdout-perturbations", "0.4", "--out", tmp_path / "split.toml")
    assert made.returncode == 0, made.stderr[-2000:]
    names = {}
    for f in (pp, raw):
        out = tmp_path / f"real_{f.stem}.h5ad"
        proc = run_cli("data", "subset", f, "--split", tmp_path / "split.toml", "--out", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        names[f.stem] = list(ad.read_h5ad(out).obs_names)
    assert names["raw"] == names["pp"] and len(names["pp"]) < adata.n_obs


def test_dotted_dataset_names(tmp_path):
    """A split key is 'dataset.context', cut at its first dot (cell-load cuts it there too): a file named
    sim.pp.h5ad is the dataset sim_pp (every split of it was refused), a dotted dataset column one error."""
    _, adata = _simulated(tmp_path)
    del adata.obs["dataset"]
    path = tmp_path / "sim.pp.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "split.toml"
    made = run_cli("data", "split", path, "--holdout-context", "ctx_B", "--out", out)
    assert made.returncode == 0, made.stderr[-2000:]
    assert read_split_toml(out).zeroshot == {"sim_pp.ctx_B": "test"}
    import vcell  # bench names it so too (it took the raw stem and refused every hold-out)

    vcell.run_bench(path, tmp_path / "bench", ["control_mean"], lambda n: vcell.make_model(n, seed=0), holdout=["ctx_B"],
                    threads=1, seed=0)
    assert "sim_pp.ctx_B" in (tmp_path / "bench" / "bench.json").read_text()
    adata.obs["dataset"] = "norman.2019"
    adata.write_h5ad(path)
    bad = run_cli("data", "split", path, "--holdout-context", "ctx_B")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: dataset 'norman.2019' has a '.' in its name: a split names a context 'dataset.context', cut at its first '.' "
        "(as cell-load cuts it); rename the dataset (its obs column, or the file)"], bad.stderr


def test_split_cli_notes_a_context_without_controls(tmp_path):
    """Its perturbed cells have no role in vcell, which a cell-load TOML cannot say: cell-load would train on
    them (its dataloader then fails to pair them with controls). The warning and the file say so."""
    _, adata = _simulated(tmp_path)
    adata = adata[~((adata.obs["cell_type"] == "ctx_C") & (adata.obs["target_gene"] == "non-targeting"))].copy()
    path, out = tmp_path / "noctrl.h5ad", tmp_path / "split.toml"
    adata.write_h5ad(path)
    made = run_cli("data", "split", path, "--holdout-context", "ctx_B", "--allow-missing-controls", "--out", out)
    assert made.returncode == 0, made.stderr[-2000:]
    n = int(((adata.obs["cell_type"] == "ctx_C")).sum())
    note = (f"context 'synthetic.ctx_C' has no control cells: its {n} perturbed cells have no role here, but cell-load "
            "would use them (in training, or in the context's held-out role)")
    assert note in " ".join(made.stderr.split()) and out.read_text().startswith(f"# note: {note}")
    assert "share the file" not in out.read_text() and "holds datasets" not in out.read_text()  # one dataset, one file
    # the sets it counts are those train st cuts: per batch with --batch-col (its default strategy)
    from vcell.data.cellsets import CellSetSampler

    counted = run_cli("data", "split", path, "--holdout-context", "ctx_B", "--allow-missing-controls", "--batch-col", "gem_group")
    data = load_dataset(path, DataSpec(batch_col="gem_group"), require_context_controls=False)
    split = apply_split(data.index, holdout_config(data.index, "ctx_B"))
    n_train = len(CellSetSampler(data.index, split, "train", 64, seed=0).plan())
    assert n_train > len(CellSetSampler(data.index, split, "train", 64, "random", seed=0).plan())
    assert f"cell sets of 64: train {n_train}, " in counted.stdout, counted.stdout


# ------------------------------------------------- perturbations held out in every context (issue #14)


@pytest.fixture(scope="module")
def sim():
    """3 contexts x 8 labels (6 single targets, 2 combinations A+B), 5 cells each, in memory."""
    from vcell.data.dataset import from_anndata
    from vcell.data.simulate import simulate_perturbseq

    adata = simulate_perturbseq(n_genes=20, n_contexts=3, n_perturbations=6, n_combinations=2,
                                cells_per_perturbation=5, n_controls=6, seed=0)
    return from_anndata(adata, DataSpec())


def _labels(data):
    return sorted(set(data.adata.obs["target_gene"].astype(str)) - {"non-targeting"})


def _obs(data):
    obs = data.adata.obs
    return obs["cell_type"].astype(str).to_numpy(), obs["target_gene"].astype(str).to_numpy()


def test_holdout_perturbations_fraction_is_seeded(sim):
    from vcell.data.splits import holdout_perturbations

    labels = _labels(sim)
    assert len(labels) == 8
    draw = lambda which, seed=0: holdout_perturbations(sim.index, which, seed).holdout_perturbations  # noqa: E731
    assert draw(0.3) == draw(0.3) == draw("0.3")  # same seed, same labels (the CLI's text too)
    assert any(draw(0.3, seed) != draw(0.3) for seed in range(1, 6))  # another seed, other labels
    # as documented: the first round(f * n) of a default_rng(seed) permutation of the sorted labels
    assert draw(0.3, 7) == sorted(np.array(labels)[np.random.default_rng(7).permutation(8)[:2]])
    assert [len(draw(f)) for f in (0.01, 0.3, 0.5, 0.99)] == [1, 2, 4, 7]  # at least one, never all
    assert set(draw(0.99)) < set(labels)
    # validation labels are drawn after the test ones: they leave the test draw as it was
    cfg = holdout_perturbations(sim.index, 0.3, 0, val=0.3)
    assert cfg.holdout_perturbations == draw(0.3) and len(cfg.val_perturbations) == 2
    assert not set(cfg.val_perturbations) & set(cfg.holdout_perturbations)


def test_holdout_perturbations_roles(sim):
    from vcell.data.splits import holdout_perturbations

    ctx, pert = _obs(sim)
    combo = next(p for p in _labels(sim) if "+" in p)
    single = combo.split("+")[0]
    roles = apply_split(sim.index, holdout_perturbations(sim.index, [single])).roles
    assert (roles[pert == single] == "test").all() and set(ctx[pert == single]) == {"ctx_A", "ctx_B", "ctx_C"}
    assert (roles[pert == "non-targeting"] == "control").all()
    # labels are exact: "A+B" is its own label and still trains when A alone is held out (documented)
    assert (roles[(pert != single) & (pert != "non-targeting")] == "train").all() and (pert == combo).any()
    # with a held-out context (unseen context x unseen perturbations) and validation
    cfg = holdout_perturbations(sim.index, [combo], contexts=["ctx_A"], val=[single], val_contexts=["ctx_B"])
    roles = apply_split(sim.index, cfg).roles
    perturbed = pert != "non-targeting"
    assert (roles[(ctx == "ctx_A") & perturbed] == "test").all()
    assert (roles[(pert == combo)] == "test").all()  # in every context, the validation context too
    assert (roles[(ctx == "ctx_B") & perturbed & (pert != combo)] == "val").all()
    assert (roles[(ctx == "ctx_C") & (pert == single)] == "val").all()
    assert (roles[(ctx == "ctx_C") & perturbed & ~np.isin(pert, [single, combo])] == "train").all()


def test_holdout_perturbations_toml_round_trip(sim, tmp_path):
    import tomllib

    from vcell.data.splits import holdout_perturbations

    cfg = holdout_perturbations(sim.index, 0.3, seed=1, contexts=["ctx_C"], val=0.2)
    text = cfg.to_toml()
    again = read_split_toml(_write(tmp_path, text))
    assert (again.holdout_perturbations, again.val_perturbations) == (cfg.holdout_perturbations, cfg.val_perturbations)
    assert (apply_split(sim.index, again).roles == apply_split(sim.index, cfg).roles).all()
    # cell-load reads only these four tables: they alone give the same roles; [vcell] only adds the check
    raw = tomllib.loads(text)
    assert set(raw) == {"datasets", "training", "zeroshot", "fewshot", "vcell"}
    from vcell.data.split_files import SplitConfig

    cell_load_view = SplitConfig(training=raw["training"], zeroshot=raw["zeroshot"], fewshot=raw["fewshot"])
    assert (apply_split(sim.index, cell_load_view).roles == apply_split(sim.index, cfg).roles).all()


LEAK_TOML = """
[training]
synthetic = "train"
[fewshot."synthetic.ctx_A"]
test = ["{p}"]
{vcell}
"""


def test_leak_is_refused(sim, tmp_path):
    from vcell.data.split_files import SplitConfig
    from vcell.data.splits import Split, check_no_leak, holdout_perturbations

    x = _labels(sim)[0]
    # X tested in ctx_A and trained in ctx_B: a leak only once the file declares X held out everywhere
    declared = _write(tmp_path, LEAK_TOML.format(p=x, vcell=f'[vcell]\nholdout_perturbations = ["{x}"]'))
    with pytest.raises(VcellError, match=rf"leak: perturbation '{x}' is held out .* in 'synthetic.ctx_B' are train"):
        apply_split(sim.index, read_split_toml(declared))
    plain = apply_split(sim.index, read_split_toml(_write(tmp_path, LEAK_TOML.format(p=x, vcell=""), "plain.toml")))
    assert (plain.roles[_obs(sim)[1] == x] != "test").any()  # a hand-written fewshot split, no leak
    # a Split whose roles put one held-out cell in training
    cfg = holdout_perturbations(sim.index, [x])
    roles = apply_split(sim.index, cfg).roles.copy()
    roles[np.flatnonzero(_obs(sim)[1] == x)[-1]] = "train"
    with pytest.raises(VcellError, match=rf"perturbation '{x}' .* 1 of its cells in 'synthetic.ctx_C' are train"):
        check_no_leak(sim.index, Split.from_roles(roles, cfg))
    # a held-out perturbation used for validation leaks too (model selection on it)
    val = SplitConfig(fewshot={k: {"val": [x]} for k in ("synthetic.ctx_A", "synthetic.ctx_B", "synthetic.ctx_C")},
                      holdout_perturbations=[x], source="v.toml")
    with pytest.raises(VcellError, match=rf"v.toml: leak: perturbation '{x}' .* are val"):
        apply_split(sim.index, val)
    with pytest.raises(VcellError, match=r"\[vcell\] holdout_perturbations: perturbation 'GENE9999' has no cells"):
        apply_split(sim.index, SplitConfig(holdout_perturbations=["GENE9999"]))


@pytest.mark.parametrize(
    "which, val, message",
    [
        ("GENE0O01", (), "--holdout-perturbations: unknown perturbation 'GENE0O01'; did you mean"),
        (["non-targeting"], (), "the list names only the control label 'non-targeting'"),
        ("ALL", (), "hold out all 8 perturbations"),
        (1.5, (), "--holdout-perturbations 1.5: a fraction must be between 0 and 1"),
        ("0", (), "--holdout-perturbations 0: a fraction must be between 0 and 1"),
        (" , ", (), "give a fraction in (0, 1) or comma-separated perturbation labels"),
        ("FIRST", "FIRST", "--val-perturbations: perturbation '{first}' is already held out"),
    ],
)
def test_holdout_perturbations_bad_inputs(sim, which, val, message):
    from vcell.data.splits import holdout_perturbations

    labels = _labels(sim)
    sub = {"ALL": ",".join(labels), "FIRST": labels[0]}
    which, val = sub.get(which, which) if isinstance(which, str) else which, sub.get(val, val) if isinstance(val, str) else val
    with pytest.raises(VcellError) as err:
        holdout_perturbations(sim.index, which, val=val)
    assert message.format(first=labels[0]) in str(err.value)


def test_parse_perturbations_and_vcell_table(tmp_path):
    from vcell.data.perturbation_lists import parse_perturbations

    assert parse_perturbations("0.25") == 0.25
    assert parse_perturbations(" PLK4, SGK1 ,PLK4") == ["PLK4", "SGK1"]
    assert parse_perturbations("0.5,") == ["0.5"] and parse_perturbations("A+B") == ["A+B"]
    for text, message in [('[vcell]\nholdout = ["A"]\n', "[vcell] has unknown key 'holdout'"),
                          ('[vcell]\nholdout_perturbations = "A"\n', "must be a list of perturbation names"),
                          ('[vcell]\nholdout_perturbations = ["A"]\nval_perturbations = ["A"]\n', "'A' is in both")]:
        with pytest.raises(VcellError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_split_toml(_write(tmp_path, text))


def test_perturbations_from_a_file(sim, tmp_path):
    """The challenge's list comes as a CSV with a header and a control row: the same split as the labels typed."""
    from vcell.data.perturbation_lists import parse_perturbations
    from vcell.data.splits import holdout_perturbations

    labels = _labels(sim)[:3]
    csv = tmp_path / "pert_counts.csv"
    csv.write_text("target_gene,n_cells\n" + "".join(f"{p},100\n" for p in [*labels, "non-targeting"]))
    (tmp_path / "perts.tsv").write_text("target\tn\n" + "".join(f"{p}\t1\n" for p in labels))
    (tmp_path / "perts.txt").write_text("\n".join(labels) + "\n\n")
    assert parse_perturbations(str(tmp_path / "perts.tsv")) == labels == parse_perturbations(str(tmp_path / "perts.txt"))
    from_file = holdout_perturbations(sim.index, str(csv))
    typed = holdout_perturbations(sim.index, ",".join(labels))
    assert from_file.holdout_perturbations == typed.holdout_perturbations == labels and from_file.fewshot == typed.fewshot
    (tmp_path / "empty.csv").write_text("")
    for path, message in [(tmp_path / "none.csv", "none.csv: file not found"), (tmp_path / "empty.csv", "not a readable list")]:
        with pytest.raises(VcellError, match=message):
            parse_perturbations(str(path))
    (tmp_path / "control.txt").write_text("non-targeting\n")
    with pytest.raises(VcellError, match="names only the control label 'non-targeting'"):
        holdout_perturbations(sim.index, str(tmp_path / "control.txt"))


def test_make_folds_holdout_perturbations(sim):
    from vcell.leaderboard import make_folds

    alone = make_folds(sim, None, [], 0.3, seed=2)
    assert len(alone) == 1 and alone[0].contexts == ["ctx_A", "ctx_B", "ctx_C"]
    held = alone[0].config.holdout_perturbations
    folds = make_folds(sim, None, ["all"], 0.3, seed=2)
    assert [f.contexts for f in folds] == [["ctx_A"], ["ctx_B"], ["ctx_C"]]  # each fold scores its held-out context
    ctx, pert = _obs(sim)
    for fold in folds:
        assert fold.config.holdout_perturbations == held  # drawn once, for every fold
        assert (fold.split.roles[np.isin(pert, held)] == "test").all()
    with pytest.raises(VcellError, match="--split FILE or --holdout-perturbations"):
        make_folds(sim, "x.toml", [], 0.3)


def test_split_cli_holdout_perturbations(tmp_path, capsys, cli_in_process):
    from vcell.data.splits import holdout_perturbations

    path, adata = _simulated(tmp_path)
    out = tmp_path / "perts.toml"
    proc = run_cli("data", "split", path, "--holdout-context", "ctx_A", "--holdout-perturbations", "0.5", "--seed", "4", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = load_dataset(path, DataSpec())
    cfg = read_split_toml(out)
    same = holdout_perturbations(data.index, 0.5, 4, contexts=["ctx_A"])
    assert cfg.holdout_perturbations == same.holdout_perturbations and len(same.holdout_perturbations) == 2
    assert "held out in every context: " + ", ".join(same.holdout_perturbations) in proc.stdout
    assert (apply_split(data.index, cfg).roles == apply_split(data.index, same).roles).all()
    # refusals, in process: one error line naming the value, exit 2, nothing written
    for args, culprit in [(["--holdout-perturbations", "GENE9"], "'GENE9'"), (["--holdout-perturbations", "2"], "--holdout-perturbations 2"),
                          (["--split", out, "--holdout-perturbations", "0.5"], "not both")]:
        with pytest.raises(SystemExit) as done:
            cli_in_process(["data", "split", str(path), *map(str, args), "--out", str(tmp_path / "no.toml")])
        err = capsys.readouterr().err
        assert done.value.code == 2 and culprit in err and err.count("error:") == 1 and "Traceback" not in err
        assert not (tmp_path / "no.toml").exists()


def test_holdout_config_checks_its_arguments(sim):
    """A context given as held out and validation, an unknown role, one name as a string, a
    misspelled role of a mask: one line each (they made an empty test set, a KeyError, or walked
    the string letter by letter)."""
    from vcell.data.splits import holdout_config

    with pytest.raises(VcellError, match="context 'ctx_B' is both held out \\(test\\) and a validation context"):
        holdout_config(sim.index, ["ctx_B"], val_contexts=["ctx_B"])
    with pytest.raises(VcellError, match="role 'tests'.*did you mean 'test'"):
        holdout_config(sim.index, ["ctx_B"], role="tests")
    assert holdout_config(sim.index, "ctx_B").zeroshot == holdout_config(sim.index, ["ctx_B"]).zeroshot
    split = apply_split(sim.index, holdout_config(sim.index, "ctx_B"))
    assert split.mask("test").any()
    with pytest.raises(VcellError, match="unknown role 'tst'.*did you mean 'test'"):
        split.mask("tst")


def test_load_dataset_takes_an_anndata_as_it_takes_a_file(sim, tmp_path):
    """A scverse user's object (`load_dataset(adata, spec)` was a TypeError from pathlib)."""
    data = load_dataset(sim.adata, DataSpec())
    assert data.path is None and list(data.index.datasets) == list(sim.index.datasets)
    np.testing.assert_array_equal(data.index.pert_codes, sim.index.pert_codes)
    with pytest.raises(VcellError, match="'nope' not found"):
        load_dataset(sim.adata, DataSpec(pert_col="nope"))
    with pytest.raises(VcellError, match="give its path, not an AnnData"):
        load_dataset(sim.adata, DataSpec(), backed=True)
    with pytest.raises(VcellError, match=r"give the path of an \.h5ad or an AnnData \(got int\)"):
        load_dataset(3, DataSpec())
