"""bf16 mixed precision for ST on CPU: training matches fp32 closely and is seeded; prediction's
residual stays fp32; fp16 on CPU is a one-line error."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_st_cli import TINY, _tiny_adata

from vcell.data.dataset import from_anndata
from vcell.data.splits import apply_split, holdout_config
from vcell.errors import VcellError
from vcell.nn.precision import autocast
from vcell.predictors.registry import make_model

from conftest import error_line, run_cli

OPTS = dict(config={**TINY, "encoder_layers": 2, "dropout": 0.0}, max_steps=12, set_size=16, batch_size=4,
            accelerator="cpu", lr=1e-3, checkpoint="last")

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN: CPU bf16 matmuls unavailable")


def _fit(tmp_path, name, precision):
    adata = _tiny_adata()
    data = from_anndata(adata)
    split = apply_split(data.index, holdout_config(data.index, ["ctx_B"]))
    model = make_model("st", seed=0, out_dir=tmp_path / name, precision=precision, **OPTS)
    model.fit(data, split)
    return model, adata


def _losses(run) -> list[float]:
    with open(next(run.glob("logs/*/metrics.csv"))) as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    return tmp, {p: _fit(tmp, p, p) for p in ("32", "bf16-mixed")}


def test_bf16_training_tracks_fp32_and_is_seeded(runs):
    tmp, fitted = runs
    meta = json.loads((tmp / "bf16-mixed" / "last" / "config.json").read_text())
    assert meta["precision"] == "bf16-mixed" and meta["step"] == 12
    w16 = load_file(tmp / "bf16-mixed" / "last" / "weights.safetensors")
    w32 = load_file(tmp / "32" / "last" / "weights.safetensors")
    assert all(t.dtype == torch.float32 for t in w16.values())  # master weights stay fp32
    # the same run in fp32 and bf16: close (bf16 rounding), but not the same numbers
    diffs = [float((w16[k] - w32[k]).abs().max()) for k in w32]
    assert 0 < max(diffs) < 0.05, max(diffs)
    l16, l32 = _losses(tmp / "bf16-mixed"), _losses(tmp / "32")
    assert len(l16) == len(l32) >= 1
    np.testing.assert_allclose(l16, l32, rtol=0.02)
    # same seed, same precision: the same weights
    again, _ = _fit(tmp, "again", "bf16-mixed")
    w_again = load_file(tmp / "again" / "last" / "weights.safetensors")
    assert all(torch.equal(w_again[k], w16[k]) for k in w16)


def test_bf16_prediction_close_to_fp32_and_residual_exact(runs):
    _, fitted = runs
    model, adata = fitted["32"]
    controls = adata[(adata.obs["cell_type"] == "ctx_B").to_numpy() & (adata.obs["target_gene"] == "non-targeting").to_numpy()].copy()
    perts = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})[:3]
    X32 = model.predict(controls, perts, "ctx_B", cells_per_perturbation=20, seed=1).X.toarray()
    model.precision = "bf16-mixed"
    try:
        X16 = model.predict(controls, perts, "ctx_B", cells_per_perturbation=20, seed=1).X.toarray()
    finally:
        model.precision = "32"
    diff = np.abs(X16 - X32)
    assert 0 < diff.max() < 0.05 * max(1.0, np.abs(X32).max()), diff.max()

    # with a zero decoder the prediction is the basal cells: the residual add is done in fp32,
    # so bf16 gives them back bit for bit
    net = model.model
    x = torch.from_numpy(controls.X.toarray()[None, :16].astype(np.float32))
    pert = torch.zeros(1, net.config.pert_dim)
    saved = net.decoder.weight.detach().clone(), net.decoder.bias.detach().clone()
    try:
        torch.nn.init.zeros_(net.decoder.weight), torch.nn.init.zeros_(net.decoder.bias)
        with torch.no_grad(), autocast(torch.device("cpu"), "bf16-mixed"):
            out = net(x, pert)
        assert torch.equal(out, x)
    finally:
        with torch.no_grad():
            net.decoder.weight.copy_(saved[0]), net.decoder.bias.copy_(saved[1])


def test_fp16_on_cpu_is_a_one_line_error(tmp_path):
    data = tmp_path / "tiny.h5ad"
    _tiny_adata().write_h5ad(data)
    proc = run_cli("train", "st", "--data", data, "--accelerator", "cpu", "--precision", "16-mixed", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "--precision 16-mixed needs a GPU" in error_line(proc)
    assert not (tmp_path / "run").exists()
    with pytest.raises(VcellError, match="16-mixed needs a GPU"):
        make_model("st", precision="16-mixed", accelerator="cpu")
    with pytest.raises(VcellError, match="--precision 'fp8'"):
        make_model("st", precision="fp8")


@pytest.mark.parametrize("extra", [{}, {"input_dim": 12, "gene_dim": 30, "gene_hidden": [16, 16]}, {"n_batches": 3}])
def test_converted_inference_copy_gives_autocast_numbers(extra):
    """The bf16 copy prediction runs (Linear layers converted once) computes exactly what autocast
    computes on the fp32 model; norms and embeddings stay fp32 in it."""
    from vcell.nn.transition import StateTransition, STConfig
    from vcell.predictors.st import STPredictor

    torch.manual_seed(0)
    config = STConfig(**{"input_dim": 40, "pert_dim": 5, "width": 32, "n_layers": 2, "n_heads": 2, "encoder_layers": 2, **extra})
    net = StateTransition(config).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    predictor = STPredictor(precision="bf16-mixed", accelerator="cpu")
    predictor.model = net
    half = predictor._inference_model(torch.device("cpu"))
    assert half is not net and predictor._inference_model(torch.device("cpu")) is half  # converted once
    assert half.norm.weight.dtype == torch.float32 and half.decoder.weight.dtype == torch.bfloat16
    assert next(net.parameters()).dtype == torch.float32  # the loaded model is left as it was
    x, pert = torch.rand(3, 7, config.input_dim), torch.rand(3, config.pert_dim)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    batch = torch.tensor([0, 1, 2]) if config.n_batches else None
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16-mixed"):
        want, got = net(x, pert, batch=batch, mask=mask), half(x, pert, batch=batch, mask=mask)
        assert torch.equal(got, want)
        if config.gene_dim:
            genes = torch.rand(3, 7, config.gene_dim)
            assert torch.equal(half.decode_genes(got, x, genes), net.decode_genes(want, x, genes))
