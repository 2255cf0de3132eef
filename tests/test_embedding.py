"""State Embedding model: tokenisation, masking, soft binning, training on real data, `vcell embed`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vcell.errors import VcellError
from vcell.nn.embedding import SEConfig, SoftBinning, StateEmbedding, embed_adata, normalise_expression, tokenize
from vcell.train.se import train_se

from conftest import run_cli

load_se = StateEmbedding.from_checkpoint

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "sentence_len": 66, "n_mask": 32}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _losses(run: Path) -> list[float]:
    lines = next((run / "logs").rglob("metrics.csv")).read_text().splitlines()
    col = lines[0].split(",").index("train_loss")
    return [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]


@pytest.fixture(scope="module")
def kang_small(tmp_path_factory) -> Path:
    """300 real Kang cells x their 1,500 most expressed genes, raw counts, as a file."""
    from conftest import KANG, shared_path

    adata = ad.read_h5ad(shared_path(KANG))
    genes = np.argsort(-np.asarray(adata.X.sum(0)).ravel(), kind="stable")[:1500]
    cells = np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)
    sub = adata[np.sort(cells)][:, np.sort(genes)].copy()
    del sub.layers["lognorm"]
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    sub.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained(kang_small, tmp_path_factory) -> Path:
    """A tiny SE trained by the real CLI on the Kang subset."""
    run = tmp_path_factory.mktemp("se") / "run"
    cfg = run.parent / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    res = run_cli("train", "se", "--data", kang_small, "--out", run, "--preset", "tiny", "--config", cfg,
                  "--max-steps", "8", "--batch-size", "16", "--gene-dim", "16", "--accelerator", "cpu", "--seed", "3")
    assert res.returncode == 0, res.stderr
    return run


# ------------------------------------------------------------------------------------ tokenisation


def test_tokenize_orders_top_genes_and_pads_with_unexpressed():
    values = np.zeros((2, 10), dtype=np.float32)
    values[0, [7, 2, 5, 0]] = [3.0, 1.0, 2.0, 2.0]  # ties keep column order: 0 before 5
    values[1] = np.arange(10, dtype=np.float32)  # 9 expressed genes, more than the slots
    gene_ids = np.arange(100, 110)
    tok = tokenize(values, gene_ids, n_slots=6, n_mask=0, rng=np.random.default_rng(0))
    assert tok["genes"].shape == (2, 6) and not tok["masked"].any()
    assert list(tok["genes"][0, :4]) == [107, 100, 105, 102]
    pad = tok["genes"][0, 4:]
    assert len(set(pad)) == 2 and set(pad) <= {101, 103, 104, 106, 108, 109}
    assert np.all(tok["values"][0, 4:] == 0)
    assert list(tok["genes"][1]) == [109, 108, 107, 106, 105, 104]
    np.testing.assert_array_equal(tok["values"][1], [9, 8, 7, 6, 5, 4])
    with pytest.raises(VcellError, match="1..10 gene tokens"):
        tokenize(values, gene_ids, n_slots=11, n_mask=0, rng=np.random.default_rng(0))


def test_masking_counts_and_targets():
    rng = np.random.default_rng(1)
    values = np.zeros((3, 200), dtype=np.float32)
    n_expr = [150, 20, 0]
    for i, n in enumerate(n_expr):
        values[i, rng.choice(200, n, replace=False)] = rng.uniform(0.5, 5, n)
    tok = tokenize(values, np.arange(200), n_slots=64, n_mask=40, rng=np.random.default_rng(2))
    assert tok["target_genes"].shape == tok["target_values"].shape == (3, 40)
    # hidden sentence genes: min(n_mask // 2, expressed in sentence // 2)
    assert tok["masked"].sum(1).tolist() == [20, 10, 0]
    for i in range(3):
        hidden = set(tok["genes"][i][tok["masked"][i]])
        assert hidden <= set(tok["target_genes"][i])  # every hidden gene is predicted
        assert all(values[i, g] > 0 for g in hidden)  # and only expressed genes are hidden
        np.testing.assert_array_equal(tok["target_values"][i], values[i, tok["target_genes"][i]])
        outside = set(tok["target_genes"][i]) - set(tok["genes"][i])
        assert len(outside) == 40 - len(hidden)  # the rest lie outside the sentence, no repeats
    # cell 0 has 86 expressed genes beyond the sentence: half of the remaining targets are expressed
    assert (tok["target_values"][0] > 0).sum() == 20 + 10
    assert (tok["target_values"][2] > 0).sum() == 0


def test_every_gene_in_the_sentence_hides_all_targets():
    values = np.arange(1, 9, dtype=np.float32)[None]
    tok = tokenize(values, np.arange(8), n_slots=8, n_mask=6, rng=np.random.default_rng(0))
    hidden = set(tok["genes"][0][tok["masked"][0]])
    assert set(tok["target_genes"][0]) <= hidden
    # With unexpressed genes in the sentence (a 2,000-HVG file under the default preset's 2,047
    # slots) the remaining targets are those padding genes: no more than half the expressed genes
    # hidden, and no target twice while padding genes are left (it hid 447 of 600, 148 repeats).
    rng = np.random.default_rng(3)
    values = np.zeros((4, 300), dtype=np.float32)
    for i in range(4):
        values[i, rng.choice(300, 90, replace=False)] = rng.integers(1, 6, 90)
    tok = tokenize(values, np.arange(300), n_slots=300, n_mask=128, rng=np.random.default_rng(4))
    for i in range(4):
        hidden_expressed = tok["masked"][i] & (tok["values"][i] > 0)
        assert hidden_expressed.sum() == 45  # half of the 90 expressed
        assert len(set(tok["target_genes"][i])) == 128  # 45 expressed + 83 of the 210 padding genes, no repeats
        assert set(tok["target_genes"][i]) == set(tok["genes"][i][tok["masked"][i]])  # every target hidden


def test_sentences_do_not_depend_on_the_files_column_order():
    """Ties at the cut (integer counts tie often) and the padding draw follow the vocabulary, not the
    columns: the same cells with their genes stored in another order give the same sentences."""
    rng = np.random.default_rng(5)
    values = np.zeros((6, 80), dtype=np.float32)
    for i in range(6):
        values[i, rng.choice(80, 30, replace=False)] = rng.integers(1, 4, 30)  # many ties
    ids = rng.permutation(80) + 1000
    perm = rng.permutation(80)
    for n_mask in (0, 24):
        a = tokenize(values, ids, n_slots=40, n_mask=n_mask, rng=[np.random.default_rng(i) for i in range(6)])
        b = tokenize(values[:, perm], ids[perm], n_slots=40, n_mask=n_mask, rng=[np.random.default_rng(i) for i in range(6)])
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_normalise_expression_counts_and_log1p():
    counts = np.array([[1, 0, 3], [10, 10, 0]], dtype=np.float32)
    before = counts.copy()
    v, depth = normalise_expression(counts, "counts")
    np.testing.assert_allclose(v, np.log1p(counts / counts.sum(1, keepdims=True) * 1e4), rtol=1e-6)
    np.testing.assert_allclose(depth, np.log1p([4, 20]), rtol=1e-6)
    np.testing.assert_array_equal(counts, before)
    v2, _ = normalise_expression(v, "log1p")
    np.testing.assert_array_equal(v2, v)


# ------------------------------------------------------------------------------------------ model


def test_soft_binning_shapes_and_convexity():
    torch.manual_seed(0)
    sb = SoftBinning(n_bins=7, dim=12)
    x = torch.rand(3, 5) * 6
    out = sb(x)
    assert out.shape == (3, 5, 12)
    lo, hi = sb.bins.min(0).values, sb.bins.max(0).values
    assert torch.all(out >= lo - 1e-6) and torch.all(out <= hi + 1e-6)  # a weighted average of bins
    assert not torch.allclose(out[0, 0], sb(torch.tensor([[100.0]]))[0, 0])


def test_sentence_layout_and_order_invariance():
    torch.manual_seed(0)
    cfg = SEConfig(n_genes=50, gene_dim=8, n_datasets=2, **TINY)
    model = StateEmbedding(cfg, torch.randn(50, 8)).eval()
    genes = torch.randint(0, 50, (2, 10))
    values = torch.rand(2, 10)
    h = model.sentence(genes, values)
    assert h.shape == (2, 12, 32)
    assert torch.equal(h[:, 0], model.cls.expand(2, -1)) and torch.equal(h[:, -1], model.ds.expand(2, -1))
    emb = model(genes, values)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    perm = torch.randperm(10)
    torch.testing.assert_close(model(genes[:, perm], values[:, perm]), emb)  # a set: no positions
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, 3] = True
    hm = model.sentence(genes, values, masked)
    assert torch.equal(hm[1], h[1]) and not torch.equal(hm[0, 4], h[0, 4])
    with pytest.raises(VcellError, match="d_model 30 is not divisible"):
        SEConfig(n_genes=5, gene_dim=4, d_model=30, n_heads=4)
    with pytest.raises(VcellError, match="unknown SE preset"):
        SEConfig.preset_values("huge")


# -------------------------------------------------------------------------------- training on data


def test_loss_decreases_on_real_data_and_resume_is_exact(kang_small, tmp_path):
    kw = dict(max_steps=40, batch_size=16, lr=3e-3, seed=0, gene_dim=16, accelerator="cpu", log_every=1)
    run = train_se([kang_small], tmp_path / "a", TINY, checkpoint_every=40, **kw)
    losses = _losses(run)
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    cfg = json.loads((run / "last" / "config.json").read_text())
    assert cfg["kind"] == "se" and cfg["step"] == 40 and cfg["datasets"] == ["kang_small"]
    assert cfg["expression"] == {"kang_small": "counts"} and cfg["gene_source"].startswith("pca:")
    assert not [p for p in run.rglob("*") if p.suffix in {".ckpt", ".pt", ".pth", ".pkl"}]
    # interrupted at step 20 and resumed: the same weights as the uninterrupted run
    short = {**kw, "max_steps": 20, "schedule_steps": 40}
    part = train_se([kang_small], tmp_path / "b", TINY, checkpoint_every=20, **short)
    train_se([kang_small], part, TINY, checkpoint_every=40, resume=True, **kw)
    a, b = load_file(str(run / "last" / "weights.safetensors")), load_file(str(part / "last" / "weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_several_files_are_several_dataset_classes(kang_small, tmp_path):
    other = ad.read_h5ad(kang_small)[:120, :1000].copy()  # fewer genes: sentences shrink to fit
    second = tmp_path / "second.h5ad"
    other.write_h5ad(second)
    run = train_se([kang_small, second], tmp_path / "two", {**TINY, "sentence_len": 1100}, max_steps=3, batch_size=32,
                   gene_dim=8, accelerator="cpu", checkpoint_every=3)
    model, meta = load_se(run)
    assert meta["datasets"] == ["kang_small", "second"] and model.config.n_datasets == 2
    assert model.ds_head.out_features == 2 and len(meta["genes"]) == 1500
    # the 1,000-gene file set the sentence length (1,098 in the config): cells are embedded with it
    assert meta["gene_slots"] == 1000 and model.config.gene_slots == 1098
    cells = ad.read_h5ad(kang_small)[:20].copy()
    used, _ = embed_adata(model, meta, cells, "counts")
    np.testing.assert_array_equal(used, embed_adata(model, {**meta, "gene_slots": 1000}, cells, "counts")[0])
    assert not np.allclose(used, embed_adata(model, {**meta, "gene_slots": 1098}, cells, "counts")[0], atol=1e-4)
    with pytest.raises(VcellError, match="share the name"):
        train_se([kang_small, kang_small], tmp_path / "dup", TINY, max_steps=1, accelerator="cpu")


def test_train_bf16_mixed_on_cpu(kang_small, tmp_path):
    """bf16 autocast on CPU trains SE: fp32 weights, finite losses close to an fp32 run's."""
    runs = {p: train_se([kang_small], tmp_path / p, TINY, max_steps=3, gene_dim=8, accelerator="cpu", precision=p)
            for p in ("32", "bf16-mixed")}
    _, meta = load_se(runs["bf16-mixed"])
    assert meta["precision"] == "bf16-mixed"
    w16, w32 = (load_file(runs[p] / "last" / "weights.safetensors") for p in ("bf16-mixed", "32"))
    assert all(t.dtype == torch.float32 for t in w16.values())
    diff = max(float((w16[k] - w32[k]).abs().max()) for k in w32)
    assert 0 < diff < 0.05, diff


