"""Gene embeddings: tables, the co-expression fallback, ESM protein embeddings and the CLI."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file

from vcell.errors import VcellError
from vcell.features import GeneEmbeddings, data_gene_embeddings, embed_fasta
from vcell.features.protein import ShardStore, _fingerprint, chunk, partial_dir, plan_batches, read_fasta, sequence_key

from conftest import MCFALINE, real_data, run_cli, run_cli_batch

ESM_ALPHABET = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
MAX_POSITIONS = 34  # a 32-residue window, so a 70-residue protein is cut into 3 chunks

MYC = "MPLNVSFTNRNYDLDYDSVQPYFYCDEEENFYQQQQQSELQPPAPSEDIWKKFELLPTPPLSPSRR"  # 66 residues
P53 = "MEEPQSDPSVEPPLSQETFSDLWKLLPENNVLSPLPSQAMDDLMLSPDDIEQWFTEDPGPDEAPRMPEA"  # 68 residues
FASTA = f"""\
>sp|P04637|P53_HUMAN Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=4
{P53[:40]}
{P53[40:]}*
>ENSP00000350283.3 pep chromosome:GRCh38:12:25205246:25250929:-1 gene_symbol:KRAS description:KRAS proto-oncogene
MTEYKLVVVGAGGVGKSALTIQLIQNHFV
>ENSP00000256078.5 pep chromosome:GRCh38:12:25205246:25250929:-1 gene_symbol:KRAS description:isoform 2
mteyklvvvgaggvgksaltiq
>MYC some free text
{MYC}
>TP53 duplicate sequence record
MKVL
"""


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory):
    """A tiny randomly initialised ESM2 model and its tokenizer, saved like a downloaded one."""
    from transformers import EsmConfig, EsmModel, EsmTokenizer

    path = tmp_path_factory.mktemp("models") / "esm2_tiny"
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(ESM_ALPHABET) + "\n")
    config = EsmConfig(
        vocab_size=len(ESM_ALPHABET), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=MAX_POSITIONS, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary",
        token_dropout=True,
    )
    torch.manual_seed(0)
    EsmModel(config, add_pooling_layer=False).save_pretrained(path)
    EsmTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "proteins.fa"
    path.write_text(FASTA)
    return path


def reference_vector(esm_dir, sequence: str) -> torch.Tensor:
    """Mean residue embedding of one sequence run alone (no padding), chunked like the model window."""
    from transformers import EsmModel, EsmTokenizer

    model = EsmModel.from_pretrained(esm_dir, add_pooling_layer=False).eval()
    tok = EsmTokenizer.from_pretrained(esm_dir)
    residue_sum, n = 0, 0
    for piece in chunk(sequence, MAX_POSITIONS - 2):
        with torch.no_grad():
            hidden = model(**tok([piece], return_tensors="pt")).last_hidden_state[0]
        residue_sum = residue_sum + hidden[1 : len(piece) + 1].sum(0)
        n += len(piece)
    return residue_sum / n


# --- tables -----------------------------------------------------------------------------------


def test_save_load_roundtrip_and_align(tmp_path):
    emb = GeneEmbeddings(names=["A", "B", "C"], vectors=torch.arange(6.0).reshape(3, 2), source="test", info={"k": 1})
    path = emb.save(tmp_path / "g.safetensors")
    back = GeneEmbeddings.load(path)
    assert back.names == ["A", "B", "C"] and back.source == "test" and back.dim == 2 and back.info == {"k": 1}
    assert torch.equal(back.vectors, emb.vectors) and back.vectors.dtype == torch.float32
    rows, missing = back.align(["C", "X", "A"])
    assert rows.tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]
    assert missing == ["X"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    with pytest.raises(VcellError, match="name the output \\*.safetensors"):
        emb.save(tmp_path / "g.pt")


def test_load_other_table_formats(tmp_path):
    vectors = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    expected = torch.from_numpy(vectors)
    save_file({"TP53": expected[0], "KRAS": expected[1]}, str(tmp_path / "plain.safetensors"))
    pd.DataFrame(vectors, columns=["d0", "d1", "d2"]).assign(gene=["TP53", "KRAS"]).to_parquet(tmp_path / "col.parquet")
    pd.DataFrame(vectors, index=pd.Index(["TP53", "KRAS"], name="symbol")).rename(columns=str).to_parquet(tmp_path / "idx.parquet")
    torch.save({"TP53": expected[0], "KRAS": expected[1]}, tmp_path / "dict.pt")
    torch.save({"names": ["TP53", "KRAS"], "vectors": expected}, tmp_path / "table.pth")
    for name in ("plain.safetensors", "col.parquet", "idx.parquet", "dict.pt", "table.pth"):
        emb = GeneEmbeddings.load(tmp_path / name)
        assert sorted(emb.names) == ["KRAS", "TP53"], name  # safetensors stores keys sorted
        rows, missing = emb.align(["TP53", "KRAS"])
        assert torch.equal(rows, expected) and not missing, name
        assert emb.source == f"table:{name}"


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("missing.safetensors", None, "not found"),
        ("junk.safetensors", lambda p: p.write_bytes(b"\x00garbage"), "unreadable safetensors"),
        ("junk.pt", lambda p: p.write_text("not a tensor"), "unreadable tensor file"),
        ("junk.parquet", lambda p: p.write_text("nope"), "unreadable parquet"),
        ("table.csv", lambda p: p.write_text("gene,a\nX,1\n"), "unknown gene table format"),
        ("ragged.pt", lambda p: torch.save({"A": torch.ones(3), "B": torch.ones(4)}, p), "different lengths"),
        ("matrix.pt", lambda p: torch.save({"A": torch.ones(2, 3)}, p), "not a 1-D vector"),
        ("rows.pt", lambda p: torch.save({"names": ["A"], "vectors": torch.ones(2, 3)}, p), "1 gene names but 2 vectors"),
        ("dups.pt", lambda p: torch.save({"names": ["A", "B", "A"], "vectors": torch.ones(3, 2)}, p), "'A' is duplicated"),
        ("dups.parquet", lambda p: pd.DataFrame({"gene": ["A", "A"], "x": [1.0, 2.0]}).to_parquet(p), "'A' is duplicated"),
        ("noname.parquet", lambda p: pd.DataFrame({"x": [1.0, 2.0]}).to_parquet(p), "no gene names"),
        ("text.parquet", lambda p: pd.DataFrame({"gene": ["A"], "x": ["a"]}).to_parquet(p), "column 'x' is not numeric"),
        ("nan.pt", lambda p: torch.save({"A": torch.tensor([1.0, float("nan")])}, p), "NaN"),
        ("pickle.pt", lambda p: torch.save({"A": object()}, p), "unreadable tensor file"),
    ],
)
def test_load_errors_are_one_line(tmp_path, name, write, message):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(VcellError, match=message) as info:
        GeneEmbeddings.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- data fallback ----------------------------------------------------------------------------


def module_data(n_cells: int = 400, seed: int = 0) -> ad.AnnData:
    """Cells whose 30 genes form three co-expressed modules, plus two constant genes; half are controls."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n_cells, 3))
    loading = np.kron(np.eye(3), np.ones((1, 10)))
    X = np.log1p(np.maximum(0.0, 3 + 2 * factors @ loading + rng.standard_normal((n_cells, 30))))
    X = np.hstack([X, np.zeros((n_cells, 1)), np.full((n_cells, 1), 1.5)]).astype(np.float32)
    labels = np.where(np.arange(n_cells) % 2 == 0, "non-targeting", "G1")
    adata = ad.AnnData(X, obs=pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(n_cells)]))
    adata.var_names = [f"m{i // 10}_{i % 10}" for i in range(30)] + ["zero", "flat"]
    return adata