def test_train_errors(kang_small, tmp_path):
    with pytest.raises(VcellError, match="nothing to resume"):
        train_se([kang_small], tmp_path / "none", TINY, max_steps=2, resume=True, accelerator="cpu")
    with pytest.raises(VcellError, match="--precision"):
        train_se([kang_small], tmp_path / "p", TINY, max_steps=2, precision="8", accelerator="cpu")
    run = train_se([kang_small], tmp_path / "one", TINY, max_steps=1, gene_dim=8, accelerator="cpu")
    other = tmp_path / "other.h5ad"
    other.write_bytes(kang_small.read_bytes())
    with pytest.raises(VcellError, match="was trained on kang_small; resume with the same --data files"):
        train_se([other], run, TINY, max_steps=2, resume=True, accelerator="cpu")
    # the run's own gene table resumes (it was compared with the checkpoint's normalised copy and refused)
    from vcell.features.genes import GeneEmbeddings

    names = [str(g) for g in ad.read_h5ad(kang_small, backed="r").var_names]
    table = GeneEmbeddings(names, np.random.default_rng(0).normal(size=(len(names), 8)).astype(np.float32), "table:test")
    table.save(tmp_path / "table.safetensors")
    with_table = train_se([kang_small], tmp_path / "table_run", TINY, max_steps=1, genes=tmp_path / "table.safetensors",
                          accelerator="cpu")
    train_se([kang_small], with_table, TINY, max_steps=2, resume=True, genes=tmp_path / "table.safetensors", accelerator="cpu")
    assert json.loads((with_table / "last" / "config.json").read_text())["step"] == 2
    table.vectors[0] += 1.0
    table.save(tmp_path / "other_table.safetensors")
    with pytest.raises(VcellError, match="another gene table"):
        train_se([kang_small], with_table, TINY, max_steps=3, resume=True, genes=tmp_path / "other_table.safetensors",
                 accelerator="cpu")
    # other model sizes were silently ignored (the checkpoint's kept, exit 0)
    with pytest.raises(VcellError, match=r"cannot resume: the checkpoint was trained with another model config \(d_model 32 -> 128"):
        train_se([kang_small], run, {**TINY, "d_model": 128}, max_steps=2, resume=True, accelerator="cpu")


# -------------------------------------------------------------------------------------- vcell embed


def test_embed_round_trip(trained, kang_small, tmp_path):
    before = _sha(kang_small)
    out = tmp_path / "emb.h5ad"
    res = run_cli("embed", "--model", trained, "--data", kang_small, "--out", out, "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert _sha(kang_small) == before  # the input is never modified
    got = ad.read_h5ad(out)
    emb = got.obsm["X_vcell"]
    assert emb.shape == (300, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    src = ad.read_h5ad(kang_small)
    assert (got.X != src.X).nnz == 0 and list(got.obs_names) == list(src.obs_names)
    # the same numbers from Python, whatever the batch size
    model, meta = load_se(trained)
    again, missing = embed_adata(model, meta, src, "counts", batch_size=7, seed=5)
    np.testing.assert_allclose(again, emb, atol=1e-5)
    assert missing == []
    assert not np.allclose(emb[0], emb[1])
    # a cell's embedding is its own, not its row's: a reordered subset gives the same (padding was drawn by row)
    pick = np.array([250, 3, 77, 140])
    part, _ = embed_adata(model, meta, src[pick].copy(), "counts", batch_size=7, seed=5)
    np.testing.assert_allclose(part, emb[pick], atol=1e-5)
    res = run_cli("embed", "--model", trained, "--data", kang_small, "--out", out, "--seed", "5")
    assert res.returncode == 2 and "already exists" in res.stderr


def test_embed_reports_missing_genes(trained, kang_small, tmp_path):
    src = ad.read_h5ad(kang_small)
    renamed = src.copy()
    renamed.var_names = [f"NOTAGENE{i}" if i < 100 else g for i, g in enumerate(src.var_names)]
    part = tmp_path / "renamed.h5ad"
    renamed.write_h5ad(part)
    out = tmp_path / "emb.h5ad"
    res = run_cli("embed", "--model", trained, "--data", part, "--out", out, "--key", "X_se")
    assert res.returncode == 0, res.stderr
    assert "100 of 1500 genes not in the model's vocabulary" in " ".join(res.stdout.split())
    assert "NOTAGENE0" in res.stderr  # the log names the first missing genes
    assert ad.read_h5ad(out).obsm["X_se"].shape == (300, 32)

    none = src.copy()
    none.var_names = [f"X{i}" for i in range(src.n_vars)]
    bad = tmp_path / "nogenes.h5ad"
    none.write_h5ad(bad)
    res = run_cli("embed", "--model", trained, "--data", bad, "--out", tmp_path / "x.h5ad")
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "none of its 1500 genes is in the gene vocabulary" in last
    assert "Traceback" not in res.stderr and not (tmp_path / "x.h5ad").exists()


def test_embed_rejects_a_folder_that_is_not_an_se_model(tmp_path, kang_small):
    res = run_cli("embed", "--model", tmp_path, "--data", kang_small, "--out", tmp_path / "o.h5ad")
    assert res.returncode == 2 and "not a vcell checkpoint" in res.stderr and "Traceback" not in res.stderr