def test_data_embeddings_capture_coexpression():
    adata = module_data()
    controls = (adata.obs["target_gene"] == "non-targeting").to_numpy()
    emb = data_gene_embeddings(adata, dim=8, control_mask=controls, seed=0)
    assert emb.names == list(adata.var_names) and emb.dim == 8 and emb.source == "pca:control-coexpression"
    v = emb.vectors.numpy()
    assert np.isfinite(v).all() and np.all(v[-2:] == 0)  # constant genes: zero vectors, no NaN
    unit = v[:30] / np.linalg.norm(v[:30], axis=1, keepdims=True)
    sim = unit @ unit.T
    within = np.mean([sim[i, j] for i in range(30) for j in range(30) if i // 10 == j // 10 and i != j])
    between = np.mean([sim[i, j] for i in range(30) for j in range(30) if i // 10 != j // 10])
    assert within > 0.8 and abs(between) < 0.3
    # loadings of a correlation matrix: the top-3 gene Gram matrix matches the exact eigen-decomposition
    corr = np.corrcoef(adata.X[controls][:, :30].astype(np.float64).T)
    w, u = np.linalg.eigh(corr)
    exact = u[:, -3:] * np.sqrt(w[-3:])
    np.testing.assert_allclose(v[:30, :3] @ v[:30, :3].T, exact @ exact.T, atol=2e-3)


def test_data_embeddings_sparse_matches_dense_and_uses_only_controls():
    adata = module_data()
    controls = (adata.obs["target_gene"] == "non-targeting").to_numpy()
    dense = data_gene_embeddings(adata, dim=5, control_mask=controls, seed=3)
    csr = adata.copy()
    csr.X = sp.csr_matrix(csr.X)
    sparse = data_gene_embeddings(csr, dim=5, control_mask=controls, seed=3)
    np.testing.assert_allclose(sparse.vectors.numpy(), dense.vectors.numpy(), atol=1e-3)
    scrambled = adata.copy()
    scrambled.X[~controls] = np.random.default_rng(1).permutation(scrambled.X[~controls].ravel()).reshape(-1, 32)
    assert torch.equal(data_gene_embeddings(scrambled, dim=5, control_mask=controls, seed=3).vectors, dense.vectors)
    assert not torch.allclose(data_gene_embeddings(scrambled, dim=5, seed=3).vectors, dense.vectors, atol=1e-2)


def test_data_embeddings_subsample_is_seeded_and_dim_capped():
    adata = module_data(n_cells=200)
    a = data_gene_embeddings(adata, dim=4, seed=1, max_cells=50)
    assert a.info["cells"] == 50
    assert torch.equal(a.vectors, data_gene_embeddings(adata, dim=4, seed=1, max_cells=50).vectors)
    assert not torch.equal(a.vectors, data_gene_embeddings(adata, dim=4, seed=2, max_cells=50).vectors)
    assert data_gene_embeddings(adata, dim=500).dim == 30  # 30 genes vary
    assert data_gene_embeddings(adata[:6].copy(), dim=500).dim == 5  # 6 cells: rank 5 after centring
    with pytest.raises(VcellError, match="at least 2 control cells"):
        data_gene_embeddings(adata, control_mask=np.eye(1, 200, dtype=bool)[0])


def test_data_embeddings_real_controls_near_optimal():
    """On real controls, the vectors' Gram matrix is a near-best rank-k fit of the gene correlations."""
    from vcell.data.io import read_h5ad

    adata = read_h5ad(real_data(MCFALINE))  # the fixture in tests/data keeps every control cell
    controls = (adata.obs["perturbation"] == "control").to_numpy()
    emb = data_gene_embeddings(adata, dim=32, control_mask=controls, seed=0)
    X = np.asarray(adata.X[controls].todense() if sp.issparse(adata.X) else adata.X[controls], dtype=np.float64)
    varies = X.std(0) > 0
    assert emb.info["genes_zero_variance"] == int((~varies).sum()) > 0
    assert np.all(emb.vectors.numpy()[~varies] == 0)
    corr = np.zeros((X.shape[1], X.shape[1]))
    corr[np.ix_(varies, varies)] = np.corrcoef(X[:, varies].T)
    w, u = np.linalg.eigh(corr)
    best = (u[:, -32:] * w[-32:]) @ u[:, -32:].T
    gram = emb.vectors.double().numpy() @ emb.vectors.double().numpy().T
    assert np.linalg.norm(corr - gram) < 1.02 * np.linalg.norm(corr - best)


# --- FASTA and ESM ----------------------------------------------------------------------------


def test_read_fasta_header_rules(fasta):
    records = read_fasta(fasta)
    assert [r.gene for r in records] == ["TP53", "KRAS", "KRAS", "MYC", "TP53"]
    assert records[0].sequence == P53  # joined lines, trailing stop dropped
    assert records[2].sequence == "MTEYKLVVVGAGGVGKSALTIQ"  # upper-cased
    custom = read_fasta(fasta, header_regex=r"^(\S+)")
    assert custom[1].gene == "ENSP00000350283.3"


@pytest.mark.parametrize(
    "text, regex, message",
    [
        ("", None, "empty FASTA"),
        ("MKV\n>A\nMKV\n", None, "line 1: sequence before the first '>' header"),
        (">A\nMKV\n>\nMKV\n", None, "line 3: header '>' has no gene symbol"),
        (">A GN=X\nMKV\n", r"gene:(\S+)", "line 1: header '>A GN=X' has no gene symbol under --header-regex"),
        (">A\nMKV\nMK1V\n", None, "line 3: invalid residue '1' in the sequence of gene 'A'"),
        (">A\nMK*V\n", None, "stop '\\*' inside"),
        (">A\n>B\nMKV\n", None, "line 1: record of gene 'A' has no sequence"),
        (">A\nMKV\n", r"(A)(B)?", "exactly one capture group"),
    ],
)
def test_fasta_errors(tmp_path, text, regex, message):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises(VcellError, match=message) as info:
        read_fasta(path, header_regex=regex)
    assert "\n" not in str(info.value)
    if regex is None or "capture" not in message:
        assert str(path) in str(info.value)


def test_batches_and_chunks():
    assert chunk("A" * 70, 32) == ["A" * 23, "A" * 24, "A" * 23]
    assert chunk("A" * 32, 32) == ["A" * 32]
    batches = plan_batches([10, 30, 5, 30, 8], max_tokens=64)
    assert batches == [[1, 3], [0, 4, 2]]  # (30+2)*2 = 64; then 3 x 12 = 36
    assert plan_batches([100], max_tokens=8) == [[0]]  # an oversized chunk still gets a batch of its own


def test_embed_fasta_matches_unbatched_reference(esm_dir, fasta, tmp_path):
    out = tmp_path / "genes.safetensors"
    emb = embed_fasta(fasta, esm_dir, out, max_tokens=80, progress=False)
    assert emb.names == ["TP53", "KRAS", "MYC"] and emb.dim == 16 and emb.source == "esm2_tiny"
    assert emb.info["isoforms"] == 5 and emb.info["isoforms_per_gene_max"] == 2 and emb.info["proteins_chunked"] == 2
    kras = (reference_vector(esm_dir, "MTEYKLVVVGAGGVGKSALTIQLIQNHFV") + reference_vector(esm_dir, "MTEYKLVVVGAGGVGKSALTIQ")) / 2
    tp53 = (reference_vector(esm_dir, P53) + reference_vector(esm_dir, "MKVL")) / 2
    torch.testing.assert_close(emb.vectors[1], kras, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.vectors[0], tp53, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.vectors[2], reference_vector(esm_dir, MYC), atol=1e-5, rtol=1e-5)
    back = GeneEmbeddings.load(out)
    assert back.names == emb.names and torch.equal(back.vectors, emb.vectors) and back.source == "esm2_tiny"
    assert not partial_dir(out).exists()
    # the batch size changes nothing
    again = embed_fasta(fasta, esm_dir, tmp_path / "one.safetensors", max_tokens=3, progress=False)
    torch.testing.assert_close(again.vectors, emb.vectors, atol=1e-5, rtol=1e-5)


def test_embed_fasta_resumes_from_partial_shards(esm_dir, fasta, tmp_path):
    out = tmp_path / "genes.safetensors"
    # An interrupted run left the vector of MYC's protein in OUT.partial: a rerun must reuse it.
    store = ShardStore(partial_dir(out), _fingerprint(esm_dir, "esm2_tiny", MAX_POSITIONS - 2))
    store.add([sequence_key(c) for c in chunk(MYC, MAX_POSITIONS - 2)], torch.full((3, 16), 7.0))
    store.flush()
    (partial_dir(out) / "shard-000001.safetensors").write_bytes(b"cut short")  # a shard a crash left half-written
    emb = embed_fasta(fasta, esm_dir, out, progress=False)
    assert torch.equal(emb.vectors[2], torch.full((16,), 7.0))
    assert not torch.equal(emb.vectors[0], torch.full((16,), 7.0))
    assert not partial_dir(out).exists() and out.exists()
    # shards from another model fingerprint are discarded, not mixed in
    store = ShardStore(partial_dir(out), {"model": "other"})
    store.add([sequence_key(c) for c in chunk(MYC, MAX_POSITIONS - 2)], torch.full((3, 16), 7.0))
    store.flush()
    fresh = embed_fasta(fasta, esm_dir, out, progress=False)
    torch.testing.assert_close(fresh.vectors[2], reference_vector(esm_dir, MYC), atol=1e-5, rtol=1e-5)


def test_esm_dir_errors(tmp_path, fasta):
    with pytest.raises(VcellError, match="ESM model directory not found"):
        embed_fasta(fasta, tmp_path / "nope", tmp_path / "o.safetensors", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VcellError, match=r"no config.json"):
        embed_fasta(fasta, tmp_path / "empty", tmp_path / "o.safetensors", progress=False)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VcellError, match="model_type is 'bert' in config.json, not an ESM model"):
        embed_fasta(fasta, bert, tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(VcellError, match="name the output"):
        embed_fasta(fasta, bert, tmp_path / "o.npz", progress=False)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_embed_and_errors(esm_dir, fasta, tmp_path):
    out = tmp_path / "genes.safetensors"
    bad = tmp_path / "bad.fa"
    bad.write_text(">A\nMKJ\n")
    embed = ["genes", "embed", "--esm-model", esm_dir, "--fasta"]
    res, again, res_bad = run_cli_batch([[*embed, fasta, "--out", out, "--max-tokens", "64", "--seed", "0"],  # one interpreter
                                         [*embed, fasta, "--out", out],
                                         [*embed, bad, "--out", tmp_path / "x.safetensors"]])
    assert res.returncode == 0, res.stderr
    assert "genes" in res.stdout and "esm2_tiny" in res.stdout and "1.67 mean, 2 max" in res.stdout
    emb = GeneEmbeddings.load(out)
    assert emb.names == ["TP53", "KRAS", "MYC"] and emb.dim == 16
    assert again.returncode == 2 and "already exists" in again.stderr
    assert res_bad.returncode == 2 and "Traceback" not in res_bad.stderr
    assert res_bad.stderr.strip().splitlines() == [f"error: {bad}: line 2: invalid residue 'J' in the sequence of gene 'A'; expected amino-acid letters (ACDEFGHIKLMNPQRSTVWY or XBUZO)"]


def test_cli_embed_without_transformers(tmp_path, fasta, esm_dir):
    blocker = tmp_path / "blocker" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('transformers is not installed')\n")
    res = run_cli(
        "genes", "embed", "--fasta", fasta, "--esm-model", esm_dir, "--out", tmp_path / "g.safetensors",
        env={"PYTHONPATH": str(blocker.parent)},
    )
    assert res.returncode == 2
    # (the CLI's rich markup currently eats "[esm]"; the library message has it)
    assert res.stderr.strip().startswith("error: protein embeddings need Hugging Face transformers: pip install 'vcell[esm]'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_from_data(tmp_path):
    adata = module_data()
    adata.X = sp.csr_matrix(adata.X)
    adata.uns["vcell"] = {"expression": "log1p"}
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    out = tmp_path / "genes.safetensors"
    res = run_cli("genes", "from-data", "--data", data, "--out", out, "--dim", "6", "--seed", "2")
    assert res.returncode == 0, res.stderr
    assert "pca:control-coexpression" in res.stdout and "2 (no variance" in res.stdout
    emb = GeneEmbeddings.load(out)
    controls = (adata.obs["target_gene"] == "non-targeting").to_numpy()
    torch.testing.assert_close(emb.vectors, data_gene_embeddings(adata, dim=6, control_mask=controls, seed=2).vectors)
    res = run_cli("genes", "from-data", "--data", data, "--out", tmp_path / "b.safetensors", "--control", "ctrl")
    assert res.returncode == 2 and "control label 'ctrl' not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("genes", "from-data", "--data", data, "--out", tmp_path / "b.safetensors", "--pert-col", "target_genes")
    assert res.returncode == 2 and "did you mean 'target_gene'" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_from_data_on_raw_counts_equals_preprocessing_first(tmp_path):
    """Raw counts (Kang's file is such) need no `vcell data preprocess` first: each control cell is
    normalised to --target-sum and log1p-transformed as preprocess does, and the table equals the
    one made from the preprocessed file (issue #14 names Kang's counts as the source of vectors)."""
    from vcell.data.simulate import simulate_perturbseq

    adata = simulate_perturbseq(n_genes=40, n_contexts=1, n_perturbations=3, n_combinations=0,
                                cells_per_perturbation=20, n_controls=300, n_programs=4, seed=3)
    counts = tmp_path / "counts.h5ad"
    adata.write_h5ad(counts)
    log1p, direct, via = tmp_path / "log1p.h5ad", tmp_path / "direct.safetensors", tmp_path / "via.safetensors"
    common = ["--dim", "5", "--seed", "1"]
    procs = run_cli_batch([
        ["genes", "from-data", "--data", counts, "--out", direct, *common],
        ["data", "preprocess", counts, log1p, "--context-col", "none", "--flag-hvg"],
        ["genes", "from-data", "--data", log1p, "--out", via, *common],
        ["genes", "from-data", "--data", counts, "--out", tmp_path / "bad.safetensors", "--target-sum", "0"],
    ])
    for proc in procs[:3]:
        assert proc.returncode == 0, proc.stderr
    assert "normalised to 10,000 per cell and log1p-transformed" in procs[0].stdout
    a, b = GeneEmbeddings.load(direct), GeneEmbeddings.load(via)
    assert a.names == b.names and a.info["expression"].startswith("counts") and "expression" not in b.info
    torch.testing.assert_close(a.vectors, b.vectors, atol=1e-5, rtol=1e-4)
    assert procs[3].returncode == 2 and "--target-sum must be > 0" in procs[3].stderr
    assert not (tmp_path / "bad.safetensors").exists()
